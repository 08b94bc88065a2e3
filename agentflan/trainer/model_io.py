"""Model construction and the final Hugging Face export, each behind one function.

The model is built by ``agentflan.builder`` (activation checkpointing and data parallelism
applied there): under FSDP an --init-from checkpoint is read shard by shard, never whole on a
rank. One case loads it whole on every rank: a tokenizer larger than the checkpoint's vocabulary
(--allow-vocab-mismatch), whose new rows are computed from all the old ones before sharding.
The final export (``agentflan.sharded_checkpoint.export_hf``) gathers one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from agentflan import builder, checkpoint
from agentflan.adapter import export_merged, save_adapter
from agentflan.checkpoint import CheckpointError
from agentflan.distributed import DistInfo
from agentflan.hf_tokenizer import write_hf_tokenizer
from agentflan.lora import apply_lora
from agentflan.model import Llama
from agentflan.sharded_checkpoint import export_hf
from agentflan.trainer.checkpointing import describe_failure
from agentflan.trainer.collective import any_rank, gather_lists
from agentflan.trainer.config import DEFAULT_AC_EVERY, TrainConfig
from agentflan.trainer.errors import TrainError
from agentflan.trainer.faults import clean_name, local_tensor, name_list, nonfinite_state
from agentflan.trainer.plan import RunPlan

FINAL_DIR = "final"
MERGED_DIR = "merged"  # --merge: the base with the LoRA adapters merged in


def build_model(plan: RunPlan, info: DistInfo) -> nn.Module:
    """The model to train, fp32 master weights on ``info.device`` (host memory with --cpu-offload),
    activation-checkpointed and parallelised as the plan says (a DistributedDataParallel wrapper
    under DDP): --init-from's weights (checked finite; the vocabulary grown when the plan says so),
    else the preset, initialised from --seed. With LoRA the base is frozen in the compute dtype and
    fp32 adapters (initialised from --seed) are the only trainable parameters. Collective. Raises
    TrainError naming the checkpoint and the cause."""
    cfg = plan.cfg
    param_dtype = torch.bfloat16 if plan.bf16 else None  # FSDP's compute dtype; DDP and one process use autocast
    weights_dtype = torch.bfloat16 if plan.lora is not None and plan.bf16 else torch.float32
    ac_every = cfg.ac_every or DEFAULT_AC_EVERY
    common = dict(mode=plan.mode, kernels=cfg.kernels, seed=cfg.seed, param_dtype=param_dtype,
                  weights_dtype=weights_dtype, ac=cfg.ac, ac_every=ac_every, cpu_offload=cfg.cpu_offload,
                  lora=plan.lora)
    if not cfg.init_from:
        return builder.build_model(cfg.preset, info, vocab_size=plan.model_config.vocab_size,
                                   max_seq_len=plan.model_config.max_seq_len, **common)
    try:
        if loads_whole(plan):
            device = torch.device("cpu") if cfg.cpu_offload else info.device
            model = checkpoint.load_hf(cfg.init_from, dtype=weights_dtype, device=device)
            model.kernels = cfg.kernels
            _grow_vocabulary(model, plan.model_config.vocab_size)
            if plan.lora is not None:
                apply_lora(model, plan.lora, cfg.seed)
            model = builder.distribute(model, plan.mode, info, param_dtype, cfg.ac, ac_every, cfg.cpu_offload)
        else:
            model = builder.build_model(cfg.init_from, info, **common)
    except (OSError, ValueError, RuntimeError) as err:  # CheckpointError is a ValueError; DCP raises RuntimeError
        raise TrainError(f"--init-from {cfg.init_from}: {err}") from None
    _check_finite_weights(model, info, cfg.init_from)
    return model


def loads_whole(plan: RunPlan) -> bool:
    """Whether each rank reads the whole --init-from checkpoint: under DDP or one process each
    rank holds the whole model anyway; under FSDP only to grow the vocabulary."""
    grows = plan.checkpoint_vocab is not None and plan.model_config.vocab_size > plan.checkpoint_vocab
    return bool(plan.cfg.init_from) and (plan.mode != "fsdp" or grows)


def _check_finite_weights(model: nn.Module, info: DistInfo, folder: str) -> None:
    """TrainError on every rank if a loaded tensor holds NaN or inf; each rank checks its own
    shards, and the message names every such tensor of every rank. Collective."""
    bad = [checkpoint.hf_name(clean_name(name)) for name, p in model.named_parameters()
           if not checkpoint.all_finite(local_tensor(p.detach()))]
    if any_rank(info, bool(bad)):
        names = list(dict.fromkeys(gather_lists(info, bad)))  # a tensor sharded over ranks is named once
        raise TrainError(f"--init-from {folder}: non-finite values (NaN or inf) in {name_list(names)}",
                         quiet=not info.is_main)


@torch.no_grad()
def _grow_vocabulary(model: Llama, vocab_size: int) -> None:
    """New embedding and LM-head rows set to the mean of the existing ones (Hewitt, "Initializing
    new word embeddings for pretrained language models", 2021): the new pieces start out
    predicted no more and no less than an average one."""
    for name in ("embed_tokens", "lm_head"):
        old = getattr(model, name).weight  # (old_vocab, dim)
        rows = old.mean(dim=0, keepdim=True).expand(vocab_size - old.shape[0], -1)
        grown = nn.Parameter(torch.cat([old, rows]))
        getattr(model, name).weight = grown
        if name == "embed_tokens":
            model.embed_tokens.num_embeddings = vocab_size
        else:
            model.lm_head.out_features = vocab_size
    model.config = type(model.config)(**{**vars(model.config), "vocab_size": vocab_size})


def check_finite(model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo, what: str) -> None:
    """TrainError on every rank if any parameter or optimizer state holds a NaN or inf (nothing
    non-finite is ever saved). Collective."""
    bad = nonfinite_state(model, optimizer)
    if any_rank(info, bool(bad)):
        raise TrainError(f"refusing to write {what}: non-finite values in {name_list(gather_lists(info, bad))}",
                         quiet=not info.is_main)


def save_dtype(plan: RunPlan) -> torch.dtype:
    """The dtype of the final model's weights (with LoRA, of the merged model): --save-dtype, where
    auto is the compute dtype."""
    choice = plan.cfg.save_dtype
    if choice == "auto":
        choice = "bf16" if plan.bf16 else "fp32"
    return torch.bfloat16 if choice == "bf16" else torch.float32


def adapter_dtype(plan: RunPlan) -> torch.dtype:
    """The dtype of a LoRA adapter's saved weights: --save-dtype, where auto is fp32 (as trained)."""
    return torch.bfloat16 if plan.cfg.save_dtype == "bf16" else torch.float32


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_final(model: nn.Module, plan: RunPlan, info: DistInfo) -> list[str]:
    """Writes RUN/final: config.json, safetensors weights in ``save_dtype(plan)``, and the
    tokenizer, chat-template and template-record files (agentflan.hf_tokenizer), all published
    together by one rename once complete (a failed save leaves an earlier final/ as it was).
    With LoRA, RUN/final is a PEFT adapter folder (agentflan.adapter, weights in
    ``adapter_dtype(plan)``) with the same tokenizer files, and --merge also writes RUN/merged, the
    whole merged model as above. Collective: each tensor is gathered in turn and rank 0 writes.
    Returns a line saying what was written, for each folder. Raises TrainError on every rank (rank 0
    prints it) naming the folder and the cause."""
    cfg: TrainConfig = plan.cfg
    out = Path(cfg.out_dir) / FINAL_DIR

    def tokenizer_files(folder: Path) -> None:
        try:
            write_hf_tokenizer(folder, cfg.tokenizer, cfg.template)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{folder}: cannot write the tokenizer files: {err}") from err

    def write(what: str, folder: Path, save: Callable[[], None]) -> None:
        try:
            save()
        except CheckpointError as err:  # raised on every rank; rank 0's holds the OS error, if any
            raise TrainError(f"cannot write {what} {folder}: {describe_failure(err, folder)}",
                             quiet=not info.is_main) from None

    if plan.lora is None:
        write("the final model", out, lambda: export_hf(model, out, dtype=save_dtype(plan), write_extra=tokenizer_files))
        return [f"saved Hugging Face model to {out} ({_dtype_name(save_dtype(plan))})"]
    write("the final adapter", out, lambda: save_adapter(model, out, plan.lora, cfg.init_from, adapter_dtype(plan),
                                                        write_extra=tokenizer_files))
    lines = [f"saved LoRA adapter (PEFT format) to {out} ({_dtype_name(adapter_dtype(plan))})"]
    if cfg.merge:
        merged = Path(cfg.out_dir) / MERGED_DIR
        write("the merged model", merged,
              lambda: export_merged(model, merged, save_dtype(plan), write_extra=tokenizer_files))
        lines.append(f"saved the merged Hugging Face model to {merged} ({_dtype_name(save_dtype(plan))})")
    return lines
