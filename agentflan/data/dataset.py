"""From conversation files to packed, loss-masked batches for the trainer (in memory).

For corpora too large to tokenize at every start, tools/prepare_data.py writes packed
shards once and `agentflan.data.loader.PreparedDataset` serves them the same way.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from agentflan.data.packing import PackedBatch, PackPlan, build_batch, plan_packs
from agentflan.data.sources import SourceReader
from agentflan.data.templates import encode_conversations
from agentflan.tokenizer import Tokenizer

ENCODE_BATCH = 512  # conversations tokenized per call (the tokenizer spreads each call over all cores)


@dataclass(frozen=True)
class EncodedCorpus:
    tokens: np.ndarray  # int32 (total_tokens,) every kept document, concatenated
    loss_mask: np.ndarray  # uint8 (total_tokens,) 1 where the token is a training target
    doc_offsets: np.ndarray  # int64 (n_docs+1,)
    n_read: int  # conversations read from the files
    n_untrained: int  # conversations left out because no token in them is trained
    reports: list[str] = field(default_factory=list)  # one line per file: counts, skips, truncation

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def n_trained_tokens(self) -> int:
        return int(self.loss_mask.sum())


def encode_files(
    paths: Sequence[str | os.PathLike],
    tokenizer: Tokenizer,
    template: str,
    format: str = "auto",
    skip_bad: bool = False,
) -> EncodedCorpus:
    """Reads and tokenizes every conversation of the files (any supported source format).

    Strict by default: a malformed record raises with its file and line or byte offset;
    with skip_bad it is skipped and counted in the file's report line.
    """
    ids: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    n_read = n_untrained = 0
    reports = []

    def flush(convs: list) -> None:
        enc = encode_conversations(convs, tokenizer, template, num_threads=0)
        doc_len = np.diff(enc.offsets)
        trained_before = np.concatenate([[0], np.cumsum(enc.loss_mask, dtype=np.int64)])
        trained = trained_before[enc.offsets[1:]] > trained_before[enc.offsets[:-1]]  # (n_convs,)
        keep = np.repeat(trained, doc_len)
        ids.append(enc.ids[keep])
        masks.append(enc.loss_mask[keep])
        lengths.append(doc_len[trained])

    for path in paths:
        reader = SourceReader(path, format, skip_bad=skip_bad)
        pending: list = []
        for conv in reader:
            n_read += 1
            pending.append(conv)
            if len(pending) == ENCODE_BATCH:
                flush(pending)
                pending = []
        if pending:
            flush(pending)
        reports.append(reader.report.summary())
    doc_len = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    n_untrained = n_read - len(doc_len)  # nothing to learn from; counted and reported by the caller
    offsets = np.zeros(len(doc_len) + 1, dtype=np.int64)
    np.cumsum(doc_len, out=offsets[1:])
    tokens = np.concatenate(ids).astype(np.int32, copy=False) if ids else np.zeros(0, np.int32)
    mask = np.concatenate(masks).astype(np.uint8, copy=False) if masks else np.zeros(0, np.uint8)
    return EncodedCorpus(tokens, mask, offsets, n_read, n_untrained, reports)


class PackedDataset:
    """Packs an encoded corpus once, then serves disjoint per-rank batches, shuffled per epoch."""

    def __init__(self, corpus: EncodedCorpus, pack_len: int, overlong: str = "split") -> None:
        self.corpus = corpus
        self.plan: PackPlan = plan_packs(np.diff(corpus.doc_offsets), pack_len, overlong)

    @property
    def n_packs(self) -> int:
        return self.plan.n_packs

    def summary(self) -> str:
        c = self.corpus
        return (
            f"{c.n_read} conversations read, {c.n_docs} kept, {c.n_untrained} left out (no trained tokens); "
            f"{len(c.tokens):,} tokens, {c.n_trained_tokens:,} trained; {self.plan.stats.summary()}"
        )

    @property
    def packing_efficiency(self) -> float:
        return self.plan.stats.efficiency

    def steps_per_epoch(self, packs_per_step: int) -> int:
        """Steps that see every pack at most once; the tail that cannot fill a step is left for the next epoch's shuffle."""
        return self.n_packs // packs_per_step

    def batches(
        self, packs_per_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0, start_batch: int = 0
    ) -> Iterator[PackedBatch]:
        """An endless stream of this rank's batches of `packs_per_batch` packs (see `pack_schedule`)."""
        for packs in pack_schedule(self.n_packs, packs_per_batch, rank, world_size, seed, start_batch):
            yield build_batch(self.plan, packs, self.corpus.tokens, self.corpus.doc_offsets, self.corpus.loss_mask)


def pack_schedule(
    n_packs: int, packs_per_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0, start_batch: int = 0
) -> Iterator[np.ndarray]:
    """This rank's pack indices for global batches start_batch, start_batch+1, ... (endless).

    Global batch b takes packs [b*G, (b+1)*G) of its epoch's seeded permutation (G =
    packs_per_batch * world_size; the tail that cannot fill a global batch waits for the
    next epoch's shuffle); rank r takes its contiguous slice, so ranks never share a pack.
    The schedule is a pure function of its arguments, so resuming at batch k replays nothing.
    """
    if packs_per_batch < 1 or world_size < 1 or not 0 <= rank < world_size or start_batch < 0:
        raise ValueError(
            f"need packs_per_batch >= 1, world_size >= 1, 0 <= rank < world_size and start_batch >= 0; "
            f"got {packs_per_batch}, {world_size}, {rank}, {start_batch}"
        )
    global_packs = packs_per_batch * world_size
    per_epoch = n_packs // global_packs
    if per_epoch == 0:
        raise ValueError(
            f"{n_packs} packs cannot fill one global batch of {global_packs} packs "
            f"({packs_per_batch} per rank x {world_size} ranks): lower the batch size or pack length"
        )
    epoch, first = divmod(start_batch, per_epoch)
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(n_packs)  # drawn once per epoch
        for index in range(first, per_epoch):
            start = index * global_packs + rank * packs_per_batch
            yield order[start : start + packs_per_batch]
        epoch, first = epoch + 1, 0
