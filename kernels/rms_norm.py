"""RMSNorm as Llama computes it, fused forward and backward in Triton.

    y = weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)

exactly the order of reference.rms_norm: normalise in fp32, round to x's dtype, then
multiply by the weight (the product rounded to the output dtype). All arithmetic is
fp32 on upcast values.

Forward: one program per row. Rows up to FWD_MAX_ONE_PASS columns are held in registers
(one read of x); wider rows are walked in chunks twice (sum of squares, then
normalise). It saves only the per-row reciprocal RMS (fp32) besides the inputs.

Backward: with xhat = x * rstd and g = dy * w,
    dx = rstd * (g - xhat * mean(g * xhat)),    dw = sum_rows dy * xhat.to(x.dtype)
A persistent grid of min(rows, 2 * SMs) programs each walks a strided set of rows and
accumulates its dw in fp32 into one partial row; the (programs, hidden) partials are
summed at the end. No (rows, hidden) fp32 temporary exists.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from agentflan.kernels.compile_check import KernelSpec
from agentflan.kernels.validate import check_runnable, unit_last

# Widest rows kept whole in registers. The forward holds x and w per row; the backward
# holds x, dy, w and the dw accumulator, so it goes chunked sooner (and sooner still for
# fp32). Past these limits ptxas spills registers (tools/hopper_check.py shows it).
FWD_MAX_ONE_PASS = 16384
BWD_MAX_ONE_PASS = {2: 8192, 4: 4096}  # by element size in bytes
CHUNK, CHUNK_WARPS = 4096, 16
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _rms_norm_fwd_kernel(
    X, W, Y, RSTD,  # X (rows, n_cols) row stride stride_x; W (n_cols,); Y (rows, n_cols); RSTD (rows,) fp32
    stride_x, stride_y, n_cols, inv_n_cols, eps,
    BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride may pass 2**31 on big batches
    x_row = X + row * stride_x
    y_row = Y + row * stride_y
    if ONE_PASS:
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)  # (BLOCK,)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) * inv_n_cols + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        xn = (x * rstd).to(X.dtype.element_ty).to(tl.float32)  # the reference rounds here
        tl.store(y_row + cols, (xn * w).to(Y.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(x_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            acc += x * x
        rstd = tl.rsqrt(tl.sum(acc, axis=0) * inv_n_cols + eps)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            xn = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
            tl.store(y_row + cols, (xn * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, RSTD, DX, DW_PARTIAL,  # DW_PARTIAL (programs, n_cols) fp32: one partial dw row per program
    stride_dy, stride_x, stride_dx, n_rows, n_cols, inv_n_cols,
    BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
):
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    # Walk rows pid, pid + n_prog, ... by advancing pointers: 64-bit pointer sums never
    # overflow, where row * stride in int32 could.
    dy_row = DY + pid * stride_dy
    x_row = X + pid * stride_x
    dx_row = DX + pid * stride_dx
    dw_row = DW_PARTIAL + pid * n_cols
    if ONE_PASS:
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK,), dtype=tl.float32)
        for row in range(pid, n_rows, n_prog):
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)  # (BLOCK,)
            dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            xhat = x * rstd
            g = dy * w
            c = tl.sum(g * xhat, axis=0) * inv_n_cols
            tl.store(dx_row + cols, (rstd * (g - xhat * c)).to(DX.dtype.element_ty), mask=mask)
            dw += dy * xhat.to(X.dtype.element_ty).to(tl.float32)
            x_row += n_prog * stride_x
            dy_row += n_prog * stride_dy
            dx_row += n_prog * stride_dx
        tl.store(dw_row + cols, dw, mask=mask)
    else:
        # DW_PARTIAL arrives zeroed; this program alone owns row pid of it, so a plain
        # read-add-write per chunk is race free.
        for row in range(pid, n_rows, n_prog):
            rstd = tl.load(RSTD + row)
            acc = tl.zeros((BLOCK,), dtype=tl.float32)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < n_cols
                x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                acc += dy * w * x
            c = tl.sum(acc, axis=0) * rstd * inv_n_cols  # mean(g * xhat)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < n_cols
                x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                xhat = x * rstd
                tl.store(dx_row + cols, (rstd * (dy * w - xhat * c)).to(DX.dtype.element_ty), mask=mask)
                dw = tl.load(dw_row + cols, mask=mask, other=0.0)
                tl.store(dw_row + cols, dw + dy * xhat.to(X.dtype.element_ty).to(tl.float32), mask=mask)
            x_row += n_prog * stride_x
            dy_row += n_prog * stride_dy
            dx_row += n_prog * stride_dx


class Config(NamedTuple):
    block: int
    one_pass: bool
    num_warps: int
    num_stages: int


def _one_pass_warps(block: int) -> int:
    return min(max(block // 512, 4), 16)


def _fwd_config(n_cols: int) -> Config:
    """The forward launch config for a row width; the wrapper and hopper_specs both use it."""
    if n_cols <= FWD_MAX_ONE_PASS:
        block = max(triton.next_power_of_2(n_cols), 64)
        return Config(block, True, _one_pass_warps(block), 1)
    return Config(CHUNK, False, CHUNK_WARPS, 1)


def _bwd_config(n_cols: int, dtype: torch.dtype) -> Config:
    """The backward launch config. Its row loop is software-pipelined two deep: the next
    row's loads are in flight while this row computes."""
    if n_cols <= BWD_MAX_ONE_PASS[dtype.itemsize]:
        block = max(triton.next_power_of_2(n_cols), 64)
        return Config(block, True, _one_pass_warps(block), 2)
    return Config(CHUNK, False, CHUNK_WARPS, 2)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _n_programs(n_rows: int, num_warps: int, device: torch.device) -> int:
    """Persistent backward grid: about 32 warps' worth of programs per SM; on the
    interpreter (CPU) a handful, which still exercises the strided row walk."""
    if device.type != "cuda":
        return max(1, min(n_rows, 8))
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(n_rows, sms * max(1, 32 // num_warps)))


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"rms_norm: x dtype must be one of {SUPPORTED_DTYPES}, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"rms_norm: weight dtype {weight.dtype} must match x dtype {x.dtype}")
    if weight.dim() != 1 or x.dim() == 0 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight must be (hidden,) = ({x.shape[-1] if x.dim() else '?'},), "
                         f"got x {tuple(x.shape)} weight {tuple(weight.shape)}")
    check_runnable("rms_norm", x, weight)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., hidden) -> (rows, hidden) with unit column stride (copies only if needed)."""
    return unit_last(t.reshape(math.prod(t.shape[:-1]), t.shape[-1]))


def _forward(x2: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_cols = x2.shape
    y = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
    if n_rows == 0 or n_cols == 0:  # nothing to normalise; rstd is never read
        return y, torch.zeros((n_rows,), dtype=torch.float32, device=x2.device)
    rstd = torch.empty((n_rows,), dtype=torch.float32, device=x2.device)
    cfg = _fwd_config(n_cols)
    _rms_norm_fwd_kernel[(n_rows,)](
        x2, weight, y, rstd, x2.stride(0), y.stride(0), n_cols, 1.0 / n_cols, eps,
        BLOCK=cfg.block, ONE_PASS=cfg.one_pass, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y, rstd


def _backward(
    dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_cols = x2.shape
    dx = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
    if n_rows == 0 or n_cols == 0:
        return dx, torch.zeros((n_cols,), dtype=weight.dtype, device=weight.device)
    cfg = _bwd_config(n_cols, x2.dtype)
    n_prog = _n_programs(n_rows, cfg.num_warps, x2.device)
    # One-pass programs store their whole partial row; chunked ones accumulate into it.
    alloc = torch.empty if cfg.one_pass else torch.zeros
    dw_partial = alloc((n_prog, n_cols), dtype=torch.float32, device=x2.device)
    _rms_norm_bwd_kernel[(n_prog,)](
        dy2, x2, weight, rstd, dx, dw_partial, dy2.stride(0), x2.stride(0), dx.stride(0), n_rows, n_cols, 1.0 / n_cols,
        BLOCK=cfg.block, ONE_PASS=cfg.one_pass, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dx, dw_partial.sum(dim=0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        _check(x, weight)
        x2 = _rows(x)
        weight = weight.contiguous()  # (hidden,): a strided weight costs one tiny copy
        y, rstd = _forward(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = _backward(_rows(dy), x2, weight, rstd)
        return dx.view(dy.shape), (dw if ctx.needs_input_grad[1] else None), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm over the last dimension: reference.rms_norm's answer.

    x: (..., hidden) fp32/fp16/bf16, any leading shape; weight: (hidden,) in x's dtype;
    returns a new contiguous tensor shaped and typed like x. Layouts: the kernels take
    the row stride of x (and of the incoming gradient), so row slices and stride-0 rows
    are read in place; a tensor whose last dimension is not contiguous, or whose
    leading dimensions do not merge into one row stride, is copied once (the kernels
    read each row as one contiguous vector, held in registers). A non-contiguous weight
    is copied (hidden elements; a generic-stride weight load spilled registers in the
    16-bit backward at hidden 8192). Raises TypeError for unsupported or mismatched
    dtypes, ValueError for mismatched shapes or devices, or CPU tensors without the
    Triton interpreter.
    """
    return RMSNormFunction.apply(x, weight, eps)


_TL_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def hopper_specs() -> list[KernelSpec]:
    """Every config the wrappers pick, for each dtype, at representative widths: small
    (96), Llama-2 7B/13B/70B (4096, 5120, 8192), 16384 and 32768 (chunked paths)."""
    specs: list[KernelSpec] = []
    seen: set[str] = set()
    for dtype in SUPPORTED_DTYPES:
        t = _TL_NAME[dtype]
        for n_cols in (96, 4096, 5120, 8192, 16384, 32768):
            for direction, cfg in (("fwd", _fwd_config(n_cols)), ("bwd", _bwd_config(n_cols, dtype))):
                name = f"rms_norm_{direction}[{t},BLOCK={cfg.block}{'' if cfg.one_pass else ',chunked'}]"
                if name in seen:
                    continue
                seen.add(name)
                if direction == "fwd":
                    fn, sig = _rms_norm_fwd_kernel, {
                        "X": f"*{t}", "W": f"*{t}", "Y": f"*{t}", "RSTD": "*fp32", "stride_x": "i32",
                        "stride_y": "i32", "n_cols": "i32", "inv_n_cols": "fp32", "eps": "fp32"}
                else:
                    fn, sig = _rms_norm_bwd_kernel, {
                        "DY": f"*{t}", "X": f"*{t}", "W": f"*{t}", "RSTD": "*fp32", "DX": f"*{t}",
                        "DW_PARTIAL": "*fp32", "stride_dy": "i32", "stride_x": "i32", "stride_dx": "i32",
                        "n_rows": "i32", "n_cols": "i32", "inv_n_cols": "fp32"}
                specs.append(KernelSpec(
                    name, fn, {**sig, "BLOCK": "constexpr", "ONE_PASS": "constexpr"},
                    {"BLOCK": cfg.block, "ONE_PASS": cfg.one_pass}, num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages,
                ))
    return specs
