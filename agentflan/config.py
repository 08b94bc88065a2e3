"""Model configuration: Llama-2 presets and the mapping to/from Hugging Face config.json."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 32000
    dim: int = 4096  # hidden size
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32  # < n_heads means grouped-query attention
    ffn_dim: int = 11008  # SwiGLU intermediate size
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    head_dim: int | None = None  # None: dim // n_heads

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim is None and self.dim % self.n_heads != 0:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.resolved_head_dim % 2 != 0:
            raise ValueError(f"head_dim ({self.resolved_head_dim}) must be even for rotary embeddings")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    def num_params(self, include_embeddings: bool = True) -> int:
        hd = self.resolved_head_dim
        attn = self.dim * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.ffn_dim
        per_layer = attn + mlp + 2 * self.dim
        total = self.n_layers * per_layer + self.dim  # + final norm
        if include_embeddings:
            total += 2 * self.vocab_size * self.dim  # untied embedding and LM head
        return total

    # ---- Hugging Face LlamaConfig <-> ModelConfig ----

    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.ffn_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.resolved_head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Reads a LlamaForCausalLM config; refuses features this model does not implement."""
        model_type = hf.get("model_type")
        if model_type != "llama":
            raise ValueError(f"{source}: model_type is {model_type!r}, expected 'llama'")
        unsupported = {
            "tie_word_embeddings": (hf.get("tie_word_embeddings", False), False),
            "attention_bias": (hf.get("attention_bias", False), False),
            "mlp_bias": (hf.get("mlp_bias", False), False),
            "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        }
        for field, (value, expected) in unsupported.items():
            if value != expected:
                raise ValueError(f"{source}: {field}={value!r} is not supported (expected {expected!r})")
        rope = _rope_parameters(hf)
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"{source}: rope scaling {rope!r} is not supported")
        n_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim")
        if head_dim == hf["hidden_size"] // n_heads:
            head_dim = None  # the standard layout: keep it derived
        return cls(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            ffn_dim=hf["intermediate_size"],
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            max_seq_len=hf.get("max_position_embeddings", 4096),
            head_dim=head_dim,
        )


def _rope_parameters(hf: dict[str, Any]) -> dict[str, Any]:
    # transformers 4.x writes rope_theta + rope_scaling at top level; 5.x nests them in rope_parameters.
    params = dict(hf.get("rope_parameters") or {})
    if hf.get("rope_scaling"):
        params.update(hf["rope_scaling"])
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    return params


PRESETS: dict[str, ModelConfig] = {
    "llama2-7b": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008),
    "llama2-13b": ModelConfig(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824),
    "llama2-70b": ModelConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672),
    # Small shapes that train on a laptop CPU; GQA on by default so the CPU path exercises it.
    "tiny": ModelConfig(vocab_size=4096, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=688, max_seq_len=2048),
    "micro": ModelConfig(vocab_size=4096, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176, max_seq_len=1024),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
