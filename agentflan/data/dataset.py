"""From Agent-FLAN JSONL files to packed, loss-masked batches for the trainer."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from agentflan.data.conversation import read_agentflan_jsonl
from agentflan.data.packing import PackedBatch, PackPlan, build_batch, plan_packs
from agentflan.data.templates import encode_conversation
from agentflan.tokenizer import Tokenizer


@dataclass(frozen=True)
class EncodedCorpus:
    tokens: np.ndarray  # int32 (total_tokens,) every kept document, concatenated
    loss_mask: np.ndarray  # uint8 (total_tokens,) 1 where the token is a training target
    doc_offsets: np.ndarray  # int64 (n_docs+1,)
    n_read: int  # conversations read from the files
    n_untrained: int  # conversations left out because no token in them is trained

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def n_trained_tokens(self) -> int:
        return int(self.loss_mask.sum())


def encode_jsonl(paths: Sequence[str | os.PathLike], tokenizer: Tokenizer, template: str) -> EncodedCorpus:
    """Reads and tokenizes every conversation; malformed lines raise with file and line."""
    chunks: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    n_read = n_untrained = 0
    for path in paths:
        for conv in read_agentflan_jsonl(path):
            n_read += 1
            enc = encode_conversation(conv, tokenizer, template)
            if not enc.loss_mask.any():
                n_untrained += 1  # nothing to learn from; counted and reported by the caller
                continue
            chunks.append(enc.ids)
            masks.append(enc.loss_mask)
    lengths = np.fromiter((len(c) for c in chunks), dtype=np.int64, count=len(chunks))
    offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate(chunks).astype(np.int32) if chunks else np.zeros(0, np.int32)
    mask = np.concatenate(masks).astype(np.uint8) if masks else np.zeros(0, np.uint8)
    return EncodedCorpus(tokens, mask, offsets, n_read, n_untrained)


class PackedDataset:
    """Packs an encoded corpus once, then serves disjoint per-rank batches, shuffled per epoch."""

    def __init__(self, corpus: EncodedCorpus, pack_len: int, overlong: str = "split") -> None:
        self.corpus = corpus
        self.plan: PackPlan = plan_packs(np.diff(corpus.doc_offsets), pack_len, overlong)

    @property
    def n_packs(self) -> int:
        return self.plan.n_packs

    def steps_per_epoch(self, packs_per_step: int) -> int:
        """Steps that see every pack at most once; the tail that cannot fill a step is left for the next epoch's shuffle."""
        return self.n_packs // packs_per_step

    def batches(
        self, packs_per_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0, start_batch: int = 0
    ) -> Iterator[PackedBatch]:
        """An endless stream of this rank's batches of `packs_per_batch` packs.

        Global batch b takes packs [b*G, (b+1)*G) of the epoch's permutation (G = packs_per_batch
        * world_size); rank r takes its contiguous slice of that, so ranks never share a pack.
        """
        global_packs = packs_per_batch * world_size
        per_epoch = self.n_packs // global_packs
        if per_epoch == 0:
            raise ValueError(
                f"{self.n_packs} packs cannot fill one global batch of {global_packs} packs "
                f"({packs_per_batch} per rank x {world_size} ranks): lower the batch size or pack length"
            )
        batch = start_batch
        while True:
            epoch, index = divmod(batch, per_epoch)
            order = np.random.default_rng([seed, epoch]).permutation(self.n_packs)
            start = index * global_packs + rank * packs_per_batch
            yield build_batch(
                self.plan, order[start : start + packs_per_batch],
                self.corpus.tokens, self.corpus.doc_offsets, self.corpus.loss_mask,
            )
            batch += 1
