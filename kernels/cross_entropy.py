"""Token cross-entropy over a vocabulary: Triton kernels and their autograd wrapper.

One program per row (token). Logits are loaded in their own dtype and upcast to fp32
before any arithmetic; the log-sum-exp is computed online over vocabulary chunks of
BLOCK_V, so any vocabulary size works (32000, 128256, 50257, 517...).

Gradient design (why the forward does not write the gradient):
- The forward reads each logits row once and keeps per row only the loss and the
  log-sum-exp (lse, fp32).
- The backward reads each row once more and writes (softmax - onehot) * scale in one
  pass, where scale is grad_output (per row for "none", a scalar otherwise) divided by
  the non-ignored count for "mean". Knowing grad_output there means no extra pass to
  rescale a precomputed gradient and no host sync to ask whether grad_output is 1.
  HBM traffic: one read in the forward, one read and one write in the backward. A
  forward that writes the gradient (then rescaled in the backward) saves that read only
  when grad_output is known to be 1, which takes a host sync to find out.
- The gradient goes to a new buffer by default, so the caller's logits survive. With
  `inplace=True` it is written over the logits buffer instead (saves N*V elements of
  memory); the logits' version counter is bumped so any other autograd node that saved
  those logits fails loudly instead of reading gradients.
- Rows whose label is ignore_index are neither read in the forward nor in the backward
  (packed Agent-FLAN batches ignore the prompt tokens): loss 0, gradient 0.
- A label outside [0, V) that is not ignore_index gives a NaN loss and a NaN gradient
  row: checking labels on the host would need a device sync.

The fused linear cross-entropy reuses the forward kernel with WRITE_GRAD=True, which
writes the (scaled) gradient over its transient logits chunk right after the lse pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from agentflan.kernels.compile_check import KernelSpec
from agentflan.kernels.validate import check_runnable, unit_last

REDUCTIONS = ("mean", "sum", "none")
LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LABEL_DTYPES = (torch.int32, torch.int64)
# Vocabulary chunk per loop step -> warps: 4096 elements over 16 warps is 8 per thread (one
# 16-byte load of 16-bit logits; 8 warps spilled a register in the unaligned-row variant
# that odd vocabularies compile); below 2048 a 1024 chunk wastes less on masking.
BLOCK_CONFIGS = {1024: 4, 4096: 16}
TL_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
TL_LABEL = {torch.int32: "i32", torch.int64: "i64"}


@triton.jit
def _row_grad(x_row, g_row, label, lse, scale, V, BLOCK_V: tl.constexpr):
    """g_row[v] = (exp(x_row[v] - lse) - [v == label]) * scale over one row; g_row may be x_row
    (each element is read before it is written, by the same program)."""
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(x - lse)
        g = tl.where(cols == label, p - 1.0, p) * scale
        tl.store(g_row + cols, g.to(g_row.dtype.element_ty), mask=mask)


@triton.jit
def _zero_row(g_row, V, BLOCK_V: tl.constexpr):
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        tl.store(g_row + cols, tl.zeros((BLOCK_V,), dtype=g_row.dtype.element_ty), mask=cols < V)


@triton.jit
def _ce_forward_kernel(
    logits_ptr,  # (N, V) logits, unit column stride; overwritten by the gradient if WRITE_GRAD
    stride_row,
    labels_ptr,  # (N,) int32/int64, stride stride_label
    stride_label,
    loss_ptr,  # (N,) fp32 out: per-row loss, 0 where ignored
    lse_ptr,  # (N,) fp32 out: per-row log-sum-exp, 0 where ignored
    scale_ptr,  # fp32 gradient scale per row (stride_scale 1) or one scalar (stride_scale 0)
    stride_scale,
    V,
    ignore_index,
    BLOCK_V: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row * stride_label).to(tl.int64)
    x_row = logits_ptr + row * stride_row
    if label == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        if WRITE_GRAD:
            _zero_row(x_row, V, BLOCK_V)
    else:
        # Online log-sum-exp: a scalar running max m and per-lane partial sums s rescaled
        # when m grows, so each element costs one exp and each chunk one max-reduction.
        m = float("-inf")
        s = tl.zeros((BLOCK_V,), dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
            m = m_new
        lse = m + tl.log(tl.sum(s, axis=0))
        in_range = (label >= 0) & (label < V)
        # Read the target logit before the gradient pass overwrites the row.
        x_label = tl.load(x_row + label, mask=in_range, other=float("nan")).to(tl.float32)
        tl.store(loss_ptr + row, lse - x_label)
        tl.store(lse_ptr + row, lse)
        if WRITE_GRAD:
            scale = tl.load(scale_ptr + row * stride_scale)
            scale = tl.where(in_range, scale, float("nan"))
            _row_grad(x_row, x_row, label, lse, scale, V, BLOCK_V)


@triton.jit
def _ce_backward_kernel(
    logits_ptr,  # (N, V) logits, unit column stride
    stride_row,
    grad_ptr,  # (N, V) out: d(loss)/d(logits), unit column stride; may alias logits_ptr
    stride_grad,
    labels_ptr,  # (N,) int32/int64, stride stride_label
    stride_label,
    lse_ptr,  # (N,) fp32 log-sum-exp from the forward
    scale_ptr,  # fp32 per-row (stride_scale 1) or scalar (stride_scale 0) upstream scale
    stride_scale,
    V,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row * stride_label).to(tl.int64)
    g_row = grad_ptr + row * stride_grad
    if label == ignore_index:
        _zero_row(g_row, V, BLOCK_V)
    else:
        lse = tl.load(lse_ptr + row)
        scale = tl.load(scale_ptr + row * stride_scale)
        scale = tl.where((label >= 0) & (label < V), scale, float("nan"))
        _row_grad(logits_ptr + row * stride_row, g_row, label, lse, scale, V, BLOCK_V)


# ---------------------------------------------------------------------------------
# Launchers (shared with the fused linear cross-entropy)
# ---------------------------------------------------------------------------------


def block_v_for(vocab: int) -> int:
    """The vocabulary chunk the kernels use for a vocabulary of `vocab` entries."""
    return 4096 if vocab > 2048 else 1024


def _vector_stride(t: torch.Tensor) -> int:
    """The element stride of a (1,) or (N,) vector; 0 for a single element (one scalar for every row)."""
    return t.stride(0) if t.numel() > 1 else 0


def launch_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    loss: torch.Tensor,
    lse: torch.Tensor,
    grad_scale: torch.Tensor | None = None,
) -> None:
    """Per-row loss and lse of logits (N, V) into loss, lse (N,) fp32 (contiguous).

    logits: any row stride, unit column stride; labels: (N,) any stride. With
    grad_scale (fp32, (1,), or (N,) of any stride), also overwrite `logits` with
    (softmax - onehot) * grad_scale, zero on ignored rows.
    """
    n_rows, vocab = logits.shape
    if n_rows == 0:
        return
    block = block_v_for(vocab)
    write_grad = grad_scale is not None
    scale = grad_scale if write_grad else lse  # not read when WRITE_GRAD is off
    _ce_forward_kernel[(n_rows,)](
        logits, logits.stride(0), labels, labels.stride(0), loss, lse, scale, _vector_stride(scale),
        vocab, ignore_index, BLOCK_V=block, WRITE_GRAD=write_grad, num_warps=BLOCK_CONFIGS[block],
    )


def launch_backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_scale: torch.Tensor,
    ignore_index: int,
    grad: torch.Tensor,
) -> None:
    """grad (N, V) = (softmax(logits) - onehot) * grad_scale; grad may be logits itself.

    logits, grad: any row stride, unit column stride; labels: (N,) any stride;
    grad_scale: fp32, (1,) for one scalar or (N,) per row, any stride.
    """
    n_rows, vocab = logits.shape
    if n_rows == 0:
        return
    block = block_v_for(vocab)
    _ce_backward_kernel[(n_rows,)](
        logits, logits.stride(0), grad, grad.stride(0), labels, labels.stride(0), lse, grad_scale,
        _vector_stride(grad_scale), vocab, ignore_index, BLOCK_V=block, num_warps=BLOCK_CONFIGS[block],
    )


def validate_labels(labels: torch.Tensor, n_rows: int) -> None:
    if labels.dim() != 1 or labels.shape[0] != n_rows:
        raise ValueError(f"labels must have shape ({n_rows},), got {tuple(labels.shape)}")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"labels must be int32 or int64, got {labels.dtype}")


def validate_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def reduce_rows(loss_rows: torch.Tensor, n_valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-row fp32 losses (N,) -> the requested reduction; 'mean' over non-ignored rows, 0 if none."""
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    return total if reduction == "sum" else total / n_valid.clamp(min=1)


def upstream_scale(grad_output: torch.Tensor, n_valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """The fp32 factor each row's (softmax - onehot) is multiplied by: (N,) for 'none' (the
    incoming gradient's own layout, read with its stride), (1,) otherwise."""
    if reduction == "none":
        return grad_output.float()
    scale = grad_output.float().reshape(1)
    return scale / n_valid.clamp(min=1) if reduction == "mean" else scale


# ---------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------


def _rows_disjoint(logits: torch.Tensor) -> bool:
    """Whether the rows of logits (N, V), unit column stride, occupy disjoint memory (not
    stride-0 or overlapping rows), so the gradient can be written over them."""
    return logits.shape[0] <= 1 or logits.stride(0) >= logits.shape[1]


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str, inplace: bool):
        n_rows = logits.shape[0]
        loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
        lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
        launch_forward(logits, labels, ignore_index, loss, lse)
        n_valid = (labels != ignore_index).sum()
        ctx.save_for_backward(logits, labels, lse, n_valid)
        ctx.ignore_index, ctx.reduction, ctx.inplace = ignore_index, reduction, inplace
        return reduce_rows(loss, n_valid, reduction)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        logits, labels, lse, n_valid = ctx.saved_tensors
        scale = upstream_scale(grad_output, n_valid, ctx.reduction)
        if ctx.inplace and _rows_disjoint(logits):
            grad = logits
            # Any other node that saved these logits now sees a newer version and refuses
            # to run rather than read gradients as logits.
            torch.autograd.graph.increment_version(logits)
        else:
            grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        launch_backward(logits, labels, lse, scale, ctx.ignore_index, grad)
        return grad, None, None, None, None


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    inplace: bool = False,
) -> torch.Tensor:
    """Token cross-entropy, computed in fp32 whatever the logits dtype: reference.cross_entropy's answer.

    logits: (N, V) fp32/fp16/bf16; labels: (N,) int32/int64, ignore_index (any value,
    also one inside [0, V)) where no loss. Returns fp32: a scalar for 'mean' (over
    non-ignored rows; 0 when all are ignored) and 'sum', (N,) for 'none'. A label
    outside [0, V) that is not ignore_index gives NaN for its row (reference.cross_entropy
    raises instead: the check needs the labels on the host).

    Layouts: the kernels take the row stride of logits, the stride of labels and of a
    'none' incoming gradient, so row slices, stride-0 rows, strided or expanded labels
    and gradients are read in place; logits whose last dimension is not contiguous are
    copied once (each row is read as one contiguous vector).

    inplace=True writes the logits gradient over the logits buffer during backward (the
    caller's logits are destroyed after backward); where that buffer cannot hold it
    (rows that share memory, e.g. expanded with stride 0) a new buffer is used instead.
    Raises TypeError for unsupported dtypes, ValueError for bad shapes, reductions or devices.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (N, V), got shape {tuple(logits.shape)}")
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    if logits.shape[1] == 0:
        raise ValueError("logits must have a non-empty vocabulary dimension")
    validate_labels(labels, logits.shape[0])
    validate_reduction(reduction)
    check_runnable("cross_entropy", logits, labels)
    logits = unit_last(logits)  # the kernels walk rows with unit column stride
    return _CrossEntropy.apply(logits, labels, int(ignore_index), reduction, bool(inplace))


# ---------------------------------------------------------------------------------
# Hopper compile specs
# ---------------------------------------------------------------------------------


def _label_stride(signature: dict[str, str], constexprs: dict, unit_label: bool) -> None:
    """Contiguous labels have stride 1, which the JIT specialises into a constant."""
    if unit_label:
        signature["stride_label"] = "constexpr"
        constexprs["stride_label"] = 1


def forward_spec(
    name: str, dtype: torch.dtype, label_dtype: torch.dtype, block: int, write_grad: bool, unit_label: bool = True
) -> KernelSpec:
    signature = {
        "logits_ptr": f"*{TL_DTYPE[dtype]}", "stride_row": "i32", "labels_ptr": f"*{TL_LABEL[label_dtype]}",
        "stride_label": "i32", "loss_ptr": "*fp32", "lse_ptr": "*fp32", "scale_ptr": "*fp32", "stride_scale": "i32",
        "V": "i32", "ignore_index": "i32", "BLOCK_V": "constexpr", "WRITE_GRAD": "constexpr",
    }
    constexprs = {"BLOCK_V": block, "WRITE_GRAD": write_grad}
    _label_stride(signature, constexprs, unit_label)
    return KernelSpec(name, _ce_forward_kernel, signature, constexprs, num_warps=BLOCK_CONFIGS[block], num_stages=3)


def backward_spec(
    name: str, dtype: torch.dtype, label_dtype: torch.dtype, block: int, unit_label: bool = True
) -> KernelSpec:
    signature = {
        "logits_ptr": f"*{TL_DTYPE[dtype]}", "stride_row": "i32", "grad_ptr": f"*{TL_DTYPE[dtype]}",
        "stride_grad": "i32", "labels_ptr": f"*{TL_LABEL[label_dtype]}", "stride_label": "i32", "lse_ptr": "*fp32",
        "scale_ptr": "*fp32", "stride_scale": "i32", "V": "i32", "ignore_index": "i32", "BLOCK_V": "constexpr",
    }
    constexprs = {"BLOCK_V": block}
    _label_stride(signature, constexprs, unit_label)
    return KernelSpec(name, _ce_backward_kernel, signature, constexprs, num_warps=BLOCK_CONFIGS[block], num_stages=3)


def hopper_specs() -> list[KernelSpec]:
    """Every config cross_entropy() launches: each logits dtype x label dtype x vocabulary
    chunk, with contiguous labels; and with strided labels at the large chunk."""
    specs = []
    for dtype in LOGIT_DTYPES:
        for label_dtype in LABEL_DTYPES:
            for block in BLOCK_CONFIGS:
                tag = f"{TL_DTYPE[dtype]}_{TL_LABEL[label_dtype]}_v{block}"
                specs.append(forward_spec(f"ce_forward_{tag}", dtype, label_dtype, block, write_grad=False))
                specs.append(backward_spec(f"ce_backward_{tag}", dtype, label_dtype, block))
            tag = f"{TL_DTYPE[dtype]}_{TL_LABEL[label_dtype]}_v4096_labels_strided"
            specs.append(forward_spec(f"ce_forward_{tag}", dtype, label_dtype, 4096, False, unit_label=False))
            specs.append(backward_spec(f"ce_backward_{tag}", dtype, label_dtype, 4096, unit_label=False))
    return specs
