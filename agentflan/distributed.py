"""torch.distributed set-up and the one place where FSDP2 or DDP is applied to the model."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

PARALLEL_MODES = ("auto", "none", "ddp", "fsdp")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Joins the process group torchrun describes in the environment; a plain `python` run is world size 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, world_size, local_rank, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def resolve_mode(mode: str, world_size: int) -> str:
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel mode must be one of {PARALLEL_MODES}, got {mode!r}")
    if mode == "auto":
        return "none" if world_size == 1 else "fsdp"
    return mode


def parallelize(model: nn.Module, mode: str, info: DistInfo, param_dtype: torch.dtype | None = None) -> nn.Module:
    """Applies data parallelism. FSDP2 shards each transformer block, then the root.

    param_dtype (FSDP only): the dtype parameters are gathered in for compute; gradients
    are reduced in fp32 and the sharded master weights stay fp32.
    """
    if mode == "none":
        return model
    if not dist.is_initialized():
        raise RuntimeError(f"parallel mode {mode!r} needs torchrun (no process group)")
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[info.local_rank] if info.device.type == "cuda" else None
        )
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole, unsharded state dict on CPU (collective under FSDP: every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if dist.is_initialized():
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(unwrap(model), options=options)
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value
