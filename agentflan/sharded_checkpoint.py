"""Hugging Face folders to and from sharded (FSDP2) models, collectively, never whole on one rank.

Loading (`load_hf_sharded`): the model was built on the meta device, sharded with fully_shard and
materialised with to_empty, so each rank holds only its shard. torch.distributed.checkpoint's
HuggingFaceStorageReader then reads, for every tensor, only the rows of this rank's shard from the
memory-mapped safetensors files and copies them (converting the dtype) into the shard: a rank holds
its shard plus one slice in flight. (That reader reads slices since torch 2.9; torch 2.8's read whole
files, so the bound needs torch >= 2.9.)

Exporting (`export_hf`): every rank walks the state dict in the same order; each sharded tensor is
cast to the export dtype shard-wise, all-gathered, and rank 0 streams it into the safetensors file
whose header it laid out in advance, then drops it. A rank holds its shard plus one full tensor.
Only rank 0 writes, so the folder needs no filesystem shared between nodes; the whole folder is
published atomically (temporary folder, then rename) and a failure is raised on every rank.

This was chosen over DCP's HuggingFaceStorageWriter with consolidation, which writes every rank's
shard to disk and then has rank 0 read them all back and write the consolidated files: twice the
disk traffic and space for the same result (benchmarks/RESULTS.md, "Final export").
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from agentflan.checkpoint import (
    DEFAULT_MAX_SHARD_BYTES,
    CheckpointError,
    PlannedTensor,
    all_finite,
    check_llama_tensors,
    hf_name,
    read_safetensors_header,
    write_hf_folder,
)
from agentflan.distributed import unwrap


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def load_hf_sharded(model: nn.Module, folder: str | os.PathLike) -> None:
    """Fills a sharded Llama in place from a Hugging Face folder (collective: every rank calls it).

    model: fully_shard'ed and materialised (to_empty) on its device; its parameters are
    overwritten, converted from the checkpoint's dtype to theirs. Every file and the index are
    checked first (CheckpointError naming the file); a safetensors file in the folder that the
    index does not list but that holds model tensors is refused, because the reader reads every
    *.safetensors file of the folder.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    folder = Path(folder)
    files = check_llama_tensors(folder, unwrap(model).config)
    wanted = {name for entries in files.values() for name in entries}
    for path in sorted(folder.glob("*.safetensors")):
        if path not in files and wanted & set(read_safetensors_header(path)):
            raise CheckpointError(
                f"{path}: not listed in {folder}'s index but holds model tensors; remove or move it"
            )
    # Tensors the checkpoint does not hold (LoRA adapters on the model) are left as they are.
    state = {hf: tensor for name, tensor in unwrap(model).state_dict().items() if (hf := hf_name(name)) in wanted}
    try:
        dcp.load(state, storage_reader=HuggingFaceStorageReader(str(folder)))
    except Exception as e:  # DCP gathers every rank's failure into one exception
        raise CheckpointError(f"{folder}: sharded load failed: {e}") from e


def export_hf(
    model: nn.Module,
    folder: str | os.PathLike,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    write_extra: Callable[[Path], None] | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Writes a Hugging Face LlamaForCausalLM folder from a model of any parallel mode (collective).

    Every rank calls it (FSDP2, DDP, or a single process). dtype: the stored dtype (None: the
    parameters', i.e. the fp32 master weights); bf16 halves the gathered bytes too, as each shard
    is cast before the gather. write_extra(tmp_folder) runs on rank 0 before the folder is
    published (e.g. to add tokenizer files). Raises CheckpointError on every rank, naming the path
    and the cause, when a tensor holds NaN or inf (checked shard-wise on every rank before anything
    is written) or when rank 0 fails to write (disk full, permissions); the previous folder is then
    left intact. state_dict: the tensors to write, by our names (default: the model's state dict).
    transform(name, tensor): each tensor as written (e.g. with LoRA adapters merged in), computed
    from this rank's tensor or DTensor shard just before its cast and gather, one at a time.
    """
    inner = unwrap(model)
    state = dict(state_dict) if state_dict is not None else inner.state_dict()
    plan = [PlannedTensor(hf_name(n), tuple(t.shape), dtype or t.dtype) for n, t in state.items()]
    rank = dist.get_rank() if dist.is_initialized() else 0
    # Each rank checks its own shards (in parallel, before anything is gathered or written).
    bad = [p.name for p, t in zip(plan, state.values()) if not all_finite(t.to_local() if _is_dtensor(t) else t)]
    if dist.is_initialized():
        everyone: list[list[str]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(everyone, bad)
        bad = sorted({name for names in everyone for name in names})
    if bad:
        raise CheckpointError(f"{folder}: refusing to export: {len(bad)} tensors hold NaN or inf, e.g. {bad[:3]}")

    def full_tensors() -> Iterator[torch.Tensor | None]:
        for (name, tensor), planned in zip(state.items(), plan):
            if transform is not None:
                tensor = transform(name, tensor)
            if _is_dtensor(tensor):
                tensor = tensor.to(planned.dtype).full_tensor()  # (full shape) on every rank
            yield tensor if rank == 0 else None

    failure: CheckpointError | None = None
    try:
        write_hf_folder(
            folder, inner.config, plan, full_tensors(),
            max_shard_bytes=max_shard_bytes, write=rank == 0, write_extra=write_extra, check_finite=False,
        )
    except CheckpointError as e:
        failure = e
    except Exception as e:  # e.g. from write_extra: the other ranks must still hear of it, not wait forever
        failure = CheckpointError(f"{folder}: export failed: {type(e).__name__}: {e}")
        failure.__cause__ = e
    error = None if failure is None else str(failure)
    if dist.is_initialized():
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if failure is not None:
        raise failure  # rank 0: with its cause (the OS error) attached
    if error is not None:
        raise CheckpointError(error)

