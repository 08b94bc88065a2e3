"""Sequence packing: documents into fixed-capacity packs, packs into varlen batches.

`plan_packs` decides once, from document lengths alone, which piece of which
document goes into which pack (first-fit decreasing, deterministic).
`build_batch` then gathers any selection of packs from the flat token corpus
into one varlen sequence with `cu_seqlens`, so attention never crosses a
document boundary. The work happens in the C++ extension `agentflan._C`;
this module validates and converts inputs and wraps the results.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from agentflan import _C
from agentflan.data.defaults import DEFAULT_OVERLONG

OVERLONG_POLICIES = ("split", "truncate", "error")

IGNORE_INDEX = -100  # label of tokens that are not trained


@dataclass(frozen=True)
class PackStats:
    """Counters of one packing plan; nothing is dropped without being counted here."""

    n_docs: int  # documents given, empty ones included
    n_packs: int
    n_pieces: int
    n_split: int  # documents longer than capacity that were split into chunks
    n_truncated: int  # documents cut to capacity (policy "truncate")
    tokens_dropped: int  # tokens removed by truncation
    real_tokens: int  # tokens placed into packs
    capacity: int
    n_empty: int = 0  # zero-length documents, skipped

    @property
    def efficiency(self) -> float:
        """Fraction of pack slots holding real tokens."""
        slots = self.n_packs * self.capacity
        return self.real_tokens / slots if slots else 0.0

    def summary(self) -> str:
        line = (
            f"{self.n_docs} docs -> {self.n_packs} packs of {self.capacity}, "
            f"efficiency {100.0 * self.efficiency:.1f}%, {self.n_split} split, "
            f"{self.n_truncated} truncated ({self.tokens_dropped} tokens dropped)"
        )
        if self.n_empty:
            line += f", {self.n_empty} empty skipped"
        return line


@dataclass(frozen=True)
class PackPlan:
    """Which tokens of which document form each piece, and which pieces form each pack."""

    capacity: int
    doc_index: np.ndarray  # int64 (n_pieces,) source document of each piece
    doc_start: np.ndarray  # int64 (n_pieces,) offset of the piece inside its document
    piece_len: np.ndarray  # int64 (n_pieces,)
    pack_offsets: np.ndarray  # int64 (n_packs+1,) pack p holds pieces [pack_offsets[p], pack_offsets[p+1])
    stats: PackStats

    @property
    def n_packs(self) -> int:
        return len(self.pack_offsets) - 1


@dataclass(frozen=True)
class PackedBatch:
    """Selected packs concatenated into one varlen sequence; every piece is its own document."""

    input_ids: np.ndarray  # int32 (total_tokens,)
    labels: np.ndarray  # int64 (total_tokens,) next token of the piece if it is a target, else -100
    loss_mask: np.ndarray  # uint8 (total_tokens,) source mask of each input token
    cu_seqlens: np.ndarray  # int32 (n_pieces+1,) piece boundaries, 0 .. total_tokens
    position_ids: np.ndarray  # int32 (total_tokens,) restart at 0 in every piece
    max_seqlen: int


class OverlongDocumentError(ValueError):
    """Documents longer than a pack under ``overlong="error"``.

    ``doc`` is the first such document (an index into the lengths given to ``plan_packs``),
    ``length`` its tokens, ``n_overlong`` how many documents are too long. The message
    starts with ``place``: where the document came from (see ``agentflan.data.conversation.place``)
    when the caller knows it, else "document <doc>"; ``at(place)`` gives the same error
    with the place filled in.
    """

    def __init__(self, doc: int, length: int, capacity: int, n_overlong: int = 1, place: str | None = None) -> None:
        self.doc, self.length, self.capacity, self.n_overlong = doc, length, capacity, n_overlong
        self.place = place if place is not None else f"document {doc}"
        what = "the conversation" if place is not None else "the document"
        more = f"; {n_overlong - 1} more document(s) are longer too" if n_overlong > 1 else ""
        super().__init__(f"{self.place}: {what} is {length} tokens, longer than pack_len {capacity} "
                         f"(overlong: error; use split or truncate){more}")

    def at(self, place: str) -> OverlongDocumentError:
        return OverlongDocumentError(self.doc, self.length, self.capacity, self.n_overlong, place)


def _index_array(values: np.ndarray | Sequence[int], name: str) -> np.ndarray:
    """1-D int64 copy-free where possible; rejects non-integer input rather than rounding it."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)  # np.asarray([]) is float64
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name} must hold integers, got dtype {array.dtype}")
    if array.dtype == np.uint64 and array.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} has values beyond int64")
    return np.ascontiguousarray(array, dtype=np.int64)


def _readonly(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def plan_packs(
    lengths: np.ndarray | Sequence[int], capacity: int, overlong: str = DEFAULT_OVERLONG
) -> PackPlan:
    """First-fit-decreasing packing of documents with `lengths` into packs of `capacity` tokens.

    Items are sorted by length descending (ties: document, then chunk, ascending) and each
    goes to the lowest-index pack with room. Empty documents are skipped; documents longer
    than `capacity` are split into chunks, truncated, or rejected according to `overlong`
    (``OverlongDocumentError`` naming the first one and counting them all).
    """
    if isinstance(capacity, bool):
        raise TypeError("capacity must be an int, got bool")
    capacity = operator.index(capacity)
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
    lengths = _index_array(lengths, "lengths")
    if overlong == "error" and capacity > 0:
        too_long = np.flatnonzero(lengths > capacity)
        if len(too_long):
            first = int(too_long[0])
            raise OverlongDocumentError(first, int(lengths[first]), capacity, len(too_long))
    doc_index, doc_start, piece_len, pack_offsets, counts = _C.plan_packs(
        lengths, capacity, overlong
    )
    stats = PackStats(
        n_docs=len(lengths),
        n_packs=len(pack_offsets) - 1,
        n_pieces=len(piece_len),
        n_split=counts["n_split"],
        n_truncated=counts["n_truncated"],
        tokens_dropped=counts["tokens_dropped"],
        real_tokens=counts["real_tokens"],
        capacity=capacity,
        n_empty=counts["n_empty"],
    )
    return PackPlan(
        capacity=capacity,
        doc_index=_readonly(doc_index),
        doc_start=_readonly(doc_start),
        piece_len=_readonly(piece_len),
        pack_offsets=_readonly(pack_offsets),
        stats=stats,
    )


def _corpus_array(array: np.ndarray, name: str, dtype: type) -> np.ndarray:
    """The corpus is passed without copying; a wrong dtype is an error, not a per-batch copy."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(array).__name__}")
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.dtype != dtype:
        raise TypeError(
            f"{name} must have dtype {np.dtype(dtype)}, got {array.dtype}; "
            f"convert the corpus once with .astype(np.{np.dtype(dtype)})"
        )
    return np.ascontiguousarray(array)


def build_batch(
    plan: PackPlan,
    pack_indices: Sequence[int],
    tokens: np.ndarray,
    doc_offsets: np.ndarray,
    loss_mask: np.ndarray,
    num_threads: int = 0,
) -> PackedBatch:
    """Concatenate packs `pack_indices` of `plan` (in that order) into one varlen batch.

    `tokens` is the int32 corpus, document d being tokens[doc_offsets[d]:doc_offsets[d+1]];
    `loss_mask` (uint8 or bool, 0/1) marks training targets. `num_threads`: 0 = all cores.
    """
    if isinstance(loss_mask, np.ndarray) and loss_mask.dtype == np.bool_:
        loss_mask = loss_mask.view(np.uint8)
    tokens = _corpus_array(tokens, "tokens", np.int32)
    loss_mask = _corpus_array(loss_mask, "loss_mask", np.uint8)
    doc_offsets = _index_array(doc_offsets, "doc_offsets")
    pack_indices = _index_array(pack_indices, "pack_indices")
    num_threads = operator.index(num_threads)
    if len(doc_offsets) != plan.stats.n_docs + 1:
        raise ValueError(
            f"doc_offsets describes {len(doc_offsets) - 1} documents but the plan was made "
            f"for {plan.stats.n_docs}"
        )
    input_ids, labels, mask, cu_seqlens, position_ids, max_seqlen = _C.build_batch(
        plan.doc_index,
        plan.doc_start,
        plan.piece_len,
        plan.pack_offsets,
        pack_indices,
        tokens,
        doc_offsets,
        loss_mask,
        num_threads,
    )
    return PackedBatch(
        input_ids=input_ids,
        labels=labels,
        loss_mask=mask,
        cu_seqlens=cu_seqlens,
        position_ids=position_ids,
        max_seqlen=max_seqlen,
    )
