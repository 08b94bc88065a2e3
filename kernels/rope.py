"""Rotary position embedding (rotate-half layout), fused for q and k, in Triton.

With x = (x1, x2) the two halves of a head and the tables split the same way,
    forward:   o1 = x1 * cos1 - x2 * sin1,    o2 = x2 * cos2 + x1 * sin2
    backward:  d1 = g1 * cos1 + g2 * sin2,    d2 = g2 * cos2 - g1 * sin1
which is reference.apply_rope and its exact transpose. For tables from
reference.rope_cos_sin (cos1 == cos2, sin1 == sin2) the backward is the rotation by
the negative angle. cos/sin are (T, head_dim), one row per token, built from positions
that restart in every packed document, so packing needs nothing here.

One program per token rotates all of its q heads and k heads, BLOCK_H heads at a time,
in fp32. Output dtype follows PyTorch promotion, as the reference's `q * cos` does:
bf16 q with fp32 tables gives fp32 outputs.

Strides: the token and head strides of q, k and their incoming gradients and the
token strides of cos/sin are passed to the kernel, so views (slices of one fused qkv
projection, stride-0 tokens or heads, tables expanded from one row) are read in place;
a tensor whose head_dim is not contiguous is copied once (each head is read as two
contiguous halves). Outputs are new contiguous tensors.

Backward: the kernel reads both halves of an element pair before writing either, so it
could safely write into the incoming gradient. It does not: autograd may hand the same
gradient buffer to other consumers (retain_grad, hooks, an expanded gradient with
stride 0), so the backward allocates dq and dk.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from agentflan.kernels.compile_check import KernelSpec
from agentflan.kernels.validate import check_runnable, unit_last

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# At most this many elements per (heads x half-head) tile: 16 fp32 per thread per half
# over 4 warps keeps every value in registers.
MAX_TILE = 2048
NUM_WARPS, NUM_STAGES = 4, 1


@triton.jit
def _rotate_heads(
    X, O, t, stride_xt, stride_xh, stride_ot, stride_oh, n_heads, half,
    c1, s1, c2, s2, d, dmask,
    BLOCK_H: tl.constexpr, BACKWARD: tl.constexpr,
):
    """Rotate the n_heads heads of token t, BLOCK_H at a time. c1..s2, d, dmask: (BLOCK_D,)."""
    x_tok = X + t * stride_xt
    o_tok = O + t * stride_ot
    for h0 in range(0, n_heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = (h < n_heads)[:, None] & dmask[None, :]  # (BLOCK_H, BLOCK_D)
        x_ptr = x_tok + h[:, None] * stride_xh + d[None, :]
        x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + half, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            o1 = x1 * c1[None, :] + x2 * s2[None, :]
            o2 = x2 * c2[None, :] - x1 * s1[None, :]
        else:
            o1 = x1 * c1[None, :] - x2 * s1[None, :]
            o2 = x2 * c2[None, :] + x1 * s2[None, :]
        o_ptr = o_tok + h[:, None] * stride_oh + d[None, :]
        tl.store(o_ptr, o1.to(O.dtype.element_ty), mask=mask)
        tl.store(o_ptr + half, o2.to(O.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q, K, COS, SIN, QO, KO,  # Q (T, n_heads, 2*half), K (T, n_kv_heads, 2*half), COS/SIN (T, 2*half)
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ct, stride_st,
    stride_qot, stride_qoh, stride_kot, stride_koh,
    n_heads, n_kv_heads, half,
    BLOCK_H: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)  # int64: t * stride may pass 2**31
    d = tl.arange(0, BLOCK_D)
    dmask = d < half
    c1 = tl.load(COS + t * stride_ct + d, mask=dmask, other=0.0).to(tl.float32)  # (BLOCK_D,)
    c2 = tl.load(COS + t * stride_ct + half + d, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + t * stride_st + d, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + t * stride_st + half + d, mask=dmask, other=0.0).to(tl.float32)
    _rotate_heads(Q, QO, t, stride_qt, stride_qh, stride_qot, stride_qoh, n_heads, half,
                  c1, s1, c2, s2, d, dmask, BLOCK_H, BACKWARD)
    _rotate_heads(K, KO, t, stride_kt, stride_kh, stride_kot, stride_koh, n_kv_heads, half,
                  c1, s1, c2, s2, d, dmask, BLOCK_KH, BACKWARD)


class Config(NamedTuple):
    block_h: int
    block_kh: int
    block_d: int


def _config(n_heads: int, n_kv_heads: int, head_dim: int) -> Config:
    """Tile sizes for a head layout; the wrapper and hopper_specs both use it."""
    block_d = triton.next_power_of_2(head_dim // 2)
    cap = max(1, MAX_TILE // block_d)
    return Config(min(triton.next_power_of_2(n_heads), cap), min(triton.next_power_of_2(n_kv_heads), cap), block_d)


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"apply_rope: q and k must be (T, heads, head_dim), got {tuple(q.shape)} and {tuple(k.shape)}")
    T, _, head_dim = q.shape
    if k.shape[0] != T or k.shape[2] != head_dim:
        raise ValueError(f"apply_rope: k {tuple(k.shape)} does not match q {tuple(q.shape)} in tokens/head_dim")
    if head_dim % 2:
        raise ValueError(f"apply_rope: head_dim must be even, got {head_dim}")
    for name, table in (("cos", cos), ("sin", sin)):
        if table.shape != (T, head_dim):
            raise ValueError(f"apply_rope: {name} must be (T, head_dim) = ({T}, {head_dim}), got {tuple(table.shape)}")
        if table.requires_grad:
            raise ValueError(f"apply_rope: {name} requires grad; the kernel treats the tables as constants")
    if q.dtype != k.dtype or q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"apply_rope: q and k must share one dtype of {SUPPORTED_DTYPES}, got {q.dtype}, {k.dtype}")
    if cos.dtype != sin.dtype or cos.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"apply_rope: cos and sin must share one dtype of {SUPPORTED_DTYPES}, got {cos.dtype}, {sin.dtype}")
    check_runnable("apply_rope", q, k, cos, sin)


def _launch(x_q, x_k, cos, sin, out_q, out_k, backward: bool) -> None:
    T, n_heads, head_dim = x_q.shape
    if T == 0 or head_dim == 0:  # nothing to rotate: the outputs hold no element
        return
    cfg = _config(n_heads, x_k.shape[1], head_dim)
    _rope_kernel[(T,)](
        x_q, x_k, cos, sin, out_q, out_k,
        x_q.stride(0), x_q.stride(1), x_k.stride(0), x_k.stride(1), cos.stride(0), sin.stride(0),
        out_q.stride(0), out_q.stride(1), out_k.stride(0), out_k.stride(1),
        n_heads, x_k.shape[1], head_dim // 2,
        BLOCK_H=cfg.block_h, BLOCK_KH=cfg.block_kh, BLOCK_D=cfg.block_d, BACKWARD=backward,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )


class RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        _check(q, k, cos, sin)
        q, k, cos, sin = unit_last(q), unit_last(k), unit_last(cos), unit_last(sin)
        out_dtype = torch.promote_types(q.dtype, cos.dtype)
        q_out = torch.empty(q.shape, dtype=out_dtype, device=q.device)
        k_out = torch.empty(k.shape, dtype=out_dtype, device=k.device)
        _launch(q, k, cos, sin, q_out, k_out, backward=False)
        ctx.save_for_backward(cos, sin)
        ctx.in_dtype = q.dtype
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq_out: torch.Tensor, dk_out: torch.Tensor):
        cos, sin = ctx.saved_tensors
        # autograd materialises the gradient of an output that took no part in the loss
        # as zeros (materialize_grads is on by default), so neither is None here.
        dq_out, dk_out = unit_last(dq_out), unit_last(dk_out)
        dq = torch.empty(dq_out.shape, dtype=ctx.in_dtype, device=dq_out.device)
        dk = torch.empty(dk_out.shape, dtype=ctx.in_dtype, device=dk_out.device)
        _launch(dq_out, dk_out, cos, sin, dq, dk, backward=True)
        return dq, dk, None, None


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (T, n_heads, head_dim) and k (T, n_kv_heads, head_dim) by the per-token
    tables cos/sin (T, head_dim): reference.apply_rope's answer.

    q and k share one dtype, cos and sin another (fp32/fp16/bf16); outputs are new
    contiguous tensors in torch.promote_types(q.dtype, cos.dtype). Any layout (see the
    module docstring for which are copied). Raises ValueError for mismatched shapes, an
    odd head_dim, tables that require grad (they are constants here) or devices;
    TypeError for unsupported or mismatched dtypes."""
    return RopeFunction.apply(q, k, cos, sin)


_TL_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# (q/k dtype, cos/sin dtype): matching tables, and fp32 tables with 16-bit activations
# (what autocast produces: fp32 residual stream, bf16 projections).
_DTYPE_PAIRS = (
    (torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32), (torch.bfloat16, torch.float32),
)
# Llama-2 7B (32/32), 13B (40/40) and 70B (64/8) head layouts, head_dim 128; and a
# small one (head_dim 16).
_LAYOUTS = ((32, 32, 128), (40, 40, 128), (64, 8, 128), (6, 2, 16))


def hopper_specs() -> list[KernelSpec]:
    """Every tile config the layouts above pick, forward and backward, for each dtype pair."""
    specs: list[KernelSpec] = []
    seen: set[str] = set()
    for q_dtype, t_dtype in _DTYPE_PAIRS:
        out_dtype = torch.promote_types(q_dtype, t_dtype)
        qn, tn, on = _TL_NAME[q_dtype], _TL_NAME[t_dtype], _TL_NAME[out_dtype]
        for n_heads, n_kv, head_dim in _LAYOUTS:
            cfg = _config(n_heads, n_kv, head_dim)
            for backward in (False, True):
                # forward reads q/k and writes outputs; backward reads output grads, writes q/k grads
                src, dst = (on, qn) if backward else (qn, on)
                name = (f"rope_{'bwd' if backward else 'fwd'}[{qn},tables={tn},"
                        f"H={cfg.block_h},KH={cfg.block_kh},D={cfg.block_d}]")
                if name in seen:
                    continue
                seen.add(name)
                sig = {"Q": f"*{src}", "K": f"*{src}", "COS": f"*{tn}", "SIN": f"*{tn}", "QO": f"*{dst}",
                       "KO": f"*{dst}"}
                sig.update({a: "i32" for a in (
                    "stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_ct", "stride_st", "stride_qot",
                    "stride_qoh", "stride_kot", "stride_koh", "n_heads", "n_kv_heads", "half")})
                sig.update({c: "constexpr" for c in ("BLOCK_H", "BLOCK_KH", "BLOCK_D", "BACKWARD")})
                consts = {"BLOCK_H": cfg.block_h, "BLOCK_KH": cfg.block_kh, "BLOCK_D": cfg.block_d,
                          "BACKWARD": backward}
                specs.append(KernelSpec(name, _rope_kernel, sig, consts, NUM_WARPS, NUM_STAGES))
    return specs
