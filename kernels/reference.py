"""PyTorch reference implementations of every op the model uses.

These are the ground truth the Triton kernels are tested against, and the ops the
model runs where Triton is unavailable (CPU). They favour clarity over speed, but
never build a (total_tokens x total_tokens) mask for a packed batch.
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
    """Causal attention inside each packed document, never across documents.

    q: (T, n_heads, head_dim); k, v: (T, n_kv_heads, head_dim); cu_seqlens: (n_docs+1,) int32.
    max_seqlen is accepted for signature parity with the Triton kernel and not needed here.
    Runs one scaled_dot_product_attention per document, so memory is per-document.
    """
    n_heads, n_kv_heads = q.shape[1], k.shape[1]
    group = n_heads // n_kv_heads
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()  # host copy: the reference path is not meant for CUDA graphs
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qd = q[start:end].transpose(0, 1)  # (n_heads, L, head_dim)
        kd = k[start:end].transpose(0, 1)  # (n_kv_heads, L, head_dim)
        vd = v[start:end].transpose(0, 1)
        if group > 1:
            kd = kd.repeat_interleave(group, dim=0)
            vd = vd.repeat_interleave(group, dim=0)
        od = F.scaled_dot_product_attention(qd, kd, vd, is_causal=causal, scale=softmax_scale)
        out[start:end] = od.transpose(0, 1)
    return out


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, reduction: str = "mean"
) -> torch.Tensor:
    """Token cross-entropy in fp32. 'mean' divides by the non-ignored count (0 when all are ignored)."""
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
