"""Activation checkpointing changes memory, never results: bitwise losses and gradients, lower peak,
and 1 rank equals 2 ranks (FSDP2 and DDP) with it on."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agentflan.config import ModelConfig
from agentflan.distributed import apply_activation_checkpointing
from agentflan.model import Llama

ROOT = Path(__file__).resolve().parents[1]
CFG = ModelConfig(vocab_size=256, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=160, max_seq_len=1024)


def _step(ac: str, seed: int, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, dict, int]:
    """Loss, gradients and peak memory (bytes, torch's MemTracker) of one forward + backward."""
    from torch.distributed._tools.mem_tracker import MemTracker

    model = Llama(CFG, kernels="reference")
    model.init_weights(seed=seed)
    apply_activation_checkpointing(model, ac, every=2)
    ids, cu = batch
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        loss = model(ids, cu, labels=ids, reduction="sum")
        loss.backward()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    grads = {n: p.grad for n, p in model.state_dict(keep_vars=True).items()}
    return loss.item(), grads, peak


def test_checkpointing_keeps_results_and_lowers_the_peak(seed):
    torch.manual_seed(seed)
    T = 600
    cuts = sorted(torch.randperm(T - 1)[:3].add(1).tolist())
    batch = (torch.randint(0, CFG.vocab_size, (T,)), torch.tensor([0, *cuts, T], dtype=torch.int32))
    base_loss, base_grads, base_peak = _step("none", seed, batch)
    peaks = {}
    for ac in ("full", "selective", "attention"):
        loss, grads, peaks[ac] = _step(ac, seed, batch)
        assert loss == base_loss, ac
        assert grads.keys() == base_grads.keys()
        for name, grad in grads.items():
            assert torch.equal(grad, base_grads[name]), (ac, name)
        assert peaks[ac] < base_peak, (ac, peaks[ac], base_peak)
    print({"none": base_peak, **peaks})
    assert peaks["full"] < peaks["selective"] < base_peak
    assert peaks["full"] < 0.6 * base_peak


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="activation checkpointing must be one of"):
        apply_activation_checkpointing(Llama(CFG), "blocks")


def _losses(tmp_path: Path, nproc: int, parallel: str, ac: str, seed: int) -> list[float]:
    out = tmp_path / f"{nproc}-{parallel}-{ac}"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           str(ROOT / "tests" / "dist_worker.py"), "train", str(out), parallel, ac, str(seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads((out / "losses.json").read_text())


@pytest.mark.slow
def test_one_rank_equals_two_ranks_with_checkpointing(tmp_path, seed):
    from agentflan.checkpoint import load_hf

    seed %= 2**16
    one = _losses(tmp_path, 1, "none", "full", seed)
    assert _losses(tmp_path, 2, "fsdp", "full", seed) == pytest.approx(one, rel=1e-6)
    assert _losses(tmp_path, 2, "ddp", "selective", seed) == pytest.approx(one, rel=1e-6)
    assert one[-1] < one[0], one
    # The exports of the three layouts hold the same trained weights.
    want = load_hf(tmp_path / "1-none-full" / "final").state_dict()
    for run in ("2-fsdp-full", "2-ddp-selective"):
        got = load_hf(tmp_path / run / "final").state_dict()
        assert got.keys() == want.keys()
        for name, tensor in got.items():
            torch.testing.assert_close(tensor, want[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{run} {name}: {m}")
