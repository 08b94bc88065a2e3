"""Curves of one or several runs (loss, learning rate, gradient norm, throughput) in one PNG, runs overlaid."""

from __future__ import annotations

import os
from pathlib import Path

from agentflan.trainer.errors import TrainError
from agentflan.trainer.metrics import METRICS_FILE, read_records

PANELS = (("loss", "loss (trained tokens)"), ("lr", "learning rate"), ("grad_norm", "gradient norm (before clipping)"),
          ("tokens_per_s", "tokens/s (all ranks)"))


def plot_runs(run_dirs: list[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Draws the runs' metrics.jsonl curves against the step into ``out`` (PNG) and returns its path.

    Skipped steps (non-finite, or without trained tokens) leave gaps in the loss and are marked
    on the step axis. Raises TrainError for a folder without metrics or a missing matplotlib.
    """
    runs = []
    for run in map(Path, run_dirs):
        records = read_records(run / METRICS_FILE)
        if not records:
            raise TrainError(f"{run}: no {METRICS_FILE} records (not a run folder, or no step finished yet)")
        runs.append((run, records))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TrainError("plotting needs matplotlib: pip install 'agentflan[plot]'") from None

    names = [run.name for run, _ in runs]
    labels = names if len(set(names)) == len(names) else [str(run) for run, _ in runs]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), sharex=True, layout="constrained")
    for (run, records), label in zip(runs, labels):
        for ax, (key, title) in zip(axes.flat, PANELS):
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            line, = ax.plot([s for s, _ in points], [v for _, v in points], label=label, linewidth=1.2)
            ax.set_title(title)
            if key == "loss":
                skipped = [r["step"] for r in records if r.get("skipped")]
                if skipped:
                    ax.plot(skipped, [0] * len(skipped), "x", color=line.get_color(), transform=ax.get_xaxis_transform(),
                            label=f"{label}: {len(skipped)} skipped step(s)")
    for ax in axes[1]:
        ax.set_xlabel("step")
    axes.flat[0].legend(fontsize="small")
    out = Path(out)
    try:
        fig.savefig(out, dpi=120)
    except OSError as err:
        raise TrainError(f"cannot write {out}: {err.strerror or err}") from None
    finally:
        plt.close(fig)
    return out
