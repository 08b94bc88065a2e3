"""The training loop: packed Agent-FLAN batches, AdamW, warmup + cosine, loss over trained tokens only."""

from __future__ import annotations

import dataclasses
import json
import math
from contextlib import nullcontext
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from agentflan import checkpoint, distributed
from agentflan.config import get_preset
from agentflan.data.dataset import PackedDataset, encode_files
from agentflan.data.loader import PreparedDataset
from agentflan.data.prepare import sha256_file
from agentflan.data.defaults import DEFAULT_CORPUS, DEFAULT_TOKENIZER
from agentflan.model import Llama
from agentflan.tokenizer import Tokenizer


@dataclass
class TrainConfig:
    # model: a preset trained from scratch, or a Hugging Face Llama folder to fine-tune
    preset: str = "tiny"
    init_from: str | None = None
    kernels: str = "auto"  # auto (Triton on CUDA) | triton | reference
    # data: conversation files (tokenized and packed at start) or one tools/prepare_data.py folder
    data: list[str] = field(default_factory=lambda: [str(DEFAULT_CORPUS)])
    data_format: str = "auto"  # agentflan | agentinstruct | toolbench | sharegpt | auto
    skip_bad: bool = False  # skip (and count) malformed records instead of stopping
    tokenizer: str = str(DEFAULT_TOKENIZER)
    template: str = "agentflan"
    pack_len: int = 1024
    overlong: str = "split"
    # optimisation
    steps: int = 200
    packs_per_step: int = 4  # per rank, split into grad_accum micro-batches
    grad_accum: int = 1
    lr: float = 3e-3
    warmup_steps: int = 20
    warmup_start_lr: float = 3e-4
    min_lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # execution
    parallel: str = "auto"  # auto | none | ddp | fsdp
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    seed: int = 0
    out_dir: str = "runs/default"
    log_every: int = 10
    save: bool = True  # a Hugging Face checkpoint of the final model
    save_every: int = 0  # steps between resumable training checkpoints (0: none)
    resume: bool = False  # continue from the newest training checkpoint in out_dir

    def __post_init__(self) -> None:
        if self.packs_per_step % self.grad_accum != 0:
            raise ValueError(f"packs_per_step ({self.packs_per_step}) must be a multiple of grad_accum ({self.grad_accum})")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise ValueError(f"dtype must be auto, fp32 or bf16, got {self.dtype!r}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup from warmup_start_lr to lr, then cosine decay to min_lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.warmup_start_lr + (cfg.lr - cfg.warmup_start_lr) * step / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def _build_model(cfg: TrainConfig, vocab_size: int, device: torch.device) -> Llama:
    if cfg.init_from:
        model = checkpoint.load_hf(cfg.init_from, dtype=torch.float32, device=device)
        model.kernels = cfg.kernels
        if model.config.vocab_size < vocab_size:
            raise ValueError(
                f"{cfg.init_from}: vocabulary {model.config.vocab_size} is smaller than tokenizer {cfg.tokenizer} ({vocab_size})"
            )
        return model
    with torch.device(device):
        model = Llama(get_preset(cfg.preset, vocab_size=vocab_size, max_seq_len=max(cfg.pack_len, 2)), cfg.kernels)
    model.init_weights(seed=cfg.seed)
    return model


def _optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device, fsdp: bool) -> torch.optim.AdamW:
    # No weight decay on norms (1-D weights), as is standard for Llama training.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda" and not fsdp)


def _load_data(cfg: TrainConfig, tokenizer: Tokenizer, say: Callable[[str], None]) -> PackedDataset | PreparedDataset:
    if len(cfg.data) == 1 and Path(cfg.data[0]).is_dir():
        dataset = PreparedDataset(cfg.data[0])
        expected = dataset.manifest["tokenizer"]["sha256"]
        if sha256_file(cfg.tokenizer) != expected:
            raise ValueError(
                f"{cfg.data[0]} was tokenized with {dataset.manifest['tokenizer']['name']} (sha256 {expected[:12]}...), "
                f"not with {cfg.tokenizer}: pass the same --tokenizer"
            )
        return dataset
    corpus = encode_files(cfg.data, tokenizer, cfg.template, cfg.data_format, cfg.skip_bad)
    for line in corpus.reports:
        say(f"read {line}")
    return PackedDataset(corpus, cfg.pack_len, cfg.overlong)


def train(cfg: TrainConfig) -> dict:
    """Runs the configured training; returns a summary (first/last loss, tokens/s, wall time)."""
    t_start = time.perf_counter()
    info = distributed.init_distributed()
    torch.manual_seed(cfg.seed)
    say = print if info.is_main else (lambda *a, **k: None)

    tokenizer = Tokenizer(cfg.tokenizer)
    dataset = _load_data(cfg, tokenizer, say)
    say(f"data: {dataset.summary()}")

    model = _build_model(cfg, tokenizer.vocab_size, info.device)
    say(f"model: {cfg.init_from or cfg.preset}, {model.config.num_params() / 1e6:.2f}M parameters, device {info.device}")
    bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and info.device.type == "cuda")
    mode = distributed.resolve_mode(cfg.parallel, info.world_size)
    model = distributed.parallelize(model, mode, info, param_dtype=torch.bfloat16 if bf16 else None)
    optimizer = _optimizer(model, cfg, info.device, fsdp=mode == "fsdp")
    micro_packs = cfg.packs_per_step // cfg.grad_accum
    start_step = 0
    if cfg.resume:
        latest = checkpoint.latest_train_state(cfg.out_dir)
        if latest is None:
            raise FileNotFoundError(f"--resume: no complete training checkpoint under {cfg.out_dir}/checkpoints")
        start_step = checkpoint.load_train_state(latest, model, optimizer)
        say(f"resumed from {latest} at step {start_step}")
    # Data order is a pure function of (seed, batch index): resuming skips ahead without replaying.
    batches = dataset.batches(micro_packs, info.rank, info.world_size, seed=cfg.seed, start_batch=start_step * cfg.grad_accum)
    # FSDP casts parameters itself; otherwise autocast runs the matmuls in bf16 over fp32 weights.
    autocast = torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=bf16 and mode != "fsdp")

    out_dir = Path(cfg.out_dir)
    log_file = None
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        log_file = open(out_dir / "metrics.jsonl", "a" if cfg.resume else "w")

    history: list[float] = []
    tokens_seen = 0
    t_train = time.perf_counter()
    bar = tqdm(range(start_step, cfg.steps), disable=not info.is_main, desc="train", unit="step", dynamic_ncols=True,
               initial=start_step, total=cfg.steps)
    for step in bar:
        t_step = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = [next(batches) for _ in range(cfg.grad_accum)]
        # Normalise by the trained tokens of the whole global batch, so every token weighs the
        # same however the packs fall across micro-batches and ranks.
        counts = torch.tensor(
            [float((b.labels != -100).sum()) for b in micro] + [float(sum(len(b.input_ids) for b in micro))],
            dtype=torch.float64, device=info.device,
        )
        distributed.all_reduce_sum(counts)
        n_trained, n_tokens = counts[:-1].sum().clamp(min=1), counts[-1]
        loss_sum = torch.zeros((), device=info.device)
        for i, b in enumerate(micro):
            input_ids = torch.from_numpy(b.input_ids).to(info.device, torch.long, non_blocking=True)
            labels = torch.from_numpy(b.labels).to(info.device, non_blocking=True)
            cu_seqlens = torch.from_numpy(b.cu_seqlens).to(info.device, non_blocking=True)
            position_ids = torch.from_numpy(b.position_ids).to(info.device, torch.long, non_blocking=True)
            sync = i == len(micro) - 1
            if mode == "fsdp":
                model.set_requires_gradient_sync(sync)
            ctx = model.no_sync() if mode == "ddp" and not sync else nullcontext()
            with ctx, autocast:
                loss = model(input_ids, cu_seqlens, position_ids, labels=labels, reduction="sum", max_seqlen=b.max_seqlen)
                # DDP/FSDP average gradients over ranks; scale back so the sum over ranks is used.
                (loss * info.world_size / n_trained.float()).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        step_loss = (distributed.all_reduce_sum(loss_sum.double()) / n_trained).item()
        elapsed = time.perf_counter() - t_train
        tokens_seen += int(n_tokens.item())
        dt = time.perf_counter() - t_step
        record = {
            "step": step + 1, "loss": step_loss, "lr": lr, "grad_norm": float(grad_norm),
            "tokens": int(n_tokens.item()), "trained_tokens": int(n_trained.item()),
            "tokens_per_s": n_tokens.item() / dt, "elapsed_s": elapsed,
        }
        history.append(step_loss)
        if log_file:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
        bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            checkpoint.save_train_state(out_dir / "checkpoints" / f"{checkpoint.TRAIN_STATE_PREFIX}{step + 1}", model, optimizer, step + 1)
        if info.is_main and ((step + 1) % cfg.log_every == 0 or step == 0 or step + 1 == cfg.steps):
            bar.write(
                f"step {step + 1:5d}/{cfg.steps}  loss {step_loss:.4f}  lr {lr:.2e}  "
                f"grad_norm {float(grad_norm):.3f}  tok/s {record['tokens_per_s']:,.0f}  elapsed {elapsed:.1f}s"
            )
    bar.close()

    train_time = time.perf_counter() - t_train
    if cfg.save:
        state = distributed.full_state_dict(model)  # collective: every rank takes part
        if info.is_main:
            final = out_dir / "final"
            checkpoint.save_hf(distributed.unwrap(model), final, state_dict=state)
            shutil.copyfile(cfg.tokenizer, final / "tokenizer.model")
            say(f"saved Hugging Face checkpoint to {final}")
    tail = history[-min(10, len(history)) :]
    summary = {
        "first_loss": history[0],
        "last_loss": history[-1],
        "last10_mean_loss": sum(tail) / len(tail),
        "steps": cfg.steps,
        "start_step": start_step,
        "tokens": tokens_seen,
        "tokens_per_s": tokens_seen / train_time,
        "train_time_s": train_time,
        "wall_time_s": time.perf_counter() - t_start,
        "packing_efficiency": dataset.packing_efficiency,
        "world_size": info.world_size,
        "parallel": mode,
    }
    if log_file:
        log_file.close()
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    say(
        f"done: loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f} (mean of last {len(tail)}: "
        f"{summary['last10_mean_loss']:.4f}), {summary['tokens_per_s']:,.0f} tok/s, "
        f"train {train_time:.1f}s, wall {summary['wall_time_s']:.1f}s"
    )
    distributed.shutdown()
    return summary



def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Every TrainConfig field is a flag (--pack-len 2048, --data a.jsonl b.jsonl, --no-save)."""
    import argparse

    parser = argparse.ArgumentParser(description="Train a Llama on Agent-FLAN conversations (run under torchrun).")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, list):
            parser.add_argument(flag, nargs="+", default=default, help=f"default: {default}")
        else:
            kind = {"int": int, "float": float}.get(type(default).__name__, str)
            parser.add_argument(flag, type=kind, default=default, help=f"default: {default}")
    return TrainConfig(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))
