"""AdamW over the model's parameters and the learning-rate schedule (linear warmup, cosine decay)."""

from __future__ import annotations

import math

import torch

from agentflan.trainer.config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device, fsdp: bool) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (with LoRA, the adapters only: the frozen base has no
    optimizer state); no weight decay on norm weights (the 1-D parameters), as is standard for Llama."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel does not take FSDP2's DTensor parameters; foreach does.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda" and not fsdp)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """LR of optimizer step ``step`` (from 0): linear from warmup_start_lr to lr over
    warmup_steps, then cosine decay to min_lr at the last step (cfg.steps)."""
    if step < cfg.warmup_steps:
        return cfg.warmup_start_lr + (cfg.lr - cfg.warmup_start_lr) * step / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))
