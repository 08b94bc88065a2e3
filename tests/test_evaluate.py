"""The agent evaluator: scripted agents whose behaviour is known, plugged in where the model
would be, score what they must; argument equality, answer matching and the hallucination
rules on hand-made cases; tools/evaluate.py end to end on a freshly initialised model."""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
from pathlib import Path

import pytest
import yaml

from agentflan.checkpoint import save_hf
from agentflan.config import get_preset
from agentflan.data.defaults import DEFAULT_TOKENIZER
from agentflan.evaluate import (
    EvalSettings,
    answer_is_right,
    arguments_equal,
    evaluate,
    general_evidence,
    react_evidence,
    trained_form,
)
from agentflan.evaluate.episodes import gold_effects
from agentflan.evaluate.facets import forced_turns, score_turn
from agentflan.model import Llama
from agentflan.toolworld import TOOLS_BY_NAME, generate_negatives, generate_tasks, render
from agentflan.toolworld.protocol import (
    CHAT,
    FORMS,
    REACT,
    STRICT_JSON,
    dumps,
    parse_json_reply,
    parse_react,
    parse_tool_choice,
)

ROOT = Path(__file__).resolve().parents[1]
N_TASKS, N_NEGATIVES = 24, 16


def key(conversation) -> str:
    return json.dumps([{"role": m["role"], "content": m["content"]} for m in conversation])


class Oracle:
    """The gold reply to every prefix of the gold conversations of a split's tasks and to every
    negative's prompt; ``fallback(conversation)`` answers anything else."""

    def __init__(self, settings: EvalSettings, fallback=None) -> None:
        self.table: dict[str, str] = {}
        self.form = settings.form
        self.fallback = fallback
        self.batches: list[int] = []
        for task in generate_tasks(settings.split, settings.tasks, settings.seed):
            msgs = [m.as_chat() for m in render(task.trajectory(), settings.form)]
            for i, m in enumerate(msgs):
                if m["role"] == "assistant":
                    self.table[key(msgs[:i])] = m["content"]
        for neg in generate_negatives(settings.split, settings.negatives, settings.seed):
            self.table[key(neg.prompt(settings.form))] = neg.answer

    def gold(self, conversation) -> str | None:
        return self.table.get(key(conversation))

    def __call__(self, conversations):
        self.batches.append(len(conversations))
        out = []
        for conv in conversations:
            gold = self.gold(conv)
            if gold is None:
                assert self.fallback is not None, "the perfect agent left the gold conversation"
                gold = self.fallback(conv)
            out.append(gold)
        return out


def settings_for(form: str, seed: int, **overrides) -> EvalSettings:
    return EvalSettings(**{"tasks": N_TASKS, "negatives": N_NEGATIVES, "form": form, "seed": seed % 10_000,
                           "max_steps": 4, **overrides})


def offered_names(conversation) -> list[str]:
    """The tool names of the system prompt (every catalogue tool it mentions)."""
    system = conversation[0]["content"] if conversation and conversation[0]["role"] == "system" else ""
    return [name for name in TOOLS_BY_NAME if f'"name": "{name}"' in system]


# ------------------------------------------------------------------------------- scripted agents


@pytest.mark.parametrize("form", FORMS)
def test_the_perfect_agent_scores_100_everywhere(form, seed):
    settings = settings_for(form, seed)
    oracle = Oracle(settings)
    results = evaluate(oracle, settings)
    for name in ("instruct", "retrieve", "understand", "reason", "overall", "success", "hscore"):
        assert results[name] == 100.0, (name, results[name])
    assert results["h_react"] == 0.0 and results["h_general"] == 0.0
    counts = results["counts"]
    assert counts["tasks"] == N_TASKS and counts["negatives"] == N_NEGATIVES
    assert counts["reason"]["total"] == N_TASKS  # one final answer a task
    assert counts["understand"]["total"] == sum(len(t.calls) for t in generate_tasks("heldout", N_TASKS,
                                                                                      settings.seed))
    assert results["episodes"] == {"answered": N_TASKS}
    # Batched across tasks: one agent call for all teacher-forced turns, one a round of episodes
    # (all live episodes together), one for the negatives.
    tasks = list(generate_tasks("heldout", N_TASKS, settings.seed))
    rounds = max(sum(m.role == "assistant" for m in render(t.trajectory(), form)) for t in tasks)
    assert oracle.batches == [counts["teacher_forced_turns"], N_TASKS, *oracle.batches[2:1 + rounds], N_NEGATIVES]
    assert len(oracle.batches) == 1 + rounds + 1
    record = results["tasks"][0]
    assert {"prompt", "forced", "episode", "query", "answer_keys"} <= set(record)
    assert all("verdicts" in t and "parsed" in t for t in record["forced"])


ALWAYS_CALL = 'Thought: I will use the calculator tool for this.\nAction: calculator\nAction Input: {"expression": "2 + 2"}'


@pytest.mark.parametrize("form", FORMS)
def test_an_agent_that_always_calls_a_tool_scores_0_on_negatives(form, seed):
    settings = settings_for(form, seed)
    results = evaluate(lambda convs: [ALWAYS_CALL] * len(convs), settings)
    assert results["h_react"] == 100.0 and results["h_general"] == 100.0 and results["hscore"] == 0.0
    assert results["success"] == 0.0 and results["reason"] == 0.0
    kinds = results["by_negative_kind"]
    assert kinds["no_tools"]["h_react"] == 100.0 and kinds["irrelevant_tools"]["h_react"] == 100.0


def malformed_json(conversation) -> str:
    return '{"thought": "I need a tool", "tool": "calculator", "arguments": {"expression": "2 + 2"'


@pytest.mark.parametrize("form", [STRICT_JSON, REACT])
def test_an_agent_emitting_malformed_json_scores_0_on_instruction_following(form, seed):
    settings = settings_for(form, seed, negatives=0)
    results = evaluate(lambda convs: [malformed_json(c) for c in convs], settings)
    assert results["instruct"] == 0.0
    assert results["success"] == 0.0 and results["understand"] == 0.0
    assert results["counts"]["instruct"]["total"] == results["counts"]["teacher_forced_turns"]
    assert set(results["episodes"]) == {"malformed"}


def test_malformed_json_arguments_fail_instruction_following_in_the_chat_form(seed):
    settings = settings_for(CHAT, seed, negatives=0)
    oracle = Oracle(settings)

    def agent(convs):  # gold everywhere but the arguments, which lose their closing brace
        replies = oracle(convs)
        return [r[:-1] if r.startswith("{") else r for r in replies]

    results = evaluate(agent, settings)
    arguments = [t for rec in results["tasks"] for t in rec["forced"] if t["expects"] == "arguments"]
    assert arguments and all(t["verdicts"] == {"instruct": False, "understand": False} for t in arguments)
    others = [t for rec in results["tasks"] for t in rec["forced"] if t["expects"] == "choice"]
    assert all(t["verdicts"]["instruct"] and t["verdicts"]["retrieve"] for t in others)
    assert results["understand"] == 0.0 and results["success"] == 0.0
    assert 0.0 < results["instruct"] < 100.0 and results["retrieve"] == 100.0


def wrong_tool(gold: str, form: str, conversation, rng: random.Random) -> str:
    """The gold reply with the tool changed to another one; a finishing turn calls a tool too."""
    names = offered_names(conversation) or list(TOOLS_BY_NAME)
    if form == CHAT:
        chosen = parse_tool_choice(gold, names)
        if chosen.kind not in ("choice", "no_tool"):
            return gold
        other = rng.choice([n for n in TOOLS_BY_NAME if n != chosen.name])
        return f"I'll use `{other}`."
    parsed = parse_react(gold) if form == REACT else parse_json_reply(gold)
    other = rng.choice([n for n in TOOLS_BY_NAME if n != parsed.name])
    arguments = parsed.arguments if parsed.kind == "call" else {}
    if form == REACT:
        return f"Thought: {parsed.thought}\nAction: {other}\nAction Input: {dumps(arguments)}"
    return dumps({"thought": parsed.thought, "tool": other, "arguments": arguments})


@pytest.mark.parametrize("form", FORMS)
def test_an_agent_picking_the_wrong_tool_scores_0_on_retrieve_but_follows_the_format(form, seed):
    settings = settings_for(form, seed, negatives=0)
    rng = random.Random(seed)
    fallback = (lambda conv: "I'll use `calculator`.") if form == CHAT else (lambda conv: ALWAYS_CALL)
    oracle = Oracle(settings, fallback=fallback)

    def agent(convs):
        return [wrong_tool(oracle.gold(c), form, c, rng) if oracle.gold(c) is not None else fallback(c)
                for c in convs]

    results = evaluate(agent, settings)
    assert results["retrieve"] == 0.0
    assert results["instruct"] == 100.0
    assert results["success"] == 0.0
    if form != CHAT:  # the arguments are the gold ones: understanding is scored apart from retrieval
        assert results["understand"] == 100.0


def test_success_needs_the_world_changed_as_the_gold_calls_change_it(seed):
    """An agent that gives the gold final answer at once, calling nothing, is right on tasks
    that only read the world and fails those that must change it (create an event, ...)."""
    settings = settings_for(REACT, seed, split="train", tasks=60, negatives=0)
    tasks = list(generate_tasks("train", settings.tasks, settings.seed))
    answers = {t.query: t.answer for t in tasks}

    def agent(convs):
        return [f"Thought: I know it.\nFinal Answer: {answers[c[1]['content']]}" for c in convs]

    results = evaluate(agent, settings)
    read_only = {t.id for t in tasks if gold_effects(t) == {"created_events": [], "deleted_events": [], "emails_to": []}}
    assert 0 < len(read_only) < len(tasks)
    repeated = {q for q in answers if sum(t.query == q for t in tasks) > 1}  # two worlds, two answers
    for record in results["tasks"]:
        if record["query"] in repeated:
            continue
        assert record["episode"]["answer_right"]
        assert record["episode"]["success"] == (record["id"] in read_only), record["id"]


def test_a_conversation_beyond_the_context_is_a_counted_failure(seed):
    settings = settings_for(CHAT, seed)
    results = evaluate(lambda convs: [None] * len(convs), settings)
    assert results["episodes"] == {"context": N_TASKS}
    assert results["instruct"] == 0.0 and results["success"] == 0.0
    assert results["h_react"] == 0.0  # no reply is no hallucination


@pytest.mark.parametrize("phrase", [
    "I will use the weather tool to look that up.", "Let me call the calculator for this.",
    "I need to call get_weather first.", "I'll check the live data for you.", "Using the `search` tool now.",
    "Let me search the web for that.", "I'm going to use a currency converter function.",
    "I'll use `get_stock_quote`.",
])
def test_h_general_finds_a_tool_use_announced_in_plain_words(phrase, seed):
    settings = settings_for(CHAT, seed, tasks=0)
    results = evaluate(lambda convs: [phrase] * len(convs), settings)
    assert results["h_general"] == 100.0 and results["h_react"] == 0.0 and results["hscore"] == 50.0
    assert general_evidence(phrase) is not None


@pytest.mark.parametrize("reply", [
    "I can't look up live weather data, so I don't know the current conditions in Oslo.",
    "I don't have access to your orders; the shop's order page will show it.",
    "I cannot send emails myself, but here is a draft you can send.",
    "Happy birthday, Ana! Wishing you a wonderful year.", "17 * 23 = 391.",
    "Here are three tips:\n1. Use a budget.\n2. Cook at home.\n3. Walk more.",
])
def test_plain_direct_replies_are_no_hallucination(reply):
    assert general_evidence(reply) is None and react_evidence(reply) is None


def test_every_gold_negative_answer_is_a_plain_reply(seed):
    for split in ("train", "heldout"):
        for neg in generate_negatives(split, 300, seed % 10_000):
            assert general_evidence(neg.answer) is None and react_evidence(neg.answer) is None, neg.answer


def test_h_react_rules():
    assert react_evidence("Thought: easy.\nAction: calculator\nAction Input: {}") == "Thought:"
    assert react_evidence('{"tool": "get_weather", "arguments": {"city": "Oslo"}}') is not None
    assert react_evidence('{"name": "get_weather", "arguments": {}}') is not None
    assert react_evidence("Sure: the answer is 4.") is None
    # Structured output where a sentence was due, well formed or cut off: a JSON step or arguments.
    assert react_evidence('{"thought": "I need the rate", "from_cur') == "a JSON object reply"
    assert react_evidence(' {"city": "Oslo"}') == "a JSON object reply"
    assert react_evidence("Use braces like {x} in templates.") is None
    # A ReAct final answer is the format's direct answer when the prompt demands ReAct.
    final = "Thought: No tool is needed.\nFinal Answer: Hello!"
    assert react_evidence(final, react_prompted=True) is None and react_evidence(final) == "Thought:"


# ------------------------------------------------------------------------------- matching rules


def test_argument_equality_is_the_call_a_strict_api_receives():
    weather, event = TOOLS_BY_NAME["get_weather"], TOOLS_BY_NAME["create_event"]
    gold = {"title": "Standup", "date": "2025-03-04", "start_time": "09:30", "duration_minutes": 30}
    assert arguments_equal(dict(reversed(list(gold.items()))), gold, event)  # key order
    assert arguments_equal({**gold, "duration_minutes": 30.0}, gold, event)  # number formatting
    assert arguments_equal(json.dumps(gold), gold, event)  # JSON text of the object
    assert not arguments_equal({**gold, "duration_minutes": "30"}, gold, event)  # a string is not a number
    assert not arguments_equal({**gold, "title": "standup"}, gold, event)  # strings are exact
    assert not arguments_equal({**gold, "location": "Room 1"}, gold, event)  # an extra key
    assert not arguments_equal({k: v for k, v in gold.items() if k != "date"}, gold, event)
    assert arguments_equal({"city": "Oslo", "unit": "celsius"}, {"city": "Oslo"}, weather)  # the default
    assert arguments_equal({"city": "Oslo", "unit": None}, {"city": "Oslo"}, weather)  # null is left out
    assert not arguments_equal({"city": "Oslo", "unit": "fahrenheit"}, {"city": "Oslo"}, weather)
    assert arguments_equal({"x": 1e1}, {"x": 10})
    assert not arguments_equal({"x": True}, {"x": 1}) and not arguments_equal({"x": 1}, {"x": True})
    assert not arguments_equal(None, {}) and not arguments_equal("not json", {})


def test_answer_matching_reads_numbers_by_value():
    keys = ("1,234.50", "Lisbon")
    assert answer_is_right("It comes to 1234.5 in lisbon.", keys)
    assert answer_is_right("It comes to $1,234.50 in Lisbon.", keys)
    assert not answer_is_right("It comes to 11,234.50 in Lisbon.", keys)
    assert not answer_is_right("It comes to 1,234.50.", keys)
    assert answer_is_right("It is -3°C.", ("-3",)) and not answer_is_right("It is 3°C.", ("-3",))
    assert answer_is_right("That is 2025-05-03.", ("3",)) and not answer_is_right("That is 13.", ("3",))
    assert not answer_is_right(None, ("x",))


def test_a_format_slip_costs_instruction_following_only(seed):
    task = next(t for t in generate_tasks("heldout", 50, seed % 10_000) if t.calls)
    turn = forced_turns(task, REACT)[0]
    call = task.calls[0]
    sloppy = f"I should call a tool.\nThought: {call.thought}\nAction: {call.name}\nAction Input: {dumps(call.arguments)} ok"
    verdicts = score_turn(turn, sloppy, REACT)
    assert verdicts == {"instruct": False, "retrieve": True, "understand": True}


# ------------------------------------------------------------------------------- a model folder


def _load_tool():
    spec = importlib.util.spec_from_file_location("evaluate_tool", ROOT / "tools" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, module_seed) -> Path:
    """A freshly initialised micro model saved as a run's final/ folder, next to a run config
    whose corpus manifest says it was mostly ReAct."""
    run = tmp_path_factory.mktemp("run")
    model = Llama(get_preset("micro"))
    model.init_weights(seed=module_seed)
    save_hf(model, run / "final")
    shutil.copyfile(DEFAULT_TOKENIZER, run / "final" / "tokenizer.model")
    (run / "corpus.jsonl").write_text("")
    (run / "corpus.manifest.json").write_text(json.dumps({"forms": {"chat": 10, "react": 90, "instruct-json": 5}}))
    (run / "config.yaml").write_text(yaml.safe_dump({"data": ["corpus.jsonl"], "pack_len": 1024, "template": "agentflan"}))
    return run


def test_trained_form_is_read_from_the_run_corpus_manifests(run_folder, tmp_path):
    form, evidence = trained_form(run_folder / "final")
    assert form == REACT and "corpus.manifest.json" in evidence
    lone = tmp_path / "final"
    shutil.copytree(run_folder / "final", lone)
    assert trained_form(lone) is None


def test_tool_evaluates_a_model_folder_end_to_end(run_folder, tmp_path, capsys):
    def args(out: Path, batch: int) -> list[str]:
        return [str(run_folder / "final"), "--tasks", "2", "--negatives", "2", "--max-new-tokens", "6",
                "--max-steps", "2", "--batch", str(batch), "--output", str(out), "--quiet"]

    out = tmp_path / "results.json"
    assert _load_tool().main(args(out, 3)) == 0
    results = json.loads(out.read_text())
    for name in ("instruct", "retrieve", "understand", "reason", "success", "h_react", "h_general", "hscore"):
        assert name in results and (results[name] is None or 0.0 <= results[name] <= 100.0)
    assert list(results)[:8] == ["instruct", "retrieve", "understand", "reason", "overall", "success", "h_react",
                                 "h_general"]
    assert results["model"]["form"] == REACT and results["model"]["form_source"].startswith("config.yaml")
    assert results["split"] == "heldout" and results["seed"] == 0 and "torch" in results["versions"]
    assert len(results["tasks"]) == 2 and len(results["negatives"]) == 2
    assert results["generation"]["replies"] > 0
    shown = capsys.readouterr().out
    assert "hscore" in shown and "instruct" in shown
    # Greedy: the same options give the same replies, whatever the batch size.
    again = tmp_path / "again.json"
    assert _load_tool().main(args(again, 1)) == 0
    first, second = json.loads(out.read_text()), json.loads(again.read_text())
    assert first["tasks"] == second["tasks"] and first["negatives"] == second["negatives"]


@pytest.mark.parametrize("extra,message", [
    (["--tasks", "-1"], "--tasks must be >= 0"),
    (["--tasks", "0", "--negatives", "0"], "nothing to evaluate"),
    (["--max-steps", "0"], "--max-steps must be >= 1"),
    (["--tasks", "0", "--max-steps", "3"], "--max-steps bounds the tasks' episodes, and --tasks is 0"),
    (["--tasks", "100000000"], "--tasks must be at most 100,000"),
    (["--negatives", "100001"], "--negatives must be at most 100,000"),
    (["--overwrite"], "--overwrite applies to --output"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--device", "gpu0"], "unknown device"),
    (["--output", "{tmp}/missing/r.json"], "does not exist"),
    (["--output", "{tmp}/exists.json"], "exists (use --overwrite"),
])
def test_tool_reports_user_mistakes_in_one_line_before_loading_weights(extra, message, run_folder, tmp_path, capsys):
    broken = tmp_path / "final"
    shutil.copytree(run_folder / "final", broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "exists.json").write_text("{}")
    rc = _load_tool().main([str(broken)] + [a.format(tmp=tmp_path) for a in extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert (tmp_path / "exists.json").read_text() == "{}"


def test_tool_reports_a_missing_model_folder(tmp_path, capsys):
    assert _load_tool().main([str(tmp_path / "nothing")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such model folder" in err[0]


def test_settings_bound_the_draws_by_what_the_tool_world_numbers():
    from agentflan.evaluate.run import MAX_DRAWS

    EvalSettings(tasks=MAX_DRAWS, negatives=MAX_DRAWS).check()
    for too_many in ({"tasks": MAX_DRAWS + 1}, {"negatives": MAX_DRAWS + 1}):
        with pytest.raises(ValueError, match="at most 100,000"):
            EvalSettings(**too_many).check()
