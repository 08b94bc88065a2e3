"""The Triton cross-entropy against kernels/reference.py.

Runs interpreted on CPU (tests/conftest.py) and compiled on CUDA. Every input is fresh
per run (seed in each failure message). The reference is evaluated on float64 copies of
the very same inputs (it upcasts to at least fp32 internally, ~1e-7 relative error,
well below the tightest tolerance here).

Tolerances (relative, float64 norm), by what limits the kernel's accuracy:
- loss: the kernel reads the logits exactly and works in fp32, so every dtype gets
  the fp32 bound 1e-5.
- d(logits): computed in fp32, then rounded once to the logits dtype: a few units of
  that dtype's rounding (fp32 1e-5, fp16 2^-11 -> 2e-3, bf16 2^-8 -> 1e-2).
"""

from __future__ import annotations

import pytest
import torch

from agentflan.kernels import reference
from agentflan.kernels.cross_entropy import cross_entropy
from triton_harness import DEVICE, DTYPES, assert_close, fresh_seed, poisoned_outputs, randn, rng

LOSS_TOL = 1e-5
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
IGNORE = -100

# (N, V): single rows, odd sizes that are not multiples of either vocabulary chunk
# (1024 or 4096), and vocabularies spanning several chunks so the online
# log-sum-exp rescales across them (2047: two 1024-chunks; 5000: two 4096-chunks).
SHAPES = [(1, 1000), (7, 517), (37, 1000), (5, 2047), (6, 5000)]


def _labels(n: int, vocab: int, gen: torch.Generator, ignore_frac: float = 0.3, dtype=torch.int64) -> torch.Tensor:
    labels = torch.randint(0, vocab, (n,), generator=gen)
    ignored = torch.rand(n, generator=gen) < ignore_frac
    if n > 1:
        ignored[0] = False  # keep at least one counted row, so 'mean' divides by > 0
    return labels.masked_fill(ignored, IGNORE).to(device=DEVICE, dtype=dtype)


def _upstream(reduction: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """A random upstream gradient: (n,) for 'none', a scalar (not 1) otherwise."""
    shape = (n,) if reduction == "none" else ()
    return (torch.randn(shape, generator=gen, dtype=torch.float64) + 0.5).to(DEVICE)


def _reference(logits: torch.Tensor, labels: torch.Tensor, reduction: str, upstream: torch.Tensor):
    x = logits.detach().double().requires_grad_()
    loss = reference.cross_entropy(x, labels, IGNORE, reduction)
    (grad,) = torch.autograd.grad(loss, x, upstream)
    return loss.detach(), grad


def _run(logits: torch.Tensor, labels: torch.Tensor, reduction: str, upstream: torch.Tensor, **kwargs):
    x = logits.detach().clone().requires_grad_()
    with poisoned_outputs():
        loss = cross_entropy(x, labels, IGNORE, reduction, **kwargs)
        (grad,) = torch.autograd.grad(loss, x, upstream.to(loss.dtype))
    return loss, grad


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}xV{s[1]}")
def test_matches_reference(shape, dtype, reduction):
    seed = fresh_seed()
    gen = rng(seed)
    n, vocab = shape
    logits = randn(n, vocab, gen=gen, dtype=dtype, scale=3.0)
    labels = _labels(n, vocab, gen)
    upstream = _upstream(reduction, n, gen)
    loss, grad = _run(logits, labels, reduction, upstream)
    ref_loss, ref_grad = _reference(logits, labels, reduction, upstream)
    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
    assert grad.dtype == dtype and grad.shape == logits.shape
    tag = f"{dtype} N={n} V={vocab} {reduction}"
    assert_close(loss, ref_loss, LOSS_TOL, f"loss {tag}", seed)
    assert_close(grad, ref_grad, GRAD_TOL[dtype], f"d(logits) {tag}", seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int32_labels_and_strided_rows(dtype):
    """int32 labels, and logits that are a column slice of a wider buffer (row stride != V)."""
    seed = fresh_seed()
    gen = rng(seed)
    n, vocab = 9, 777
    wide = randn(n, vocab + 13, gen=gen, dtype=dtype, scale=3.0)
    logits = wide[:, :vocab]
    labels = _labels(n, vocab, gen, dtype=torch.int32)
    upstream = _upstream("mean", n, gen)
    loss, grad = _run(logits, labels, "mean", upstream)
    ref_loss, ref_grad = _reference(logits, labels, "mean", upstream)
    assert_close(loss, ref_loss, LOSS_TOL, f"loss {dtype} strided", seed)
    assert_close(grad, ref_grad, GRAD_TOL[dtype], f"d(logits) {dtype} strided", seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_logits_spanning_chunks(dtype):
    """Row maxima far above the rest and placed in a later vocabulary chunk: a log-sum-exp
    that did not rescale its running sum when the max grows would overflow or be wrong."""
    seed = fresh_seed()
    gen = rng(seed)
    n, vocab = 4, 2500  # chunks of 1024: the spike sits in the third
    logits = randn(n, vocab, gen=gen, dtype=torch.float32)
    logits[:, 2300] += 150.0
    logits[1, 10] += 149.0  # a competing spike in the first chunk
    logits = logits.to(dtype)
    labels = torch.tensor([2300, 10, 5, IGNORE], device=DEVICE)
    upstream = _upstream("sum", n, gen)
    loss, grad = _run(logits, labels, "sum", upstream)
    ref_loss, ref_grad = _reference(logits, labels, "sum", upstream)
    assert_close(loss, ref_loss, LOSS_TOL, f"loss {dtype} spikes", seed)
    assert_close(grad, ref_grad, GRAD_TOL[dtype], f"d(logits) {dtype} spikes", seed)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_zero_grad(reduction):
    seed = fresh_seed()
    gen = rng(seed)
    logits = randn(5, 300, gen=gen, dtype=torch.bfloat16)
    labels = torch.full((5,), IGNORE, device=DEVICE)
    upstream = _upstream(reduction, 5, gen)
    loss, grad = _run(logits, labels, reduction, upstream)
    assert torch.isfinite(loss).all(), f"loss not finite: {loss} (seed={seed})"
    assert (loss == 0).all(), f"all-ignored loss must be exactly 0, got {loss} (seed={seed})"
    assert (grad == 0).all(), f"all-ignored grad must be exactly 0 (seed={seed})"


def test_default_keeps_logits_and_inplace_reuses_them():
    seed = fresh_seed()
    gen = rng(seed)
    logits = randn(6, 600, gen=gen, dtype=torch.float16, scale=2.0)
    labels = _labels(6, 600, gen)
    upstream = _upstream("mean", 6, gen)
    _, ref_grad = _reference(logits, labels, "mean", upstream)

    x = logits.clone().requires_grad_()
    loss = cross_entropy(x, labels, IGNORE)
    (grad,) = torch.autograd.grad(loss, x, upstream.float())
    assert torch.equal(x.detach(), logits), f"default mode changed the caller's logits (seed={seed})"
    assert grad.data_ptr() != x.data_ptr()

    x = logits.clone().requires_grad_()
    loss = cross_entropy(x, labels, IGNORE, inplace=True)
    (grad,) = torch.autograd.grad(loss, x, upstream.float())
    assert grad.data_ptr() == x.data_ptr(), "inplace=True must write the gradient over the logits buffer"
    assert_close(grad, ref_grad, GRAD_TOL[torch.float16], "inplace d(logits)", seed)


def test_inplace_refuses_when_another_node_saved_the_logits():
    """exp saves its output; overwriting it in place must make autograd fail, not compute garbage."""
    seed = fresh_seed()
    gen = rng(seed)
    pre = randn(4, 300, gen=gen, scale=0.5).requires_grad_()
    logits = pre.exp()
    labels = _labels(4, 300, gen)
    loss = cross_entropy(logits, labels, IGNORE, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_out_of_range_label_gives_nan_for_that_row_only():
    seed = fresh_seed()
    gen = rng(seed)
    logits = randn(4, 300, gen=gen)
    labels = torch.tensor([3, 300, IGNORE, 7], device=DEVICE)
    loss = cross_entropy(logits, labels, IGNORE, "none")
    assert torch.isnan(loss[1]), f"label 300 >= V=300 must give NaN, got {loss[1].item()} (seed={seed})"
    good = torch.tensor([0, 2, 3], device=DEVICE)
    ref = reference.cross_entropy(logits.double()[good], labels[good], IGNORE, "none")
    assert_close(loss[good], ref, LOSS_TOL, "valid rows next to an out-of-range label", seed)


def test_empty_batch():
    logits = torch.zeros(0, 100, device=DEVICE, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    loss = cross_entropy(logits, labels)
    loss.backward()
    assert loss.item() == 0.0 and logits.grad.shape == (0, 100)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: (torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.int64)), ValueError, "2-D"),
        (lambda: (torch.zeros(2, 5), torch.zeros(3, dtype=torch.int64)), ValueError, "labels must have shape"),
        (lambda: (torch.zeros(2, 5), torch.zeros(2, dtype=torch.float32)), TypeError, "int32 or int64"),
        (lambda: (torch.zeros(2, 5, dtype=torch.float64), torch.zeros(2, dtype=torch.int64)), TypeError, "float32"),
    ],
)
def test_rejects_bad_inputs(make, error, match):
    logits, labels = make()
    with pytest.raises(error, match=match):
        cross_entropy(logits.to(DEVICE), labels.to(DEVICE))


def test_rejects_unknown_reduction():
    with pytest.raises(ValueError, match="reduction"):
        labels = torch.zeros(2, dtype=torch.int64, device=DEVICE)
        cross_entropy(torch.zeros(2, 5, device=DEVICE), labels, reduction="avg")


@pytest.mark.parametrize("vocab", [32000, 50257, 128256])
def test_production_vocabularies(vocab):
    """Llama-2, GPT-2 and Llama-3 vocabularies: many 4096-chunks, an odd size among them."""
    seed = fresh_seed()
    gen = rng(seed)
    n = 3
    logits = randn(n, vocab, gen=gen, dtype=torch.bfloat16, scale=4.0)
    labels = torch.tensor([0, vocab - 1, IGNORE], device=DEVICE)
    upstream = _upstream("mean", n, gen)
    loss, grad = _run(logits, labels, "mean", upstream)
    ref_loss, ref_grad = _reference(logits, labels, "mean", upstream)
    assert_close(loss, ref_loss, LOSS_TOL, f"loss V={vocab}", seed)
    assert_close(grad, ref_grad, GRAD_TOL[torch.bfloat16], f"d(logits) V={vocab}", seed)
