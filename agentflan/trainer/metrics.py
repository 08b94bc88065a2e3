"""What a run reports: metrics.jsonl (one record a step), summary.json, TensorBoard events and
progress lines.

Files are strict JSON: a non-finite number is written as null and its key listed under
``"nonfinite"``. A record's keys: ``step`` (from 1), ``loss`` (mean over the global batch's
trained tokens; null when the step had none), ``lr``, ``grad_norm`` (before clipping),
``tokens`` and ``trained_tokens`` (global), ``tokens_per_s`` and ``trained_tokens_per_s``
(global, over the step's wall time), ``mfu`` (model FLOPs utilisation, ``agentflan.perf``;
null when the device's peak is unknown, e.g. on a CPU without ``--peak-tflops``),
``peak_memory_gib`` (the device's peak allocated memory so far; null on a CPU),
``data_wait_s`` (time spent getting the step's batches), ``step_time_s``, ``elapsed_s``
(training time of the whole run), ``skipped`` (true when the update was not applied) and,
for a skipped step, ``skip_reason`` (``nonfinite`` or ``no_trained_tokens``).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from agentflan.trainer.run_dir import write_atomic

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TENSORBOARD_DIR = "tensorboard"
_SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s", "trained_tokens_per_s", "mfu", "peak_memory_gib", "data_wait_s")


def strict(record: dict[str, Any]) -> dict[str, Any]:
    """The record with every non-finite float replaced by None and listed under 'nonfinite'."""
    out: dict[str, Any] = {}
    bad = []
    for key, value in record.items():
        if isinstance(value, float) and not math.isfinite(value):
            bad.append(key)
            value = None
        out[key] = value
    if bad:
        out["nonfinite"] = bad
    return out


def dumps(record: dict[str, Any]) -> str:
    return json.dumps(strict(record), allow_nan=False)


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a line cut off by a crash (not valid JSON) ends the list."""
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                break
    return records


class MetricsLog:
    """Rank 0's metrics.jsonl and TensorBoard writer for one part of a run (from ``start_step``)."""

    def __init__(self, run_dir: str, start_step: int, tensorboard: bool) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.records: list[dict[str, Any]] = []
        if start_step:
            # Resuming at step k: keep records 1..k, drop those of steps redone after the checkpoint.
            kept = [r for r in read_records(self.path) if isinstance(r.get("step"), int) and r["step"] <= start_step]
            self.records = kept
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
            self.missing = start_step - len(kept)
        else:
            write_atomic(self.path, "")
            self.missing = 0
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides the events an earlier part of the run wrote after the checkpoint.
            self._tb = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR), purge_step=start_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(dumps(record) + "\n")
        self._file.flush()
        self.records.append(strict(record))
        if self._tb is not None:
            for key in _SCALARS:
                value = record.get(key)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()

    def summary(self, **extra: Any) -> dict[str, Any]:
        """First/last loss and totals over every step of the run (all parts, from the records)."""
        losses = [r["loss"] for r in self.records if r.get("loss") is not None]
        tail = losses[-10:]
        mfu = [r["mfu"] for r in self.records if r.get("mfu") is not None]
        memory = [r["peak_memory_gib"] for r in self.records if r.get("peak_memory_gib") is not None]
        return strict({
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "last10_mean_loss": sum(tail) / len(tail) if tail else None,
            "steps": len(self.records),
            "skipped_steps": sum(1 for r in self.records if r.get("skipped")),
            "tokens": sum(r.get("tokens", 0) for r in self.records),
            "trained_tokens": sum(r.get("trained_tokens", 0) for r in self.records),
            "mean_mfu": sum(mfu) / len(mfu) if mfu else None,
            "peak_memory_gib": max(memory) if memory else None,
            **extra,
        })


def write_summary(run_dir: str, summary: dict[str, Any]) -> None:
    write_atomic(Path(run_dir) / SUMMARY_FILE, json.dumps(strict(summary), indent=2, allow_nan=False) + "\n")


def progress_line(record: dict[str, Any], steps: int) -> str:
    def num(key: str, fmt: str, scale: float = 1.0) -> str:
        value = record.get(key)
        return "n/a" if value is None or not math.isfinite(value) else format(value * scale, fmt)

    parts = [f"step {record['step']:5d}/{steps}", f"loss {num('loss', '.4f')}", f"lr {record['lr']:.2e}",
             f"grad_norm {num('grad_norm', '.3f')}", f"tok/s {num('tokens_per_s', ',.0f')}",
             f"trained tok/s {num('trained_tokens_per_s', ',.0f')}"]
    if record.get("mfu") is not None:
        parts.append(f"mfu {num('mfu', '.1f', 100)}%")
    if record.get("peak_memory_gib") is not None:
        parts.append(f"mem {num('peak_memory_gib', '.1f')}GiB")
    parts += [f"data_wait {num('data_wait_s', '.1f', 1e3)}ms", f"elapsed {record['elapsed_s']:.1f}s"]
    if record.get("skipped"):
        parts.append(f"SKIPPED ({record.get('skip_reason')})")
    return "  ".join(parts)


class Progress:
    """A progress bar on a terminal; plain lines every ``log_every`` steps otherwise (logs, pipes)."""

    def __init__(self, enabled: bool, start_step: int, steps: int, log_every: int) -> None:
        self.enabled, self.steps, self.log_every = enabled, steps, log_every
        self._bar = None
        if enabled and sys.stdout.isatty():
            self._bar = tqdm(total=steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def update(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        step = record["step"]
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{record['loss']:.3f}" if record.get("loss") is not None else "n/a",
                                  tok_s=f"{record['tokens_per_s']:.0f}")
        if step % self.log_every == 0 or step == 1 or step == self.steps or record.get("skipped"):
            self.say(progress_line(record, self.steps))

    def say(self, line: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
