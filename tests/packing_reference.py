"""Pure-Python reference of the packing extension, for tests and benchmarks.

Same algorithm and output as agentflan._C (first-fit decreasing with a max-tree
over pack room, deterministic tie-break), written with plain lists and loops so
it can be read against the spec line by line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

IGNORE_INDEX = -100


@dataclass
class ReferencePlan:
    capacity: int
    doc_index: list[int] = field(default_factory=list)  # (n_pieces,)
    doc_start: list[int] = field(default_factory=list)  # (n_pieces,)
    piece_len: list[int] = field(default_factory=list)  # (n_pieces,)
    pack_offsets: list[int] = field(default_factory=lambda: [0])  # (n_packs+1,)
    n_empty: int = 0
    n_split: int = 0
    n_truncated: int = 0
    tokens_dropped: int = 0
    real_tokens: int = 0


def make_items(
    lengths: Sequence[int], capacity: int, overlong: str, plan: ReferencePlan
) -> list[tuple[int, int, int]]:
    """(length, doc, start) per piece, in document then chunk order."""
    if capacity <= 0:
        raise ValueError(f"capacity must be positive, got {capacity}")
    if overlong not in ("split", "truncate", "error"):
        raise ValueError(f"unknown overlong policy {overlong!r}")
    items = []
    for doc, length in enumerate(lengths):
        length = int(length)
        if length < 0:
            raise ValueError(f"lengths[{doc}] is {length}; document lengths must be >= 0")
        if length == 0:
            plan.n_empty += 1
        elif length <= capacity:
            items.append((length, doc, 0))
        elif overlong == "truncate":
            items.append((capacity, doc, 0))
            plan.n_truncated += 1
            plan.tokens_dropped += length - capacity
        elif overlong == "split":
            for start in range(0, length, capacity):
                items.append((min(capacity, length - start), doc, start))
            plan.n_split += 1
        else:
            raise ValueError(
                f"document {doc} has {length} tokens, more than the pack capacity {capacity}"
            )
    return items


def plan_packs_reference(
    lengths: Sequence[int], capacity: int, overlong: str = "split"
) -> ReferencePlan:
    plan = ReferencePlan(capacity=capacity)
    items = make_items(lengths, capacity, overlong, plan)
    items.sort(key=lambda item: (-item[0], item[1], item[2]))

    # room[leaves + p] is the room left in pack p; inner node i holds the max of
    # its children. Unopened packs have full room, so the leftmost leaf that fits
    # is the first open pack with room, or else the next new pack.
    leaves = 1
    while leaves < len(items):
        leaves *= 2
    room = [capacity] * (2 * leaves)
    packs: list[list[tuple[int, int, int]]] = []
    for item in items:
        need = item[0]
        node = 1
        while node < leaves:
            node = 2 * node if room[2 * node] >= need else 2 * node + 1
        pack = node - leaves
        if pack == len(packs):
            packs.append([])
        packs[pack].append(item)
        room[node] -= need
        node //= 2
        while node >= 1:
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2

    for pieces in packs:
        for length, doc, start in pieces:
            plan.doc_index.append(doc)
            plan.doc_start.append(start)
            plan.piece_len.append(length)
            plan.real_tokens += length
        plan.pack_offsets.append(len(plan.doc_index))
    return plan


def build_batch_reference(
    doc_index: Sequence[int],
    doc_start: Sequence[int],
    piece_len: Sequence[int],
    pack_offsets: Sequence[int],
    pack_indices: Sequence[int],
    tokens: Sequence[int],
    doc_offsets: Sequence[int],
    loss_mask: Sequence[int],
) -> dict[str, list[int] | int]:
    """The batch of packs `pack_indices`, built piece by piece with plain lists."""
    out: dict[str, list[int] | int] = {
        "input_ids": [],
        "labels": [],
        "loss_mask": [],
        "cu_seqlens": [0],
        "position_ids": [],
        "max_seqlen": 0,
    }
    for pack in pack_indices:
        for k in range(pack_offsets[pack], pack_offsets[pack + 1]):
            first = doc_offsets[doc_index[k]] + doc_start[k]
            length = piece_len[k]
            for i in range(length):
                src = first + i
                out["input_ids"].append(int(tokens[src]))
                out["loss_mask"].append(int(loss_mask[src]))
                out["position_ids"].append(i)
                if i + 1 < length and loss_mask[src + 1] == 1:
                    out["labels"].append(int(tokens[src + 1]))
                else:
                    out["labels"].append(IGNORE_INDEX)
            out["cu_seqlens"].append(out["cu_seqlens"][-1] + length)
            out["max_seqlen"] = max(out["max_seqlen"], length)
    return out
