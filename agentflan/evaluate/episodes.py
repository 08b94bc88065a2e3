"""End-to-end task success: the agent runs each task in its tool world, batched.

Every task's ``protocol.Episode`` starts at once; each round, the conversations of all
live episodes go to the agent as one batch, each reply is fed to its episode (which runs
any call it completes in the task's world and adds the observation), and finished
episodes leave. An episode ends at a final answer, at a malformed reply, at a
conversation the agent cannot continue (beyond its context) or after ``max_steps`` tool
calls.

A task succeeds when the final answer is right (``matching.answer_is_right``) and the
world is left as the gold calls leave it (``world_effects``): the same calendar events
created (title, date, start and end) and deleted, and email sent to the same recipients
(subjects and bodies are free text). Reading the right answer out of thin air, or claiming
"Done" without creating the event, is not success.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from agentflan.evaluate.agent import Agent
from agentflan.evaluate.matching import answer_is_right
from agentflan.toolworld.protocol import Episode
from agentflan.toolworld.tasks import Task
from agentflan.toolworld.world import World


def world_effects(world: World) -> dict[str, list]:
    """What the calls changed in ``world``, order-free: events created (title, date, start,
    end), events deleted (ids) and the recipients of email sent."""
    return {
        "created_events": sorted([e["title"], e["date"], e["start_time"], e["end_time"]]
                                 for e in world.created_events.values()),
        "deleted_events": sorted(world.deleted_events),
        "emails_to": sorted(m["to"] for m in world.outbox),
    }


def gold_effects(task: Task) -> dict[str, list]:
    """``world_effects`` after the task's gold calls, in a fresh copy of its world."""
    world = task.world()
    for call in task.calls:
        world.call(call.name, call.arguments, task.tools)
    return world_effects(world)


@dataclass
class EpisodeResult:
    """One task run end to end."""

    task: Task
    episode: Episode
    answer_right: bool = False
    effects_right: bool = False
    failure: str | None = None

    @property
    def success(self) -> bool:
        return self.answer_right and self.effects_right

    def record(self) -> dict[str, Any]:
        return {
            "messages": self.episode.messages,
            "calls": [{"name": c.name, "arguments": c.arguments, "observation": c.observation}
                      for c in self.episode.calls],
            "final_answer": self.episode.final_answer,
            "failure": self.failure,
            "answer_right": self.answer_right,
            "effects_right": self.effects_right,
            "success": self.success,
        }


NO_REPLY = "no reply: the conversation does not fit the model's context"


def run_episodes(agent: Agent, tasks: Sequence[Task], form: str, max_steps: int,
                 on_round: Callable[[int, int], None] | None = None) -> list[EpisodeResult]:
    """Runs every task to its end (module doc); ``on_round(round, live)`` reports progress."""
    results = [EpisodeResult(t, Episode(t.query, t.tools, t.world(), form, max_steps=max_steps)) for t in tasks]
    live = list(results)
    rounds = 0
    while live:
        rounds += 1
        if on_round is not None:
            on_round(rounds, len(live))
        replies = agent([r.episode.messages for r in live])
        if len(replies) != len(live):
            raise RuntimeError(f"the agent gave {len(replies)} replies to {len(live)} conversations")
        for result, reply in zip(live, replies):
            if reply is None:
                result.failure = NO_REPLY
                continue
            result.episode.feed(reply)
            result.failure = result.episode.failure
        live = [r for r in live if not r.episode.done and r.failure is None]
    for result in results:
        ep = result.episode
        result.answer_right = answer_is_right(ep.final_answer, result.task.answer_keys)
        result.effects_right = world_effects(ep.world) == gold_effects(result.task)
    return results


def failure_kinds(results: Sequence[EpisodeResult]) -> dict[str, int]:
    """How the episodes ended, counted: ``answered`` or the failure's kind."""
    kinds: Counter = Counter()
    for r in results:
        if r.failure is None:
            kinds["answered"] += 1
        elif r.failure == NO_REPLY:
            kinds["context"] += 1
        elif r.failure.startswith("no final answer"):
            kinds["turn_limit"] += 1
        else:
            kinds["malformed"] += 1
    return dict(sorted(kinds.items()))
