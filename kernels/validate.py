"""Checks every Triton entry point runs before it launches anything (host-side only:
shapes, dtypes, devices and strides, never tensor values, which would need a sync)."""

from __future__ import annotations

import os

import torch


def interpreted() -> bool:
    """Whether Triton runs kernels with its CPU interpreter (TRITON_INTERPRET set true)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def check_runnable(op: str, *tensors: torch.Tensor) -> None:
    """Raise ValueError unless all tensors share one device the kernels can run on: CUDA,
    or the CPU under TRITON_INTERPRET=1."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    device = devices.pop()
    if device.type != "cuda" and not interpreted():
        raise ValueError(
            f"{op}: Triton kernels need CUDA tensors (got {device}); on CPU use agentflan.kernels.reference "
            "or set TRITON_INTERPRET=1 before importing triton"
        )


def unit_last(t: torch.Tensor) -> torch.Tensor:
    """t itself when its last dimension is contiguous (stride 1), else a contiguous copy.
    A last dimension of size <= 1 counts as contiguous whatever its stride."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()
