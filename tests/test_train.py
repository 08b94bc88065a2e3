"""End-to-end training runs under torchrun: the loss falls, and data parallelism changes nothing but speed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agentflan.train import TrainConfig, lr_at

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(nproc: int, out_dir: Path, *args: str) -> dict:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--standalone", str(ROOT / "tools" / "train.py"),
        "--out-dir", str(out_dir), *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads((out_dir / "summary.json").read_text())


def _step_losses(out_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_default_command_trains_and_saves_a_loadable_checkpoint(tmp_path):
    seed = str(int.from_bytes(os.urandom(2), "little"))
    summary = _torchrun(
        1, tmp_path / "run", "--steps", "12", "--preset", "micro", "--pack-len", "512",
        "--packs-per-step", "2", "--warmup-steps", "2", "--seed", seed,
    )
    assert summary["last_loss"] < summary["first_loss"] - 0.5, summary
    losses = _step_losses(tmp_path / "run")
    assert len(losses) == 12 and all(l == l for l in losses)  # one finite record a step

    from agentflan.checkpoint import load_hf

    model = load_hf(tmp_path / "run" / "final")
    assert (tmp_path / "run" / "final" / "tokenizer.model").is_file()
    assert model.config.vocab_size > 0


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_rank(tmp_path, parallel):
    """Two ranks with half the packs each take the same steps as one rank with the whole global batch."""
    seed = str(int.from_bytes(os.urandom(2), "little"))
    common = ["--steps", "3", "--preset", "micro", "--pack-len", "256", "--warmup-steps", "1",
              "--seed", seed, "--no-save", "--dtype", "fp32"]
    _torchrun(1, tmp_path / "one", *common, "--packs-per-step", "4")
    _torchrun(2, tmp_path / "two", *common, "--packs-per-step", "2", "--parallel", parallel)
    one, two = _step_losses(tmp_path / "one"), _step_losses(tmp_path / "two")
    assert one == pytest.approx(two, rel=1e-4), (seed, one, two)


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    seed = str(int.from_bytes(os.urandom(2), "little"))
    common = ["--steps", "2", "--preset", "micro", "--pack-len", "256", "--packs-per-step", "4",
              "--warmup-steps", "1", "--seed", seed, "--no-save"]
    from agentflan.train import main

    main([*common, "--out-dir", str(tmp_path / "a")])
    main([*common, "--grad-accum", "2", "--out-dir", str(tmp_path / "b")])
    a, b = _step_losses(tmp_path / "a"), _step_losses(tmp_path / "b")
    assert a == pytest.approx(b, rel=1e-4), (seed, a, b)


def test_lr_schedule_warms_up_then_decays_to_min():
    cfg = TrainConfig(steps=100, lr=1e-3, warmup_steps=10, warmup_start_lr=1e-4, min_lr=1e-5)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(100, cfg) == pytest.approx(1e-5)
    lrs = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_config_rejects_bad_accumulation():
    with pytest.raises(ValueError, match="multiple of grad_accum"):
        TrainConfig(packs_per_step=3, grad_accum=2)


def test_resume_continues_exactly(tmp_path):
    """Steps after resuming from a training checkpoint equal those of the uninterrupted run."""
    import shutil

    from agentflan.train import main

    seed = str(int.from_bytes(os.urandom(2), "little"))
    common = ["--steps", "5", "--preset", "micro", "--pack-len", "256", "--packs-per-step", "2",
              "--warmup-steps", "1", "--seed", seed, "--no-save", "--save-every", "2"]
    main([*common, "--out-dir", str(tmp_path / "full")])
    full = _step_losses(tmp_path / "full")
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()) == ["step_2", "step_4"]

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_2", resumed / "checkpoints" / "step_2")
    main([*common, "--out-dir", str(resumed), "--resume"])
    after = _step_losses(resumed)
    assert len(after) == 3
    assert after == pytest.approx(full[2:], rel=1e-6), (seed, full, after)


def test_resume_without_checkpoint_fails_clearly(tmp_path):
    from agentflan.train import main

    with pytest.raises(FileNotFoundError, match="no complete training checkpoint"):
        main(["--steps", "1", "--preset", "micro", "--pack-len", "256", "--out-dir", str(tmp_path), "--resume"])


def test_prepared_folder_trains_exactly_like_the_jsonl_it_came_from(tmp_path):
    from agentflan.data.defaults import DEFAULT_CORPUS
    from agentflan.train import main

    prep = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "prepare_data.py"), str(tmp_path / "prepared"),
         "--source", str(DEFAULT_CORPUS), "--pack-len", "256"],
        capture_output=True, text=True,
    )
    assert prep.returncode == 0, prep.stdout + prep.stderr
    seed = str(int.from_bytes(os.urandom(2), "little"))
    common = ["--steps", "3", "--preset", "micro", "--pack-len", "256", "--packs-per-step", "2",
              "--warmup-steps", "1", "--seed", seed, "--no-save"]
    main([*common, "--out-dir", str(tmp_path / "jsonl")])
    main([*common, "--data", str(tmp_path / "prepared"), "--out-dir", str(tmp_path / "shards")])
    assert _step_losses(tmp_path / "jsonl") == pytest.approx(_step_losses(tmp_path / "shards"), rel=1e-6), seed


def test_prepared_folder_rejects_another_tokenizer(tmp_path):
    from agentflan.data.defaults import DEFAULT_CORPUS
    from agentflan.train import main

    prep = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "prepare_data.py"), str(tmp_path / "prepared"),
         "--source", str(DEFAULT_CORPUS), "--pack-len", "256"],
        capture_output=True, text=True,
    )
    assert prep.returncode == 0, prep.stderr
    mistral_common = pytest.importorskip("mistral_common", reason="needs a second real tokenizer model")
    other = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    with pytest.raises(ValueError, match="pass the same --tokenizer"):
        main(["--steps", "1", "--preset", "micro", "--data", str(tmp_path / "prepared"),
              "--tokenizer", str(other), "--out-dir", str(tmp_path / "run")])
