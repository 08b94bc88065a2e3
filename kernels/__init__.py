"""Kernels for packed-sequence training, imported as ``agentflan.kernels``.

`reference` holds the PyTorch ground truth for every op. The Triton kernels live one
file per op; `resolve_ops` picks the set the model runs with. Importing this package
does not import Triton: `flash_attn_varlen` is looked up lazily, on first use.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from agentflan.kernels import reference

Ops = ModuleType  # a module exposing the functions of `reference`
KERNEL_BACKENDS = ("auto", "reference", "triton")
ENV_VAR = "AGENTFLAN_KERNELS"


def resolve_ops(backend: str, device: torch.device) -> Ops:
    """'auto' means the AGENTFLAN_KERNELS environment variable if set, else Triton on CUDA and reference elsewhere."""
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto")
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"kernel backend must be one of {KERNEL_BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "reference"
    if backend == "reference":
        return reference
    from agentflan.kernels import triton_ops

    return triton_ops


def __getattr__(name: str) -> object:
    # Lazy export: the Triton kernel module loads only when its function is asked for,
    # so this package imports on machines without Triton.
    if name == "flash_attn_varlen":
        from agentflan.kernels.flash_attention import flash_attn_varlen

        return flash_attn_varlen
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
