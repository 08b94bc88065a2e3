"""Faults: non-finite steps are skipped on every rank and counted, too many in a row abort with a
diagnostic, nothing non-finite is saved, and failed writes name the path and the cause."""

import errno
import json
import math
import resource
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agentflan.data.packing import IGNORE_INDEX
from agentflan.trainer.faults import FaultInjection
from agentflan.trainer.errors import TrainError
from train_helpers import TRAIN, env, error_lines, micro, records, run_main, small_corpus, torchrun


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return small_corpus(tmp_path_factory.mktemp("corpus"))


def _checkpoint_tensors(folder):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(folder, folder.parent / f"{folder.name}.pt")
    return torch.load(folder.parent / f"{folder.name}.pt", weights_only=False)


def _flat(state, prefix=""):
    if isinstance(state, dict):
        for key, value in state.items():
            yield from _flat(value, f"{prefix}{key}.")
    elif isinstance(state, torch.Tensor):
        yield prefix, state


def test_nonfinite_steps_are_skipped_and_change_nothing(tmp_path, corpus, seed, capsys, monkeypatch):
    monkeypatch.setenv("AGENTFLAN_TEST_FAULTS", "nan_loss@2,inf_grad@3")
    run = tmp_path / "run"
    # Packs of 1024 tokens: a step without a trained token, where nothing can be injected, is rare.
    args = micro(corpus, run, seed, "--steps", "4", "--save-every", "1", "--keep-checkpoints", "9", "--no-save",
                 pack_len=1024)
    code, out, err = run_main(args, capsys)
    assert code == 0, err
    rec = records(run)
    if any(r.get("skip_reason") == "no_trained_tokens" for r in rec[1:3]):
        pytest.skip(f"seed {seed}: step 2 or 3 holds no trained token, so nothing was injected")
    assert [r["skip_reason"] for r in rec[1:3]] == ["nonfinite", "nonfinite"]
    assert rec[1]["loss"] is None and "loss" in rec[1]["nonfinite"]  # NaN written as null and flagged
    assert rec[2]["loss"] is not None and rec[2]["grad_norm"] is None and rec[2]["nonfinite"] == ["grad_norm"]
    assert rec[3].get("skip_reason") != "nonfinite"
    assert "SKIPPED (nonfinite)" in out
    # The skipped steps updated neither the weights nor the optimizer state.
    before, after = (dict(_flat(_checkpoint_tensors(run / "checkpoints" / f"step_{s}"))) for s in (1, 3))
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_bad_steps_in_a_row_abort_with_the_diagnostic(tmp_path, corpus, seed, capsys, monkeypatch):
    monkeypatch.setenv("AGENTFLAN_TEST_FAULTS", ",".join(f"nan_loss@{s}" for s in range(2, 12)))
    run = tmp_path / "run"
    code, out, err = run_main(micro(corpus, run, seed, "--steps", "12", "--max-bad-steps", "3"), capsys)
    assert code == 1
    # A step whose batch trains no token runs no forward (nothing to poison) and does not break the row.
    bad = [r["step"] for r in records(run) if r.get("skip_reason") == "nonfinite"]
    assert len(bad) == 3 and records(run)[-1]["step"] == bad[-1]
    (line,) = error_lines(err)
    assert line.startswith(f"error: step {bad[-1]}: 3 steps in a row with a non-finite loss or gradient norm")
    assert "last loss nan" in line
    assert "non-finite gradients in 21 parameter(s) in embed_tokens, layers.0, layers.1, norm, lm_head" in line
    assert not (run / "final").exists() and not (run / "summary.json").exists()


def test_fault_injection_spec_is_checked():
    with pytest.raises(TrainError, match="kind@step"):
        FaultInjection("nan_loss@x")
    assert FaultInjection("inf_grad@3").at("inf_grad", 3) and not FaultInjection("").at("inf_grad", 3)


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (3 << 20, 3 << 20))  # a "disk" that takes files up to 3 MiB


def test_full_disk_during_a_checkpoint_names_the_path_and_the_cause(tmp_path, corpus, seed):
    run = tmp_path / "run"
    args = micro(corpus, run, seed, "--steps", "4", "--save-every", "2", "--no-save")
    proc = subprocess.run([sys.executable, str(TRAIN), *args], capture_output=True, text=True, env=env(),
                          preexec_fn=_limit_file_size, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    (line,) = error_lines(proc.stderr)
    assert line == f"error: cannot write the training checkpoint {run / 'checkpoints' / 'step_2'}: File too large " \
                   f"(errno EFBIG)"
    assert "Traceback" not in proc.stderr
    assert list((run / "checkpoints").iterdir()) == []  # the partial write is gone
    assert [r["step"] for r in records(run)] == [1, 2]


def test_failed_final_save_names_the_path_and_the_cause(tmp_path, corpus, seed, capsys, monkeypatch):
    import agentflan.checkpoint

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    run = tmp_path / "run"
    monkeypatch.setattr(agentflan.checkpoint, "_write_tensor", disk_full)  # the disk fills while weights are written
    code, out, err = run_main(micro(corpus, run, seed, "--steps", "1"), capsys)
    assert code == 1
    (line,) = error_lines(err)
    assert line.startswith(f"error: cannot write the final model {run / 'final'}: No space left on device (errno "
                           f"ENOSPC)"), line
    assert "Traceback" not in err
    assert sorted(p.name for p in run.iterdir() if "final" in p.name) == []  # no final/, no partial folder


# Runs main twice in one fresh process under a one-rank gloo group (as torchrun sets it up): a run
# that finishes, then one whose final save fails; prints the gloo threads left after each.
_GROUP_CHECK = """
import errno, json, os, sys
from pathlib import Path
import agentflan.checkpoint
from agentflan.train import main

def gloo_threads():
    names = (Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task"))
    return [name for name in names if "gloo" in name]

def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

args, left = sys.argv[1:], {}
out = args.index("--out-dir") + 1
base = args[out]
for case in ("finished", "failed"):
    if case == "failed":
        agentflan.checkpoint._write_tensor = disk_full
    args[out] = base + "-" + case
    try:
        main(args)
        code = 0
    except SystemExit as stop:
        code = stop.code
    left[case] = {"code": code, "gloo_threads": gloo_threads()}
print(json.dumps(left))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the thread names from Linux's /proc")
def test_the_process_group_is_gone_when_training_ends(tmp_path, corpus, seed):
    """A DDP run under a process group leaves no gloo thread behind, whether it finishes or fails
    after the model exists: a group that outlives the run is destroyed at interpreter exit, where a
    gloo thread that needs the GIL aborts the process (SIGABRT), or from a model's destructor
    holding the GIL, where the two can wait for each other forever."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    group = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    args = micro(corpus, tmp_path / "run", seed, "--steps", "1", "--parallel", "ddp")
    proc = subprocess.run([sys.executable, "-c", _GROUP_CHECK, *args], capture_output=True, text=True,
                          env=env(**group), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    left = json.loads(proc.stdout.splitlines()[-1])
    assert left == {"finished": {"code": 0, "gloo_threads": []}, "failed": {"code": 1, "gloo_threads": []}}, \
        proc.stderr[-3000:]


@pytest.mark.slow
def test_ranks_agree_on_skips_and_errors(tmp_path, corpus, seed):
    """Under torchrun a gradient made non-finite on the last rank only is skipped by rank 0 too, and a
    mistake is printed once while every rank exits non-zero."""
    run = tmp_path / "run"
    proc = torchrun(2, micro(corpus, run, seed, "--steps", "3", "--parallel", "ddp", "--no-save", pack_len=1024),
                    AGENTFLAN_TEST_FAULTS="inf_grad@2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    if records(run)[1]["skip_reason"] == "no_trained_tokens":  # both packs of step 2 empty: ~1 seed in 25,000
        pytest.skip(f"seed {seed}: step 2 holds no trained token, so nothing was injected")
    assert records(run)[1]["skip_reason"] == "nonfinite"
    proc = torchrun(2, micro(corpus, tmp_path / "bad", seed, "--global-batch", "3"))
    assert proc.returncode != 0
    assert error_lines(proc.stderr) == ["error: --global-batch 3 does not divide among 2 ranks: use a multiple of 2 "
                                        "or another number of ranks"]
    # torchrun's report: a rank exited 1 and none exited 0 (one still tearing down may be ended by torchrun's SIGTERM)
    assert "exitcode  : 1 " in proc.stderr and "exitcode  : 0 " not in proc.stderr
    assert not (tmp_path / "bad").exists()


def test_data_without_a_trained_turn_names_the_cause(tmp_path, corpus, seed, capsys):
    import random

    lines = corpus.read_text().splitlines()
    picked = random.Random(seed).sample(lines, 7)
    prompts_only = tmp_path / "prompts.jsonl"
    with open(prompts_only, "w") as f:
        for line in picked:
            record = json.loads(line)
            record["conversation"] = [t for t in record["conversation"] if t["role"] != "assistant"]
            f.write(json.dumps(record) + "\n")
    run = tmp_path / "run"
    code, _, err = run_main(micro(prompts_only, run, seed, "--steps", "2"), capsys)
    assert code == 1 and error_lines(err) == [
        "error: no conversation in the data has a trained turn: 7 read, 7 left out for lack of one (only assistant "
        "turns are trained; the 'read' lines above count each file's skipped records): check the data's roles, or "
        "--data-format"], err
    assert not (run / "final").exists()


def test_packs_that_cannot_hold_a_trained_token_are_refused(corpus, seed):
    """Trained tokens only where a piece of a split document starts: no pack holds a target (a
    piece's first token is nobody's label), though the conversations hold trained tokens."""
    import dataclasses
    import random

    import numpy as np

    from agentflan.data.dataset import PackedDataset, encode_files
    from agentflan.data.defaults import DEFAULT_TOKENIZER
    from agentflan.tokenizer import Tokenizer
    from agentflan.trainer.data import check_packs_train, trained_packs

    encoded = encode_files([str(corpus)], Tokenizer(str(DEFAULT_TOKENIZER)), "agentflan", "auto", False)
    pack_len = random.Random(seed).randint(3, 9)
    in_doc = np.arange(len(encoded.tokens)) - np.repeat(encoded.doc_offsets[:-1], np.diff(encoded.doc_offsets))
    starts_only = PackedDataset(dataclasses.replace(encoded, loss_mask=(in_doc % pack_len == 0).astype(np.uint8)),
                                pack_len)
    with pytest.raises(TrainError, match=f"0 of {starts_only.n_packs} packs of --pack-len {pack_len} tokens hold a "
                                         f"trained token .*: no step can train; raise --pack-len"):
        check_packs_train(starts_only, 2, warn=print)
    # The real mask: counted pack by pack as the batches hold them, and a warning when many steps would skip.
    dataset = PackedDataset(encoded, pack_len)
    expected = sum(bool((build_one(dataset, p) != IGNORE_INDEX).any()) for p in range(dataset.n_packs))
    assert trained_packs(dataset, chunk=7) == expected
    warnings = []
    check_packs_train(dataset, 1, warnings.append)
    assert warnings == ([] if expected / dataset.n_packs > 0.9 else [warnings[0]])
    assert not warnings or warnings[0].startswith(f"warning: {expected} of {dataset.n_packs} packs of --pack-len")
    # Runs of --max-bad-steps empty steps in a row, expected within the run, are refused up front.
    empty = (1 - expected / dataset.n_packs) ** 2
    for steps, limit in ((10, 3), (100_000, 2), (10**9, 5)):
        if 1 - math.exp(-steps * empty ** limit) >= 0.05:
            with pytest.raises(TrainError, match=f"{limit} such steps in a row \\(--max-bad-steps\\), which end "
                                                 f"the run, have a \\d+% chance within {steps} steps"):
                check_packs_train(dataset, 2, warnings.append, steps, limit)
        else:
            check_packs_train(dataset, 2, warnings.append, steps, limit)


def build_one(dataset, pack):
    import numpy as np

    from agentflan.data.packing import build_batch

    c = dataset.corpus
    return build_batch(dataset.plan, np.array([pack]), c.tokens, c.doc_offsets, c.loss_mask).labels


def test_steps_without_trained_tokens_in_a_row_abort_like_bad_steps(seed):
    import random

    from agentflan.trainer.faults import NonFiniteGuard

    limit = random.Random(seed).randint(2, 6)
    guard = NonFiniteGuard(limit, empty_hint="raise --pack-len")
    for step in range(1, limit):  # interrupted by a trained step: the count starts again
        guard.record(step, None, None, None, [])
    guard.record(limit, True, 1.0, 1.0, [])
    for step in range(limit + 1, 2 * limit):
        guard.record(step, None, None, None, [])
    with pytest.raises(TrainError, match=f"steps {limit + 1}-{2 * limit}: {limit} steps in a row whose global "
                                         f"batch held no trained token \\(--max-bad-steps {limit}\\): nothing is "
                                         f"learned. raise --pack-len"):
        guard.record(2 * limit, None, None, None, [])


def test_a_failed_overwrite_run_leaves_the_earlier_run_recoverable(tmp_path, corpus, seed, capsys):
    import signal

    from train_helpers import snapshot, start_process, wait_for_steps

    run = tmp_path / "run"
    code, _, err = run_main(micro(corpus, run, seed, "--steps", "1", "--no-save"), capsys)
    assert code == 0, err
    earlier = snapshot(run)
    proc = start_process(micro(corpus, run, seed + 1, "--steps", "40", "--no-save", "--overwrite"))
    wait_for_steps(run, 2, proc)
    proc.send_signal(signal.SIGKILL)  # no handler runs: only what is on disk counts
    out, _ = proc.communicate(timeout=60)
    (aside,) = list(run.glob(".replaced-*"))
    assert snapshot(aside) == earlier  # every file of the earlier run, byte for byte
    assert f"the earlier run's files (config.yaml, metrics.jsonl, summary.json, checkpoints) are kept in {aside}" in out
    code, _, err = run_main(micro(corpus, run, seed + 2, "--steps", "1", "--no-save", "--overwrite"), capsys)
    assert code == 0, err
    assert not list(run.glob(".replaced-*")) and (run / "summary.json").exists()  # finished: the old runs go
