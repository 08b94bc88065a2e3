"""Ctrl-C: the first SIGINT finishes the step, writes a checkpoint and exits 130 with one line (also
when it arrives twice at once, as under torchrun); a later second one exits at once, without a traceback."""

import signal
import subprocess
import sys

import pytest

from train_helpers import env, micro, small_corpus, start_process, wait_for_steps

STEPS = 30


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return small_corpus(tmp_path_factory.mktemp("corpus"), n=60)


@pytest.mark.parametrize("extra, hint", [
    ([], "run the same command to resume"),
    (["--resume", "never"], "to resume, run it again with --resume auto"),
    (["--overwrite"], "to resume, run it again with --resume auto and without --overwrite"),
])
def test_ctrl_c_checkpoints_the_step_and_exits_130(tmp_path, corpus, seed, extra, hint):
    run = tmp_path / "run"
    proc = start_process(micro(corpus, run, seed, "--steps", str(STEPS), "--no-save", *extra))
    wait_for_steps(run, 2, proc)
    # The terminal's SIGINT and torchrun's forwarded copy, back to back: one request.
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    stopped = [line for line in out.splitlines() if line.startswith("stopped by SIGINT after step ")]
    assert len(stopped) == 1, out
    step = int(stopped[0].split("after step ")[1].split("/")[0])
    assert 2 <= step < STEPS and (run / "checkpoints" / f"step_{step}").is_dir(), out
    assert stopped[0].endswith(f"; {hint}"), stopped[0]


_SECOND_CTRL_C = """
import os, signal, sys, time
from agentflan.trainer import faults
faults.DUPLICATE_WINDOW_S = float(sys.argv[1])
with faults.Preemption() as p:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)
    print("requested", p.requested, p.interrupted, flush=True)
"""


@pytest.mark.parametrize("window, aborts", [(0.0, True), (60.0, False)])
def test_a_later_second_ctrl_c_exits_at_once(window, aborts):
    proc = subprocess.run([sys.executable, "-c", _SECOND_CTRL_C, str(window)], capture_output=True, text=True,
                          env=env(), timeout=60)
    assert "Traceback" not in proc.stderr, proc.stderr
    if aborts:
        assert proc.returncode == -signal.SIGINT and "requested" not in proc.stdout
        assert proc.stderr.strip().splitlines() == [
            "SIGINT again: exiting now without a checkpoint of the step in progress"], proc.stderr
    else:  # within the window: the same request, delivered twice
        assert proc.returncode == 0 and proc.stdout.strip() == "requested True True", proc
