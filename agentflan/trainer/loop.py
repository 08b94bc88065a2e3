"""``train(cfg)``: check everything, take the run folder, load data and model, then the loop."""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from agentflan import distributed
from agentflan.distributed import DistInfo
from agentflan.perf import peak_flops
from agentflan.trainer import checkpointing
from agentflan.trainer.checkpointing import TrainState
from agentflan.trainer.collective import agree, from_main
from agentflan.trainer.config import TrainConfig, to_yaml
from agentflan.data.dataset import PackedDataset
from agentflan.trainer.data import Dataset, check_packs_train, check_trainable, load_data
from agentflan.trainer.faults import FaultInjection, NonFiniteGuard, Preemption, kill_self
from agentflan.trainer.metrics import MetricsLog, Progress, write_summary
from agentflan.trainer.model_io import build_model, check_finite, loads_whole, save_final
from agentflan.trainer.optim import build_optimizer, lr_at
from agentflan.trainer.plan import RunPlan, device_dtype, resolve, steps_from_data
from agentflan.trainer.run_dir import RunFolder, RunStart, check_unfinished, resume_hint
from agentflan.trainer.step import Stepper


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Runs the configured training (under torchrun: on every rank); returns rank 0's summary.

    Raises TrainError for a mistake in the options or the files they name (before any data is
    tokenized or weights loaded), a run folder that is refused or in use, ``--max-bad-steps``
    non-finite steps in a row, or a failed write (naming the path and the cause).
    """
    t_start = time.perf_counter()
    info = distributed.init_distributed(cpu_offload=cfg.cpu_offload)
    try:
        return _prepare_and_train(cfg, info, t_start)
    except BaseException as err:
        _release_frames(err)
        raise
    finally:
        distributed.shutdown()


def _release_frames(err: BaseException) -> None:
    """Clears the locals of the frames an exception (and those it chains) carries, so that the
    model they hold is freed before the process group is left (distributed.shutdown says why);
    the traceback keeps the file and line of each frame."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [err]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)  # skips the frames still running (this one)
        pending += [current.__cause__, current.__context__]


def _prepare_and_train(cfg: TrainConfig, info: DistInfo, t_start: float) -> dict[str, Any]:
    def say(line: str) -> None:
        if info.is_main:
            print(line, flush=True)

    def warn(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    plan = agree(info, lambda: resolve(cfg, info))
    if plan.mode == "fsdp" and info.world_size == 1:  # --cpu-offload without torchrun
        distributed.init_single_process(info, cpu_offload=cfg.cpu_offload)
    torch.manual_seed(plan.cfg.seed + info.rank)  # LoRA's dropout draws here: a run repeats itself, rank by rank
    folder = agree(info, lambda: RunFolder.open(plan.cfg.out_dir) if info.is_main else None)
    started = False
    try:
        start = from_main(info, agree(info, lambda: folder.decide(plan.cfg, warn) if info.is_main else None))
        say(f"config ({'resuming from ' + str(start.checkpoint) if start.checkpoint else 'starting'}):\n"
            + to_yaml(plan.cfg).rstrip())
        dataset = load_data(plan, info, start.checkpoint is not None, say)
        say(f"data: {dataset.summary()}")
        agree(info, lambda: check_trainable(dataset))
        agree(info, lambda: steps_from_data(plan, dataset.n_packs))
        if isinstance(dataset, PackedDataset):  # prepared data: its steps without a trained token abort later
            agree(info, lambda: check_packs_train(dataset, plan.cfg.global_batch, warn if info.is_main else say,
                                                  plan.cfg.steps - start.step, plan.cfg.max_bad_steps))
        agree(info, lambda: check_unfinished(plan.cfg.out_dir, start.step, plan.cfg.steps))
        for note in plan.notes:
            if note.startswith("warning:"):
                if info.is_main:
                    warn(note)
            else:
                say(note)
        model = agree(info, lambda: build_model(plan, info))
        say(f"model: {_model_line(plan, info)}")
        optimizer = build_optimizer(model, plan.cfg, info.device, fsdp=plan.mode == "fsdp")
        state = TrainState()
        if start.checkpoint is not None:
            state = agree(info, lambda: checkpointing.load(start.checkpoint, model, optimizer, info))
            say(f"resumed from {start.checkpoint} at step {state.step}")
        metrics = agree(info, lambda: _begin(folder, plan, start, say, warn) if info.is_main else None,
                        also=(OSError,))
        started = True
        try:
            result = _loop(plan, info, model, optimizer, dataset, state, metrics, t_start)
        finally:
            if metrics is not None:
                metrics.close()
        if info.is_main and not result.get("stopped"):
            folder.drop_replaced()
        return result
    finally:
        if folder is not None:
            folder.release(started)


def _model_line(plan: RunPlan, info: DistInfo) -> str:
    cfg = plan.cfg
    if cfg.init_from:
        how = "read whole on each rank" if loads_whole(plan) else "read shard by shard"
        source = f"{cfg.init_from} ({how})"
    else:
        source = f"preset {cfg.preset} (initialised from seed {cfg.seed})"
    line = (f"{source}, {plan.model_config.num_params() / 1e6:.2f}M parameters, {info.world_size} rank(s) on "
            f"{info.device.type}, parallel {plan.mode}{', CPU offload' if cfg.cpu_offload else ''}, {cfg.dtype}, "
            f"activation checkpointing {plan.describe_ac()}")
    return line + (f"; {plan.describe_lora(cfg.dtype)}" if plan.lora is not None else "")


def _begin(folder: RunFolder, plan: RunPlan, start: RunStart, say: Callable[[str], None],
           warn: Callable[[str], None]) -> MetricsLog:
    """Rank 0, when training starts: the folder's files are set for this run."""
    folder.begin(plan.cfg, start, say)
    metrics = MetricsLog(plan.cfg.out_dir, start.step, plan.cfg.tensorboard)
    if metrics.missing:
        warn(f"warning: {metrics.path} held {start.step - metrics.missing} of the {start.step} records before the "
             f"checkpoint; {metrics.missing} are lost")
    return metrics


def _loop(plan: RunPlan, info: DistInfo, model: torch.nn.Module, optimizer: torch.optim.Optimizer, dataset: Dataset,
          state: TrainState, metrics: MetricsLog | None, t_start: float) -> dict[str, Any]:
    cfg = plan.cfg
    faults = FaultInjection()
    stepper = Stepper(model, optimizer, plan, info, faults)
    batches = dataset.batches(cfg.packs_per_step // cfg.grad_accum, info.rank, info.world_size, seed=cfg.seed,
                              start_batch=state.step * cfg.grad_accum)  # the data order is a function of the step
    guard = NonFiniteGuard(cfg.max_bad_steps, state.bad_in_a_row, quiet=not info.is_main, empty_hint=(
                               f"The assistant turns do not reach the packs of {cfg.pack_len} tokens: raise "
                               f"--pack-len, or check the data's roles (only assistant turns are trained)"))
    progress = Progress(info.is_main, state.step, cfg.steps, cfg.log_every)
    peak = peak_flops(info.device, device_dtype(plan), cfg.peak_tflops)
    start_step, saved_step, stopped = state.step, state.step, False
    t_train, elapsed_before = time.perf_counter(), state.elapsed_s

    def save_checkpoint() -> None:
        check_finite(model, optimizer, info, f"the checkpoint of step {state.step}")
        cut = kill_self if info.is_main and faults.at("kill_in_checkpoint", state.step) else lambda: None
        path = checkpointing.save(cfg.out_dir, model, optimizer, state, info, cfg.keep_checkpoints, before_commit=cut)
        progress.say(f"checkpoint: {path}")

    with Preemption() as preemption:
        for step in range(state.step, cfg.steps):
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t_step = time.perf_counter()
            result = stepper.run(step, batches, stop=preemption.requested)
            if result.stopped:
                stopped = True
                break
            dt = time.perf_counter() - t_step
            state.step, state.tokens = step + 1, state.tokens + result.tokens
            state.elapsed_s = elapsed_before + time.perf_counter() - t_train
            state.skipped_steps += result.skip_reason is not None
            record = _record(state, result, lr, dt, peak, info)
            if metrics is not None:
                metrics.write(record)
            progress.update(record)
            finite = None if result.skip_reason == "no_trained_tokens" else result.skip_reason is None
            guard.record(state.step, finite, result.loss, result.grad_norm, result.bad_params)
            state.bad_in_a_row = guard.in_a_row
            if cfg.save_every and state.step % cfg.save_every == 0 and state.step < cfg.steps:
                save_checkpoint()
                saved_step = state.step
        progress.close()
        if state.step > saved_step:  # the last step, or where a signal stopped the run
            save_checkpoint()
        if stopped:
            where = f"checkpoint {checkpointing.FOLDER}/{checkpointing.PREFIX}{state.step}" if state.step > start_step \
                else "nothing new to save"
            progress.say(f"stopped by {preemption.name} after step {state.step}/{cfg.steps} ({where} in {cfg.out_dir}); "
                         + resume_hint(cfg))
            return {"stopped": True, "step": state.step, "interrupted": preemption.interrupted}
        if cfg.save:
            check_finite(model, optimizer, info, "the final model")
            for line in save_final(model, plan, info):
                progress.say(line)
    if metrics is None:
        return {}
    summary = metrics.summary(
        start_step=start_step, tokens_per_s=state.tokens / max(state.elapsed_s, 1e-9), train_time_s=state.elapsed_s,
        wall_time_s=time.perf_counter() - t_start, packing_efficiency=dataset.packing_efficiency,
        world_size=info.world_size, parallel=plan.mode,
    )
    write_summary(cfg.out_dir, summary)
    loss = (lambda v: "n/a" if v is None else f"{v:.4f}")
    progress.say(f"done: loss {loss(summary['first_loss'])} -> {loss(summary['last_loss'])} (mean of last 10: "
                 f"{loss(summary['last10_mean_loss'])}), {summary['tokens_per_s']:,.0f} tok/s, {summary['skipped_steps']} "
                 f"skipped step(s), train {state.elapsed_s:.1f}s{' over all parts' if start_step else ''}, wall "
                 f"{summary['wall_time_s']:.1f}s{' of this part' if start_step else ''}")
    return summary


def _record(state: TrainState, result: Any, lr: float, dt: float, peak: float | None, info: DistInfo) -> dict[str, Any]:
    cuda = info.device.type == "cuda"
    record = {
        "step": state.step, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
        "tokens": result.tokens, "trained_tokens": result.trained_tokens,
        "tokens_per_s": result.tokens / dt, "trained_tokens_per_s": result.trained_tokens / dt,
        "mfu": result.flops / (dt * info.world_size * peak) if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(info.device) / 2**30 if cuda else None,
        "data_wait_s": result.data_wait_s, "step_time_s": dt, "elapsed_s": state.elapsed_s,
        "skipped": result.skip_reason is not None,
    }
    if result.skip_reason:
        record["skip_reason"] = result.skip_reason
    return record
