"""The tool world: executors give right answers and API-like errors, tasks are solved by
their gold calls, the train / held-out split is disjoint by template and entity, and the
agent protocol's parsers and Episode agree with its renderer."""

import datetime as dt
import json
import random
import re
from fractions import Fraction

import pytest

from agentflan.toolworld import (
    CHAT,
    FORMS,
    HELD_OUT_TEMPLATES,
    REACT,
    STRICT_JSON,
    TOOLS,
    Episode,
    World,
    generate_negatives,
    generate_tasks,
    is_error,
    parse_arguments,
    parse_json_reply,
    parse_react,
    parse_tool_choice,
    render,
    teacher_forcing,
)
from agentflan.toolworld.catalogue import evaluate_expression, monthly_payment
from agentflan.toolworld.negatives import HELD_OUT_NEGATIVE_TEMPLATES, IRRELEVANT_TOOLS, KINDS, NO_TOOLS
from agentflan.toolworld.protocol import CHOICE_REPLY, ELICIT_TOOL, FACETS, NO_TOOL_REPLY
from agentflan.toolworld.recovery import trajectory_with_recovery
from agentflan.toolworld.tables import COUNTRIES, CURRENCIES, HELD_OUT, TIMEZONES, UNITS, WORDS, is_held_out
from agentflan.toolworld.tasks import TEMPLATES, build_task

# ----------------------------------------------------------------------------- executors


_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b,
        "%": lambda a, b: a % b, "//": lambda a, b: Fraction(a // b), "**": lambda a, b: a ** int(b)}


def _random_expression(rng: random.Random, depth: int = 0) -> tuple[str, Fraction]:
    """(expression, its exact value); raises ZeroDivisionError where the value has none."""
    if depth > 2 or rng.random() < 0.3:
        text = str(rng.choice([rng.randint(0, 999), round(rng.uniform(0, 99), rng.randint(1, 3))]))
        return text, Fraction(text)
    op = rng.choice(list(_OPS))
    left, a = _random_expression(rng, depth + 1)
    right, b = (str(k := rng.randint(0, 4)), Fraction(k)) if op == "**" else _random_expression(rng, depth + 1)
    def operand(t: str) -> str:
        return f"({t})" if " " in t else t

    return f"{operand(left)} {op} {operand(right)}", _OPS[op](a, b)


def test_calculator_is_exact(seed: int) -> None:
    rng = random.Random(seed)
    world = World(seed)
    checked = 0
    for _ in range(300):
        try:
            expr, expected = _random_expression(rng)
        except ZeroDivisionError:
            continue
        obs = world.call("calculator", {"expression": expr})
        if is_error(obs):  # a result too large to print
            assert "too large" in obs["error"]["message"], (expr, obs)
            continue
        assert evaluate_expression(expr) == expected, expr
        # Six decimals, within a double's precision for large values (JSON numbers are doubles).
        tolerance = Fraction(1, 2 * 10**6) + abs(expected) * Fraction(1, 2**50)
        assert abs(Fraction(str(obs["result"])) - expected) <= tolerance, (expr, obs)
        checked += 1
    assert checked > 100
    assert world.call("calculator", {"expression": "7 / (3 - 3)"})["error"]["message"] == "calculator: division by zero"


def test_conversions_match_definitions_and_invert(seed: int) -> None:
    rng = random.Random(seed)
    world = World(seed)
    exact = [(1, "mi", "km", 1.609344), (1, "in", "cm", 2.54), (1, "lb", "g", 453.5924), (100, "C", "F", 212),
             (0, "C", "K", 273.15), (-40, "F", "C", -40), (1, "gal", "floz", 128), (1, "yd", "ft", 3)]
    for value, a, b, result in exact:
        assert world.call("convert_units", {"value": value, "from_unit": a, "to_unit": b})["result"] == \
            pytest.approx(result, rel=1e-5)
    for _ in range(50):
        a, b = rng.sample([u for u, v in UNITS.items() if v[0] == "length"], 2)
        value = round(rng.uniform(1, 1000), 2)
        there = world.call("convert_units", {"value": value, "from_unit": a, "to_unit": b})["result"]
        back = world.call("convert_units", {"value": there, "from_unit": b, "to_unit": a})["result"]
        assert back == pytest.approx(value, rel=1e-3, abs=1e-3)
    for _ in range(30):
        a, b = rng.sample(list(CURRENCIES), 2)
        amount = rng.randint(1, 10000)
        obs = world.call("convert_currency", {"amount": amount, "from_currency": a, "to_currency": b})
        assert obs["rate"] == pytest.approx(CURRENCIES[b][0] / CURRENCIES[a][0], rel=1e-4)
        assert obs["converted"] == pytest.approx(amount * obs["rate"], abs=0.006)


def test_dates_formulas_and_lookups(seed: int) -> None:
    rng = random.Random(seed)
    world = World(seed)
    for _ in range(30):
        start = dt.date(2000, 1, 1) + dt.timedelta(days=rng.randrange(20000))
        days = rng.randint(-3000, 3000)
        obs = world.call("add_days", {"date": start.isoformat(), "days": days})
        assert obs["date"] == (start + dt.timedelta(days=days)).isoformat()
        assert obs["weekday"] == (start + dt.timedelta(days=days)).strftime("%A")
        back = world.call("days_between", {"start_date": start.isoformat(), "end_date": obs["date"]})
        assert back["days"] == days
    # A textbook annuity: 200,000 at 6% over 30 years costs 1,199.10 a month.
    assert world.call("loan_payment", {"principal": 200000, "annual_rate_percent": 6, "years": 30})[
        "monthly_payment"] == 1199.1
    assert monthly_payment(1200, 0, 1) == 100
    assert world.call("calculate_bmi", {"weight_kg": 70, "height_cm": 175}) == {"bmi": 22.9, "category": "normal weight"}
    country, capital, continent, currency = rng.choice(COUNTRIES)
    assert world.call("get_country_info", {"country": country.upper()}) == \
        {"country": country, "capital": capital, "continent": continent, "currency": currency}
    word = rng.choice(WORDS)
    assert world.call("define_word", {"word": word[0]})["definition"] == word[2]
    city, zone, offset = rng.choice(TIMEZONES)
    local = dt.datetime.strptime(world.call("get_current_time", {"timezone": zone})["local_time"], "%Y-%m-%d %H:%M")
    assert local == (world.now + dt.timedelta(minutes=offset)).replace(second=0, microsecond=0)


def test_sql_runs_on_the_employees_table(seed: int) -> None:
    world = World(seed)
    dept = random.Random(seed).choice(sorted({row[1] for row in world.employees}))
    rows = [r for r in world.employees if r[1] == dept]
    obs = world.call("query_database", {"sql": f"SELECT COUNT(*) AS n, MAX(salary) AS top FROM employees "
                                               f"WHERE department = '{dept}'"})
    assert obs == {"rows": [{"n": len(rows), "top": max(r[2] for r in rows)}]}
    obs = world.call("query_database", {"sql": "SELECT name FROM employees ORDER BY hire_date, name"})
    assert obs["truncated"] is True and len(obs["rows"]) == 20
    assert obs["rows"][0]["name"] == min(world.employees, key=lambda r: (r[3], r[0]))[0]
    for sql, message in [("DELETE FROM employees", "read-only"), ("SELECT nope FROM employees", "no such column"),
                         ("SELECT 1; SELECT 2", "one statement")]:
        obs = world.call("query_database", {"sql": sql})
        assert obs["error"]["type"] == "invalid_value" and message in obs["error"]["message"], obs


def test_calendar_keeps_state_and_reads_do_not_depend_on_call_order(seed: int) -> None:
    rng = random.Random(seed)
    day = (dt.date(2024, 1, 1) + dt.timedelta(days=rng.randrange(700))).isoformat()
    world = World(seed)
    before = world.call("list_events", {"date": day})["events"]
    created = world.call("create_event", {"title": "Dentist", "date": day, "start_time": "07:05",
                                          "duration_minutes": 40})
    assert created["status"] == "confirmed" and created["end_time"] == "07:45"
    after = world.call("list_events", {"date": day})["events"]
    assert [e["event_id"] for e in after] == [created["event_id"]] + [e["event_id"] for e in before]
    target = rng.choice(after)["event_id"]
    assert world.call("delete_event", {"event_id": target}) == {"status": "deleted", "event_id": target}
    assert target not in [e["event_id"] for e in world.call("list_events", {"date": day})["events"]]
    assert world.call("delete_event", {"event_id": target})["error"]["type"] == "not_found"
    # A fresh world of the same seed answers reads the same whatever was asked before.
    names = ["get_weather", "get_stock_quote", "search_flights"]
    calls = [("get_weather", {"city": "Lisbon"}), ("get_stock_quote", {"symbol": "AAPL"}),
             ("search_flights", {"origin": "Oslo", "destination": "Lima", "date": day})]
    first = {n: World(seed).call(n, a) for n, a in calls}
    shuffled = World(seed)
    rng.shuffle(calls)
    assert {n: shuffled.call(n, a) for n, a in calls} == first and set(first) == set(names)
    assert World(seed + 1).call("get_weather", {"city": "Lisbon"}) != first["get_weather"] or \
        World(seed + 2).call("get_weather", {"city": "Lisbon"}) != first["get_weather"]


@pytest.mark.parametrize("name, arguments, kind, words", [
    ("get_weather", {}, "missing_parameter", "'city'"),
    ("get_weather", {"city": 3}, "invalid_type", "must be a string"),
    ("get_weather", {"city": "Lisbon", "unit": "kelvin"}, "invalid_value", "celsius, fahrenheit"),
    ("get_weather", {"location": "Lisbon"}, "unknown_parameter", "'location'"),
    ("get_weather", {"city": "Atlantis"}, "not_found", "Atlantis"),
    ("get_weather", '{"city": "Lisbon"', "invalid_arguments", "not valid JSON"),
    ("get_weather", "[1, 2]", "invalid_arguments", "JSON object"),
    ("convert_units", {"value": "5", "from_unit": "km", "to_unit": "mi"}, "invalid_type", "must be a number"),
    ("convert_units", {"value": 5, "from_unit": "kilometres", "to_unit": "mi"}, "invalid_value", "unknown unit"),
    ("convert_units", {"value": 5, "from_unit": "km", "to_unit": "kg"}, "invalid_value", "cannot convert"),
    ("add_days", {"date": "2024-02-01", "days": 2.5}, "invalid_type", "integer"),
    ("create_event", {"title": "x", "date": "March 3, 2024", "start_time": "10:00"}, "invalid_value", "YYYY-MM-DD"),
    ("get_current_time", {"timezone": "Tokyo"}, "invalid_value", "IANA"),
    ("lookup_order", {"order_id": "12345"}, "invalid_value", "A12345"),
    ("send_email", {"to": "bob", "subject": "s", "body": "b"}, "invalid_value", "email address"),
    ("calculator", {"expression": "2 ** 0.5"}, "invalid_value", "exponents"),
    ("calculator", {"expression": "__import__('os')"}, "invalid_value", "unsupported"),
    ("no_such_tool", {}, "unknown_tool", "no tool named"),
])
def test_bad_calls_return_the_error_an_api_would(name: str, arguments: object, kind: str, words: str) -> None:
    world = World(0)
    obs = world.call(name, arguments)
    assert set(obs) == {"error"} and obs["error"]["type"] == kind and words in obs["error"]["message"], obs
    assert world.log[-1].observation == obs


def test_calls_outside_the_offered_tools_are_unknown() -> None:
    tools = [t for t in TOOLS if t.name == "calculator"]
    obs = World(0).call("get_weather", {"city": "Lisbon"}, tools)
    assert obs["error"]["type"] == "unknown_tool" and "calculator" in obs["error"]["message"]


# ----------------------------------------------------------------------------- tasks and the split


def test_every_template_is_solved_by_its_gold_calls(seed: int) -> None:
    rng = random.Random(seed)
    for template in TEMPLATES:
        for k in range(3):
            novelty = "entity" if template.has_entity and not template.held_out and k == 2 else None
            task = build_task(template, random.Random(rng.random()), "train", f"t{k}", novelty)
            assert task.answer_keys and task.answer_is_right(task.answer), task
            assert not task.answer_is_right(""), task
            names = {t.name for t in task.tools}
            assert {c.name for c in task.calls} <= names
            trajectory = task.trajectory()
            errors = [json.loads(s.observation) for s in trajectory.steps if "error" in json.loads(s.observation)]
            assert not errors or task.template == "order_status", (task.id, errors)
            assert trajectory.tools == task.tool_specs() and trajectory.final.answer == task.answer


def _names(text: str) -> set[str]:
    """Held-out names of four letters or more appearing as words in ``text``."""
    return {n for n in HELD_OUT if len(n) >= 4 and re.search(rf"(?<![\w/]){re.escape(n)}(?![\w/])", text)}


def test_split_is_disjoint_by_template_and_entity(seed: int) -> None:
    train = list(generate_tasks("train", 400, seed))
    assert all(t.template not in HELD_OUT_TEMPLATES and t.novelty is None for t in train)
    for t in train:
        assert not any(is_held_out(e) for e in t.entities), t.id
        text = " ".join([t.query, t.answer] + [json.dumps(c.arguments, ensure_ascii=False) for c in t.calls])
        assert not _names(text), (t.id, _names(text))
    held = list(generate_tasks("heldout", 400, seed))
    by_novelty = {n: [t for t in held if t.novelty == n] for n in ("template", "entity")}
    assert all(len(v) > 100 for v in by_novelty.values())
    for t in by_novelty["template"]:
        assert t.template in HELD_OUT_TEMPLATES and not any(is_held_out(e) for e in t.entities), t.id
    for t in by_novelty["entity"]:
        assert t.template not in HELD_OUT_TEMPLATES and any(is_held_out(e) for e in t.entities), t.id
    assert {t.template for t in by_novelty["template"]} == HELD_OUT_TEMPLATES
    # Pure functions of (split, seed, index), whatever n is.
    assert [t.query for t in generate_tasks("heldout", 50, seed)] == [t.query for t in held[:50]]
    assert [t.query for t in generate_tasks("heldout", 50, seed + 1)] != [t.query for t in held[:50]]


def test_negatives_both_kinds_and_their_split(seed: int) -> None:
    train = list(generate_negatives("train", 300, seed))
    held = list(generate_negatives("heldout", 300, seed))
    for split in (train, held):
        assert [n.kind for n in split] == [KINDS[i % 2] for i in range(len(split))]
        for n in split:
            assert (n.kind == NO_TOOLS) == (not n.tools), n.id
            assert n.answer and "`" not in n.answer and "Action:" not in n.answer
    for n in train:
        assert n.template not in HELD_OUT_NEGATIVE_TEMPLATES and not any(is_held_out(e) for e in n.entities), n.id
        assert not _names(n.query + " " + n.answer), n.id
    for n in held:
        if n.novelty == "template":
            assert n.template in HELD_OUT_NEGATIVE_TEMPLATES and not any(is_held_out(e) for e in n.entities)
        else:
            assert n.template not in HELD_OUT_NEGATIVE_TEMPLATES and any(is_held_out(e) for e in n.entities), n.id
    assert {n.kind for n in held if n.novelty == "template"} == set(KINDS)
    # Kind (b) offers tools unrelated to the query: never the one a tool task would use.
    for n in train + held:
        if n.kind == IRRELEVANT_TOOLS and n.template == "sort_numbers":
            assert "calculator" not in {t.name for t in n.tools}


def test_recovery_trajectories_hold_a_real_error_then_the_gold_call(seed: int) -> None:
    rng = random.Random(seed)
    kinds = set()
    for task in generate_tasks("train", 150, seed):
        traj = trajectory_with_recovery(task, rng)
        assert len(traj.steps) == len(task.calls) + 1, task.id
        observations = [json.loads(s.observation) for s in traj.steps]
        bad = next(i for i, o in enumerate(observations) if isinstance(o.get("error"), dict))
        kinds.add(observations[bad]["error"]["type"])
        assert traj.steps[bad].action == traj.steps[bad + 1].action
        assert traj.steps[bad].arguments != traj.steps[bad + 1].arguments
        assert observations[bad]["error"]["message"] in traj.steps[bad + 1].thought or \
            "correct" in traj.steps[bad + 1].thought
        gold = [(s.action, s.arguments) for i, s in enumerate(traj.steps) if i != bad]
        assert gold == [(c.name, c.arguments) for c in task.calls]
        assert traj.final.answer == task.answer
    assert {"missing_parameter", "unknown_parameter", "invalid_value"} <= kinds


# ----------------------------------------------------------------------------- protocol


def test_replies_parse_to_what_was_rendered(seed: int) -> None:
    rng = random.Random(seed)
    for task in generate_tasks("train", 60, seed):
        traj = task.trajectory()
        for form in FORMS:
            msgs = render(traj, form, random.Random(rng.random()))
            golds = [m for m in msgs if m.role == "assistant"]
            for m in golds:
                if form == REACT:
                    parsed = parse_react(m.content)
                elif form == STRICT_JSON:
                    parsed = parse_json_reply(m.content)
                elif m.facet == "retrieve":
                    parsed = parse_tool_choice(m.content, [t.name for t in task.tools])
                elif m.facet == "understand":
                    parsed = parse_arguments(m.content)
                else:
                    continue
                assert parsed.kind == m.gold.kind and parsed.name == m.gold.name, (form, m, parsed)
                assert parsed.arguments == m.gold.arguments and parsed.answer == m.gold.answer, (form, m, parsed)
            assert {m.facet for m in golds} <= set(FACETS)


@pytest.mark.parametrize("reply, reason", [
    ("Action: calculator\nAction Input: {}", "no Thought"),
    ("Thought: x\nAction: calculator\nAction Input: {\"expression\": \"1+\"", "not valid JSON"),
    ("Thought: x\nAction: calculator\nAction Input: [1]", "not a JSON object"),
    ("Thought: x\nAction: calculator\nAction Input: {} and more", "not valid JSON"),
    ("Thought: x\nAction: calculator", "expected Thought, Action, Action Input"),
    ("Thought: x\nFinal Answer: 3\nAction: calculator\nAction Input: {}", "both"),
    ("Thought: x\nAction: calculator\nAction Input: {}\nObservation: {}", "Observation"),
    ("Sure! Thought: x\nFinal Answer: 3", "before the first label"),
    ("Thought: x", "no Action or Final Answer"),
])
def test_malformed_react_replies_say_why(reply: str, reason: str) -> None:
    parsed = parse_react(reply)
    assert parsed.kind == "malformed" and reason in parsed.reason, parsed


def test_chat_replies_and_strict_json() -> None:
    names = ["get_weather", "calculator"]
    for template in CHOICE_REPLY:
        assert parse_tool_choice(template.format(name="calculator"), names).name == "calculator"
    for text in NO_TOOL_REPLY:
        assert parse_tool_choice(text, names).kind == "no_tool"
    assert parse_tool_choice("I would use get_weather here.", names).name == "get_weather"
    assert parse_tool_choice("Paris is nice.", names).kind == "malformed"
    assert parse_arguments('```json\n{"city": "Oslo"}\n```').kind == "malformed"
    assert parse_arguments('```json\n{"city": "Oslo"}\n```', lenient=True).arguments == {"city": "Oslo"}
    assert parse_json_reply('{"thought": "t", "final_answer": "4"}').answer == "4"
    assert parse_json_reply('{"thought": "t", "tool": "calculator", "arguments": {"expression": "2"}}').name == \
        "calculator"
    assert parse_json_reply('{"thought": "t", "tool": "calculator"}').kind == "malformed"
    assert parse_react('Thought: done\nAction: Finish\nAction Input: {"return_type": "give_answer", '
                       '"final_answer": "4"}').answer == "4"


@pytest.mark.parametrize("form", FORMS)
def test_episode_driven_with_gold_replies_reproduces_the_rendering(form: str, seed: int) -> None:
    rng = random.Random(seed)
    for task in generate_tasks("heldout", 25, seed):
        traj = trajectory_with_recovery(task, rng) if rng.random() < 0.3 else task.trajectory()
        msgs = render(traj, form)
        episode = Episode(task.query, task.tools, task.world(), form)
        for m in msgs:
            if m.role == "assistant":
                assert not episode.done
                episode.feed(m.content)
        assert episode.failure is None and episode.final_answer == task.answer
        assert episode.messages == [m.as_chat() for m in msgs]
        assert [(c.name, c.arguments) for c in episode.calls] == [(s.action, s.arguments) for s in traj.steps]
        forced = list(teacher_forcing(task.trajectory(), form))
        assert forced and all(f.messages[-1]["role"] == "user" for f in forced)
        assert [f.gold.name for f in forced if f.gold.kind in ("call", "choice")] == [c.name for c in task.calls]


def test_episode_stops_on_malformed_replies_and_step_limits() -> None:
    task = next(generate_tasks("train", 1, 0))
    episode = Episode(task.query, task.tools, task.world(), CHAT)
    episode.feed("Let me think.")
    assert episode.expects == "choice" and episode.messages[-1]["content"] == ELICIT_TOOL[0]
    episode.feed(f"I'll use `{task.calls[0].name}`.")
    episode.feed("{not json")
    assert episode.done and "arguments" in episode.failure and "not valid JSON" in episode.failure
    with pytest.raises(RuntimeError, match="over"):
        episode.feed("{}")
    looping = Episode(task.query, task.tools, task.world(), REACT, max_steps=3)
    while not looping.done:
        looping.feed('Thought: again\nAction: calculator\nAction Input: {"expression": "1"}')
    assert len(looping.calls) == 3 and "3 tool calls" in looping.failure
    offered = "calculator" in {t.name for t in task.tools}
    assert all(c.observation == {"expression": "1", "result": 1} if offered else
               c.observation["error"]["type"] == "unknown_tool" for c in looping.calls)
