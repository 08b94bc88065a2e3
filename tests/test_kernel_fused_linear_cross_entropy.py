"""The fused linear cross-entropy against kernels/reference.py.

Runs interpreted on CPU (tests/conftest.py) and compiled on CUDA. The reference is
evaluated on float64 copies of the same hidden/weight (its projection runs in float64,
its cross-entropy upcasts to fp32: ~1e-7 relative error, below every tolerance here).

Tolerances (relative, float64 norm), by what limits the kernel's accuracy with unit
roundoff u of the input dtype (fp32 2^-24, fp16 2^-11, bf16 2^-8 for rounding to 8 bits):
- loss: the logits chunk is rounded to the input dtype by the matmul, then reduced in
  fp32. Rounding a logit x moves it by at most u|x|, so a row's loss lse - x_label moves
  by at most u (|x_label| + sum_j softmax_j |x_j|): the loss is checked against that
  bound (with 1.5u for the matmul's own fp32 error, and an fp32 floor), computed from
  the float64 logits. A relative tolerance would not do: a single row's loss can be
  small next to its logits.
- gradients: d(logits) rounded to the input dtype, a matmul with fp32 accumulation, the
  result rounded again: fp32 1e-5, fp16 2.5e-3 (~5u), bf16 1.2e-2 (~3u).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from agentflan.kernels import reference
from agentflan.kernels.fused_linear_cross_entropy import (
    LOGITS_CHUNK_FRACTION,
    MIN_CHUNK_ROWS,
    ROW_PAD,
    default_chunk_rows,
    fused_linear_cross_entropy,
)
from triton_harness import DEVICE, DTYPES, assert_close, fresh_seed, poisoned_outputs, randn, rel_err, rng

LOSS_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3}
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 2.5e-3, torch.bfloat16: 1.2e-2}
IGNORE = -100

# (N, D, V, chunk_rows): several chunks with a ragged last one (37 = 4*8 + 5), a single
# row, the default chunking (one chunk at these sizes), a vocabulary over two 1024-wide
# CE chunks and not a multiple of the 128-row weight-gradient tile.
CASES = [(37, 48, 517, 8), (1, 32, 300, None), (7, 64, 1000, None), (20, 40, 2100, 6)]


def _labels(n: int, vocab: int, gen: torch.Generator, dtype=torch.int64) -> torch.Tensor:
    labels = torch.randint(0, vocab, (n,), generator=gen)
    ignored = torch.rand(n, generator=gen) < 0.3
    ignored[0] = False  # at least one counted row, so 'mean' divides by > 0
    return labels.masked_fill(ignored, IGNORE).to(device=DEVICE, dtype=dtype)


def _inputs(n: int, dim: int, vocab: int, dtype: torch.dtype, gen: torch.Generator):
    hidden = randn(n, dim, gen=gen, dtype=dtype)
    weight = randn(vocab, dim, gen=gen, dtype=dtype, scale=dim**-0.5 * 2)  # logits of a few units
    return hidden, weight


def _upstream(reduction: str, n: int, gen: torch.Generator) -> torch.Tensor:
    shape = (n,) if reduction == "none" else ()
    return (torch.randn(shape, generator=gen, dtype=torch.float64) + 0.5).to(DEVICE)


def _reference(hidden, weight, labels, reduction, upstream):
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    loss = reference.linear_cross_entropy(h, w, labels, IGNORE, reduction)
    grad_h, grad_w = torch.autograd.grad(loss, (h, w), upstream)
    return loss.detach(), grad_h, grad_w


def _run(hidden, weight, labels, reduction, upstream, chunk_rows=None):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    with poisoned_outputs():
        loss = fused_linear_cross_entropy(h, w, labels, IGNORE, reduction, chunk_rows=chunk_rows)
        grad_h, grad_w = torch.autograd.grad(loss, (h, w), upstream.to(loss.dtype))
    return loss, grad_h, grad_w


UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _loss_bound(hidden, weight, labels, reduction, dtype) -> torch.Tensor:
    """The most the loss may differ from the float64 one when the kernel rounds each logit
    to `dtype` (see the module docstring), per row for 'none', else reduced like the loss."""
    logits = hidden.detach().double() @ weight.detach().double().T  # (N, V)
    keep = labels != IGNORE
    label_logit = logits.gather(1, torch.where(keep, labels, 0).long()[:, None])[:, 0]
    spread = label_logit.abs() + (torch.softmax(logits, -1) * logits.abs()).sum(-1)
    rows = torch.where(keep, 1.5 * UNIT_ROUNDOFF[dtype] * spread + 1e-6 * (1 + spread), 0.0)
    if reduction == "none":
        return rows
    return rows.sum() / (keep.sum().clamp(min=1) if reduction == "mean" else 1)


def _check(out, ref, dtype, tag, seed, inputs):
    """inputs: (hidden, weight, labels, reduction) the outputs came from."""
    loss, grad_h, grad_w = out
    ref_loss, ref_h, ref_w = ref
    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
    assert grad_h.dtype == dtype and grad_w.dtype == dtype
    assert torch.isfinite(loss).all(), f"loss {tag}: not finite (seed={seed})"
    excess = (loss.double() - ref_loss).abs() - _loss_bound(*inputs, dtype)
    assert (excess <= 0).all(), f"loss {tag}: off by more than the rounding bound, excess {excess.max():.3e} (seed={seed})"
    assert_close(grad_h, ref_h, GRAD_TOL[dtype], f"d(hidden) {tag}", seed)
    assert_close(grad_w, ref_w, GRAD_TOL[dtype], f"d(weight) {tag}", seed)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[0]}xD{c[1]}xV{c[2]}xC{c[3]}")
def test_matches_reference(case, dtype, reduction):
    seed = fresh_seed()
    gen = rng(seed)
    n, dim, vocab, chunk_rows = case
    hidden, weight = _inputs(n, dim, vocab, dtype, gen)
    labels = _labels(n, vocab, gen)
    upstream = _upstream(reduction, n, gen)
    out = _run(hidden, weight, labels, reduction, upstream, chunk_rows)
    ref = _reference(hidden, weight, labels, reduction, upstream)
    _check(out, ref, dtype, f"{dtype} N={n} D={dim} V={vocab} chunk={chunk_rows} {reduction}", seed,
           (hidden, weight, labels, reduction))


def test_int32_labels_one_row_chunks():
    """int32 labels and chunk_rows=1: the chunk loop runs once per row."""
    seed = fresh_seed()
    gen = rng(seed)
    hidden, weight = _inputs(11, 32, 400, torch.float16, gen)
    labels = _labels(11, 400, gen, dtype=torch.int32)
    upstream = _upstream("mean", 11, gen)
    out = _run(hidden, weight, labels, "mean", upstream, chunk_rows=1)
    ref = _reference(hidden, weight, labels, "mean", upstream)
    _check(out, ref, torch.float16, "fp16 int32 labels chunk=1", seed, (hidden, weight, labels, "mean"))


def test_weight_grad_accumulates_in_fp32():
    """One row per chunk, and a first chunk that dominates the sum: a bf16 running sum
    would then round away every later chunk's contribution.

    Every label is token 0 and the hidden rows share a positive mean, so all chunk
    products have the same sign; the per-row upstream gradient ('none') is 1000 on row 0
    and about 1 elsewhere, so each later product is below half a bf16 unit of the running
    sum. The test first shows that a bf16 running sum (fp32 add, one rounding per chunk)
    misses the tolerance on these inputs, then that the kernel meets it.
    """
    seed = fresh_seed()
    gen = rng(seed)
    n, dim, vocab = 96, 32, 128
    dtype = torch.bfloat16
    hidden = (randn(n, dim, gen=gen, scale=0.1) + 1.0).to(dtype)
    weight = randn(vocab, dim, gen=gen, dtype=dtype, scale=0.2)
    labels = torch.zeros(n, dtype=torch.int64, device=DEVICE)
    upstream = _upstream("none", n, gen) * 0.1 + 0.95
    upstream[0] = 1000.0
    _, _, grad_w = _run(hidden, weight, labels, "none", upstream, chunk_rows=1)
    _, _, ref_w = _reference(hidden, weight, labels, "none", upstream)

    bf16_sum = torch.zeros(vocab, dim, dtype=dtype, device=DEVICE)
    for row in range(n):
        h = hidden[row : row + 1].double()
        dlogits = torch.softmax(h @ weight.double().t(), dim=-1)
        dlogits[:, 0] -= 1.0
        dlogits = (dlogits * upstream[row]).to(dtype).double()  # as the kernel's chunk buffer holds it
        bf16_sum = (bf16_sum.double() + dlogits.t() @ h).to(dtype)
    drift = rel_err(bf16_sum, ref_w)
    assert drift > GRAD_TOL[dtype], f"bf16 accumulation drifts only {drift:.2e}: this test cannot tell (seed={seed})"
    assert_close(grad_w, ref_w, GRAD_TOL[dtype], f"d(weight) over {n} chunks", seed)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_zero_grads(reduction):
    seed = fresh_seed()
    gen = rng(seed)
    hidden, weight = _inputs(9, 16, 130, torch.bfloat16, gen)
    labels = torch.full((9,), IGNORE, device=DEVICE)
    upstream = _upstream(reduction, 9, gen)
    loss, grad_h, grad_w = _run(hidden, weight, labels, reduction, upstream, chunk_rows=4)
    assert (loss == 0).all(), f"all-ignored loss must be exactly 0, got {loss} (seed={seed})"
    assert (grad_h == 0).all() and (grad_w == 0).all(), f"all-ignored grads must be exactly 0 (seed={seed})"


def test_frozen_weight_and_no_grad():
    """Only hidden requires grad: weight gets none. Under no_grad: the same loss, no graph."""
    seed = fresh_seed()
    gen = rng(seed)
    hidden, weight = _inputs(13, 24, 333, torch.float32, gen)
    labels = _labels(13, 333, gen)
    one = torch.tensor(1.0, dtype=torch.float64, device=DEVICE)
    ref_loss, ref_h, _ = _reference(hidden, weight, labels, "mean", one)
    h = hidden.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, weight, labels, IGNORE, "mean", chunk_rows=5)
    loss.backward()
    assert weight.grad is None
    assert_close(h.grad, ref_h, GRAD_TOL[torch.float32], "d(hidden) with frozen weight", seed)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(h, weight, labels, IGNORE, "mean", chunk_rows=5)
    assert loss.grad_fn is None
    assert_close(loss, ref_loss, LOSS_TOL[torch.float32], "loss under no_grad", seed)


def test_second_backward_is_refused():
    """Gradients are precomputed in the forward and scaled in place on the first backward,
    so a second backward through the same graph must fail loudly, not double-scale."""
    seed = fresh_seed()
    gen = rng(seed)
    hidden, weight = _inputs(5, 16, 100, torch.float32, gen)
    h = hidden.requires_grad_()
    loss = fused_linear_cross_entropy(h, weight, _labels(5, 100, gen))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


class _AllocationTracker(TorchDispatchMode):
    """Records the bytes of every tensor an op creates with fresh storage (not a view)."""

    def __init__(self) -> None:
        super().__init__()
        self.allocations: list[tuple[int, str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.allocations.append((t.untyped_storage().nbytes(), str(func), tuple(t.shape)))
        return out


def test_never_allocates_full_logits():
    """Every tensor created during forward+backward, counted by a dispatch-mode tracker:
    apart from the gradients themselves and the fp32 weight-gradient accumulator, none is
    larger than one logits chunk (rows padded to ROW_PAD). The tracker sees the unfused
    reference create (N, V)."""
    seed = fresh_seed()
    gen = rng(seed)
    n, dim, vocab, chunk = 96, 16, 1500, 12
    dtype = torch.bfloat16
    hidden, weight = _inputs(n, dim, vocab, dtype, gen)
    labels = _labels(n, vocab, gen)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    gradient_shapes = {(n, dim), (vocab, dim)}

    with _AllocationTracker() as ref_tracker:
        reference.linear_cross_entropy(h, w, labels, IGNORE).backward()
    assert max(b for b, _, _ in ref_tracker.allocations) >= n * vocab * 2, "tracker missed the reference's logits"

    for reduction in ("mean", "none"):
        with _AllocationTracker() as tracker:
            loss = fused_linear_cross_entropy(h, w, labels, IGNORE, reduction, chunk_rows=chunk)
            loss.backward(torch.ones_like(loss))
        others = [a for a in tracker.allocations if a[2] not in gradient_shapes]
        largest = max(others)
        padded_row = -(-vocab // ROW_PAD) * ROW_PAD  # the chunk buffer's rows are padded for alignment
        assert largest[0] <= chunk * padded_row * 2, f"{reduction}: allocation larger than a logits chunk: {largest}"
        grads = [a for a in tracker.allocations if a[2] in gradient_shapes]
        assert max(grads)[0] <= vocab * dim * 4, f"{reduction}: gradient-shaped allocation too large: {max(grads)}"


@pytest.mark.skipif(DEVICE != "cuda", reason="peak device memory needs torch.cuda memory statistics")
def test_peak_memory_on_cuda():
    """At the production shape, peak memory beyond inputs, gradients and the fp32 weight
    accumulator stays under 10% of the fp32 (N, V) logits."""
    n, dim, vocab = 16384, 4096, 32000
    dtype = torch.bfloat16
    gen = rng(fresh_seed())
    hidden, weight = _inputs(n, dim, vocab, dtype, gen)
    labels = _labels(n, vocab, gen)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fused_linear_cross_entropy(h, w, labels).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    grads = h.numel() * 2 + w.numel() * 2
    accumulator = w.numel() * 4
    budget = 0.10 * n * vocab * 4
    assert extra - grads - accumulator <= budget, (
        f"peak extra {extra / 2**20:.0f} MiB - grads {grads / 2**20:.0f} - fp32 accumulator "
        f"{accumulator / 2**20:.0f} > 10% of fp32 logits {budget / 2**20:.0f} MiB"
    )


def test_default_chunking_policy():
    """The default chunk: within LOGITS_CHUNK_FRACTION of the fp32 logits wherever that
    allows MIN_CHUNK_ROWS rows; otherwise no more chunks than MIN_CHUNK_ROWS-row chunks
    would make; chunks balanced (the last one is not a sliver)."""
    for n in (1, 1000, 2048, 5000, 11000, 16384, 32768, 65536):
        for elem in (2, 4):
            rows = default_chunk_rows(n, elem)
            n_chunks = math.ceil(n / rows)
            budget_rows = LOGITS_CHUNK_FRACTION * 4 * n / elem
            if budget_rows >= MIN_CHUNK_ROWS:
                assert rows <= budget_rows, (n, elem, rows)
            assert n_chunks <= math.ceil(n / MIN_CHUNK_ROWS), (n, elem, rows)
            assert n - (n_chunks - 1) * rows >= rows // 2, (n, elem, rows)
    assert default_chunk_rows(16384, 2) * 32000 * 2 <= 0.10 * 16384 * 32000 * 4
    assert default_chunk_rows(1000, 2) == 1000  # small batches: one chunk


@pytest.mark.parametrize(
    "shapes, dtypes, error, match",
    [
        (((4, 8), (10, 9), (4,)), (torch.float32, torch.float32), ValueError, "hidden dim"),
        (((4, 8), (10, 8), (5,)), (torch.float32, torch.float32), ValueError, "labels must have shape"),
        (((4, 8), (10, 8), (4,)), (torch.float32, torch.bfloat16), TypeError, "share one of"),
        (((2, 4, 8), (10, 8), (4,)), (torch.float32, torch.float32), ValueError, r"\(N, D\)"),
        (((4, 20), (10, 20), (4,)), (torch.bfloat16, torch.bfloat16), ValueError, "multiple of 8"),
    ],
)
def test_rejects_bad_inputs(shapes, dtypes, error, match):
    (hs, ws, ls), (hd, wd) = shapes, dtypes
    hidden = torch.zeros(hs, dtype=hd, device=DEVICE)
    weight = torch.zeros(ws, dtype=wd, device=DEVICE)
    labels = torch.zeros(ls, dtype=torch.int64, device=DEVICE)
    with pytest.raises(error, match=match):
        fused_linear_cross_entropy(hidden, weight, labels)


@pytest.mark.parametrize(
    "dtype, dim", [(torch.bfloat16, 24), (torch.float32, 20)], ids=["bf16-D24", "fp32-D20"]
)
def test_unaligned_hidden_rows(dtype, dim):
    """hidden starting one element into its storage (not 16-byte aligned): the 16-bit path
    must copy it to aligned rows; fp32 (cuBLAS only) takes any hidden size and layout."""
    seed = fresh_seed()
    gen = rng(seed)
    n, vocab = 10, 300
    storage = randn(n * dim + 1, gen=gen, dtype=dtype).requires_grad_()
    hidden = storage[1:].view(n, dim)
    assert hidden.data_ptr() % 16 != 0
    weight = randn(vocab, dim, gen=gen, dtype=dtype, scale=dim**-0.5 * 2).requires_grad_()
    labels = _labels(n, vocab, gen)
    upstream = _upstream("sum", n, gen)
    with poisoned_outputs():
        loss = fused_linear_cross_entropy(hidden, weight, labels, IGNORE, "sum", chunk_rows=3)
        grad_storage, grad_w = torch.autograd.grad(loss, (storage, weight), upstream.float())
    ref = _reference(hidden, weight, labels, "sum", upstream)
    _check((loss, grad_storage[1:].view(n, dim), grad_w), ref, dtype, f"{dtype} unaligned hidden D={dim}", seed,
           (hidden, weight, labels, "sum"))


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_larger_bf16_many_chunks(reduction):
    """A larger vocabulary (two 4096-wide CE chunks, 35 weight-gradient row tiles) and a
    hidden size spanning two 256-wide tiles, over 9 chunks."""
    seed = fresh_seed()
    gen = rng(seed)
    n, dim, vocab = 70, 320, 4500
    hidden, weight = _inputs(n, dim, vocab, torch.bfloat16, gen)
    labels = _labels(n, vocab, gen)
    upstream = _upstream(reduction, n, gen)
    out = _run(hidden, weight, labels, reduction, upstream, chunk_rows=8)
    ref = _reference(hidden, weight, labels, reduction, upstream)
    _check(out, ref, torch.bfloat16, f"bf16 N={n} D={dim} V={vocab} {reduction}", seed,
           (hidden, weight, labels, reduction))
