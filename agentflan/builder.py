"""The one call that builds the model a run trains: from a preset or a Hugging Face folder, with
activation checkpointing and data parallelism applied.

From scratch, every rank initialises the whole model from the seed and then shards it, so the
weights are bit-identical whatever the world size. From a Hugging Face folder under FSDP the model
is built on the meta device, wrapped for activation checkpointing, sharded, materialised shard by
shard (to_empty) and filled from the safetensors files (agentflan.sharded_checkpoint), so no rank
ever holds more than its shard plus one tensor in flight. Under DDP or a single process each rank
needs the whole model anyway: it is loaded one tensor at a time, converted from the checkpoint's
dtype to the weights' dtype as it goes.

LoRA adapters (agentflan.lora) go on the Llama before activation checkpointing and sharding, i.e.
just before `distribute` below; on the meta device they are initialised once the base is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from agentflan import distributed
from agentflan.checkpoint import CONFIG_FILE, check_llama_tensors, load_config, load_hf
from agentflan.config import PRESETS, ModelConfig, get_preset
from agentflan.distributed import DistInfo
from agentflan.lora import LoraSpec, apply_lora, init_adapters
from agentflan.model import Llama
from agentflan.sharded_checkpoint import load_hf_sharded


def is_hf_folder(source: str | os.PathLike) -> bool:
    """Whether `source` names a Hugging Face folder; a preset's name (a str) is a preset even when a
    folder of that name exists in the current directory."""
    if isinstance(source, str) and source in PRESETS:
        return False
    return Path(source).is_dir()


def model_config(
    source: str | os.PathLike, vocab_size: int | None = None, max_seq_len: int | None = None
) -> ModelConfig:
    """The configuration `build_model` would use, without building anything (for dry runs).

    source: a preset name (vocab_size and max_seq_len override the preset's) or a Hugging Face
    folder (its config.json wins; vocab_size, the tokenizer's, must not exceed the checkpoint's).
    Raises ValueError naming the folder or preset.
    """
    if is_hf_folder(source):
        if not (Path(source) / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{source}: a folder, but no {CONFIG_FILE} in it (not a Hugging Face checkpoint)")
        cfg = load_config(source)
        if vocab_size is not None and cfg.vocab_size < vocab_size:
            raise ValueError(
                f"{source}: checkpoint vocabulary {cfg.vocab_size} is smaller than the tokenizer's ({vocab_size})"
            )
        return cfg
    overrides = {k: v for k, v in (("vocab_size", vocab_size), ("max_seq_len", max_seq_len)) if v is not None}
    return get_preset(str(source), **overrides)


def build_model(
    source: str | os.PathLike,
    info: DistInfo,
    *,
    mode: str = "auto",
    vocab_size: int | None = None,
    max_seq_len: int | None = None,
    kernels: str = "auto",
    seed: int = 0,
    param_dtype: torch.dtype | None = None,
    weights_dtype: torch.dtype = torch.float32,
    ac: str = "none",
    ac_every: int = 2,
    cpu_offload: bool = False,
    lora: LoraSpec | None = None,
) -> nn.Module:
    """Builds, initialises or loads, checkpoints and parallelises the model (collective under torchrun).

    source: a preset name (trained from scratch, initialised from `seed`) or a Hugging Face
      LlamaForCausalLM folder (fine-tuned). See `model_config` for vocab_size and max_seq_len.
    mode: auto | none | ddp | fsdp (distributed.resolve_mode). param_dtype: FSDP's compute dtype
      (None: the weights'). weights_dtype: the dtype parameters are held in (fp32 master weights).
    ac, ac_every: activation checkpointing (distributed.apply_activation_checkpointing).
    cpu_offload: FSDP2 CPUOffloadPolicy (FSDP only).
    lora: adapters to train on a frozen base (agentflan.lora.apply_lora; initialised from `seed`); the
      base is held in `weights_dtype`, the adapters in fp32.
    Returns the module to train (a DistributedDataParallel wrapper under DDP). All checks that
    need no weights (folder, config, every safetensors header, vocabulary) run before any allocation.
    """
    mode = distributed.resolve_mode(mode, info.world_size)
    if ac not in distributed.AC_MODES:
        raise ValueError(f"activation checkpointing must be one of {distributed.AC_MODES}, got {ac!r}")
    distributed.check_cpu_offload(cpu_offload, mode, info.device)
    cfg = model_config(source, vocab_size, max_seq_len)
    init_device = torch.device("cpu") if cpu_offload else info.device
    from_hf = is_hf_folder(source)
    if from_hf:
        check_llama_tensors(source, cfg)
    if from_hf and mode == "fsdp":
        with torch.device("meta"):
            model = Llama(cfg, kernels).to(weights_dtype)
        if lora is not None:
            apply_lora(model, lora, seed)
        distribute(model, mode, info, param_dtype, ac, ac_every, cpu_offload)
        model.to_empty(device=init_device)
        load_hf_sharded(model, source)
        if lora is not None:
            init_adapters(model, seed)
        return model
    if from_hf:
        model = load_hf(source, dtype=weights_dtype, device=init_device)
        model.kernels = kernels
    else:
        with torch.device(init_device):
            model = Llama(cfg, kernels)
        model.init_weights(seed=seed)
        model.to(weights_dtype)
    if lora is not None:
        apply_lora(model, lora, seed)
    return distribute(model, mode, info, param_dtype, ac, ac_every, cpu_offload)


def distribute(
    model: Llama,
    mode: str,
    info: DistInfo,
    param_dtype: torch.dtype | None = None,
    ac: str = "none",
    ac_every: int = 2,
    cpu_offload: bool = False,
) -> nn.Module:
    """Activation checkpointing, then data parallelism, applied to a whole (unsharded) Llama: the last
    step of `build_model`, for a caller that changed the loaded model first (e.g. grew its vocabulary).
    mode: none | ddp | fsdp. Collective under FSDP/DDP; returns the module to train."""
    distributed.apply_activation_checkpointing(model, ac, ac_every)
    return distributed.parallelize(model, mode, info, param_dtype=param_dtype, cpu_offload=cpu_offload)
