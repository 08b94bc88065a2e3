"""From conversation files to packed, loss-masked batches for the trainer (in memory).

For corpora too large to tokenize at every start, tools/prepare_data.py writes packed
shards once and `agentflan.data.loader.PreparedDataset` serves them the same way.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from agentflan.data.conversation import Conversation, place
from agentflan.data.defaults import DEFAULT_OVERLONG
from agentflan.data.packing import OverlongDocumentError, PackedBatch, PackPlan, build_batch, plan_packs
from agentflan.data.sources import SourceReader
from agentflan.data.templates import encode_conversations
from agentflan.tokenizer import Tokenizer

ENCODE_BATCH = 512  # conversations tokenized per call (the tokenizer spreads each call over all cores)


@dataclass(frozen=True)
class EncodedCorpus:
    """Every kept document's tokens and loss mask, and where each document came from.

    Provenance costs 20 bytes a document (three arrays, no per-document objects):
    ``doc_file[d]`` indexes ``files``, ``doc_line[d]`` is the 1-based line where its record
    starts and ``doc_offset[d]`` the record's byte offset in a JSON array file (-1 in a
    JSONL file, where the line alone names it). ``where(d)`` formats them as data errors do.
    """

    tokens: np.ndarray  # int32 (total_tokens,) every kept document, concatenated
    loss_mask: np.ndarray  # uint8 (total_tokens,) 1 where the token is a training target
    doc_offsets: np.ndarray  # int64 (n_docs+1,)
    files: tuple[str, ...]  # the files read, as given
    doc_file: np.ndarray  # int32 (n_docs,) index into files
    doc_line: np.ndarray  # int64 (n_docs,) 1-based line of the record's start
    doc_offset: np.ndarray  # int64 (n_docs,) byte offset of the record in a JSON array file, -1 in JSONL
    n_read: int  # conversations read from the files
    n_untrained: int  # conversations left out because no token in them is trained
    reports: list[str] = field(default_factory=list)  # one line per file: counts, skips, truncation

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def n_trained_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def where(self, doc: int) -> str:
        """Document ``doc``'s source: ``path:line`` (JSONL) or ``path: byte N (line L)`` (JSON array)."""
        offset = int(self.doc_offset[doc])
        return place(self.files[int(self.doc_file[doc])], int(self.doc_line[doc]), offset if offset >= 0 else None)


def encode_files(
    paths: Sequence[str | os.PathLike],
    tokenizer: Tokenizer,
    template: str,
    format: str = "auto",
    skip_bad: bool = False,
    max_doc_tokens: int | None = None,
) -> EncodedCorpus:
    """Reads and tokenizes every conversation of the files (any supported source format).

    Strict by default: a malformed record raises ``DataFormatError`` with its file and line
    or byte offset; with skip_bad it is skipped and counted in the file's report line.
    ``max_doc_tokens`` (the pack length, under ``overlong="error"``): the first kept
    document longer than this raises ``OverlongDocumentError`` naming its file and line as
    soon as its batch is tokenized, before the rest of the data is read.
    """
    ids: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    doc_files: list[np.ndarray] = []
    doc_lines: list[np.ndarray] = []
    doc_offsets: list[np.ndarray] = []
    n_read = 0
    reports = []
    files = tuple(os.fspath(p) for p in paths)

    def flush(convs: list[Conversation], file_index: int) -> None:
        enc = encode_conversations(convs, tokenizer, template, num_threads=0)
        doc_len = np.diff(enc.offsets)
        trained_before = np.concatenate([[0], np.cumsum(enc.loss_mask, dtype=np.int64)])
        trained = trained_before[enc.offsets[1:]] > trained_before[enc.offsets[:-1]]  # (n_convs,)
        if max_doc_tokens is not None:
            too_long = np.flatnonzero(trained & (doc_len > max_doc_tokens))
            if len(too_long):
                conv = convs[int(too_long[0])]
                raise OverlongDocumentError(sum(map(len, lengths)) + int(trained[: too_long[0]].sum()),
                                            int(doc_len[too_long[0]]), max_doc_tokens,
                                            place=place(conv.source, conv.line, conv.offset))
        keep = np.repeat(trained, doc_len)
        ids.append(enc.ids[keep])
        masks.append(enc.loss_mask[keep])
        lengths.append(doc_len[trained])
        kept = [conv for conv, t in zip(convs, trained.tolist()) if t]
        doc_files.append(np.full(len(kept), file_index, dtype=np.int32))
        doc_lines.append(np.fromiter((c.line for c in kept), dtype=np.int64, count=len(kept)))
        doc_offsets.append(np.fromiter((-1 if c.offset is None else c.offset for c in kept), dtype=np.int64,
                                       count=len(kept)))

    for file_index, path in enumerate(paths):
        reader = SourceReader(path, format, skip_bad=skip_bad)
        pending: list[Conversation] = []
        for conv in reader:
            n_read += 1
            pending.append(conv)
            if len(pending) == ENCODE_BATCH:
                flush(pending, file_index)
                pending = []
        if pending:
            flush(pending, file_index)
        reports.append(reader.report.summary())

    def cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
        return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)

    doc_len = cat(lengths, np.int64)
    n_untrained = n_read - len(doc_len)  # nothing to learn from; counted and reported by the caller
    offsets = np.zeros(len(doc_len) + 1, dtype=np.int64)
    np.cumsum(doc_len, out=offsets[1:])
    return EncodedCorpus(cat(ids, np.int32), cat(masks, np.uint8), offsets, files, cat(doc_files, np.int32),
                         cat(doc_lines, np.int64), cat(doc_offsets, np.int64), n_read, n_untrained, reports)


class PackedDataset:
    """Packs an encoded corpus once, then serves disjoint per-rank batches, shuffled per epoch."""

    def __init__(self, corpus: EncodedCorpus, pack_len: int, overlong: str = DEFAULT_OVERLONG) -> None:
        """Raises ``OverlongDocumentError`` naming the first overlong document's file and line
        (and counting the others) under ``overlong="error"``."""
        self.corpus = corpus
        try:
            self.plan: PackPlan = plan_packs(np.diff(corpus.doc_offsets), pack_len, overlong)
        except OverlongDocumentError as err:
            raise err.at(corpus.where(err.doc)) from None

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
