"""Tests of the packing extension against the pure-Python reference and independent checks.

Inputs are random and fresh on every run. Each test prints its seed, and every
assertion message carries it; set AGENTFLAN_TEST_SEED=<seed> to replay a failure.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from packing_reference import build_batch_reference, plan_packs_reference  # noqa: E402

from agentflan import _C  # noqa: E402
from agentflan.data.packing import (  # noqa: E402
    IGNORE_INDEX,
    OVERLONG_POLICIES,
    OverlongDocumentError,
    PackPlan,
    build_batch,
    plan_packs,
)

CAPACITIES = (1, 2, 3, 7, 16, 64, 100, 2048)


@pytest.fixture
def seeded():
    """(rng, seed) with a fresh seed unless AGENTFLAN_TEST_SEED pins one."""
    pinned = os.environ.get("AGENTFLAN_TEST_SEED")
    seed = int(pinned) if pinned else int(np.random.SeedSequence().entropy)
    print(f"AGENTFLAN_TEST_SEED={seed}")
    return np.random.default_rng(seed), seed


def random_lengths(rng: np.random.Generator, capacity: int, n: int) -> np.ndarray:
    """A mix of the edge cases (0, 1, capacity +- 1, multiples of it) and ordinary lengths."""
    edges = np.array([0, 1, capacity - 1, capacity, capacity + 1, 2 * capacity, 3 * capacity])
    edges = edges[edges >= 0]
    kind = rng.integers(0, 4, size=n)
    return np.where(
        kind == 0,
        rng.choice(edges, size=n),
        np.where(
            kind == 1,
            rng.integers(1, capacity + 1, size=n),
            np.where(kind == 2, rng.integers(1, 4 * capacity + 2, size=n), rng.integers(0, 3, size=n)),
        ),
    ).astype(np.int64)


def random_case(rng: np.random.Generator) -> tuple[np.ndarray, int]:
    capacity = int(rng.choice(CAPACITIES))
    n = int(rng.choice([0, 1, 2, int(rng.integers(3, 40)), int(rng.integers(40, 300))]))
    return random_lengths(rng, capacity, n), capacity


def assert_plan_matches_reference(plan: PackPlan, lengths, capacity: int, overlong: str, msg: str):
    ref = plan_packs_reference(lengths.tolist(), capacity, overlong)
    for name in ("doc_index", "doc_start", "piece_len", "pack_offsets"):
        got = getattr(plan, name)
        assert got.dtype == np.int64, f"{name} dtype {got.dtype}; {msg}"
        want = np.array(getattr(ref, name), dtype=np.int64)
        np.testing.assert_array_equal(got, want, err_msg=f"{name}; {msg}")
    s = plan.stats
    expected = (len(lengths), len(ref.pack_offsets) - 1, len(ref.piece_len), ref.n_split, ref.n_truncated,
                ref.tokens_dropped, ref.real_tokens, capacity, ref.n_empty)
    got = (s.n_docs, s.n_packs, s.n_pieces, s.n_split, s.n_truncated, s.tokens_dropped, s.real_tokens,
           s.capacity, s.n_empty)
    assert got == expected, f"stats {s} != reference {expected}; {msg}"


def test_plan_matches_reference_on_random_cases(seeded):
    rng, seed = seeded
    for case in range(1500):
        lengths, capacity = random_case(rng)
        overlong = OVERLONG_POLICIES[case % 3]
        msg = f"seed={seed} case={case} capacity={capacity} overlong={overlong} lengths={lengths.tolist()}"
        overlong_docs = np.flatnonzero(lengths > capacity)
        if overlong == "error" and overlong_docs.size:
            d = int(overlong_docs[0])
            with pytest.raises(OverlongDocumentError) as err:
                plan_packs(lengths, capacity, overlong)
            e = err.value
            assert (e.doc, e.length, e.capacity, e.n_overlong) == (d, lengths[d], capacity, overlong_docs.size), msg
            assert str(e).startswith(f"document {d}: the document is {lengths[d]} tokens, longer than pack_len "
                                     f"{capacity}"), f"error message {str(e)!r} does not name document {d}; {msg}"
            with pytest.raises(ValueError):
                plan_packs_reference(lengths.tolist(), capacity, overlong)
            continue
        plan = plan_packs(lengths, capacity, overlong)
        assert_plan_matches_reference(plan, lengths, capacity, overlong, msg)


def test_plan_matches_reference_on_chat_like_corpus(seeded):
    rng, seed = seeded
    lengths = np.maximum(rng.lognormal(6.0, 1.0, size=4000).astype(np.int64), 1)
    lengths[rng.integers(0, len(lengths), size=40)] = 0
    for capacity in (2048, 4096):
        for overlong in ("split", "truncate"):
            plan = plan_packs(lengths, capacity, overlong)
            msg = f"seed={seed} capacity={capacity}"
            assert_plan_matches_reference(plan, lengths, capacity, overlong, msg)


def naive_first_fit(lengths, capacity: int, overlong: str) -> list[list[tuple[int, int, int]]]:
    """Spec oracle written without the max-tree: scan every pack for the first with room."""
    items = []
    for doc, length in enumerate(lengths):
        if length > capacity and overlong == "truncate":
            items.append((capacity, doc, 0))
        else:
            items += [(min(capacity, length - s), doc, s) for s in range(0, length, capacity)]
    items.sort(key=lambda item: (-item[0], item[1], item[2]))
    packs: list[list[tuple[int, int, int]]] = []
    room: list[int] = []
    for item in items:
        fits = [p for p, r in enumerate(room) if r >= item[0]]
        if fits:
            p = fits[0]
        else:
            p = len(packs)
            packs.append([])
            room.append(capacity)
        packs[p].append(item)
        room[p] -= item[0]
    return packs


def plan_as_packs(plan: PackPlan) -> list[list[tuple[int, int, int]]]:
    return [
        [(int(plan.piece_len[k]), int(plan.doc_index[k]), int(plan.doc_start[k])) for k in range(a, b)]
        for a, b in zip(plan.pack_offsets[:-1], plan.pack_offsets[1:])
    ]


def test_plan_is_first_fit_decreasing(seeded):
    rng, seed = seeded
    for case in range(400):
        lengths, capacity = random_case(rng)
        overlong = ("split", "truncate")[case % 2]
        plan = plan_packs(lengths, capacity, overlong)
        assert plan_as_packs(plan) == naive_first_fit(lengths.tolist(), capacity, overlong), (
            f"seed={seed} case={case} capacity={capacity} overlong={overlong} lengths={lengths.tolist()}"
        )


def test_plan_invariants(seeded):
    rng, seed = seeded
    for case in range(500):
        lengths, capacity = random_case(rng)
        overlong = ("split", "truncate")[case % 2]
        msg = f"seed={seed} case={case} capacity={capacity} overlong={overlong} lengths={lengths.tolist()}"
        plan = plan_packs(lengths, capacity, overlong)
        s = plan.stats

        offsets = plan.pack_offsets
        assert offsets[0] == 0 and offsets[-1] == len(plan.piece_len), msg
        assert np.all(np.diff(offsets) > 0), f"empty pack; {msg}"
        used = np.add.reduceat(plan.piece_len, offsets[:-1]) if plan.n_packs else np.zeros(0, np.int64)
        assert np.all(used <= capacity), f"pack over capacity; {msg}"
        assert np.all(plan.piece_len >= 1), msg
        # First fit leaves no two packs that could be merged: pack q's first item did not fit
        # into any earlier pack, so used[p] + used[q] > capacity for every p < q.
        for q in range(1, plan.n_packs):
            assert used[:q].min() + used[q] > capacity, f"packs mergeable at {q}; {msg}"

        # Each non-empty document is covered exactly once by contiguous pieces, in order.
        pieces: dict[int, list[tuple[int, int]]] = {}
        for d, start, n in zip(plan.doc_index.tolist(), plan.doc_start.tolist(), plan.piece_len.tolist()):
            pieces.setdefault(d, []).append((start, n))
        assert set(pieces) == set(np.flatnonzero(lengths > 0).tolist()), f"documents lost or invented; {msg}"
        for d, chunks in pieces.items():
            chunks.sort()
            covered = [0]
            for start, n in chunks:
                assert start == covered[-1], f"doc {d} chunks {chunks} not contiguous; {msg}"
                covered.append(start + n)
            want = min(lengths[d], capacity) if overlong == "truncate" else lengths[d]
            assert covered[-1] == want, f"doc {d} covered to {covered[-1]}, want {want}; {msg}"
            if len(chunks) > 1:
                assert all(n == capacity for _, n in chunks[:-1]), f"doc {d} chunks {chunks}; {msg}"

        over = lengths > capacity
        assert s.n_empty == int(np.sum(lengths == 0)), msg
        assert s.n_split == (int(over.sum()) if overlong == "split" else 0), msg
        assert s.n_truncated == (int(over.sum()) if overlong == "truncate" else 0), msg
        dropped = int((lengths[over] - capacity).sum()) if overlong == "truncate" else 0
        assert s.tokens_dropped == dropped, msg
        assert s.real_tokens == int(plan.piece_len.sum()) == int(lengths.sum()) - s.tokens_dropped, msg
        assert s.n_pieces == len(plan.piece_len) and s.n_packs == plan.n_packs, msg
        expected_eff = s.real_tokens / (s.n_packs * capacity) if s.n_packs else 0.0
        assert s.efficiency == pytest.approx(expected_eff, rel=1e-12), msg


def test_plan_hand_checked_example():
    # cap 4: docs 0 (5) and 3 (10) split; sorted items 4,4,4 | 3,3 | 2 | 1,1; the two 1s fill
    # the packs holding the 3s, the 2 opens pack 5.
    plan = plan_packs([5, 3, 3, 10, 0, 1], 4)
    assert plan.doc_index.tolist() == [0, 3, 3, 1, 0, 2, 5, 3]
    assert plan.doc_start.tolist() == [0, 0, 4, 0, 4, 0, 0, 8]
    assert plan.piece_len.tolist() == [4, 4, 4, 3, 1, 3, 1, 2]
    assert plan.pack_offsets.tolist() == [0, 1, 2, 3, 5, 7, 8]
    assert plan.stats.summary() == (
        "6 docs -> 6 packs of 4, efficiency 91.7%, 2 split, 0 truncated (0 tokens dropped), 1 empty skipped"
    )
    truncated = plan_packs([5, 3, 3, 10, 0, 1], 4, overlong="truncate")
    assert truncated.stats.summary() == (
        "6 docs -> 4 packs of 4, efficiency 93.8%, 0 split, 2 truncated (7 tokens dropped), 1 empty skipped"
    )


def test_plan_degenerate_inputs():
    empty = plan_packs([], 8)
    assert empty.n_packs == 0 and empty.pack_offsets.tolist() == [0] and empty.stats.efficiency == 0.0
    assert empty.doc_index.dtype == np.int64
    zeros = plan_packs(np.zeros(5, dtype=np.int32), 8)
    assert zeros.n_packs == 0 and zeros.stats.n_empty == 5 and zeros.stats.n_docs == 5
    single = plan_packs([8], 8)
    assert single.pack_offsets.tolist() == [0, 1] and single.stats.efficiency == 1.0
    ones = plan_packs(np.ones(10, dtype=np.uint16), 1)
    assert ones.n_packs == 10 and ones.doc_index.tolist() == list(range(10))
    assert plan_packs([3], 2**40).piece_len.tolist() == [3]


def test_plan_bad_inputs():
    with pytest.raises(ValueError, match="capacity must be positive, got 0"):
        plan_packs([1, 2], 0)
    with pytest.raises(ValueError, match="capacity must be positive, got -3"):
        plan_packs([1, 2], -3)
    with pytest.raises(TypeError):
        plan_packs([1, 2], 2.5)
    with pytest.raises(TypeError, match="capacity must be an int"):
        plan_packs([1, 2], True)
    with pytest.raises(ValueError, match=r"lengths\[2\] is -1"):
        plan_packs([4, 0, -1, 3], 8)
    with pytest.raises(TypeError, match="lengths must hold integers, got dtype float64"):
        plan_packs([1.0, 2.5], 8)
    with pytest.raises(ValueError, match="lengths must be 1-D"):
        plan_packs(np.ones((2, 2), dtype=np.int64), 8)
    with pytest.raises(ValueError, match="overlong must be one of"):
        plan_packs([1, 2], 8, overlong="drop")
    with pytest.raises(OverlongDocumentError, match=r"^document 1: the document is 9 tokens, longer than pack_len 8 "
                                                    r"\(overlong: error; use split or truncate\); 1 more document"):
        plan_packs([8, 9, 10], 8, overlong="error")


def make_corpus(rng: np.random.Generator, lengths: np.ndarray):
    """tokens int32, doc_offsets int64 (n_docs+1,), loss_mask uint8 with prompt/response-like runs."""
    doc_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = int(doc_offsets[-1])
    tokens = rng.integers(0, 32000, size=n, dtype=np.int32)
    run_starts = rng.random(n) < 0.05
    loss_mask = (np.cumsum(run_starts) % 2).astype(np.uint8)
    return tokens, doc_offsets, loss_mask


def assert_batch_matches_reference(batch, plan, packs, tokens, doc_offsets, loss_mask, msg):
    ref = build_batch_reference(
        plan.doc_index.tolist(), plan.doc_start.tolist(), plan.piece_len.tolist(), plan.pack_offsets.tolist(),
        list(packs), tokens.tolist(), doc_offsets.tolist(), loss_mask.tolist(),
    )
    dtypes = {"input_ids": np.int32, "labels": np.int64, "loss_mask": np.uint8, "cu_seqlens": np.int32,
              "position_ids": np.int32}
    for name, dtype in dtypes.items():
        got = getattr(batch, name)
        assert got.dtype == dtype, f"{name} dtype {got.dtype}; {msg}"
        np.testing.assert_array_equal(got, np.array(ref[name], dtype=dtype), err_msg=f"{name}; {msg}")
    assert batch.max_seqlen == ref["max_seqlen"], msg


def test_build_batch_matches_reference(seeded):
    rng, seed = seeded
    for case in range(150):
        lengths, capacity = random_case(rng)
        overlong = ("split", "truncate")[case % 2]
        tokens, doc_offsets, loss_mask = make_corpus(rng, lengths)
        plan = plan_packs(lengths, capacity, overlong)
        # Any selection: repeats allowed, any order, possibly empty.
        packs = rng.integers(0, max(plan.n_packs, 1), size=int(rng.integers(0, 12))) if plan.n_packs else []
        msg = f"seed={seed} case={case} capacity={capacity} overlong={overlong} packs={list(packs)}"
        batch = build_batch(plan, packs, tokens, doc_offsets, loss_mask, num_threads=int(rng.integers(0, 4)))
        assert_batch_matches_reference(batch, plan, packs, tokens, doc_offsets, loss_mask, msg)


def test_build_batch_keeps_documents_intact(seeded):
    rng, seed = seeded
    lengths = random_lengths(rng, 64, 300)
    tokens, doc_offsets, loss_mask = make_corpus(rng, lengths)
    plan = plan_packs(lengths, 64, "split")
    order = rng.permutation(plan.n_packs)
    batch = build_batch(plan, order, tokens, doc_offsets, loss_mask)
    msg = f"seed={seed}"

    cu = batch.cu_seqlens
    assert cu[0] == 0 and cu[-1] == len(batch.input_ids) == int(lengths.sum()), msg
    piece_ids = np.concatenate([np.arange(plan.pack_offsets[p], plan.pack_offsets[p + 1]) for p in order])
    chunks: dict[int, list[tuple[int, np.ndarray]]] = {}
    for slot, k in enumerate(piece_ids):
        a, b = cu[slot], cu[slot + 1]
        np.testing.assert_array_equal(batch.position_ids[a:b], np.arange(b - a), err_msg=msg)
        assert batch.labels[b - 1] == IGNORE_INDEX, msg
        chunks.setdefault(int(plan.doc_index[k]), []).append((int(plan.doc_start[k]), batch.input_ids[a:b]))
    for d in np.flatnonzero(lengths > 0):
        rebuilt = np.concatenate([ids for _, ids in sorted(chunks[int(d)], key=lambda c: c[0])])
        source = tokens[doc_offsets[d] : doc_offsets[d + 1]]
        np.testing.assert_array_equal(rebuilt, source, err_msg=f"doc {d}; {msg}")


def test_build_batch_threads_agree(seeded):
    rng, seed = seeded
    capacity = 4096
    lengths = np.maximum(rng.lognormal(6.0, 1.0, size=900).astype(np.int64), 1)
    tokens, doc_offsets, loss_mask = make_corpus(rng, lengths)
    plan = plan_packs(lengths, capacity)
    packs = rng.permutation(plan.n_packs)
    # Threads start only above the grain, so make sure several would run.
    assert plan.stats.real_tokens >= 4 * _C.PARALLEL_GRAIN_TOKENS and plan.n_packs >= 4, f"seed={seed}"
    single = build_batch(plan, packs, tokens, doc_offsets, loss_mask, num_threads=1)
    assert_batch_matches_reference(single, plan, packs, tokens, doc_offsets, loss_mask, f"seed={seed}")
    for threads in (0, 2, 3, 4):
        multi = build_batch(plan, packs, tokens, doc_offsets, loss_mask, num_threads=threads)
        for name in ("input_ids", "labels", "loss_mask", "cu_seqlens", "position_ids"):
            np.testing.assert_array_equal(getattr(multi, name), getattr(single, name),
                                          err_msg=f"{name} threads={threads} seed={seed}")
        assert multi.max_seqlen == single.max_seqlen


def test_build_batch_accepts_readonly_memmap_and_bool_mask(tmp_path, seeded):
    rng, seed = seeded
    lengths = random_lengths(rng, 16, 50)
    tokens, doc_offsets, loss_mask = make_corpus(rng, lengths)
    path = tmp_path / "tokens.bin"
    tokens.tofile(path)
    mapped = np.memmap(path, dtype=np.int32, mode="r")
    plan = plan_packs(lengths, 16)
    packs = list(range(plan.n_packs))
    batch = build_batch(plan, packs, mapped, doc_offsets, loss_mask.astype(bool))
    assert_batch_matches_reference(batch, plan, packs, tokens, doc_offsets, loss_mask, f"seed={seed}")


def test_build_batch_bad_inputs():
    lengths = np.array([3, 5, 2], dtype=np.int64)
    tokens = np.arange(10, dtype=np.int32)
    offsets = np.array([0, 3, 8, 10], dtype=np.int64)
    mask = np.ones(10, dtype=np.uint8)
    plan = plan_packs(lengths, 8)  # packs: [5, 3], [2]

    with pytest.raises(TypeError, match="tokens must have dtype int32, got int64"):
        build_batch(plan, [0], tokens.astype(np.int64), offsets, mask)
    with pytest.raises(TypeError, match="tokens must be a numpy array"):
        build_batch(plan, [0], tokens.tolist(), offsets, mask)
    with pytest.raises(TypeError, match="loss_mask must have dtype uint8, got int32"):
        build_batch(plan, [0], tokens, offsets, mask.astype(np.int32))
    with pytest.raises(ValueError, match="loss_mask has 9 entries but tokens has 10"):
        build_batch(plan, [0], tokens, offsets, mask[:9])
    with pytest.raises(ValueError, match="doc_offsets describes 2 documents but the plan was made for 3"):
        build_batch(plan, [0], tokens, offsets[:-1], mask)
    with pytest.raises(ValueError, match=r"doc_offsets\[-1\] is 10 but tokens has 9 entries"):
        build_batch(plan, [0], tokens[:9], offsets, mask[:9])
    with pytest.raises(ValueError, match=r"doc_offsets\[0\] must be 0, got 1"):
        build_batch(plan, [0], tokens, np.array([1, 3, 8, 10]), mask)
    with pytest.raises(ValueError, match=r"non-decreasing, but doc_offsets\[2\] = 2 < doc_offsets\[1\] = 3"):
        build_batch(plan, [0], tokens, np.array([0, 3, 2, 10]), mask)
    with pytest.raises(IndexError, match=r"pack_indices\[1\] = 2 is out of range for a plan with 2 packs"):
        build_batch(plan, [0, 2], tokens, offsets, mask)
    with pytest.raises(IndexError, match=r"pack_indices\[0\] = -1 is out of range"):
        build_batch(plan, [-1], tokens, offsets, mask)
    with pytest.raises(TypeError, match="pack_indices must hold integers"):
        build_batch(plan, [0.0], tokens, offsets, mask)
    with pytest.raises(ValueError, match="num_threads must be >= 0, got -1"):
        build_batch(plan, [0], tokens, offsets, mask, num_threads=-1)
    # A plan made for other lengths: document 1 has only 4 tokens in this corpus.
    with pytest.raises(ValueError, match=r"covers tokens \[0, 5\) of document 1, which has 4 tokens"):
        build_batch(plan, [0], tokens, np.array([0, 3, 7, 10]), mask)
    bad_mask = mask.copy()
    bad_mask[4] = 2
    bad = r"loss_mask must hold only 0 or 1, but loss_mask\[4\] \(document 1\) is 2"
    with pytest.raises(ValueError, match=bad):
        build_batch(plan, [0], tokens, offsets, bad_mask)
    # The bad value sits in pack 0 only; pack 1 is unaffected.
    assert build_batch(plan, [1], tokens, offsets, bad_mask).input_ids.tolist() == [8, 9]
