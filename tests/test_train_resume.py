"""Run folders, preemption and resume: a run stopped by a signal, killed between or during checkpoints,
or restarted by torchrun continues with the same per-step losses, bit for bit, and logs each step once."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train_helpers import (TRAIN, env, error_lines, losses, micro, records, run_main, run_process, small_corpus,
                           snapshot, start_process, steps_logged, torchrun, wait_for_steps)

STEPS = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return small_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, module_seed):
    """An uninterrupted one-rank run of STEPS steps; the interrupted runs below must match it exactly."""
    run = tmp_path_factory.mktemp("reference") / "run"
    proc = run_process(micro(corpus, run, module_seed, "--steps", str(STEPS), "--no-save"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def _args(corpus, run, seed, *extra):
    return micro(corpus, run, seed, "--steps", str(STEPS), "--no-save", *extra)


def _assert_same_run(run: Path, reference: Path) -> None:
    assert steps_logged(run) == list(range(1, STEPS + 1))  # every step exactly once
    assert losses(run) == losses(reference)  # bitwise: the CPU path is deterministic
    summary, expected = (json.loads((r / "summary.json").read_text()) for r in (run, reference))
    assert summary["first_loss"] == expected["first_loss"] and summary["steps"] == STEPS


def test_sigterm_checkpoints_after_the_step_and_resume_is_exact(tmp_path, corpus, reference, module_seed, capsys):
    run = tmp_path / "run"
    args = _args(corpus, run, module_seed)
    proc = start_process(args)
    wait_for_steps(run, 3, proc)
    # A second run on the same folder is refused while the first holds it, and changes nothing.
    code, _, err = run_main(args, capsys)
    assert code == 1 and f"--out-dir {run} is in use by another run (pid {proc.pid}" in error_lines(err)[0], err
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    stopped = [line for line in out.splitlines() if line.startswith("stopped by SIGTERM after step ")]
    assert len(stopped) == 1, out
    step = int(stopped[0].split("after step ")[1].split("/")[0])
    assert 3 <= step < STEPS and (run / "checkpoints" / f"step_{step}").is_dir()
    assert not (run / "summary.json").exists()  # not finished

    again = run_process(args)  # --resume auto: the same command continues
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{step}'} at step {step}" in again.stdout
    _assert_same_run(run, reference)


def test_a_second_signal_exits_at_once(tmp_path, corpus, module_seed):
    run = tmp_path / "run"
    proc = start_process(_args(corpus, run, module_seed))
    wait_for_steps(run, 2, proc)
    proc.send_signal(signal.SIGTERM)  # two different signals, so both are delivered (the lower number first)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode in (-signal.SIGTERM, -signal.SIGUSR1), (out, err)  # killed by the second one
    assert "stopped by" not in out and not any((run / "checkpoints").glob("step_*"))


def test_sigkill_between_checkpoints_resumes_from_the_last_one(tmp_path, corpus, reference, module_seed):
    run = tmp_path / "run"
    args = _args(corpus, run, module_seed, "--save-every", "5")
    proc = start_process(args)
    wait_for_steps(run, 8, proc)
    proc.kill()  # no handler runs: the lock dies with the process
    proc.communicate()
    logged = len(records(run))
    again = run_process(args)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = int(again.stdout.split("at step ")[1].split()[0])
    assert resumed % 5 == 0 and 5 <= resumed <= logged  # steps after it were logged, then redone once
    _assert_same_run(run, reference)


def test_kill_in_the_middle_of_a_checkpoint_write_uses_the_previous(tmp_path, corpus, reference, module_seed):
    run = tmp_path / "run"
    args = _args(corpus, run, module_seed, "--save-every", "3")
    cut = run_process(args, AGENTFLAN_TEST_FAULTS="kill_in_checkpoint@6")
    assert cut.returncode == -signal.SIGKILL, cut.stderr[-2000:]
    assert (run / "checkpoints" / ".tmp-step_6").is_dir() and not (run / "checkpoints" / "step_6").exists()
    again = run_process(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "at step 3" in again.stdout and not (run / "checkpoints" / ".tmp-step_6").exists()
    _assert_same_run(run, reference)


def test_torn_train_state_falls_back_and_finished_runs_extend(tmp_path, corpus, module_seed, capsys):
    run = tmp_path / "run"
    args = micro(corpus, run, module_seed, "--steps", "8", "--save-every", "2", "--keep-checkpoints", "3", "--no-save")
    first = run_process(args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_4", "step_6", "step_8"]
    full = losses(run)

    before = snapshot(run)
    code, _, err = run_main(args, capsys)  # finished: refused, nothing touched
    assert code == 1 and "holds a run finished at step 8; --steps 8 adds no step" in err
    assert snapshot(run) == before

    torn = run / "checkpoints" / "step_8" / "train_state.json"
    torn.write_text("")
    again = run_process(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"warning: {torn}: unreadable" in again.stderr and "at step 6" in again.stdout
    assert steps_logged(run) == list(range(1, 9)) and losses(run) == full

    extended = run_process([*args[:-1], "--steps", "10", "--no-save"])  # a finished run goes on with more steps
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert "at step 8" in extended.stdout and steps_logged(run) == list(range(1, 11))
    assert losses(run)[:8] == full
    # A step without a trained token has no loss (None); the summary's first loss is the first one there is.
    assert json.loads((run / "summary.json").read_text())["first_loss"] == next(x for x in full if x is not None)


def test_folder_of_another_run_is_refused_and_overwrite_replaces_it(tmp_path, corpus, seed, capsys):
    run = tmp_path / "run"
    args = micro(corpus, run, seed, "--steps", "2", "--no-save")
    assert run_main(args, capsys)[0] == 0
    before = snapshot(run)
    code, _, err = run_main([*args, "--lr", "1e-3", "--steps", "3"], capsys)
    assert code == 1 and "holds a run with other options (lr: 0.003 -> 0.001)" in error_lines(err)[0]
    code, _, err = run_main([*args, "--lr", "1e-3", "--resume", "never"], capsys)
    assert code == 1 and "--resume never starts over there only with --overwrite" in error_lines(err)[0]
    assert snapshot(run) == before
    code, out, err = run_main([*args, "--lr", "1e-3", "--overwrite"], capsys)
    assert code == 0, err
    assert steps_logged(run) == [1, 2] and "lr: 0.001" in (run / "config.yaml").read_text()


def _workers(launcher: subprocess.Popen) -> dict[int, int]:
    """LOCAL_RANK -> pid of torchrun's worker processes."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher.pid:
            for item in environ:
                if item.startswith(b"LOCAL_RANK="):
                    found[int(item.split(b"=")[1])] = int(entry.name)
    return found


def _launch(run, args, *launcher):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", *launcher, str(TRAIN),
           *args]
    # Restarted workers must not share the rendezvous store: with it shared they can read the
    # previous attempt's addresses and fail to connect (PyTorch issue 135712).
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"))


def _signal_rank1(proc, run, steps, sig):
    wait_for_steps(run, steps, proc, timeout=300)
    deadline = time.monotonic() + 30
    while 1 not in (workers := _workers(proc)) and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(workers[1], sig)


@pytest.mark.slow
def test_two_ranks_stop_together_and_torchrun_restarts_recover(tmp_path, corpus, seed):
    """SIGUSR1 to rank 1 alone stops both ranks at one step with a checkpoint; later a SIGKILLed rank
    is restarted by torchrun --max-restarts and resumes by itself; losses equal an uninterrupted run."""
    common = ["--parallel", "ddp", "--save-every", "4"]
    ref = torchrun(2, [*_args(corpus, tmp_path / "ref", seed, *common)])
    assert ref.returncode == 0, ref.stderr[-3000:]

    run = tmp_path / "run"
    args = _args(corpus, run, seed, *common)
    proc = _launch(run, args)
    _signal_rank1(proc, run, 3, signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    step = int(out.split("stopped by ")[1].split("after step ")[1].split("/")[0])
    assert (run / "checkpoints" / f"step_{step}").is_dir() and len(records(run)) == step

    proc = _launch(run, args, "--max-restarts=1")
    _signal_rank1(proc, run, step + 6, signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert out.count("resumed from") == 2, out  # the relaunch, and torchrun's restart after the kill
    assert steps_logged(run) == list(range(1, STEPS + 1))
    assert losses(run) == losses(tmp_path / "ref")


def test_a_checkpoint_before_the_first_update_leaves_adamw_unstarted(tmp_path, seed):
    """Saving or resuming before any update was applied (every step so far skipped) must not
    count a step in AdamW's bias correction: the next update equals a run's that never saved."""
    import torch

    from agentflan.distributed import DistInfo
    from agentflan.trainer import checkpointing

    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(5, 3, generator=gen)

    def build():
        model = torch.nn.Linear(3, 5, bias=False)
        with torch.no_grad():
            model.weight.copy_(torch.ones(5, 3))
        return model, torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)

    def update(model, optimizer):
        model.weight.grad = grad.clone()
        optimizer.step()
        return model.weight.detach().clone()

    plain = update(*build())
    model, optimizer = build()
    state = checkpointing.TrainState(step=2, skipped_steps=2)
    folder = checkpointing.save(tmp_path / "run", model, optimizer, state, info, keep=1)
    assert not optimizer.state  # the save left the live optimizer as it was
    assert torch.equal(update(model, optimizer), plain)
    model, optimizer = build()
    assert checkpointing.load(folder, model, optimizer, info).step == 2
    assert not optimizer.state
    assert torch.equal(update(model, optimizer), plain)
