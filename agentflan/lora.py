"""LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685) on the
Llama's linear layers, applied in one place (`apply_lora`); the model file knows nothing of it.

Each targeted projection ``y = x W^T`` becomes ``y = x W^T + s * dropout(x) A^T B^T`` with
A (r, in_features) and B (out_features, r) trainable and W frozen. B starts at zero, so the
adapted model computes exactly what the base model does until the first update; A starts
kaiming-uniform (a = sqrt(5)), as PEFT and nn.Linear initialise. The scale s is alpha / r
(the LoRA paper), or alpha / sqrt(r) with rsLoRA (Kalajdzievski, arXiv 2312.03732).

Parameter names keep the base model's (``layers.0.self_attn.q_proj.weight``), so Hugging Face
loading and export, and DCP checkpoints of the base, are unchanged; the adapters add
``...q_proj.lora_A.weight`` and ``...q_proj.lora_B.weight``, PEFT's names without its adapter
name (``agentflan.adapter`` writes them in PEFT's format).

Dtypes: the frozen base (every parameter but the adapters) is held in the compute dtype, bf16
when training in bf16, so it needs no fp32 master copy, no gradient and no optimizer state;
adapters are fp32 master weights with their own AdamW state. The adapter's matmuls run in the
compute dtype too (FSDP's gathered dtype, or autocast's): the second one is an addmm that adds
its product onto the base output in the same GEMM, with the scale as its alpha.

Training FLOPs (`training_flops_per_token`): a frozen weight still does its forward matmul (2N)
and the backward's input-gradient matmul (2N), but no weight gradient (the 2N that the 6N of
full training counts for it; Kaplan et al., arXiv 2001.08361, section 2.1), so about 4N for the
base plus 6 per adapter parameter, plus attention as in ``agentflan.perf``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from agentflan.config import ModelConfig
from agentflan.perf import flops_per_token

# The projections of a Llama block, by their Hugging Face names (the LoRA targets).
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
TARGETS = ATTENTION_TARGETS + MLP_TARGETS
ADAPTER_PARTS = ("lora_A", "lora_B")


def parse_targets(names: Iterable[str]) -> tuple[str, ...]:
    """Target names in model order, from full names (``q_proj``), short ones (``q``, ``gate``), or
    ``all`` / ``attention`` / ``mlp``; comma-separated items are split. Raises ValueError naming an
    unknown or repeated one."""
    groups = {"all": TARGETS, "attention": ATTENTION_TARGETS, "mlp": MLP_TARGETS}
    chosen: list[str] = []
    for item in (part.strip() for name in names for part in name.split(",")):
        if not item:
            continue
        full = groups.get(item) or ((item,) if item in TARGETS else (f"{item}_proj",))
        for target in full:
            if target not in TARGETS:
                raise ValueError(f"unknown LoRA target {item!r}; choose from {', '.join(TARGETS)} (or q, k, v, o, "
                                 f"gate, up, down; all, attention, mlp)")
            if target in chosen:
                raise ValueError(f"LoRA target {target} is named twice")
            chosen.append(target)
    if not chosen:
        raise ValueError("no LoRA target given")
    return tuple(t for t in TARGETS if t in chosen)


@dataclass(frozen=True)
class LoraSpec:
    """What to adapt and how: rank r >= 1, alpha > 0, dropout in [0, 1) on the adapter's input,
    targets (names in TARGETS), rslora (scale alpha / sqrt(r) instead of alpha / r)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS
    rslora: bool = False

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {self.rank}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoRA alpha must be a positive number, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if parse_targets(self.targets) != tuple(self.targets):
            raise ValueError(f"LoRA targets must be distinct names of {TARGETS} in that order, got {self.targets}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def shapes(self, cfg: ModelConfig) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each target projection of a block of ``cfg``."""
        q, kv = cfg.n_heads * cfg.resolved_head_dim, cfg.n_kv_heads * cfg.resolved_head_dim
        every = {"q_proj": (cfg.dim, q), "k_proj": (cfg.dim, kv), "v_proj": (cfg.dim, kv), "o_proj": (q, cfg.dim),
                 "gate_proj": (cfg.dim, cfg.ffn_dim), "up_proj": (cfg.dim, cfg.ffn_dim),
                 "down_proj": (cfg.ffn_dim, cfg.dim)}
        return {t: every[t] for t in self.targets}

    def num_params(self, cfg: ModelConfig) -> int:
        """Adapter parameters of the whole model: r * (in + out) per target per layer."""
        return cfg.n_layers * sum(self.rank * (i + o) for i, o in self.shapes(cfg).values())


class AdapterDropout(nn.Dropout):
    """nn.Dropout through torch.native_dropout, whose backward keeps a 1-byte mask on every device
    (the CPU's F.dropout keeps a mask in the input's dtype), so the memory estimate holds on both."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.native_dropout(x, self.p, True)[0] if self.training else x


class LoRALinear(nn.Module):
    """A frozen bias-free nn.Linear plus a trainable low-rank update (see the module docstring).

    Holds the base layer's ``weight`` under its own name; ``lora_A`` (in -> r) and ``lora_B``
    (r -> out) are bias-free nn.Linear in fp32 on the weight's device (meta stays meta), B zero.
    x: (..., in_features) -> (..., out_features).
    """

    def __init__(self, base: nn.Linear, spec: LoraSpec) -> None:
        super().__init__()
        if base.bias is not None:
            raise ValueError("LoRA here adapts bias-free linear layers (Llama's)")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        device = base.weight.device
        self.lora_A = nn.Linear(self.in_features, spec.rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(spec.rank, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.zeros_(self.lora_B.weight)  # A keeps nn.Linear's kaiming-uniform; init_adapters redraws it seeded
        self.dropout = AdapterDropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.scaling = spec.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)  # (N, in)
        down = F.linear(self.dropout(x), self.lora_A.weight)  # (N, r)
        # base + s * down @ B^T in one GEMM: no (N, out) temporary for the update.
        out = torch.addmm(F.linear(x, self.weight), down, self.lora_B.weight.t(), alpha=self.scaling)
        return out.view(*lead, self.out_features)

    @torch.no_grad()
    def delta(self) -> torch.Tensor:
        """s * B @ A (out_features, in_features) in fp32: what merging adds to the weight."""
        return self.lora_B.weight.float() @ self.lora_A.weight.float() * self.scaling

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.lora_A.out_features}, scaling={self.scaling:g}")


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(name, module) of every LoRALinear, in model order; names without wrapper prefixes."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield clean_name(name), module


def clean_name(name: str) -> str:
    """A parameter or module name without DDP's, FSDP's or activation checkpointing's wrapper parts."""
    for part in ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "_orig_mod."):
        name = name.replace(part, "")
    return name.removeprefix("module.")


def is_adapter(name: str) -> bool:
    """Whether a parameter name is an adapter's (``...lora_A.weight`` / ``...lora_B.weight``)."""
    return any(f".{part}." in f".{name}" for part in ADAPTER_PARTS)


def apply_lora(model: nn.Module, spec: LoraSpec, seed: int = 0) -> int:
    """Freezes every parameter of a Llama and wraps each target projection of every block in a
    LoRALinear, in place, before activation checkpointing and data parallelism are applied.
    Adapters are initialised from ``seed`` (not on the meta device: call `init_adapters` once the
    model is materialised). Returns the number of adapter parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.layers:
        for parent in (block.self_attn, block.mlp):
            for target in spec.targets:
                base = getattr(parent, target, None)
                if isinstance(base, nn.Linear):
                    setattr(parent, target, LoRALinear(base, spec))
    if not any(p.is_meta for p in model.parameters()):
        init_adapters(model, seed)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def init_adapters(model: nn.Module, seed: int) -> None:
    """A kaiming-uniform (a = sqrt(5)), B zero in every LoRALinear, drawn from ``seed`` whole on
    the CPU in model order, so the values are the same whatever the device, world size or
    sharding (a DTensor shard gets its rows of the whole draw). Collective under FSDP."""
    gen = torch.Generator().manual_seed(seed)
    for _, module in lora_modules(model):
        a = torch.empty(module.lora_A.weight.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
        _assign(module.lora_A.weight, a)
        _assign(module.lora_B.weight, torch.zeros(module.lora_B.weight.shape))


def _assign(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copies a whole tensor into a parameter, or into this rank's shard of a DTensor parameter."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        full = distribute_tensor(full.to(param.device), param.device_mesh, param.placements)
    param.copy_(full.to(device=param.device, dtype=param.dtype))


def training_flops_per_token(cfg: ModelConfig, attention_context: float, adapter_params: int = 0) -> float:
    """Training FLOPs per token (forward + backward): agentflan.perf.flops_per_token's 6N + attention
    when ``adapter_params`` is 0 (every weight trained); with LoRA, 4N for the frozen weights
    (forward and input gradient, no weight gradient) + 6 * adapter_params + the same attention term.
    N: parameters without the embedding (its lookup costs no FLOPs), the LM head included."""
    full = flops_per_token(cfg, attention_context)
    if adapter_params == 0:
        return full
    n = cfg.num_params(include_embeddings=False) + cfg.vocab_size * cfg.dim
    return full - 2.0 * n + 6.0 * adapter_params
