"""Llama-2 for packed training: RMSNorm, RoPE, SwiGLU, grouped-query attention.

The model takes a packed batch: all documents concatenated into one token stream
`input_ids (total_tokens,)`, with document boundaries `cu_seqlens (n_docs+1,)` and
positions restarting at 0 in every document. Attention never crosses a boundary.
Parameter names follow Hugging Face's LlamaForCausalLM (without its `model.` prefix),
so checkpoints map one to one. The file knows nothing of distribution.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from agentflan.config import ModelConfig
from agentflan.kernels import Ops, resolve_ops


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, ops: Ops) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.resolved_head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, ops: Ops
    ) -> torch.Tensor:
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.n_heads, self.head_dim)  # (T, n_heads, head_dim)
        k = self.k_proj(x).view(T, self.n_kv_heads, self.head_dim)  # (T, n_kv_heads, head_dim)
        v = self.v_proj(x).view(T, self.n_kv_heads, self.head_dim)
        q, k = ops.apply_rope(q, k, cos.to(q.dtype), sin.to(q.dtype))  # q is bf16 under autocast
        out = ops.varlen_attention(q, k, v, cu_seqlens, max_seqlen)  # (T, n_heads, head_dim)
        return self.o_proj(out.reshape(T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, ops: Ops) -> torch.Tensor:
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, ops: Ops
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x, ops), cos, sin, cu_seqlens, max_seqlen, ops)
        return x + self.mlp(self.post_attention_layernorm(x, ops), ops)


class Llama(nn.Module):
    """kernels: 'auto' (Triton on CUDA, PyTorch reference elsewhere), 'triton' or 'reference';
    the AGENTFLAN_KERNELS environment variable overrides 'auto'."""

    def __init__(self, cfg: ModelConfig, kernels: str = "auto") -> None:
        super().__init__()
        self.config = cfg
        self.kernels = kernels
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int | None = None) -> None:
        """Llama-style init: normal(0, std), residual output projections scaled by 1/sqrt(2 * n_layers)."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.embed_tokens.weight.device).manual_seed(seed)
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, out_std, generator=gen)
            else:
                p.normal_(0.0, std, generator=gen)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> tuple[torch.Tensor, Ops]:
        """Final normalised hidden states (total_tokens, dim) before the LM head, and the ops used."""
        if input_ids.dim() != 1:
            raise ValueError(f"input_ids must be a packed 1-D tensor (total_tokens,), got shape {tuple(input_ids.shape)}")
        T = input_ids.shape[0]
        if cu_seqlens is None:
            cu_seqlens = torch.tensor([0, T], dtype=torch.int32, device=input_ids.device)
        if position_ids is None:
            position_ids = positions_from_cu_seqlens(cu_seqlens, T)
        ops = resolve_ops(self.kernels, input_ids.device)
        if max_seqlen is None:  # a host sync; the trainer passes the value it knows from the batch
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        h = self.embed_tokens(input_ids)  # (T, dim)
        cos, sin = ops.rope_cos_sin(position_ids, self.config.resolved_head_dim, self.config.rope_theta, h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin, cu_seqlens, max_seqlen, ops)
        return self.norm(h, ops), ops

    def forward(
        self,
        input_ids: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        reduction: str = "mean",
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """input_ids (total_tokens,) -> logits (total_tokens, vocab_size).

        With labels (total_tokens,), -100 where nothing is trained, returns the next-token
        cross-entropy instead; 'sum' lets the trainer normalise over a whole global batch.
        """
        hidden, ops = self.hidden_states(input_ids, cu_seqlens, position_ids, max_seqlen)
        if labels is None:
            return self.lm_head(hidden)
        return ops.linear_cross_entropy(hidden, self.lm_head.weight, labels, reduction=reduction)


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """Positions restarting at 0 in every document: (total_tokens,) int64."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    starts = torch.repeat_interleave(cu[:-1], lengths, output_size=total_tokens)
    return torch.arange(total_tokens, device=cu_seqlens.device) - starts
