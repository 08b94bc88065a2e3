"""The Triton SwiGLU against reference.swiglu: forward and both gradients in fp32, fp16
and bf16, fresh inputs every run, odd sizes, poisoned outputs.

The reference runs in float64 on the same (already rounded) inputs. The kernel rounds
each output once, so its error is about half an ulp of the dtype; tolerances are a
small multiple of the unit roundoff (fp16 2**-11, bf16 2**-8).
"""

from __future__ import annotations

import pytest
import torch

from agentflan.kernels import reference
from agentflan.kernels.swiglu import BLOCK, swiglu
from triton_harness import DEVICE, DTYPES, assert_close, fresh_seed, poisoned_outputs, randn, rng

TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 6e-3}


def _check(shape: tuple[int, ...], dtype: torch.dtype, seed: int, gate_scale: float = 2.0) -> None:
    g = rng(seed)
    gate = randn(*shape, gen=g, dtype=dtype, scale=gate_scale)  # both saturated and linear regions of silu
    up = randn(*shape, gen=g, dtype=dtype)
    dy = randn(*shape, gen=g, dtype=dtype)

    gk, uk = gate.clone().requires_grad_(), up.clone().requires_grad_()
    with poisoned_outputs():
        y = swiglu(gk, uk)
        y.backward(dy)
    assert y.dtype == dtype and y.shape == gate.shape

    g64, u64 = gate.double().requires_grad_(), up.double().requires_grad_()
    y64 = reference.swiglu(g64, u64)
    y64.backward(dy.double())

    tol = TOL[dtype]
    assert_close(y, y64, tol, f"y {dtype} {shape}", seed)
    assert_close(gk.grad, g64.grad, tol, f"dgate {dtype} {shape}", seed)
    assert_close(uk.grad, u64.grad, tol, f"dup {dtype} {shape}", seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1,), (7, 1000), (3, 11, 96), (BLOCK + 1,)], ids=str)
def test_swiglu_matches_reference(shape, dtype):
    _check(shape, dtype, fresh_seed())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swiglu_large_gate(dtype):
    # |gate| up to ~60: sigmoid saturates to 0 and 1 and silu(g) -> 0 or g; no inf/NaN.
    _check((33, 96), dtype, fresh_seed(), gate_scale=20.0)


def test_swiglu_non_contiguous_inputs():
    # gate and up as column halves of one fused projection output: copied once, then fused.
    seed = fresh_seed()
    fused = randn(9, 2 * 100, gen=rng(seed), dtype=torch.bfloat16).requires_grad_()
    gate, up = fused[:, :100], fused[:, 100:]
    with poisoned_outputs():
        y = swiglu(gate, up)
        y.sum().backward()
    f64 = fused.detach().double().requires_grad_()
    y64 = reference.swiglu(f64[:, :100], f64[:, 100:])
    y64.sum().backward()
    assert_close(y, y64, TOL[torch.bfloat16], "y", seed)
    assert_close(fused.grad, f64.grad, TOL[torch.bfloat16], "d fused", seed)


def test_swiglu_saves_only_inputs():
    seed = fresh_seed()
    gate = randn(5, 96, gen=rng(seed)).requires_grad_()
    up = randn(5, 96, gen=rng(seed + 1)).requires_grad_()
    y = swiglu(gate, up)  # kept alive: some torch versions free a graph's saved tensors with its output
    saved = y.grad_fn.saved_tensors
    assert [t.data_ptr() for t in saved] == [gate.data_ptr(), up.data_ptr()]


def test_swiglu_empty():
    gate = torch.empty(0, 96, device=DEVICE, requires_grad=True)
    up = torch.empty(0, 96, device=DEVICE, requires_grad=True)
    y = swiglu(gate, up)
    y.sum().backward()
    assert y.shape == (0, 96) and gate.grad.shape == (0, 96)


def test_swiglu_rejects_bad_inputs():
    a = torch.zeros(4, 96, device=DEVICE)
    with pytest.raises(ValueError, match=r"gate \(4, 96\) and up \(4, 95\) must have the same shape"):
        swiglu(a, torch.zeros(4, 95, device=DEVICE))
    with pytest.raises(TypeError, match="gate dtype torch.float32 and up dtype torch.bfloat16 must match"):
        swiglu(a, a.to(torch.bfloat16))
    with pytest.raises(TypeError, match="dtype must be one of"):
        swiglu(a.double(), a.double())
