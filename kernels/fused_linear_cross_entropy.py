"""LM-head projection + token cross-entropy without materialising the (N, V) logits.

Design (row chunks, gradients computed in the forward):
- Rows (tokens) are processed in chunks of C rows. For each chunk:
    logits_c  = hidden_c @ weight.T                   (C, V)  cuBLAS, into one reused buffer
    CE kernel: loss, lse, then (softmax - onehot) * s written over logits_c in place
    grad_h_c  = dlogits_c @ weight                    (C, D)  cuBLAS, straight into grad_hidden
    acc      += dlogits_c.T @ hidden_c                (V, D)  Triton, fp32 accumulator
  so the forward+backward costs the same three matmuls as the unfused op, and the only
  (N, V)-sized traffic is one chunk at a time.
- s is 1/n_valid for "mean" and 1 for "sum"; the backward multiplies both precomputed
  gradients by grad_output (a device scalar: no host sync, no "is it 1?" check).
- "none" cannot be precomputed (the weight gradient needs the per-row upstream
  gradient inside the sum over rows): the forward keeps only lse (N,) and the backward
  recomputes each logits chunk (a fourth matmul) and applies the per-row factor.
- The weight gradient is summed over chunks in fp32 (a bf16 running sum drifts); the
  Triton kernel reads the fp32 tile, adds the chunk's product and writes it back, and on
  the last chunk writes the weight-dtype gradient directly (no separate cast pass). With
  one chunk no fp32 buffer exists at all. fp32 weights use cuBLAS addmm into the fp32
  gradient itself, which already accumulates in fp32.

Chunk size: the logits chunk is held to 8% of what the fp32 (N, V) logits would take
(C <= 0.32 N / element size: 7 balanced chunks for 16-bit logits, whatever V), leaving
room under a 10% budget for the allocator's and cuBLAS's own buffers. But chunks are
never made smaller than 2048 rows would allow: each chunk costs a read-modify-write of
the fp32 (V, D) accumulator (8 V D bytes), which would dominate the weight-gradient
matmul (2 C V D FLOPs) for small C. That floor binds below ~13k tokens (16-bit), where
the absolute sizes are small. Chunks are balanced, so the last one is not a sliver.

Memory beyond inputs and the returned gradients: the logits chunk (C x V), lse and loss
(8 N bytes) and, for 16-bit weights with more than one chunk, the fp32 accumulator
(4 V D bytes, the price of fp32 accumulation; D/N of the fp32 logits size).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from agentflan.kernels.compile_check import KernelSpec
from agentflan.kernels.cross_entropy import (
    BLOCK_CONFIGS,
    LABEL_DTYPES,
    LOGIT_DTYPES,
    TL_DTYPE,
    TL_LABEL,
    backward_spec,
    forward_spec,
    launch_backward,
    launch_forward,
    reduce_rows,
    validate_labels,
    validate_reduction,
)
from agentflan.kernels.validate import check_runnable

LOGITS_CHUNK_FRACTION = 0.08  # of the fp32 (N, V) logits size
MIN_CHUNK_ROWS = 2048
CHUNK_ROW_ALIGN = 64  # keeps chunk starts aligned for the matmul tiles
# The logits chunk buffer's rows are padded to a multiple of this many elements, so every
# row starts 16-byte aligned (and the JIT sees a row stride divisible by 16) whatever V is.
ROW_PAD = 64
# Weight-gradient tile: 128 x 128 output over 8 warps (64 fp32 accumulator registers per
# thread), K steps of 64 rows, 4 stages of A and B tiles in shared memory (128 KB). A
# 128 x 256 tile spilled registers in the variants that read the fp32 running sum back.
WGRAD_CONFIG = {"BLOCK_V": 128, "BLOCK_D": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4}
WGRAD_DTYPES = (torch.float16, torch.bfloat16)


@triton.jit
def _weight_grad_kernel(
    dlogits_ptr,  # (C, V) d(loss)/d(logits) of one chunk, row stride stride_dl >= V, unit column stride
    stride_dl,
    hidden_ptr,  # (C, D) hidden rows of the chunk, unit column stride
    stride_h,
    acc_ptr,  # (V, D) fp32 running sum over chunks, contiguous (unused when FIRST and LAST)
    out_ptr,  # (V, D) weight-dtype gradient, contiguous (written when LAST)
    C,
    V,
    D,
    FIRST: tl.constexpr,
    LAST: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """acc (+)= dlogits.T @ hidden for one (BLOCK_V, BLOCK_D) tile, K = the chunk's rows.

    The wrapper guarantees 16-byte aligned rows everywhere: base pointers 16-byte aligned,
    stride_dl, stride_h and D multiples of 8 elements. Stating it here (the `// 8 * 8`
    and multiple_of hints) gives 16-byte loads, cp.async pipelining and wgmma even where
    the JIT cannot see the alignment from the arguments; without it the loads go scalar
    and the kernel spills.
    """
    pid = tl.program_id(0)
    num_d = tl.cdiv(D, BLOCK_D)
    # D-tiles vary fastest: consecutive programs share one BLOCK_V slab of dlogits (read
    # from HBM once), while the chunk's hidden rows (C x D) stay resident in L2.
    pid_v = pid // num_d
    pid_d = pid % num_d
    stride_dl = (stride_dl // 8) * 8
    stride_h = (stride_h // 8) * 8
    D = (D // 8) * 8
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    d_mask = offs_d < D
    # A = dlogits.T tile (BLOCK_V, BLOCK_K), contiguous along V. Its loads are bounded by
    # the padded row length stride_dl (a multiple of 8, so masks stay 16-byte uniform):
    # pad columns only feed output rows >= V, which are never stored.
    a_mask_v = offs_v < stride_dl
    a_ptrs = tl.multiple_of(dlogits_ptr + offs_k[None, :] * stride_dl + offs_v[:, None], [16, 1])
    # B = hidden tile (BLOCK_K, BLOCK_D), contiguous along D.
    b_ptrs = tl.multiple_of(hidden_ptr + offs_k[:, None] * stride_h + offs_d[None, :], [1, 16])
    out_offs = offs_v[:, None].to(tl.int64) * D + offs_d[None, :]
    acc_ptrs = tl.multiple_of(acc_ptr + out_offs, [1, 16])
    out_ptrs = tl.multiple_of(out_ptr + out_offs, [1, 16])
    out_mask = (offs_v < V)[:, None] & d_mask[None, :]
    if FIRST:
        acc = tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32)
    else:
        acc = tl.load(acc_ptrs, mask=out_mask, other=0.0)
    for k in range(0, tl.cdiv(C, BLOCK_K)):
        k_left = C - k * BLOCK_K
        a = tl.load(a_ptrs, mask=a_mask_v[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & d_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_dl
        b_ptrs += BLOCK_K * stride_h
    if LAST:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(acc_ptrs, acc, mask=out_mask)


def default_chunk_rows(n_rows: int, elem_size: int) -> int:
    """Rows per chunk: logits chunk <= LOGITS_CHUNK_FRACTION of the fp32 logits, unless that
    makes more chunks than MIN_CHUNK_ROWS-row chunks would; balanced so the last chunk is not a sliver."""
    budget_rows = int(LOGITS_CHUNK_FRACTION * 4 * n_rows / elem_size)
    rows = max(budget_rows, MIN_CHUNK_ROWS)
    if rows >= n_rows:
        return max(n_rows, 1)
    n_chunks = math.ceil(n_rows / rows)
    balanced = math.ceil(n_rows / n_chunks)
    return min(rows, math.ceil(balanced / CHUNK_ROW_ALIGN) * CHUNK_ROW_ALIGN)


class _WeightGrad:
    """The weight gradient summed over row chunks in fp32.

    16-bit weights: a Triton kernel keeps the running sum in an fp32 (V, D) buffer (none
    when there is a single chunk) and writes the weight-dtype result on the last chunk.
    fp32 weights: cuBLAS accumulates into the fp32 gradient itself.
    """

    def __init__(self, weight: torch.Tensor, n_chunks: int) -> None:
        self.n_chunks = n_chunks
        self.done = 0
        if n_chunks == 0:  # no rows: the gradient is exactly zero
            self.grad = torch.zeros_like(weight, memory_format=torch.contiguous_format)
        else:
            self.grad = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        self.acc = None
        if weight.dtype in WGRAD_DTYPES and n_chunks > 1:
            self.acc = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)

    def add(self, dlogits: torch.Tensor, hidden_c: torch.Tensor) -> None:
        """dlogits (C, V), hidden_c (C, D): grad += dlogits.T @ hidden_c."""
        first, last = self.done == 0, self.done == self.n_chunks - 1
        self.done += 1
        if self.grad.dtype == torch.float32:
            if first:
                torch.mm(dlogits.t(), hidden_c, out=self.grad)
            else:
                self.grad.addmm_(dlogits.t(), hidden_c)
            return
        vocab, dim = self.grad.shape
        cfg = WGRAD_CONFIG
        grid = (triton.cdiv(vocab, cfg["BLOCK_V"]) * triton.cdiv(dim, cfg["BLOCK_D"]),)
        acc = self.acc if self.acc is not None else self.grad
        _weight_grad_kernel[grid](
            dlogits, dlogits.stride(0), hidden_c, hidden_c.stride(0), acc, self.grad,
            dlogits.shape[0], vocab, dim, FIRST=first, LAST=last,
            BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"], BLOCK_K=cfg["BLOCK_K"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        if last:
            self.acc = None  # free the fp32 buffer as soon as the result is out


def _new_rows(hidden: torch.Tensor) -> torch.Tensor:
    """A new contiguous (N, D) buffer like hidden: its row chunks are matmul outputs."""
    return torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)


def _chunks(n_rows: int, chunk_rows: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk_rows, n_rows)) for start in range(0, n_rows, chunk_rows)]


def _run_chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    chunk_rows: int,
    loss: torch.Tensor | None,
    lse: torch.Tensor,
    grad_scale: torch.Tensor | None,
    grad_hidden: torch.Tensor | None,
    weight_grad: _WeightGrad | None,
) -> None:
    """One pass over the row chunks.

    grad_scale None: forward only, fills loss and lse. Otherwise, with loss given, the
    forward kernel writes the gradient right after the lse pass (grad_scale (1,));
    with loss None, the backward kernel uses the saved lse (grad_scale (N,) per row).
    Fills grad_hidden (N, D) and/or accumulates weight_grad where given.
    """
    chunks = _chunks(hidden.shape[0], chunk_rows)
    if not chunks:
        return
    vocab = weight.shape[0]
    padded = -(-vocab // ROW_PAD) * ROW_PAD
    buf = torch.empty((chunks[0][1] - chunks[0][0], padded), dtype=hidden.dtype, device=hidden.device)
    buf[:, vocab:].zero_()  # pad columns: read by the weight-gradient kernel for rows it never stores
    for start, end in chunks:
        h_c, logits = hidden[start:end], buf[: end - start, :vocab]
        torch.mm(h_c, weight.t(), out=logits)  # (C, V)
        if loss is not None:
            launch_forward(logits, labels[start:end], ignore_index, loss[start:end], lse[start:end], grad_scale)
        else:
            scale_c = grad_scale[start:end]
            launch_backward(logits, labels[start:end], lse[start:end], scale_c, ignore_index, logits)
        if grad_scale is None:
            continue
        if grad_hidden is not None:
            torch.mm(logits, weight, out=grad_hidden[start:end])  # (C, D)
        if weight_grad is not None:
            weight_grad.add(logits, h_c)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        ignore_index: int,
        reduction: str,
        chunk_rows: int,
        need_grad_hidden: bool,
        need_grad_weight: bool,
    ):
        n_rows = hidden.shape[0]
        loss = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        n_valid = (labels != ignore_index).sum()
        ctx.reduction, ctx.ignore_index, ctx.chunk_rows = reduction, ignore_index, chunk_rows
        ctx.need = (need_grad_hidden, need_grad_weight)
        ctx.precomputed = reduction != "none"
        if not ctx.precomputed:
            _run_chunks(hidden, weight, labels, ignore_index, chunk_rows, loss, lse, None, None, None)
            ctx.save_for_backward(hidden, weight, labels, lse)
            return loss
        if reduction == "mean":
            scale = (1.0 / n_valid.clamp(min=1).float()).reshape(1)
        else:
            scale = torch.ones(1, dtype=torch.float32, device=hidden.device)
        grad_hidden = _new_rows(hidden) if need_grad_hidden else None
        weight_grad = _WeightGrad(weight, len(_chunks(n_rows, chunk_rows))) if need_grad_weight else None
        _run_chunks(hidden, weight, labels, ignore_index, chunk_rows, loss, lse, scale, grad_hidden, weight_grad)
        ctx.grads = [grad_hidden, weight_grad.grad if weight_grad is not None else None]
        return reduce_rows(loss, n_valid, reduction)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if ctx.precomputed:
            if ctx.grads is None:
                raise RuntimeError(
                    "fused_linear_cross_entropy: backward ran twice through the same graph; its gradients are "
                    "computed in the forward and handed out (scaled in place) on the first backward"
                )
            grad_hidden, grad_weight = ctx.grads
            ctx.grads = None
            for g in (grad_hidden, grad_weight):
                if g is not None:
                    g.mul_(grad_output)
            return grad_hidden, grad_weight, None, None, None, None, None, None
        hidden, weight, labels, lse = ctx.saved_tensors
        need_grad_hidden, need_grad_weight = ctx.need
        grad_hidden = _new_rows(hidden) if need_grad_hidden else None
        weight_grad = _WeightGrad(weight, len(_chunks(hidden.shape[0], ctx.chunk_rows))) if need_grad_weight else None
        scale = grad_output.float()  # (N,) per-row upstream gradient, read with its stride
        _run_chunks(
            hidden, weight, labels, ctx.ignore_index, ctx.chunk_rows, None, lse, scale, grad_hidden, weight_grad
        )
        grad_weight = weight_grad.grad if weight_grad is not None else None
        return grad_hidden, grad_weight, None, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T, labels) without the (N, V) logits in memory:
    reference.linear_cross_entropy's answer.

    hidden: (N, D), weight: (V, D), same dtype (fp32/fp16/bf16); labels: (N,) int32/int64,
    ignore_index where no loss (a label outside [0, V) otherwise gives NaN, as in
    cross_entropy). Returns fp32: a scalar for 'mean' (over non-ignored rows, 0 when all
    are ignored) and 'sum', (N,) for 'none'. chunk_rows overrides the rows per chunk
    (see default_chunk_rows).

    Layouts: weight and fp32 hidden may have any strides (they only feed cuBLAS
    matmuls); labels and a 'none' incoming gradient are read with their strides.
    fp16/bf16 hidden is read by the weight-gradient kernel as 16-byte aligned rows:
    one whose last dimension is not contiguous, whose row stride is not a multiple of
    8 or whose start is not 16-byte aligned is copied once; D must be a multiple of 8.
    Raises TypeError for unsupported or mismatched dtypes, ValueError for bad shapes,
    reductions, chunk sizes or devices.
    """
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"hidden must be (N, D) and weight (V, D), got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden dim {hidden.shape[1]} != weight dim {weight.shape[1]}")
    if hidden.dtype not in LOGIT_DTYPES or weight.dtype != hidden.dtype:
        raise TypeError(f"hidden and weight must share one of fp32/fp16/bf16, got {hidden.dtype} and {weight.dtype}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one vocabulary row")
    validate_labels(labels, hidden.shape[0])
    validate_reduction(reduction)
    check_runnable("fused_linear_cross_entropy", hidden, weight, labels)
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(hidden.shape[0], hidden.element_size())
    elif chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if hidden.dtype in WGRAD_DTYPES:
        # The 16-bit weight-gradient kernel reads and writes 16-byte aligned rows.
        if hidden.shape[1] % 8 != 0:
            raise ValueError(f"fp16/bf16 hidden size must be a multiple of 8 (16-byte rows), got {hidden.shape[1]}")
        if hidden.stride(1) != 1 or hidden.stride(0) % 8 != 0 or hidden.data_ptr() % 16 != 0:
            hidden = hidden.clone(memory_format=torch.contiguous_format)  # a fresh allocation is aligned
    grad_on = torch.is_grad_enabled()
    need_h, need_w = grad_on and hidden.requires_grad, grad_on and weight.requires_grad
    if not (need_h or need_w):
        # Nothing to differentiate: the forward alone, outside autograd.
        n_rows = hidden.shape[0]
        loss = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        _run_chunks(hidden, weight, labels, int(ignore_index), chunk_rows, loss, lse, None, None, None)
        return reduce_rows(loss, (labels != ignore_index).sum(), reduction)
    return _FusedLinearCrossEntropy.apply(
        hidden, weight, labels, int(ignore_index), reduction, int(chunk_rows), need_h, need_w
    )


# ---------------------------------------------------------------------------------
# Hopper compile specs
# ---------------------------------------------------------------------------------


def _weight_grad_spec(dtype: torch.dtype, first: bool, last: bool) -> KernelSpec:
    t = TL_DTYPE[dtype]
    cfg = WGRAD_CONFIG
    return KernelSpec(
        name=f"flce_weight_grad_{t}_{'first' if first else 'next'}_{'last' if last else 'acc'}",
        fn=_weight_grad_kernel,
        signature={
            "dlogits_ptr": f"*{t}", "stride_dl": "i32", "hidden_ptr": f"*{t}", "stride_h": "i32",
            "acc_ptr": "*fp32" if not (first and last) else f"*{t}", "out_ptr": f"*{t}",
            "C": "i32", "V": "i32", "D": "i32", "FIRST": "constexpr", "LAST": "constexpr",
            "BLOCK_V": "constexpr", "BLOCK_D": "constexpr", "BLOCK_K": "constexpr",
        },
        constexprs={"FIRST": first, "LAST": last, "BLOCK_V": cfg["BLOCK_V"], "BLOCK_D": cfg["BLOCK_D"],
                    "BLOCK_K": cfg["BLOCK_K"]},
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        expect_wgmma=True,
    )


def hopper_specs() -> list[KernelSpec]:
    """Every config fused_linear_cross_entropy() launches: the cross-entropy kernels it uses
    (the gradient-writing forward is its own) and the weight-gradient matmul for each
    16-bit dtype and chunk position (first/middle/last/only)."""
    specs = []
    for dtype in LOGIT_DTYPES:
        for label_dtype in LABEL_DTYPES:
            for block in BLOCK_CONFIGS:
                tag = f"{TL_DTYPE[dtype]}_{TL_LABEL[label_dtype]}_v{block}"
                specs.append(forward_spec(f"flce_ce_forward_{tag}", dtype, label_dtype, block, write_grad=False))
                specs.append(forward_spec(f"flce_ce_forward_grad_{tag}", dtype, label_dtype, block, write_grad=True))
                specs.append(backward_spec(f"flce_ce_backward_{tag}", dtype, label_dtype, block))
            tag = f"{TL_DTYPE[dtype]}_{TL_LABEL[label_dtype]}_v4096_labels_strided"
            specs.append(forward_spec(f"flce_ce_forward_{tag}", dtype, label_dtype, 4096, False, unit_label=False))
            specs.append(forward_spec(f"flce_ce_forward_grad_{tag}", dtype, label_dtype, 4096, True, unit_label=False))
            specs.append(backward_spec(f"flce_ce_backward_{tag}", dtype, label_dtype, 4096, unit_label=False))
    for dtype in WGRAD_DTYPES:
        for first in (True, False):
            for last in (True, False):
                specs.append(_weight_grad_spec(dtype, first, last))
    return specs
