"""SwiGLU, silu(gate) * up, fused forward and backward in Triton.

    y  = gate * sigmoid(gate) * up
    dg = dy * up * s * (1 + gate * (1 - s)),   s = sigmoid(gate)
    du = dy * gate * s

All arithmetic is fp32 on upcast values; each output is rounded to the input dtype
once. The backward recomputes the sigmoid from gate, so the forward saves nothing but
its two inputs (which autograd keeps alive anyway for the projections feeding them).

Both tensors are treated as one flat stream of elements: any shape works, and the
kernels see contiguous memory. A non-contiguous input or incoming gradient (a column
slice of a fused gate/up projection, a transposed or stride-0 expanded view, the
gradient of `.sum()`) is copied once by the wrapper; contiguous ones are not copied.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from agentflan.kernels.compile_check import KernelSpec
from agentflan.kernels.validate import check_runnable

# 1024 elements per program over 4 warps: 8 per thread, i.e. 16-byte vector accesses
# for 16-bit dtypes. Elementwise and memory bound, so one config serves every size.
BLOCK, NUM_WARPS, NUM_STAGES = 1024, 4, 1
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, n, BLOCK: tl.constexpr):  # G, U, Y: (n,) flat
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: n may pass 2**31
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, (g * tl.sigmoid(g) * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, G, U, DG, DU, n, BLOCK: tl.constexpr):  # all (n,) flat
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    silu = g * s
    tl.store(DU + offs, (dy * silu).to(DU.dtype.element_ty), mask=mask)
    tl.store(DG + offs, (dy * u * s * (1.0 + g * (1.0 - s))).to(DG.dtype.element_ty), mask=mask)


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    if gate.dtype != up.dtype:
        raise TypeError(f"swiglu: gate dtype {gate.dtype} and up dtype {up.dtype} must match")
    if gate.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"swiglu: dtype must be one of {SUPPORTED_DTYPES}, got {gate.dtype}")
    check_runnable("swiglu", gate, up)


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK),)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        _check(gate, up)
        gate, up = gate.contiguous(), up.contiguous()
        y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
        n = gate.numel()
        if n:
            _swiglu_fwd_kernel[_grid(n)](gate, up, y, n, BLOCK=BLOCK, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        dg = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
        du = torch.empty(up.shape, dtype=up.dtype, device=up.device)
        n = gate.numel()
        if n:
            _swiglu_bwd_kernel[_grid(n)](
                dy, gate, up, dg, du, n, BLOCK=BLOCK, num_warps=NUM_WARPS, num_stages=NUM_STAGES
            )
        return dg, du


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: reference.swiglu's answer for same-shape, same-dtype tensors.

    gate, up: any shape and layout (see the module docstring for which are copied),
    fp32/fp16/bf16. Returns a new contiguous tensor of that shape and dtype. Raises
    ValueError for different shapes (no broadcasting) or devices, TypeError for
    unsupported or mismatched dtypes."""
    return SwiGLUFunction.apply(gate, up)


_TL_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def hopper_specs() -> list[KernelSpec]:
    """The single config, forward and backward, for each dtype; n arrives as i32, or as
    i64 once a tensor holds 2**31 elements or more (Triton specialises on the value)."""
    specs: list[KernelSpec] = []
    for dtype in SUPPORTED_DTYPES:
        name = _TL_NAME[dtype]
        t = f"*{name}"
        for n_ty in ("i32", "i64"):
            specs.append(KernelSpec(
                f"swiglu_fwd[{name},n:{n_ty}]", _swiglu_fwd_kernel,
                {"G": t, "U": t, "Y": t, "n": n_ty, "BLOCK": "constexpr"}, {"BLOCK": BLOCK}, NUM_WARPS, NUM_STAGES,
            ))
            specs.append(KernelSpec(
                f"swiglu_bwd[{name},n:{n_ty}]", _swiglu_bwd_kernel,
                {"DY": t, "G": t, "U": t, "DG": t, "DU": t, "n": n_ty, "BLOCK": "constexpr"}, {"BLOCK": BLOCK},
                NUM_WARPS, NUM_STAGES,
            ))
    return specs
