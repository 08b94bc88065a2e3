"""The op set the model runs on the Triton path: same names and signatures as `reference`.

Each op is one Triton kernel file; this module only adapts call conventions.
"""

from __future__ import annotations

import torch

from agentflan.kernels.cross_entropy import cross_entropy
from agentflan.kernels.flash_attention import flash_attn_varlen
from agentflan.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from agentflan.kernels.reference import rope_cos_sin
from agentflan.kernels.rms_norm import rms_norm
from agentflan.kernels.rope import apply_rope
from agentflan.kernels.swiglu import swiglu

__all__ = [
    "cross_entropy", "linear_cross_entropy", "rms_norm", "rope_cos_sin",
    "apply_rope", "swiglu", "varlen_attention",
]


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """LM head + cross-entropy without (tokens x vocab) logits. hidden: (T, dim), weight: (vocab, dim).

    Under autocast both operands are cast to the autocast dtype, as nn.Linear would be,
    so the projection runs on tensor cores while the master weight stays fp32.
    """
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    return fused_linear_cross_entropy(hidden, weight, labels, ignore_index, reduction)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Attention inside each packed document (varlen flash attention, GQA).

    q: (T, n_heads, head_dim); k, v: (T, n_kv_heads, head_dim); cu_seqlens: (n_docs+1,)
    int32/int64. Tokens outside every document get output and gradients 0, as in
    reference.varlen_attention. max_seqlen only tunes the kernel choice (None is fine,
    and costs no host sync).
    """
    return flash_attn_varlen(q, k, v, cu_seqlens, max_seqlen, causal=causal, softmax_scale=softmax_scale)
