"""torch.distributed set-up and the one place where FSDP2 or DDP is applied to the model."""

from __future__ import annotations

import gc
import importlib
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


def _backend(device: torch.device, cpu_offload: bool) -> str:
    """NCCL for CUDA tensors; with CPU offload also gloo for the collectives on host tensors
    (gradient norms, exports and checkpoints of offloaded shards), as torchtitan does."""
    if device.type != "cuda":
        return "gloo"
    return "cuda:nccl,cpu:gloo" if cpu_offload else "nccl"


def init_distributed(cpu_offload: bool = False) -> DistInfo:
    """Joins the process group torchrun describes in the environment; a plain `python` run is world
    size 1. cpu_offload: the group also takes collectives on host tensors (gloo beside NCCL)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if "RANK" in os.environ and not dist.is_initialized():
        # Imported before the group exists: torch.distributed.nn.functional takes group.WORLD as
        # the default argument of its functions when first imported (by DDP, FSDP or DCP), which
        # would keep the group alive after destroy_process_group (see shutdown).
        importlib.import_module("torch.distributed.nn")
        dist.init_process_group(backend=_backend(device, cpu_offload), device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, world_size, local_rank, device)


def init_single_process(info: DistInfo, cpu_offload: bool = True) -> None:
    """A process group of this one process (rank 0 of 1, an in-memory store), for FSDP without
    torchrun: CPU offload of a full fine-tune on one GPU. Does nothing when a group exists."""
    if dist.is_initialized():
        return
    cuda = info.device.type == "cuda"
    importlib.import_module("torch.distributed.nn")  # before the group exists (see init_distributed)
    dist.init_process_group(backend=_backend(info.device, cpu_offload), store=dist.HashStore(), rank=0, world_size=1,
                            device_id=info.device if cuda else None)


def shutdown() -> None:
    """Leaves the process group, joining gloo's worker threads. Drop the parallelised models first.

    Why: a model that outlives this call keeps the group alive (DDP's reducer holds it), and
    the group is then destroyed later from the model's destructor with the GIL held, while a
    gloo worker thread may be waiting for the GIL to release the Python tensors of a finished
    collective: the two wait for each other (a hang), or, during interpreter exit, the worker is
    stopped inside a destructor (SIGABRT; PyTorch issue 56297). Models already dropped but held
    in reference cycles (DDP's are) are collected here first, so the group dies in this call,
    through the Python binding, which releases the GIL."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def resolve_mode(mode: str, world_size: int) -> str:
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel mode must be one of {PARALLEL_MODES}, got {mode!r}")
    if mode == "auto":
        return "none" if world_size == 1 else "fsdp"
    return mode


AC_MODES = ("none", "full", "selective", "attention")


def apply_activation_checkpointing(model: nn.Module, ac: str, every: int = 2) -> None:
    """Recomputes activations in the backward instead of keeping them (in place, before parallelize).

    ac:
      none       keep every activation.
      full       every transformer block is recomputed: a block keeps only its input.
      selective  every `every`-th block (blocks 0, every, 2*every, ...) is recomputed, the others keep
                 their activations: memory and recompute both fall by about 1/every of `full`'s.
      attention  in every block only the attention sub-layer (q/k/v/o projections, RoPE, varlen
                 attention) is recomputed; the MLP, whose activations are the larger part, keeps them.
    Uses torch's checkpoint_wrapper (non-reentrant torch.utils.checkpoint), which leaves state-dict
    names unchanged. Recomputation repeats the same ops on the same inputs, so losses and gradients
    are bitwise those without it; a model with active dropout (LoRA's) has its RNG state saved and
    restored around the recomputation, so it draws the same masks.
    """
    if ac not in AC_MODES:
        raise ValueError(f"activation checkpointing must be one of {AC_MODES}, got {ac!r}")
    if ac == "selective" and every < 1:
        raise ValueError(f"ac_every must be >= 1, got {every}")
    if ac == "none":
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    random = any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())

    def wrap(module: nn.Module) -> nn.Module:
        return checkpoint_wrapper(module, checkpoint_impl=CheckpointImpl.NO_REENTRANT, preserve_rng_state=random)

    for i, block in enumerate(model.layers):
        if ac == "attention":
            block.self_attn = wrap(block.self_attn)
        elif ac == "full" or i % every == 0:
            model.layers[i] = wrap(block)


def check_cpu_offload(cpu_offload: bool, mode: str, device: torch.device) -> None:
    """Raises ValueError unless CPU offload is off, or on with FSDP over an accelerator (it pins host memory)."""
    if not cpu_offload:
        return
    if mode != "fsdp":
        raise ValueError(f"cpu_offload needs parallel mode 'fsdp', got {mode!r}")
    if device.type == "cpu":
        raise ValueError("cpu_offload needs a CUDA device: it moves FSDP's shards to pinned host memory between uses")


def parallelize(
    model: nn.Module,
    mode: str,
    info: DistInfo,
    param_dtype: torch.dtype | None = None,
    cpu_offload: bool = False,
) -> nn.Module:
    """Applies data parallelism. FSDP2 shards each transformer block, then the root.

    param_dtype (FSDP only): the dtype parameters are gathered in for compute; gradients
    are reduced in fp32 and the sharded master weights stay fp32.
    cpu_offload (FSDP only): FSDP2's CPUOffloadPolicy keeps sharded parameters, gradients and
    optimizer state in pinned host memory and copies each block to the device for its compute.
    """
    check_cpu_offload(cpu_offload, mode, info.device)
    if mode == "none":
        return model
    if not dist.is_initialized():
        raise RuntimeError(f"parallel mode {mode!r} needs torchrun (no process group)")
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[info.local_rank] if info.device.type == "cuda" else None
        )
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for layer in model.layers:
        fully_shard(layer, mp_policy=mp, offload_policy=offload)
    fully_shard(model, mp_policy=mp, offload_policy=offload)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value
