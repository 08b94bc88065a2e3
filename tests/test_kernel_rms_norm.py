"""The Triton RMSNorm against reference.rms_norm: forward, dx and dw, in fp32, fp16 and
bf16, fresh inputs every run, odd sizes, poisoned outputs.

The reference runs in float64 on the same (already rounded) inputs, so the measured
error is the kernel's own. Tolerances are a small multiple of each dtype's unit
roundoff (fp16 2**-11, bf16 2**-8; fp32 within a few ulps): the kernel rounds x/rms to the input dtype (as
the reference does) and rounds every output once.
"""

from __future__ import annotations

import pytest
import torch

from agentflan.kernels import reference
from agentflan.kernels.rms_norm import rms_norm
from triton_harness import DEVICE, DTYPES, assert_close, fresh_seed, poisoned_outputs, randn, rng

TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _check(shape: tuple[int, ...], dtype: torch.dtype, seed: int, eps: float = 1e-5, x_scale: float = 1.0) -> None:
    g = rng(seed)
    hidden = shape[-1]
    x = randn(*shape, gen=g, dtype=dtype, scale=x_scale)
    w = (1.0 + randn(hidden, gen=g, scale=0.5)).to(dtype)  # not ones: a weight mix-up must show
    dy = randn(*shape, gen=g, dtype=dtype)

    xk, wk = x.clone().requires_grad_(), w.clone().requires_grad_()
    with poisoned_outputs():
        y = rms_norm(xk, wk, eps)
        y.backward(dy)
    assert y.dtype == dtype and y.shape == x.shape
    assert xk.grad.dtype == dtype and wk.grad.dtype == dtype

    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    y64 = reference.rms_norm(x64, w64, eps)
    y64.backward(dy.double())

    tol = TOL[dtype]
    assert_close(y, y64, tol, f"y {dtype} {shape}", seed)
    assert_close(xk.grad, x64.grad, tol, f"dx {dtype} {shape}", seed)
    assert_close(wk.grad, w64.grad, tol, f"dw {dtype} {shape}", seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 96), (7, 1000), (3, 11, 96), (2, 37, 200)], ids=str)
def test_rms_norm_matches_reference(shape, dtype):
    _check(shape, dtype, fresh_seed())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_hidden_8192_few_rows(dtype):
    _check((3, 8192), dtype, fresh_seed())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_large_values(dtype):
    # x**2 summed over the row would overflow fp16 (max 65504) if not done in fp32.
    _check((5, 300), dtype, fresh_seed(), x_scale=60.0, eps=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_chunked_rows(dtype):
    # 17000 columns: past the one-pass limits of both directions, and not a multiple of
    # the 4096-column chunk. 11 rows over the interpreter's 8 backward programs: some
    # programs accumulate dw over two rows.
    _check((11, 17000), dtype, fresh_seed())


def test_rms_norm_fp32_backward_chunks_from_4097_columns():
    # fp32 rows wider than 4096 take the chunked backward while the forward stays one pass.
    _check((19, 4097), torch.float32, fresh_seed())


def test_rms_norm_strided_rows():
    # A column slice of a wider buffer: rows are strided, columns contiguous; no copy needed.
    seed = fresh_seed()
    g = rng(seed)
    base = randn(9, 160, gen=g, dtype=torch.float16)
    x = base[:, 17:113]  # (9, 96), row stride 160
    w = (1.0 + randn(96, gen=g, scale=0.5)).to(torch.float16)
    with poisoned_outputs():
        y = rms_norm(x, w, 1e-5)
    assert_close(y, reference.rms_norm(x.double(), w.double(), 1e-5), TOL[torch.float16], "y strided", seed)


def test_rms_norm_saves_only_inputs_and_fp32_rstd():
    seed = fresh_seed()
    x = randn(6, 96, gen=rng(seed), dtype=torch.bfloat16).requires_grad_()
    w = torch.ones(96, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    y = rms_norm(x, w, 1e-5)
    saved = y.grad_fn.saved_tensors
    assert len(saved) == 3
    assert saved[0].data_ptr() == x.data_ptr() and saved[1].data_ptr() == w.data_ptr()
    assert saved[2].dtype == torch.float32 and saved[2].shape == (6,)


def test_rms_norm_weight_without_grad():
    seed = fresh_seed()
    x = randn(4, 96, gen=rng(seed)).requires_grad_()
    w = torch.ones(96, device=DEVICE)
    rms_norm(x, w, 1e-5).sum().backward()
    assert w.grad is None and torch.isfinite(x.grad).all()


def test_rms_norm_no_rows():
    x = torch.empty(0, 96, device=DEVICE, requires_grad=True)
    w = torch.ones(96, device=DEVICE, requires_grad=True)
    y = rms_norm(x, w, 1e-5)
    y.sum().backward()
    assert y.shape == (0, 96) and torch.equal(w.grad, torch.zeros(96, device=DEVICE))


def test_rms_norm_rejects_bad_inputs():
    x = torch.zeros(4, 96, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight must be \(hidden,\) = \(96,\)"):
        rms_norm(x, torch.ones(95, device=DEVICE), 1e-5)
    with pytest.raises(TypeError, match="weight dtype torch.float16 must match x dtype torch.float32"):
        rms_norm(x, torch.ones(96, device=DEVICE, dtype=torch.float16), 1e-5)
    with pytest.raises(TypeError, match="x dtype must be one of"):
        rms_norm(x.double(), torch.ones(96, device=DEVICE, dtype=torch.float64), 1e-5)
