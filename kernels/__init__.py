"""Kernels for packed-sequence training, imported as ``agentflan.kernels``.

`reference` holds the PyTorch ground truth for every op. The Triton kernels live one
file per op; `resolve_ops` picks the set the model runs with.

The six functional entry points are attributes of this package, loaded lazily so that
importing the package does not import Triton:

    import agentflan.kernels as K
    K.rms_norm(x, weight, eps)          # agentflan.kernels.rms_norm.rms_norm
    K.swiglu(gate, up)                  # agentflan.kernels.swiglu.swiglu
    K.apply_rope(q, k, cos, sin)        # agentflan.kernels.rope.apply_rope
    K.cross_entropy(logits, labels)     # agentflan.kernels.cross_entropy.cross_entropy
    K.fused_linear_cross_entropy(hidden, weight, labels)
    K.flash_attn_varlen(q, k, v, cu_seqlens, max_seqlen)

Four of them share their name with the submodule that defines them (`rms_norm`,
`swiglu`, `cross_entropy`, `fused_linear_cross_entropy`): on the package the name is
the function, also after the submodule has been imported. The submodules themselves
stay importable as usual (`from agentflan.kernels.rms_norm import rms_norm`,
`importlib.import_module("agentflan.kernels.rms_norm")`).
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import torch

from agentflan.kernels import reference

Ops = ModuleType  # a module exposing the functions of `reference`
KERNEL_BACKENDS = ("auto", "reference", "triton")
ENV_VAR = "AGENTFLAN_KERNELS"

# Public function -> the submodule that defines it.
ENTRY_POINTS = {
    "rms_norm": "rms_norm",
    "swiglu": "swiglu",
    "apply_rope": "rope",
    "cross_entropy": "cross_entropy",
    "fused_linear_cross_entropy": "fused_linear_cross_entropy",
    "flash_attn_varlen": "flash_attention",
}

__all__ = ["KERNEL_BACKENDS", "ENV_VAR", "Ops", "reference", "resolve_ops", *ENTRY_POINTS]


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
    # Lazy export: a kernel module (and Triton) loads only when its function is asked for.
    if name in ENTRY_POINTS:
        module = importlib.import_module(f"{__name__}.{ENTRY_POINTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(ENTRY_POINTS))


class _Package(ModuleType):
    """This package's module type. Importing a submodule binds it as an attribute of its
    package; where the submodule is named like the function it exports, the function is
    bound instead, so `agentflan.kernels.rms_norm` stays the function."""

    def __setattr__(self, name: str, value: object) -> None:
        if (
            isinstance(value, ModuleType)
            and ENTRY_POINTS.get(name) == name
            and value.__name__ == f"{self.__name__}.{name}"
        ):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
