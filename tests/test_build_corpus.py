"""Corpus construction: raw AgentInstruct / ToolBench records become Agent-FLAN data with every
tool name, argument and value intact, facets tagged and weighted, negatives of both kinds,
a general-data recipe at the asked token ratio, strict and skip-bad reading, and the same
bytes for the same seed."""

import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from agentflan.corpus.align import record
from agentflan.corpus.build import BuildError, BuildOptions, arm_options, build_corpus, output_paths
from agentflan.corpus.facets import FACETS, UNIFORM_WEIGHTS, parse_facet_weights
from agentflan.corpus.parse import parse_assistant_turn, trajectory_from_agentinstruct, trajectory_from_toolbench
from agentflan.data.conversation import Conversation, DataFormatError, RecordError, read_agentflan_jsonl
from agentflan.data.prepare import prepare
from agentflan.data.recipe import load_recipe
from agentflan.data.sources import PARSERS
from agentflan.toolworld import CHAT, REACT, generate_raw, parse_arguments, parse_react, parse_tool_choice, render
from agentflan.toolworld.protocol import (
    ELICIT_ANSWER,
    ELICIT_ARGUMENTS,
    ELICIT_TOOL,
    NO_TOOL_REPLY,
    system_prompt,
)
from agentflan.toolworld.raw import TOOLBENCH_API_MARKER
from agentflan.toolworld.trajectory import Final, Step, Trajectory

REPO = Path(__file__).resolve().parents[1]

# An AgentInstruct "os" record as the release writes it: instructions in the first human
# turn, an acknowledgement with loss false, Think/Act turns with bash in a code fence.
AGENTINSTRUCT_OS = {"id": "os_7", "conversations": [
    {"from": "human", "loss": None, "value": "You act on a Linux machine for me. Think first, then act:\n"
                                             "Think: ...\nAct: bash\n```bash\n# code\n```\nor Act: answer(...)"},
    {"from": "gpt", "loss": False, "value": "OK."},
    {"from": "human", "loss": None, "value": "Now, my problem is:\n\nHow many files are in /etc?"},
    {"from": "gpt", "loss": True, "value": "Think: I should count the files in /etc.\n\nAct: bash\n\n"
                                           "```bash\nls -1 /etc | wc -l\n```"},
    {"from": "human", "loss": None, "value": "The output of the OS:\n\n220"},
    {"from": "gpt", "loss": True, "value": "Think: The output is 220, so that is the answer.\n\nAct: answer(220)"},
]}

# A processed ToolBench record: the API list as a Python literal after the marker, a
# pretty-printed Action Input, a string response, the closing Finish call.
_APIS = [{"name": "current_weather_for_weatherapi", "description": "Current weather for a place.",
          "parameters": {"type": "object", "properties": {"q": {"type": "string", "description": "city name"},
                                                          "days": {"type": "number"}}, "required": ["q"]}},
         {"name": "Finish", "description": "Finish the task.", "parameters": {"type": "object", "properties": {
             "return_type": {"type": "string"}, "final_answer": {"type": "string"}}, "required": ["return_type"]}}]
TOOLBENCH_TRIP = {"id": "Step 3: I'm going to Tokyo. What's the weather?", "conversations": [
    {"from": "system", "value": "Solve the task with function calls.\n" + TOOLBENCH_API_MARKER + repr(_APIS)},
    {"from": "user", "value": "\nI'm going to Tokyo. What's the weather?\nBegin!\n"},
    {"from": "assistant", "value": "\nThought: I should call the weather API for Tokyo.\n"
                                   "Action: current_weather_for_weatherapi\nAction Input: {\n  \"q\": \"Tokyo\",\n"
                                   "  \"days\": 1.5\n}"},
    {"from": "function", "value": "{\"error\": \"\", \"response\": \"{'temp_c': 21.0, 'text': 'Sunny'}\"}"},
    {"from": "assistant", "value": "\nThought: It is 21°C and sunny.\nAction: Finish\nAction Input: {\n"
                                   "  \"return_type\": \"give_answer\",\n  \"final_answer\": \"It's 21°C and sunny "
                                   "in Tokyo.\"\n}"},
]}


def _conversation(raw: dict, fmt: str) -> Conversation:
    rid, messages = PARSERS[fmt](raw)
    return Conversation(rid, messages, "hand.jsonl", 1)


def _turns(rec: dict) -> list[tuple]:
    return [(t["role"], t["content"], t.get("loss"), t.get("facet")) for t in rec["conversation"]]


def test_hand_checked_agentinstruct_record_aligns_exactly() -> None:
    traj = trajectory_from_agentinstruct(_conversation(AGENTINSTRUCT_OS, "agentinstruct"))
    assert traj.tools is None and traj.instructions == AGENTINSTRUCT_OS["conversations"][0]["value"]
    assert [(s.action, s.arguments) for s in traj.steps] == [("bash", "ls -1 /etc | wc -l"), (None, "answer(220)")]
    rec = record("chat/os_7", render(traj, CHAT))
    assert _turns(rec) == [
        ("system", system_prompt(CHAT, None, traj.instructions), None, None),
        ("assistant", "OK.", False, None),
        ("user", "Now, my problem is:\n\nHow many files are in /etc?", None, None),
        ("assistant", "I should count the files in /etc.", True, "reason"),
        ("user", ELICIT_TOOL[0], None, None),
        ("assistant", "I'll use `bash`.", True, "retrieve"),
        ("user", "What is the input?", None, None),
        ("assistant", "ls -1 /etc | wc -l", True, "understand"),
        ("user", "The output of the OS:\n\n220", None, None),
        ("assistant", "The output is 220, so that is the answer.", True, "reason"),
        ("user", "What is your next action?", None, None),
        ("assistant", "answer(220)", True, "understand"),
    ]
    assert traj.instructions in rec["conversation"][0]["content"]
    # The ReAct form keeps the source's own text, the instructions as the system prompt.
    react = record("react/os_7", render(traj, REACT))
    assert [t["content"] for t in react["conversation"]] == \
        [AGENTINSTRUCT_OS["conversations"][0]["value"]] + [t["value"] for t in AGENTINSTRUCT_OS["conversations"][1:]]
    assert [t.get("loss") for t in react["conversation"]] == [None, False, None, True, None, True]


def test_hand_checked_toolbench_record_aligns_exactly() -> None:
    traj = trajectory_from_toolbench(_conversation(TOOLBENCH_TRIP, "toolbench"))
    assert traj.tools == (_APIS[0],)  # read from the Python literal, Finish dropped
    assert traj.query == "I'm going to Tokyo. What's the weather?"
    rec = record("chat/trip", render(traj, CHAT))
    assert _turns(rec) == [
        ("system", system_prompt(CHAT, traj.tools), None, None),
        ("user", "I'm going to Tokyo. What's the weather?", None, None),
        ("assistant", "I should call the weather API for Tokyo.", True, "reason"),
        ("user", ELICIT_TOOL[0], None, None),
        ("assistant", "I'll use `current_weather_for_weatherapi`.", True, "retrieve"),
        ("user", ELICIT_ARGUMENTS[0], None, None),
        ("assistant", '{"q": "Tokyo", "days": 1.5}', True, "understand"),
        ("user", TOOLBENCH_TRIP["conversations"][3]["value"], None, None),
        ("assistant", "It is 21°C and sunny.", True, "reason"),
        ("user", ELICIT_TOOL[0], None, None),
        ("assistant", NO_TOOL_REPLY[0], True, "retrieve"),
        ("user", ELICIT_ANSWER[0], None, None),
        ("assistant", "It's 21°C and sunny in Tokyo.", True, "reason"),
    ]
    assert json.dumps(_APIS[0]) in rec["conversation"][0]["content"]
    react = record("react/trip", render(traj, REACT))
    assert [t["content"] for t in react["conversation"][2::2]] == \
        [TOOLBENCH_TRIP["conversations"][i]["value"] for i in (2, 4)]
    assert react["conversation"][0]["content"] == TOOLBENCH_TRIP["conversations"][0]["value"]


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def raw_files(tmp_path: Path, seed: int) -> tuple[list[Path], dict[str, list[dict]]]:
    rng = random.Random(seed)
    records = {shape: list(generate_raw(shape, rng.randint(60, 90), rng.randrange(2**31), recovery_share=0.3,
                                        example_share=0.3)) for shape in ("agentinstruct", "toolbench")}
    return [_write_jsonl(tmp_path / f"{shape}.jsonl", recs) for shape, recs in records.items()], records


def _calls_in_raw(rec: dict) -> tuple[list, str]:
    """(name, arguments, observation) of the task's steps and the final answer of a raw record."""
    turns = rec["conversations"]
    start = max((i for i, t in enumerate(turns) if t.get("loss") is False), default=0) + 2
    if turns[0]["from"] == "system":
        start = 2
    calls, final = [], None
    for i in range(start, len(turns), 2):
        step = parse_react(turns[i]["value"])
        if step.kind == "final":
            final = step.answer
        else:
            calls.append((step.name, step.arguments, turns[i + 1]["value"]))
    return calls, final


def _calls_in_chat(rec: dict, names: list[str]) -> tuple[list, str]:
    turns = rec["conversation"]
    calls = []
    for i, t in enumerate(turns):
        if t.get("facet") == "understand":
            calls.append((parse_tool_choice(turns[i - 2]["content"], names).name,
                          parse_arguments(t["content"]).arguments, turns[i + 1]["content"]))
    return calls, turns[-1]["content"]


def test_every_tool_name_argument_and_value_survives_alignment(tmp_path: Path, raw_files) -> None:
    inputs, records = raw_files
    out = tmp_path / "chat.jsonl"
    build_corpus(inputs, out, BuildOptions(react_share=0.0, instruct_samples=0, negatives=0,
                                           facet_weights=dict(UNIFORM_WEIGHTS)))
    built = [json.loads(line) for line in out.read_text().splitlines()]
    raw = records["agentinstruct"] + records["toolbench"]
    assert len(built) == len(raw)
    for rec, src in zip(built, raw):
        assert rec["id"].startswith("chat/")
        names = sorted({c[0] for c in _calls_in_raw(src)[0]})
        assert _calls_in_chat(rec, names) == _calls_in_raw(src), rec["id"]
        assert all(t.get("loss") is not False for t in rec["conversation"] if t.get("facet"))
        # Loss only on assistant turns; in-context example turns untrained and untagged.
        for t in rec["conversation"]:
            assert ("loss" in t) == (t["role"] == "assistant")
            if t["role"] == "assistant" and t["loss"] is False:
                assert "facet" not in t
    out_react = tmp_path / "react.jsonl"
    build_corpus(inputs, out_react, BuildOptions(react_share=1.0, instruct_samples=0, negatives=0))
    for line, src in zip(out_react.read_text().splitlines(), raw):
        rec = json.loads(line)
        gpt = [t["value"] for t in src["conversations"] if t["from"] in ("gpt", "assistant")]
        assert [t["content"] for t in rec["conversation"] if t["role"] == "assistant"] == gpt


def test_facet_weights_are_applied_exactly_and_counted(tmp_path: Path, raw_files, tok, seed: int) -> None:
    inputs, _ = raw_files
    rng = random.Random(seed)
    weights = {f: round(rng.uniform(0.1, 1.0), 2) for f in FACETS}
    out = tmp_path / "weighted.jsonl"
    manifest = build_corpus(inputs, out, BuildOptions(facet_weights=weights, negatives=20, seed=seed))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    counted = {f: [0, 0, 0] for f in FACETS}  # turns, trained, trained tokens
    for rec in rows:
        for t in rec["conversation"]:
            if t.get("facet"):
                row = counted[t["facet"]]
                row[0] += 1
                if t["loss"]:
                    row[1] += 1
                    row[2] += len(tok.encode(t["content"].strip())) + 1
    for f in FACETS:
        m = manifest["facets"][f]
        assert m["turns"] == m["trained_turns_before"] == counted[f][0] > 0, f
        assert m["trained_turns_after"] == counted[f][1] == round(weights[f] * counted[f][0]), f
        assert m["trained_tokens_after"] == counted[f][2], f
    assert manifest["trained_tokens"]["after"] == sum(c[2] for c in counted.values())
    assert parse_facet_weights("1:0.25:0.75") == {"instruct": 1.0, "reason": 1.0, "retrieve": 0.25,
                                                  "understand": 0.75}
    assert parse_facet_weights("retrieve=0.5") == {**UNIFORM_WEIGHTS, "retrieve": 0.5}
    for bad, words in [("1:2:0.5", "in [0, 1]"), ("reasoning=1", "unknown facet"), ("retrieve=x", "not a number"),
                       ("0.5", "facet=weight")]:
        with pytest.raises(ValueError, match=words.replace("[", r"\[")):
            parse_facet_weights(bad)


def test_negatives_of_both_kinds(tmp_path: Path, raw_files, seed: int) -> None:
    inputs, _ = raw_files
    n = random.Random(seed).randint(10, 40)
    manifest = build_corpus(inputs, tmp_path / "neg.jsonl", BuildOptions(negatives=n, seed=seed))
    rows = [json.loads(line) for line in (tmp_path / "neg.jsonl").read_text().splitlines()]
    negatives = [r for r in rows if r["id"].startswith("negative-")]
    assert len(negatives) == n
    assert manifest["forms"]["negative-no_tools"] == (n + 1) // 2
    assert manifest["forms"]["negative-irrelevant_tools"] == n // 2
    for r in negatives:
        turns = r["conversation"]
        with_tools = turns[0]["role"] == "system" and "Tools:" in turns[0]["content"]
        assert with_tools == ("irrelevant_tools" in r["id"])
        assert [t["role"] for t in turns if t["role"] != "system"] == ["user", "assistant"]
        assert turns[-1]["facet"] == "reason" and turns[-1]["loss"] is True
        assert "Thought:" not in turns[-1]["content"] and "`" not in turns[-1]["content"]


def _sharegpt(path: Path, rng: random.Random, n: int) -> Path:
    words = "the a model data train token chat answer question about river city light music".split()
    recs = [{"id": f"sg_{i}", "conversations": [
        {"from": "human" if k % 2 == 0 else "gpt", "value": " ".join(rng.choices(words, k=rng.randint(5, 60)))}
        for k in range(rng.randint(2, 6))]} for i in range(n)]
    path.write_text(json.dumps(recs), encoding="utf-8")
    return path


def test_general_data_is_mixed_at_the_token_ratio_through_a_recipe(tmp_path: Path, raw_files, seed: int) -> None:
    inputs, _ = raw_files
    rng = random.Random(seed)
    ratio = round(rng.uniform(0.3, 2.0), 2)
    general = _sharegpt(tmp_path / "sharegpt.json", rng, 1500)
    out = tmp_path / "mixed.jsonl"
    manifest = build_corpus(inputs, out, BuildOptions(general=(str(general),), general_ratio=ratio, negatives=10))
    recipe_path = output_paths(out)[2]
    assert manifest["general"] == {"files": ["sharegpt.json"], "ratio": ratio, "recipe": recipe_path.name}
    recipe = load_recipe(recipe_path)
    assert recipe.mix_by == "tokens" and [s.format for s in recipe.sources] == ["agentflan", "sharegpt"]
    prepared = prepare(recipe, tmp_path / "prepared", num_threads=1)
    agent, chat = prepared["sources"]
    assert agent["epochs"] == 1.0 and agent["selected_documents"] == manifest["conversations"]
    # Whole conversations are drawn, so the ratio holds to within one conversation.
    longest = max(len(c.messages) for c in read_agentflan_jsonl(out)) * 200
    assert abs(chat["selected_tokens"] - ratio * agent["selected_tokens"]) <= longest, (ratio, agent, chat)


def _bad_records(tmp_path: Path, good: list[dict]) -> tuple[Path, dict[int, str]]:
    unparsed = json.loads(json.dumps(good[0]))
    unparsed["conversations"][-1]["value"] = "I think the answer is 4."
    after_final = json.loads(json.dumps(good[1]))
    after_final["conversations"] += [{"from": "human", "loss": None, "value": "and?"},
                                     {"from": "gpt", "loss": True, "value": "Thought: t\nFinal Answer: 5"}]
    bad_role = {"id": "x", "conversations": [{"from": "robot", "value": "hi", "loss": None}]}
    lines = [json.dumps(r) for r in good[2:8]]
    inserted = {3: json.dumps(unparsed), 5: "{not json", 6: json.dumps(after_final), 8: json.dumps(bad_role)}
    for line_no in sorted(inserted):
        lines.insert(line_no - 1, inserted[line_no])
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, {3: "unparsed step", 5: "invalid JSON", 6: "turns after the final answer", 8: "unknown role"}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "build_corpus.py"), *args], capture_output=True,
                          text=True, cwd=REPO)


def test_strict_by_default_and_skip_bad_counts_by_reason(tmp_path: Path, raw_files) -> None:
    _, records = raw_files
    bad, kinds = _bad_records(tmp_path, records["agentinstruct"])
    out = tmp_path / "out.jsonl"
    out.write_text("earlier run\n")
    with pytest.raises(DataFormatError, match=r"bad.jsonl:3: .*no Thought, Action or Final Answer"):
        build_corpus([bad], out, BuildOptions(overwrite=True))
    proc = _cli("--input", str(bad), "--output", str(out), "--overwrite")
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "bad.jsonl:3:" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert out.read_text() == "earlier run\n" and not output_paths(out)[1].exists()
    manifest = build_corpus([bad], out, BuildOptions(skip_bad=True, overwrite=True, negatives=0))
    (entry,) = manifest["inputs"]
    assert entry["skipped"] == {kind: 1 for kind in kinds.values()}
    assert sorted(e["line"] for e in entry["skip_examples"]) == sorted(kinds)
    assert entry["trajectories"] == 6 and entry["records"] == 10


def test_same_seed_same_bytes_and_another_seed_differs(tmp_path: Path, raw_files, seed: int) -> None:
    inputs, _ = raw_files
    outs = []
    for name, s in [("a", seed), ("b", seed), ("c", seed + 1)]:
        out = tmp_path / f"{name}.jsonl"
        build_corpus(inputs, out, BuildOptions(seed=s, negatives=12))
        outs.append((out.read_bytes(), output_paths(out)[1].read_text().replace(f"{name}.jsonl", "X")))
    assert outs[0] == outs[1]
    assert outs[0][0] != outs[2][0]


def test_the_three_arms_from_the_same_raw_files(tmp_path: Path, raw_files) -> None:
    inputs, records = raw_files
    n = sum(len(v) for v in records.values())
    general = _sharegpt(tmp_path / "sharegpt.json", random.Random(0), 50)
    built = {}
    for arm in ("react", "aligned", "full"):
        options = arm_options(arm, general=(str(general),) if arm == "full" else ())
        manifest = build_corpus(inputs, tmp_path / f"{arm}.jsonl", options)
        built[arm] = manifest
    assert built["react"]["forms"] == {"react": n}
    assert built["react"]["trained_tokens"]["before"] == built["react"]["trained_tokens"]["after"]
    assert set(built["aligned"]["forms"]) == {"chat", "react", "instruct-json", "instruct-react"}
    assert built["aligned"]["forms"]["react"] == round(0.1 * n)
    assert built["aligned"]["facets"]["retrieve"]["trained_turns_after"] < \
        built["aligned"]["facets"]["retrieve"]["trained_turns_before"]
    assert built["full"]["forms"]["negative-no_tools"] > 0 and built["full"]["general"]["ratio"] == 1.0
    with pytest.raises(BuildError, match="--general"):
        arm_options("full")


@pytest.mark.parametrize("args, words", [
    (["--input", "missing.jsonl"], "source file not found: missing.jsonl"),
    (["--facet-weights", "1:3:1"], "in [0, 1]"),
    (["--react-share", "1.5"], "--react-share must be in [0, 1], got 1.5"),
    (["--instruct-samples", "-3"], "--instruct-samples must be >= 0, got -3"),
    (["--negatives", "-1"], "--negatives must be >= 0"),
    (["--general-ratio", "2"], "--general-ratio sets the general mix and needs --general"),
    (["--instruct-samples", "100000"], "instruction-following samples"),
    (["--general", "GENERAL_AS_INPUT"], "--input takes raw agent trajectories"),
    (["--arm", "full"], "--general"),
    (["--input", "INPUT", "--input", "INPUT"], "the same file as --input"),
])
def test_cli_refuses_bad_options_with_one_error_line(tmp_path: Path, raw_files, args: list[str], words: str) -> None:
    inputs, _ = raw_files
    general = _sharegpt(tmp_path / "sharegpt.json", random.Random(1), 5)
    if args[0] == "--general":
        args = ["--input", str(general)]
    args = [str(inputs[0]) if a == "INPUT" else a for a in args]
    base = [] if args[0] == "--input" else ["--input", str(inputs[0])]
    out = tmp_path / "o.jsonl"
    proc = _cli(*base, *args, "--output", str(out))
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and words in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()


def test_an_undetectable_input_names_what_each_option_takes(tmp_path: Path, raw_files) -> None:
    """build_corpus has no format option: its advice is what --input and --general take."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"text": "a record of no known format"}) + "\n")
    for args, words in (
            (["--input", str(empty)], f"error: {empty}: no record to detect the format from; --input takes raw "
                                      f"agent trajectories (agentinstruct or toolbench)"),
            (["--input", str(other)], f"error: {other}:1: the first record fits no known format"),
            (["--input", str(raw_files[0][0]), "--general", str(empty)],
             f"error: {empty}: no record to detect the format from; --general takes ShareGPT chat files")):
        proc = _cli(*args, "--output", str(tmp_path / "o.jsonl"))
        assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith(words) and "name the format" not in proc.stderr, proc.stderr


def _main_in_process():
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_corpus_tool", REPO / "tools" / "build_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_outputs_that_are_inputs_folders_or_under_files_are_refused_before_any_work(
        tmp_path: Path, raw_files, capsys) -> None:
    inputs, _ = raw_files
    main = _main_in_process()
    general = _sharegpt(tmp_path / "sharegpt.json", random.Random(2), 5)
    folder = tmp_path / "afolder"
    folder.mkdir()
    (folder / "a.manifest.json").mkdir()
    before = {p: p.read_bytes() for p in inputs}
    cases = [
        (str(inputs[0]), [], "is the same file as --input"),
        (str(tmp_path / "." / inputs[1].name), [], "is the same file as --input"),
        (str(general), ["--general", str(general)], "is the same file as --general"),
        (str(folder), [], "is a folder; give the path of a file"),
        (str(folder / "a.jsonl"), [], "a.manifest.json: is a folder"),
        (str(inputs[0] / "out.jsonl"), [], f"{inputs[0]} is a file, not a folder"),
        (str(tmp_path / "missing" / "out.jsonl"), [], "does not exist"),
    ]
    link = tmp_path / "link.jsonl"
    os.link(inputs[1], link)  # another name of the same file
    cases.append((str(link), [], "is the same file as --input"))
    for output, extra, words in cases:
        capsys.readouterr()
        args = [a for p in inputs for a in ("--input", str(p))] + extra + ["--output", output, "--overwrite"]
        assert main(args) == 1, output
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and words in err, err
    assert {p: p.read_bytes() for p in inputs} == before and link.read_bytes() == before[inputs[1]]
    assert not [p for p in tmp_path.rglob(".*") if p.name.endswith(".tmp")]


def test_cli_builds_and_will_not_replace_without_overwrite(tmp_path: Path, raw_files) -> None:
    inputs, _ = raw_files
    out = tmp_path / "cli.jsonl"
    args = [a for p in inputs for a in ("--input", str(p))] + ["--output", str(out), "--negatives", "6"]
    proc = _cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and "retrieve" in proc.stdout
    before = out.read_bytes()
    proc = _cli(*args, "--seed", "5")
    assert proc.returncode == 1 and "exists (use --overwrite" in proc.stderr and out.read_bytes() == before
    assert _cli(*args, "--seed", "5", "--overwrite").returncode == 0 and out.read_bytes() != before
    assert sum(1 for _ in read_agentflan_jsonl(out)) == json.loads(output_paths(out)[1].read_text())["conversations"]


@pytest.mark.parametrize("text, expected", [
    ("THOUGHT: I need to find a mug.\nACTION: go to cabinet 1",  # ALFWorld
     Step("I need to find a mug.", None, "go to cabinet 1", None)),
    ("Thought:\nI think I should search for blue shoes.\n\nAction:\nsearch[blue shoes size 9]",  # WebShop
     Step("I think I should search for blue shoes.", None, "search[blue shoes size 9]", None)),
    ("To list the names, I query the table.\nAction: Operation\n```sql\nSELECT name FROM t WHERE x = 1;\n```",  # DB
     Step("To list the names, I query the table.", "Operation", "SELECT name FROM t WHERE x = 1;", None)),
    ("The query returned John.\nAction: Answer\nFinal Answer: [\"John\"]",
     Final("The query returned John.", "[\"John\"]")),
    ("Thought: I need the relations of X.\nAction: get_relations(Gas-generator)",  # KG
     Step("I need the relations of X.", None, "get_relations(Gas-generator)", None)),
    ("Think: I should count them.\n\nAct: bash\n\n```bash\nls -1 | wc -l\n```",  # OS
     Step("I should count them.", "bash", "ls -1 | wc -l", None)),
    ("\nThought: t\nAction: f_for_x\nAction Input: {'a': 1}",  # ToolBench, input not JSON: kept verbatim
     Step("t", "f_for_x", "{'a': 1}", None)),
    ("\nThought: nothing works\nAction: Finish\nAction Input: {\"return_type\": \"give_up_and_restart\"}",
     Final("nothing works", "", gave_up=True)),
    ("Thought: let me think about it", Step("let me think about it", None, None, None)),
])
def test_assistant_turns_of_the_released_corpora_parse(text: str, expected) -> None:
    parsed = parse_assistant_turn(text, "conversations[3]")
    assert parsed == dataclasses.replace(expected, raw=text)
    # Every action's name and input appear verbatim in the aligned chat turns.
    traj = Trajectory("t", "q", (parsed,) if isinstance(parsed, Step) else (), parsed if isinstance(parsed, Final)
                      else None)
    chat = [m.content for m in render(traj, CHAT) if m.role == "assistant"]
    if isinstance(parsed, Step) and parsed.arguments is not None:
        assert parsed.arguments in chat and (parsed.action is None or f"`{parsed.action}`" in " ".join(chat))


@pytest.mark.parametrize("text, words", [
    ("OK, I will do it.", "no Thought, Action or Final Answer"),
    ("Thought: a\nThought: b\nAction: x", "appears twice"),
    ("Thought: a\nAction Input: {}", "without an Action"),
    ("Thought: a\nAction: Finish\nAction Input: {\"return_type\": \"maybe\"}", "return_type"),
])
def test_unreadable_assistant_turns_are_record_errors(text: str, words: str) -> None:
    with pytest.raises(RecordError, match=words) as err:
        parse_assistant_turn(text, "conversations[3]")
    assert err.value.kind == "unparsed step" and "conversations[3]" in str(err.value)


def test_records_without_tool_lists_build_with_defaults(tmp_path: Path) -> None:
    # Released AgentInstruct tasks describe their actions in prose: no strict-form samples can
    # be made from them, which the default build accepts and the manifest shows.
    records = [{**AGENTINSTRUCT_OS, "id": f"os_{i}"} for i in range(30)] + [TOOLBENCH_TRIP]
    path = _write_jsonl(tmp_path / "mixed_ai.jsonl", records[:30])
    tb = _write_jsonl(tmp_path / "tb.jsonl", records[30:])
    manifest = build_corpus([path, tb], tmp_path / "out.jsonl", BuildOptions(negatives=0))
    assert manifest["notes"]["tools_not_found_in_instructions"] == 30
    assert manifest["notes"]["strict_form_eligible"] == 1 and manifest["notes"]["free_form_actions"] == 30
    assert manifest["forms"].get("instruct-json", 0) + manifest["forms"].get("instruct-react", 0) <= 1
    with pytest.raises(BuildError, match="only 1 trajectories have known tools"):
        build_corpus([path, tb], tmp_path / "out2.jsonl", BuildOptions(instruct_samples=2))
