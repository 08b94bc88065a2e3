"""Telemetry: strict-JSON metrics with throughput, MFU, memory and data wait; TensorBoard events;
plain progress lines off a terminal; curves of several runs in one PNG."""

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from agentflan.config import get_preset
from agentflan.perf import flops_per_token
from agentflan.trainer.errors import TrainError
from agentflan.trainer.metrics import dumps, strict
from agentflan.trainer.plot import plot_runs
from train_helpers import ROOT, micro, records, run_main, small_corpus

FIELDS = {"step", "loss", "lr", "grad_norm", "tokens", "trained_tokens", "tokens_per_s", "trained_tokens_per_s", "mfu",
          "peak_memory_gib", "data_wait_s", "step_time_s", "elapsed_s", "skipped"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, module_seed):
    """Two short runs: one with --peak-tflops and TensorBoard, one without either."""
    from agentflan.train import main

    folder = tmp_path_factory.mktemp("telemetry")
    corpus = small_corpus(folder)
    a, b = folder / "a", folder / "b"
    tensorboard = ["--tensorboard"] if importlib.util.find_spec("tensorboard") else []
    main([*micro(corpus, a, module_seed, "--steps", "4", "--no-save", "--peak-tflops", "0.5"), *tensorboard])
    main(micro(corpus, b, module_seed + 1, "--steps", "3", "--no-save", "--lr", "1e-3"))
    return a, b


def test_every_step_has_the_metrics_in_strict_json(runs):
    a, b = runs
    rec = records(a)  # parses with NaN/Infinity refused
    assert [r["step"] for r in rec] == [1, 2, 3, 4]
    cfg = get_preset("micro", vocab_size=4096)
    for r in rec:
        assert FIELDS <= r.keys(), r
        assert 0 < r["tokens"] <= 512 and 0 <= r["trained_tokens"] <= r["tokens"]  # 2 packs of <= 256
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["step_time_s"])
        assert r["peak_memory_gib"] is None  # CPU
        assert 0 <= r["data_wait_s"] < r["step_time_s"]
        if r.get("skip_reason") == "no_trained_tokens":  # no forward or backward ran
            assert r["mfu"] == 0
            continue
        # MFU = FLOPs / (time * peak): FLOPs a token lie between the no-attention and the whole-pack bounds.
        per_token = r["mfu"] * 0.5e12 * r["step_time_s"] / r["tokens"]
        assert flops_per_token(cfg, 1) <= per_token * (1 + 1e-9) and per_token <= flops_per_token(cfg, 256) * (1 + 1e-9)
    assert all(r["mfu"] is None for r in records(b))  # a CPU has no known peak
    summary = json.loads((a / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["tokens"] == sum(r["tokens"] for r in rec) and summary["mean_mfu"] > 0


def test_tensorboard_events_hold_the_curves(runs):
    pytest.importorskip("tensorboard", reason="TensorBoard events are written only when tensorboard is installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    a, b = runs
    events = EventAccumulator(str(a / "tensorboard"))
    events.Reload()
    logged = [r["step"] for r in records(a) if r["loss"] is not None]
    assert [e.step for e in events.Scalars("train/loss")] == logged
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([r["lr"] for r in records(a)])
    assert not (b / "tensorboard").exists()  # --no-tensorboard


def test_progress_is_plain_lines_off_a_terminal(tmp_path, seed, capsys):
    corpus = small_corpus(tmp_path, 100)
    code, out, err = run_main(micro(corpus, tmp_path / "run", seed, "--steps", "3", "--no-save", "--log-every", "2"),
                              capsys)
    assert code == 0, err
    assert "\r" not in out and "\r" not in err
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]  # the first, every 2nd, the last
    assert "tok/s" in lines[0] and "data_wait" in lines[0]


def test_strict_json_writes_non_finite_as_null_and_flags_it():
    record = {"step": 3, "loss": math.nan, "grad_norm": math.inf, "lr": 1e-3}
    assert strict(record) == {"step": 3, "loss": None, "grad_norm": None, "lr": 1e-3, "nonfinite": ["loss", "grad_norm"]}
    assert json.loads(dumps(record))["nonfinite"] == ["loss", "grad_norm"]


def test_plot_draws_runs_overlaid(runs, tmp_path):
    pytest.importorskip("matplotlib", reason="plots need matplotlib (the 'plot' extra)")
    a, b = runs
    out = plot_runs([a, b], tmp_path / "curves.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    tool = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_run.py"), str(a)], capture_output=True, text=True)
    assert tool.returncode == 0 and (a / "curves.png").is_file(), tool.stderr
    missing = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_run.py"), str(tmp_path / "none")],
                             capture_output=True, text=True)
    assert missing.returncode == 1 and missing.stderr.startswith(f"error: {tmp_path / 'none'}: no metrics.jsonl")


def test_plot_without_matplotlib_says_how_to_install_it(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(TrainError, match=r"pip install 'agentflan\[plot\]'"):
        plot_runs([runs[0]], tmp_path / "x.png")
    # The tool says the same whatever image format --out asks for (not that .pdf is no image suffix).
    import importlib.util

    spec = importlib.util.spec_from_file_location("plot_run_tool", ROOT / "tools" / "plot_run.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for name in ("c.pdf", "c.svg", "c.png"):
        assert tool.main([str(runs[0]), "--out", str(tmp_path / name)]) == 1
        assert capsys.readouterr().err == "error: plotting needs matplotlib: pip install 'agentflan[plot]'\n"
    assert tool.main([str(runs[0]), str(runs[0]) + "/", "--out", str(tmp_path / "c.png")]) == 1
    assert capsys.readouterr().err == f"error: RUN_DIR {runs[0]}/: given twice; give each run once\n"
