"""Shared pieces of the trainer tests: a small corpus, cheap option sets, runs in and out of process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from agentflan.data.defaults import DEFAULT_CORPUS

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "tools" / "train.py"


def small_corpus(folder: Path, n: int = 300) -> Path:
    """The first ``n`` conversations of the bundled corpus (tokenized in a fraction of a second)."""
    path = folder / "corpus.jsonl"
    with open(DEFAULT_CORPUS, encoding="utf-8") as src:
        path.write_text("".join(line for _, line in zip(range(n), src)), encoding="utf-8")
    return path


def micro(corpus: Path, out: Path, seed: int, *extra: str, pack_len: int = 256) -> list[str]:
    """Options of a run that takes well under a second a step on one core. At packs of 256
    tokens a quarter of small_corpus's packs hold no trained token (pieces of split prompts),
    so about 1 step in 15 is skipped for lack of one; at 1024, 1 pack in 160."""
    return ["--data", str(corpus), "--preset", "micro", "--pack-len", str(pack_len), "--global-batch", "2",
            "--warmup-steps", "1", "--seed", str(seed % 2**16), "--out-dir", str(out), "--log-every", "1",
            "--no-tensorboard", *extra]


def run_main(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """tools/train.py's main in this process: (exit code, stdout, stderr)."""
    from agentflan.train import main

    try:
        main(args)
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k != "AGENTFLAN_TEST_FAULTS"}
    return {**base, "OMP_NUM_THREADS": "1", **extra}


def run_process(args: list[str], timeout: float = 300, **extra_env: str) -> subprocess.CompletedProcess:
    """``python tools/train.py ARGS`` (one rank, one thread)."""
    return subprocess.run([sys.executable, str(TRAIN), *args], capture_output=True, text=True, env=env(**extra_env),
                          timeout=timeout)


def start_process(args: list[str], **extra_env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(TRAIN), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env(**extra_env))


def torchrun(nproc: int, args: list[str], *launcher: str, timeout: float = 600, **extra_env: str
             ) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone", *launcher,
           str(TRAIN), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env(**extra_env), timeout=timeout)


def records(run: Path) -> list[dict]:
    def refuse(constant: str) -> None:
        raise ValueError(f"non-strict JSON constant {constant}")

    return [json.loads(line, parse_constant=refuse) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> list[float | None]:
    return [r["loss"] for r in records(run)]


def steps_logged(run: Path) -> list[int]:
    return [r["step"] for r in records(run)]


def wait_for_steps(run: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Waits until metrics.jsonl holds ``n`` records (the process must still be running)."""
    path = run / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training ended early (rc {proc.returncode}): {proc.stderr.read()[-2000:]}")
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    raise AssertionError(f"no {n} steps in {timeout} s")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (the lock file's holder line aside) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def checkpoint_state(folder: Path) -> dict:
    """A DCP checkpoint folder (RUN/checkpoints/step_N), read whole in this process:
    {"model": {name: tensor}, "optim": {"state": {name: {"exp_avg", "exp_avg_sq", "step"}},
    "param_groups": [...]}}, however many ranks wrote it."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    whole = folder.parent / f"{folder.name}.pt"
    dcp_to_torch_save(folder, whole)
    return torch.load(whole, weights_only=False)


def _adamw_update(state: dict, group: dict) -> torch.Tensor:
    """The AdamW step a parameter took (weight decay aside) from its moments after that step:
    lr * m_hat / (sqrt(v_hat) + eps), m_hat and v_hat the bias-corrected moments (as torch.optim.AdamW)."""
    (beta1, beta2), t = group["betas"], float(state["step"])
    m_hat = state["exp_avg"].double() / (1 - beta1**t)
    v_hat = state["exp_avg_sq"].double() / (1 - beta2**t)
    return group["lr"] * m_hat / (v_hat.sqrt() + group["eps"])


def assert_trained_alike(one: Path, two: Path, steps: int, rtol: float = 1e-5, atol: float = 1e-6
                         ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Runs ``one`` and ``two`` took the same ``steps`` AdamW steps from the same weights on the same
    global batches (one process and several ranks, say): their losses, gradients and weights agree,
    each as closely as fp32 and AdamW allow. Each run keeps the checkpoint of every step
    (--save-every 1, --keep-checkpoints >= steps). Returns the weights of each run's last checkpoint.

    First update: both runs take their gradients at the same weights, and sums taken in another
    order (over ranks, over a shard) differ in their last bits alone. The gradient norms agree to
    1e-6, and AdamW's moments (running means of the gradient and of its square) within 1e-5 of each
    tensor's largest (measured <= 1e-6 in the micro model; a whole-tensor scale suits the rounding
    of an element that is a near-cancellation of large parts, which carries the parts' rounding).

    Weights: AdamW sets w_t = w_(t-1) (1 - lr_t wd) - u_t with u_t = lr_t m_hat_t / (sqrt(v_hat_t) + eps),
    so from equal starting weights |w_T(two) - w_T(one)| <= sum_t |u_t(two) - u_t(one)|, each run's
    u_t computed from its own moments. The weights must agree within that, plus atol + rtol |w| for
    the rounding of the arithmetic. A fixed tolerance would not do: an element whose gradient is a
    near-cancellation (e.g. 1.3e-8 where its parts are ~1e-3) carries a rounding error of ~1e-10,
    1% of itself, and where |g| is near eps (1e-8) AdamW's update is near linear in g with a gain of
    up to lr / eps (3e5 at lr 3e-3): such an element ends up to ~5e-6 apart at lr 3e-3, 1% of a LoRA
    B element after its first step, while the bound stays ~0 wherever the update is well conditioned.

    Later updates: the gradients are taken at weights that differ where AdamW amplified rounding,
    and answer it in proportion: a LoRA A's first gradient (at step 2, through B) moved 3e-4 of its
    norm for such a B element. The moments then agree within 1e-2 of each tensor's norm, which a
    distributed fault (a rank's share lost or counted twice, rows mixed up, a wrong scale) exceeds
    many times. The losses take no more than second order from those elements (their gradients
    are ~eps) and agree to 1e-6 at every step (measured <= 1.3e-7).
    """
    logged = [records(run) for run in (one, two)]
    assert len(logged[0]) == len(logged[1]) == steps
    first = True  # no update yet: the next gradients are taken at the same weights
    for ra, rb in zip(*logged):
        assert (ra["loss"] is None) == (rb["loss"] is None) and (ra["grad_norm"] is None) == (rb["grad_norm"] is None)
        if ra["loss"] is not None:
            assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6), (ra, rb)
        if ra["grad_norm"] is not None and first:
            assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-6), (ra, rb)
        first = first and ra.get("skip_reason") is not None
    slack: dict[str, torch.Tensor] = {}
    updates: dict[str, float] = {}  # AdamW steps taken so far (a step without trained tokens takes none)
    for step in range(1, steps + 1):
        a, b = (checkpoint_state(run / "checkpoints" / f"step_{step}") for run in (one, two))
        assert a["optim"]["param_groups"] == b["optim"]["param_groups"], step  # lr, betas, eps, weight decay
        groups = {name: group for group in a["optim"]["param_groups"] for name in group["params"]}
        assert a["optim"]["state"].keys() == b["optim"]["state"].keys() == groups.keys()
        for name, group in groups.items():
            sa, sb = a["optim"]["state"][name], b["optim"]["state"][name]
            taken = float(sa["step"])
            assert float(sb["step"]) == taken, name
            if taken == updates.get(name, 0.0):
                continue  # no update at this step: the state is the one checked before
            updates[name] = taken
            for ma, mb in (sa["exp_avg"], sb["exp_avg"]), (sa["exp_avg_sq"].sqrt(), sb["exp_avg_sq"].sqrt()):
                if taken == 1:
                    gap, allowed = (mb - ma).abs().max(), 1e-5 * ma.abs().max()
                else:
                    gap, allowed = (mb - ma).norm(), 1e-2 * ma.norm()
                assert gap <= allowed, f"{name}: AdamW moments after step {step} differ by {gap:.3e} > {allowed:.3e}"
            slack[name] = slack.get(name, 0) + (_adamw_update(sb, group) - _adamw_update(sa, group)).abs()
    final_a, final_b = a["model"], b["model"]
    assert final_a.keys() == final_b.keys() == groups.keys()
    for name, wa in final_a.items():
        wb, bound = final_b[name], slack.get(name, torch.zeros(wa.shape, dtype=torch.float64))
        excess = (wb.double() - wa.double()).abs() - (atol + rtol * wa.double().abs() + bound)
        i = int(excess.argmax())
        assert excess.max() <= 0, (f"{name}: element {i} is {wa.flatten()[i]:.8e} and {wb.flatten()[i]:.8e}, beyond "
                                   f"AdamW's bound {bound.flatten()[i]:.3e} by {excess.max():.3e}")
    return final_a, final_b
