"""Llama-2 for packed training: RMSNorm, RoPE, SwiGLU, grouped-query attention.

The model takes a packed batch: all documents concatenated into one token stream
`input_ids (total_tokens,)`, with document boundaries `cu_seqlens (n_docs+1,)` and
positions restarting at 0 in every document. Attention never crosses a boundary.
Parameter names follow Hugging Face's LlamaForCausalLM (without its `model.` prefix),
so checkpoints map one to one. The file knows nothing of distribution.

Generation reuses the same blocks with a KV cache (`KVCache`): `prefill` runs the packed
prompts exactly as training does and stores every key and value on the way; `decode` then
feeds one token per sequence and attends over the cache with PyTorch's SDPA.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from agentflan.config import ModelConfig
from agentflan.kernels import Ops, reference, resolve_ops


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, ops: Ops) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        # The reference formula (normalise in fp32, cast, scale) with PyTorch's fused norm,
        # in one op for fp32: a decode step of a few tokens is bound by per-op overhead.
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


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
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        ops: Ops,
        kv: LayerKV | None = None,
    ) -> torch.Tensor:
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.n_heads, self.head_dim)  # (T, n_heads, head_dim)
        k = self.k_proj(x).view(T, self.n_kv_heads, self.head_dim)  # (T, n_kv_heads, head_dim)
        v = self.v_proj(x).view(T, self.n_kv_heads, self.head_dim)
        q, k = ops.apply_rope(q, k, cos.to(q.dtype), sin.to(q.dtype))  # q is bf16 under autocast
        if kv is not None:  # prefill: keep this layer's keys and values for decoding
            kv.store(k, v)
        out = ops.varlen_attention(q, k, v, cu_seqlens, max_seqlen)  # (T, n_heads, head_dim)
        return self.o_proj(out.reshape(T, self.n_heads * self.head_dim))

    def decode(self, x: torch.Tensor, rotation: torch.Tensor, kv: LayerKV, key_bias: torch.Tensor) -> torch.Tensor:
        """One new token per sequence: x (B, dim); rotation (B, head_dim, head_dim) its rotary
        embedding (KVCache.rope_rotation); key_bias (B, 1, 1, W) is 0 where row b may attend
        to cache column j (its earlier tokens and the new one) and -inf elsewhere."""
        B = x.shape[0]
        q = torch.bmm(self.q_proj(x).view(B, self.n_heads, self.head_dim), rotation)  # (B, n_heads, head_dim)
        k = torch.bmm(self.k_proj(x).view(B, self.n_kv_heads, self.head_dim), rotation)  # (B, n_kv_heads, head_dim)
        v = self.v_proj(x).view(B, self.n_kv_heads, self.head_dim)
        keys, values = kv.store(k, v)  # (B, n_kv_heads, max_len, head_dim)
        # The heads sharing one KV head become that head's query rows, so grouped-query
        # attention reads the cache once and never copies it.
        group = self.n_heads // self.n_kv_heads
        q = q.reshape(B, self.n_kv_heads, group, self.head_dim)
        W = key_bias.shape[-1]
        out = F.scaled_dot_product_attention(q, keys[:, :, :W], values[:, :, :W], attn_mask=key_bias)
        return self.o_proj(out.reshape(B, self.n_heads * self.head_dim))  # out: (B, n_kv_heads, group, head_dim)


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
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        ops: Ops,
        kv: LayerKV | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x, ops), cos, sin, cu_seqlens, max_seqlen, ops, kv)
        return x + self.mlp(self.post_attention_layernorm(x, ops), ops)

    def decode(self, x: torch.Tensor, rotation: torch.Tensor, kv: LayerKV, key_bias: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn.decode(self.input_layernorm.decode(x), rotation, kv, key_bias)
        return x + self.mlp(self.post_attention_layernorm.decode(x), reference)


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
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, Ops]:
        """Final normalised hidden states (total_tokens, dim) before the LM head, and the ops used.

        With a cache, every layer's keys and values are also stored: document i fills cache
        row i, each token at the column of its position (see `prefill`).
        """
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
        kvs = [None] * len(self.layers) if cache is None else cache.layers(_document_index(cu_seqlens, T), position_ids)
        for layer, kv in zip(self.layers, kvs):
            h = layer(h, cos, sin, cu_seqlens, max_seqlen, ops, kv)
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

    # ---- generation: prefill the prompts into a KV cache, then decode one token per step ----

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `max_len` tokens, in the model's dtype and device."""
        w = self.embed_tokens.weight
        return KVCache(self.config, batch, max_len, w.dtype, w.device)

    def prefill(
        self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, cache: KVCache, max_seqlen: int | None = None
    ) -> torch.Tensor:
        """Runs packed prompts exactly as training does and stores their keys and values.

        input_ids (total_tokens,), cu_seqlens (cache.batch+1,) int32: prompt i fills cache
        row i, columns [0, len_i). Returns the normalised hidden states (total_tokens, dim);
        the LM head is left to the caller, which usually needs only each prompt's last row.
        Raises ValueError when the prompts do not fit the cache.
        """
        if len(cu_seqlens) != cache.batch + 1:
            raise ValueError(f"{len(cu_seqlens) - 1} prompts for a cache of {cache.batch} rows")
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()  # (B,)
        if max_seqlen is None:  # a host sync; the generation engine passes the value it knows
            max_seqlen = int(lengths.max())
        if max_seqlen > cache.max_len:
            raise ValueError(f"a prompt of {max_seqlen} tokens does not fit a cache of {cache.max_len} columns")
        hidden = self.hidden_states(input_ids, cu_seqlens, max_seqlen=max_seqlen, cache=cache)[0]
        cache.begin(lengths, max_seqlen)
        return hidden

    def decode(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Appends one token to every cache row: input_ids (B,), B == cache.batch.

        Row b's token takes position cache.lengths[b] (its keys and values go to that
        column) and attends to the row's earlier tokens and itself. Returns the normalised
        hidden states (B, dim). Runs PyTorch ops on every device, the formulas of the
        reference kernels in fewer ops: a step this small is bound by per-op overhead.
        Raises ValueError when a row is full.
        """
        if cache.width >= cache.max_len:
            raise ValueError(f"the cache is full ({cache.max_len} columns)")
        positions = cache.next_positions()  # (B,)
        h = self.embed_tokens(input_ids)  # (B, dim)
        rotation = cache.rope_rotation(positions)  # (B, head_dim, head_dim)
        key_bias = cache.key_bias[:, None, None, : cache.width]  # (B, 1, 1, W)
        for layer, kv in zip(self.layers, cache.layers(cache.rows, positions)):
            h = layer.decode(h, rotation, kv, key_bias)
        return self.norm.decode(h)


class LayerKV(NamedTuple):
    """One layer's slice of a KVCache and where the tokens of the current forward go."""

    k: torch.Tensor  # (batch, n_kv_heads, max_len, head_dim)
    v: torch.Tensor
    rows: torch.Tensor  # (N,) cache row of each token
    cols: torch.Tensor  # (N,) cache column of each token (its position)

    def store(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes k, v (N, n_kv_heads, head_dim) in place; returns the layer's whole cache."""
        if k.dtype != self.k.dtype:  # bf16 activations under autocast over an fp32 cache
            k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        self.k[self.rows, :, self.cols] = k
        self.v[self.rows, :, self.cols] = v
        return self.k, self.v


class KVCache:
    """Everything decoding keeps between steps, allocated once for the longest sequence.

    k, v: (n_layers, batch, n_kv_heads, max_len, head_dim), zero-initialised (masked
    columns then contribute exact zeros, never NaN). Row b holds sequence b, its token at
    position p in column p, so rows are ragged: `lengths` (batch,) int64 counts each
    row's tokens, `key_bias` (batch, max_len) is 0 on those columns and -inf past them
    (SDPA's additive mask), `width` (a host int) is the longest row. Tokens are written
    in place; nothing is concatenated per step. The rotary cos/sin tables of every
    position are computed once here, with `reference.rope_cos_sin`.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> None:
        if batch < 1 or max_len < 1:
            raise ValueError(f"a KV cache needs batch >= 1 and max_len >= 1, got {batch} and {max_len}")
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.resolved_head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # Rows padded to a multiple of 16 columns: the stride SDPA's fused CUDA kernels want of a mask.
        self.key_bias = torch.full((batch, -(-max_len // 16) * 16), -math.inf, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.rows = torch.arange(batch, device=device)
        self.width = 0
        self._zero = torch.zeros((), dtype=dtype, device=device)
        head_dim = cfg.resolved_head_dim
        self._cos, sin = reference.rope_cos_sin(torch.arange(max_len, device=device), head_dim, cfg.rope_theta, dtype)
        self._sin = torch.cat([-sin[:, : head_dim // 2], sin[:, head_dim // 2 :]], dim=-1)  # rotate-half's sign
        self._eye = torch.eye(head_dim, dtype=dtype, device=device)
        self._half_roll = self._eye.roll(head_dim // 2, dims=0)  # [(j + half) % head_dim, j] = 1

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def layers(self, rows: torch.Tensor, cols: torch.Tensor) -> list[LayerKV]:
        return [LayerKV(k, v, rows, cols) for k, v in zip(self.k, self.v)]

    def begin(self, lengths: torch.Tensor, width: int) -> None:
        """After prefill: row b holds lengths[b] (B,) tokens; the longest has `width`."""
        columns = torch.arange(self.key_bias.shape[1], device=lengths.device)
        self.key_bias.masked_fill_(columns < lengths[:, None], 0.0)
        self.lengths = lengths
        self.width = width

    def next_positions(self) -> torch.Tensor:
        """Opens the next column of every row for the token being decoded; returns its positions (B,)."""
        positions = self.lengths
        self.key_bias.index_put_((self.rows, positions), self._zero)
        self.lengths = positions + 1
        self.width += 1
        return positions

    def rope_rotation(self, positions: torch.Tensor) -> torch.Tensor:
        """The rotary embedding at positions (B,) as matrices (B, head_dim, head_dim): x @ R
        equals reference.apply_rope's x * cos + rotate_half(x) * sin, where rotate_half(x)
        is x rolled by head_dim/2 with its first half negated. One batched matmul applies
        it to all heads of q and k."""
        cos, sin = self._cos[positions], self._sin[positions]  # (B, head_dim)
        # R[j, j] = cos_j; R[(j + half) % head_dim, j] = sin_j (sign folded in).
        return torch.addcmul(cos[:, None, :] * self._eye, sin[:, None, :], self._half_roll)

    def keep(self, rows: Sequence[int]) -> None:
        """Keeps only the given rows, ascending: finished sequences leave the batch.

        Kept rows move down in place, one row at a time, so dropping rows never needs a
        second cache's worth of memory.
        """
        if any(b <= a for a, b in zip(rows, rows[1:])) or not rows or rows[0] < 0 or rows[-1] >= self.batch:
            raise ValueError(f"rows to keep must ascend within [0, {self.batch}), got {list(rows)}")
        for dst, src in enumerate(rows):
            if dst != src:  # dst < src: a row is read before anything is written over it
                self.k[:, dst] = self.k[:, src]
                self.v[:, dst] = self.v[:, src]
        n = len(rows)
        index = torch.tensor(rows, device=self.lengths.device)
        self.k, self.v = self.k[:, :n], self.v[:, :n]
        self.key_bias = self.key_bias.index_select(0, index)
        self.lengths = self.lengths.index_select(0, index)
        self.rows = self.rows[:n]
        self.width = int(self.lengths.max())  # one host sync per change of the batch


def _document_index(cu_seqlens: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """Which document each packed token belongs to: (total_tokens,) int64."""
    cu = cu_seqlens.long()
    docs = torch.arange(len(cu) - 1, device=cu.device)
    return torch.repeat_interleave(docs, cu[1:] - cu[:-1], output_size=total_tokens)


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """Positions restarting at 0 in every document: (total_tokens,) int64, without a host sync.

    Tokens outside every document (before cu_seqlens[0], from cu_seqlens[-1] on) get position 0;
    attention gives them zeros (see kernels.reference.varlen_attention). Boundaries are clamped
    into [0, total_tokens] and made non-decreasing here, so the sizes always add up; an invalid
    cu_seqlens is refused by the attention ops.
    """
    cu = cu_seqlens.long().clamp(0, total_tokens).cummax(0).values
    # Segments: the gap before the first document, each document, the gap after the last.
    bounds = torch.cat([cu.new_zeros(1), cu, cu.new_full((1,), total_tokens)])
    starts = torch.repeat_interleave(bounds[:-1], bounds.diff(), output_size=total_tokens)
    index = torch.arange(total_tokens, device=cu_seqlens.device)
    inside = (index >= cu[0]) & (index < cu[-1])
    return (index - starts) * inside
