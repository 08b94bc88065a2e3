"""One evaluation: facet scores, task success and hallucination on a split of the tool world.

    from agentflan.evaluate import EvalSettings, evaluate, load_agent
    results = evaluate(load_agent("runs/default/final"), EvalSettings(tasks=100, negatives=100))
    print(results["instruct"], results["success"], results["hscore"])

Three passes, each batched across tasks: the teacher-forced turns of every task
(``agentflan.evaluate.facets``), the tasks end to end (``agentflan.evaluate.episodes``)
and the negatives, one reply each (``agentflan.evaluate.hallucination``). Tasks and
negatives are ``generate_tasks(split, tasks, seed)`` and ``generate_negatives(split,
negatives, seed)``; with a greedy agent the whole result is a function of the settings.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

from agentflan.evaluate.agent import Agent
from agentflan.evaluate.episodes import EpisodeResult, failure_kinds, run_episodes
from agentflan.evaluate.facets import SCORED_FACETS, ForcedTurn, forced_turns, score_turn
from agentflan.evaluate.hallucination import general_evidence, hscore, react_evidence, react_prompted
from agentflan.toolworld.negatives import Negative, generate_negatives
from agentflan.toolworld.protocol import FORMS, render
from agentflan.toolworld.tables import SPLITS
from agentflan.toolworld.tasks import Task, generate_tasks

SCORES = ("instruct", "retrieve", "understand", "reason", "overall", "success", "h_react", "h_general", "hscore")
Progress = Callable[[str], None]


# The most tasks and negatives one evaluation draws: the tool world numbers each in five
# digits ("heldout-0-00042-..."), so more would repeat ids (and would run for days).
MAX_DRAWS = 100_000


@dataclass(frozen=True)
class EvalSettings:
    """What to evaluate: ``tasks`` tasks and ``negatives`` negatives of ``split`` drawn with
    ``seed``, in agent ``form``, each episode ending after at most ``max_steps`` tool calls."""

    split: str = "heldout"
    tasks: int = 100
    negatives: int = 100
    form: str = "chat"
    max_steps: int = 8
    seed: int = 0

    def check(self) -> None:
        """Raises ValueError naming the setting at fault."""
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {', '.join(FORMS)}, got {self.form!r}")
        if self.tasks < 0 or self.negatives < 0 or self.tasks + self.negatives == 0:
            raise ValueError(f"tasks and negatives must be >= 0 and not both 0, got {self.tasks} and {self.negatives}")
        if max(self.tasks, self.negatives) > MAX_DRAWS:
            raise ValueError(f"tasks and negatives must be at most {MAX_DRAWS:,} (the tool world's five-digit ids), "
                             f"got {self.tasks} and {self.negatives}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


def percent(right: int, total: int) -> float | None:
    """100 * right / total rounded to 0.01, None when nothing was scored."""
    return round(100.0 * right / total, 2) if total else None


@dataclass
class _Tally:
    right: int = 0
    total: int = 0

    def add(self, ok: bool) -> None:
        self.right += ok
        self.total += 1


def _facet_scores(turns: Sequence[ForcedTurn], episodes: Sequence[EpisodeResult]) -> tuple[dict, dict]:
    """(scores in percent, counts) of the facets, the T-Eval-style overall mean and success."""
    tallies = {facet: _Tally() for facet in SCORED_FACETS}
    for turn in turns:
        for facet, ok in turn.verdicts.items():
            tallies[facet].add(ok)
    success = _Tally()
    for result in episodes:
        success.add(result.success)
    scores = {facet: percent(t.right, t.total) for facet, t in tallies.items()}
    present = [s for s in scores.values() if s is not None]
    scores["overall"] = round(sum(present) / len(present), 2) if present else None
    scores["success"] = percent(success.right, success.total)
    counts = {facet: asdict(t) for facet, t in tallies.items()} | {"success": asdict(success)}
    return scores, counts


def _negative_scores(records: Sequence[dict]) -> tuple[dict, dict]:
    react, general = _Tally(), _Tally()
    for rec in records:
        react.add(rec["h_react"] is not None)
        general.add(rec["h_general"] is not None)
    h_react, h_general = percent(react.right, react.total), percent(general.right, general.total)
    score = round(hscore(h_react, h_general), 2) if h_react is not None else None
    return ({"h_react": h_react, "h_general": h_general, "hscore": score},
            {"h_react": asdict(react), "h_general": asdict(general)})


def score_negatives(agent: Agent, negatives: Sequence[Negative], form: str) -> list[dict[str, Any]]:
    """One reply to each negative's canonical prompt in ``form``, checked for both kinds of
    hallucination; returns the per-negative records."""
    prompts = [neg.prompt(form) for neg in negatives]
    replies = agent(prompts) if prompts else []
    out = []
    for neg, prompt, reply in zip(negatives, prompts, replies):
        text = reply or ""
        out.append({
            "id": neg.id, "kind": neg.kind, "template": neg.template, "novelty": neg.novelty,
            "prompt": prompt, "reply": reply, "gold_answer": neg.answer,
            "h_react": react_evidence(text, react_prompted(form, bool(neg.tools))),
            "h_general": general_evidence(text),
        })
    return out


def _task_record(task: Task, form: str, turns: Sequence[ForcedTurn], episode: EpisodeResult) -> dict[str, Any]:
    return {
        "id": task.id, "template": task.template, "novelty": task.novelty, "query": task.query,
        "tools": [t.name for t in task.tools], "answer_keys": list(task.answer_keys), "gold_answer": task.answer,
        "prompt": [m.as_chat() for m in render(task.trajectory(), form)],
        "forced": [t.record() for t in turns],
        "episode": episode.record(),
    }


def _breakdown(groups: dict[str, tuple[list, list, list]]) -> dict[str, dict]:
    out = {}
    for name, (turns, episodes, negatives) in sorted(groups.items()):
        scores, _ = _facet_scores(turns, episodes) if turns or episodes else ({}, {})
        if negatives:
            scores |= _negative_scores(negatives)[0]
        out[name] = {"tasks": len(episodes), "negatives": len(negatives), **scores}
    return out


def evaluate(agent: Agent, settings: EvalSettings = EvalSettings(), progress: Progress | None = None) -> dict[str, Any]:
    """Evaluates ``agent`` (module doc); returns the results: the scores in percent at the top
    level (``SCORES``; None where nothing was scored), ``counts``, breakdowns by novelty and
    negative kind, how the episodes ended, the settings and the per-task and per-negative
    records. Raises ValueError for bad settings before any reply is asked for."""
    settings.check()
    say = progress or (lambda _: None)
    tasks = list(generate_tasks(settings.split, settings.tasks, settings.seed))
    negatives = list(generate_negatives(settings.split, settings.negatives, settings.seed))
    timings = {}

    started = time.perf_counter()
    per_task = [forced_turns(task, settings.form) for task in tasks]
    turns = [t for ts in per_task for t in ts]
    say(f"teacher-forced turns: {len(turns)} of {len(tasks)} tasks")
    for turn, reply in zip(turns, agent([t.messages for t in turns]) if turns else []):
        score_turn(turn, reply, settings.form)
    timings["teacher_forced_s"] = round(time.perf_counter() - started, 2)

    started = time.perf_counter()
    episodes = run_episodes(agent, tasks, settings.form, settings.max_steps,
                            on_round=lambda r, live: say(f"episodes: round {r}, {live} running"))
    timings["episodes_s"] = round(time.perf_counter() - started, 2)

    started = time.perf_counter()
    say(f"negatives: {len(negatives)}")
    negative_records = score_negatives(agent, negatives, settings.form)
    timings["negatives_s"] = round(time.perf_counter() - started, 2)

    scores, counts = _facet_scores(turns, episodes)
    negative_scores, negative_counts = _negative_scores(negative_records)
    groups: dict[str, tuple[list, list, list]] = defaultdict(lambda: ([], [], []))
    for task, ts, ep in zip(tasks, per_task, episodes):
        group = groups[f"novelty={task.novelty}"]
        group[0].extend(ts)
        group[1].append(ep)
    kinds: dict[str, tuple[list, list, list]] = defaultdict(lambda: ([], [], []))
    for rec in negative_records:
        kinds[rec["kind"]][2].append(rec)
        groups[f"novelty={rec['novelty']}"][2].append(rec)
    return {
        **{key: (scores | negative_scores)[key] for key in SCORES},
        "counts": {"tasks": len(tasks), "negatives": len(negatives), "teacher_forced_turns": len(turns),
                   **counts, **negative_counts},
        "by_novelty": _breakdown(groups),
        "by_negative_kind": _breakdown(kinds),
        "episodes": failure_kinds(episodes),
        "settings": asdict(settings),
        "timings": timings,
        "tasks": [_task_record(task, settings.form, ts, ep) for task, ts, ep in zip(tasks, per_task, episodes)],
        "negatives": negative_records,
    }


def format_table(results: dict[str, Any]) -> str:
    """The scores as a printed table (percent, with right / total)."""
    counts = results["counts"]
    rows = [("instruct", "well-formed replies in the requested format", counts.get("instruct")),
            ("retrieve", "right next action (tool or finish)", counts.get("retrieve")),
            ("understand", "right arguments", counts.get("understand")),
            ("reason", "right final answer, gold history given", counts.get("reason")),
            ("overall", "mean of the four facets (T-Eval style)", None),
            ("success", "task solved end to end", counts.get("success")),
            ("h_react", "tool-call form where a plain reply was right", counts.get("h_react")),
            ("h_general", "tool use announced in plain words", counts.get("h_general")),
            ("hscore", "0.5 * ((100 - h_react) + (100 - h_general))", None)]
    lines = [f"{'score':<11} {'%':>6}  {'right/total':>11}  meaning"]
    for key, meaning, tally in rows:
        value = results.get(key)
        shown = f"{value:6.1f}" if value is not None else f"{'-':>6}"
        ratio = f"{tally['right']}/{tally['total']}" if tally else ""
        lines.append(f"{key:<11} {shown}  {ratio:>11}  {meaning}")
    return "\n".join(lines)
