"""benchmarks/run_all.py: parts run within the budget, failures and timeouts are recorded and the
rest still runs, and the results come out as markdown, JSON and logs."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_all():
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_all"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_failures_timeouts_and_skips_are_recorded_and_the_rest_runs(tmp_path, seed):
    run_all = _run_all()
    py = sys.executable
    value = seed % 1000
    parts = [
        run_all.Part("fails", [py, "-c", "print('half done'); raise SystemExit(3)"], 30),
        run_all.Part("hangs", [py, "-c", "import time; print('started', flush=True); time.sleep(60)"], 3),
        run_all.Part("gpu_only", [py, "-c", "print('never')"], 30, needs_cuda=True),
        run_all.Part("works", [py, "-c", f"print('speed'); print('| x | y |'); print('| --- | --- |'); print('| {value} | 2 |')"], 30),
    ]
    summary = run_all.run(parts, tmp_path, budget_s=60, command="test")
    status = {p["name"]: p["status"] for p in summary["parts"]}
    assert status["fails"] == "failed (exit 3)"
    assert status["hangs"].startswith("timed out")
    assert status["works"] == "ok"
    import torch

    assert status["gpu_only"] == ("ok" if torch.cuda.is_available() else "skipped (needs CUDA)")
    md = (tmp_path / "results.md").read_text()
    assert f"| {value} | 2 |" in md and "speed" in md and "| fails | failed (exit 3) |" in md
    logs = (tmp_path / "logs.txt").read_text()
    assert "half done" in logs and "started" in logs
    assert json.loads((tmp_path / "results.json").read_text())["meta"]["versions"]["torch"] == torch.__version__

    summary = run_all.run(parts[-1:], tmp_path / "late", budget_s=0.5, command="test")
    assert summary["parts"][0]["status"] == "skipped (time budget used up)"


@pytest.mark.slow
def test_cpu_run_benchmarks_the_training_step(tmp_path):
    run_all = _run_all()
    assert run_all.main([str(tmp_path), "--parts", "train_step", "--budget-s", "300"]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    (part,) = data["parts"]
    assert part["status"] == "ok", (tmp_path / "logs.txt").read_text()[-3000:]
    backends = [row["backend"] for row in part["data"]["rows"]]
    assert backends == (["triton", "reference", "hf"] if "CPU" not in data["meta"]["card"] else ["reference", "hf"])
    assert all(row["tokens_per_s"] > 0 for row in part["data"]["rows"])
    md = (tmp_path / "results.md").read_text()
    assert "| reference |" in md and "| hf |" in md and data["meta"]["card"] in md
    with pytest.raises(SystemExit):
        run_all.main([str(tmp_path), "--parts", "no_such_part"])
