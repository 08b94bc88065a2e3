"""``--dry-run``: what a run would need, found without running it.

The options are resolved and checked exactly as a run does (``plan.resolve``), for ``--world-size``
ranks and without a process group; files the run needs but that are absent here (weights, data,
the tokenizer) are warnings, so a laptop can plan a cluster job. Nothing is allocated: the
shape comes from --init-from's config.json (or --preset when the folder is absent) through
``agentflan.builder.model_config``, and ``agentflan.memory.estimate_memory`` gives the memory per
rank. The verdict is against ``--gpu`` (else the current CUDA device, else none).
"""

from __future__ import annotations

import os
import sys

import torch

from agentflan import memory
from agentflan.distributed import DistInfo
from agentflan.trainer.collective import agree
from agentflan.trainer.config import DEFAULT_AC_EVERY, TrainConfig, check_options
from agentflan.trainer.errors import TrainError
from agentflan.trainer.model_io import adapter_dtype, save_dtype
from agentflan.trainer.plan import Checks, RunPlan, resolve


def dry_run(cfg: TrainConfig) -> memory.MemoryEstimate:
    """Checks ``cfg`` for the ranks and card it names and prints the checks, the plan and the
    memory report; returns the estimate. Raises TrainError for a mistake in the options or the
    files present (as a run would), or when the estimate does not fit the card."""
    check_options(cfg)
    card = memory.device_memory(cfg.gpu)  # None: no card named and none here
    world_size = cfg.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    # The machine planned for: a GPU when a card is known (bf16 and Triton by default there).
    info = DistInfo(rank=0, world_size=world_size, local_rank=0, device=torch.device("cuda" if card else "cpu"))
    loud = os.environ.get("RANK", "0") == "0"  # under torchrun every rank plans the same job: one prints

    def report(line: str) -> None:
        if loud:
            print(line, file=sys.stderr if line.startswith("warning:") else sys.stdout, flush=True)

    # agree: a recipe's or a data reader's own error becomes a TrainError, as in a run
    plan = agree(info, lambda: resolve(cfg, info, Checks(dry_run=True, report=report)))
    estimate = estimate_plan(plan, world_size)
    if loud:
        print(f"plan: {describe(plan, world_size)}")
        for note in plan.notes:
            print(note, file=sys.stderr if note.startswith("warning:") else sys.stdout)
        print(memory.format_report(estimate, layout(plan, world_size), card), flush=True)
    if card is not None and estimate.device_total > card[1]:
        name, total = card
        raise TrainError(f"the run needs {estimate.device_total / memory.GiB:.1f} GiB a rank, more than {name}'s "
                         f"{total / memory.GiB:.1f} GiB: use --ac full, more ranks, shorter packs or more "
                         f"--grad-accum micro-batches", quiet=not loud)
    return estimate


def _kernels(plan: RunPlan) -> str:
    """The kernels estimated for: Triton unless --kernels reference (a dry run plans for a GPU)."""
    return "reference" if plan.cfg.kernels == "reference" else "triton"


def _packs_per_micro_batch(plan: RunPlan) -> int:
    return plan.cfg.packs_per_step // plan.cfg.grad_accum


def estimate_plan(plan: RunPlan, world_size: int) -> memory.MemoryEstimate:
    """The memory per rank of the planned run (agentflan.memory.estimate_memory)."""
    cfg = plan.cfg
    return memory.estimate_memory(
        plan.model_config, world_size=world_size, mode=plan.mode, pack_len=cfg.pack_len,
        packs_per_micro_batch=_packs_per_micro_batch(plan), bf16=plan.bf16, ac=cfg.ac,
        ac_every=cfg.ac_every or DEFAULT_AC_EVERY, kernels=_kernels(plan), cpu_offload=cfg.cpu_offload,
        lora=plan.lora, frozen_dtype=torch.bfloat16 if plan.bf16 else torch.float32,
    )


def layout(plan: RunPlan, world_size: int) -> str:
    cfg = plan.cfg
    precision = ("bf16" if plan.bf16 else "fp32") if plan.lora else memory.precision_for(plan.mode, plan.bf16)
    line = (f"parallel {plan.mode} over {world_size} rank(s){' with CPU offload' if cfg.cpu_offload else ''}, "
            f"{precision} compute, activation checkpointing {plan.describe_ac()}, {_packs_per_micro_batch(plan)} "
            f"pack(s) of {cfg.pack_len} tokens a micro-batch, {_kernels(plan)} kernels")
    return line + (f"; {plan.describe_lora(precision)}" if plan.lora is not None else "")


def describe(plan: RunPlan, world_size: int) -> str:
    cfg = plan.cfg
    steps = f"{cfg.steps} steps" if cfg.steps is not None else f"--epochs {cfg.epochs:g} (steps follow from the data)"
    source = cfg.init_from or f"preset {cfg.preset}"
    final = f"final model in {str(save_dtype(plan)).removeprefix('torch.')}" if cfg.save else "no final model"
    if cfg.save and plan.lora is not None:
        final = f"final LoRA adapter (PEFT format) in {str(adapter_dtype(plan)).removeprefix('torch.')}"
        if cfg.merge:
            final += f", merged model in {str(save_dtype(plan)).removeprefix('torch.')}"
    return (f"{source}; {steps}; global batch {cfg.global_batch} packs ({cfg.packs_per_step} a rank on {world_size}, "
            f"{cfg.grad_accum} micro-batch(es) a step); {final}; no process group, no data read, no weights loaded")
