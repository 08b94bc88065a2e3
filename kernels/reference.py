"""PyTorch reference implementations of every op the model uses.

These are the ground truth the Triton kernels are tested against, and the ops the
model runs where Triton is unavailable (CPU). They favour clarity over speed, but keep
memory linear in sequence length: attention never builds a (tokens x tokens) mask or
score matrix, for the packed batch or for one document. Every op accepts inputs of any
layout (views, strides, stride-0 expansions), as PyTorch ops do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / rms(x) * weight, normalised in fp32 as Llama checkpoints expect."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for the rotate-half layout, computed in fp32.

    position_ids: (total_tokens,) -> cos, sin: (total_tokens, head_dim)
    """
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.int64).float() / head_dim)
    )
    freqs = position_ids.float()[:, None] * inv_freq[None, :]  # (T, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, head_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding, rotate-half layout (as in Hugging Face Llama checkpoints).

    q: (T, n_heads, head_dim), k: (T, n_kv_heads, head_dim), cos/sin: (T, head_dim)
    """
    cos, sin = cos[:, None, :], sin[:, None, :]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Attention inside each packed document, never across documents.

    q: (T, n_heads, head_dim); k, v: (T, n_kv_heads, head_dim), one dtype, n_heads a
    multiple of n_kv_heads; cu_seqlens: (n_docs+1,) int32/int64, document d being the rows
    [cu_seqlens[d], cu_seqlens[d+1]). Returns (T, n_heads, head_dim), contiguous, in q's
    dtype; softmax_scale defaults to head_dim**-0.5. max_seqlen is accepted for signature
    parity with the Triton kernel and not needed here.

    Tokens outside every document (before cu_seqlens[0], from cu_seqlens[-1] on) attend
    to nothing: output rows 0 and gradients 0, as in flash_attn_varlen. cu_seqlens is read
    on the host (a sync) and checked: ValueError unless it is non-decreasing within [0, T].

    Memory is linear in document length: one scaled_dot_product_attention per document
    on (1, heads, L, head_dim) views, GQA through enable_gqa (no repeated K/V). For these
    PyTorch runs a flash-attention kernel on CPU (fp32, bf16, fp16, fp64; its backward
    is blockwise too) and flash or memory-efficient kernels on CUDA; none materialises
    the (L, L) scores. Inputs of any layout are read as views.
    """
    _check_attention_inputs(q, k, v)
    total, n_heads, head_dim = q.shape
    bounds = _document_bounds(cu_seqlens, total)
    gqa = n_heads != k.shape[1]
    # An exact 0 that depends on q, k and v: rows outside every document get it, so their
    # gradients are defined zeros even where no document uses q, k or v at all.
    zero = q[:0].sum() + k[:0].sum() + v[:0].sum()
    pieces = []
    if bounds[0] > 0:
        pieces.append(q.new_zeros(bounds[0], n_heads, head_dim) + zero)
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qd = q[start:end].transpose(0, 1)[None]  # (1, n_heads, L, head_dim)
        kd = k[start:end].transpose(0, 1)[None]  # (1, n_kv_heads, L, head_dim)
        vd = v[start:end].transpose(0, 1)[None]
        od = F.scaled_dot_product_attention(qd, kd, vd, is_causal=causal, scale=softmax_scale, enable_gqa=gqa)
        pieces.append(od[0].transpose(0, 1))  # (L, n_heads, head_dim)
    if bounds[-1] < total or not pieces:
        pieces.append(q.new_zeros(total - bounds[-1], n_heads, head_dim) + zero)
    return torch.cat(pieces)


def _check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"varlen_attention: q, k, v must be (tokens, heads, head_dim), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"varlen_attention: k and v must be (tokens, n_kv_heads, head_dim) matching q "
                         f"{tuple(q.shape)}, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"varlen_attention: n_heads ({q.shape[1]}) must be a multiple of n_kv_heads ({k.shape[1]})")
    if not q.is_floating_point() or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"varlen_attention: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"varlen_attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def _document_bounds(cu_seqlens: torch.Tensor, total: int) -> list[int]:
    """cu_seqlens as a host list, checked: 1-D int32/int64, non-decreasing, within [0, total]."""
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"varlen_attention: cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"varlen_attention: cu_seqlens must be 1-D (n_docs+1,) with at least one boundary, got "
                         f"shape {tuple(cu_seqlens.shape)}")
    bounds = cu_seqlens.tolist()  # host copy: the reference path is not meant for CUDA graphs
    if bounds[0] < 0 or bounds[-1] > total:
        raise ValueError(f"varlen_attention: cu_seqlens must lie within [0, {total}] (the token count), "
                         f"got {bounds[0]}..{bounds[-1]}")
    for d, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if end < start:
            raise ValueError(f"varlen_attention: cu_seqlens must be non-decreasing, got cu_seqlens[{d}] = {start} > "
                             f"cu_seqlens[{d + 1}] = {end}")
    return bounds


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, reduction: str = "mean"
) -> torch.Tensor:
    """Token cross-entropy in fp32. logits: (N, V) float; labels: (N,) int32/int64, ignore_index
    where no loss. Returns fp32: (N,) for 'none', a scalar for 'sum' and 'mean' ('mean'
    divides by the non-ignored count; 0 when all are ignored). A label outside [0, V)
    that is not ignore_index raises (on CPU; a device assert on CUDA)."""
    if labels.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cross_entropy: labels must be int32 or int64, got {labels.dtype}")
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy: logits must be (N, V) and labels (N,), got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    losses = F.cross_entropy(logits.float(), labels.long(), ignore_index=ignore_index, reduction="none")
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / (labels != ignore_index).sum().clamp(min=1)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """LM-head projection followed by cross-entropy. hidden: (T, dim), weight: (vocab, dim)."""
    return cross_entropy(hidden @ weight.t(), labels, ignore_index, reduction)
