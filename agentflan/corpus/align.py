"""Format alignment: trajectories and negatives written as Agent-FLAN records.

A record is ``{"id", "conversation": [{"role", "content", "loss"?, "facet"?}]}``, the
released corpus's schema: tool observations are ``user`` turns, every assistant turn
carries ``loss`` (false for in-context example turns) and the task's assistant turns carry
``facet`` (one of ``agentflan.toolworld.protocol.FACETS``), an extra message key that the
Agent-FLAN reader ignores.
"""

from __future__ import annotations

import random
from typing import Any

from agentflan.toolworld.negatives import IRRELEVANT_TOOLS, Negative
from agentflan.toolworld.protocol import CHAT, REASON, STRICT_JSON, Message, render
from agentflan.toolworld.trajectory import Trajectory

JSON = dict[str, Any]

def record(record_id: str, messages: list[Message]) -> JSON:
    """An Agent-FLAN record of rendered messages."""
    turns = []
    for m in messages:
        turn: JSON = {"role": m.role, "content": m.content}
        if m.role == "assistant":
            turn["loss"] = m.trained
            if m.facet is not None and m.trained:
                turn["facet"] = m.facet
        turns.append(turn)
    return {"id": record_id, "conversation": turns}


def instruct_eligible(trajectory: Trajectory) -> bool:
    """Whether the trajectory can be written in the strict forms: known tools, a named tool
    in every step, and a final answer."""
    return bool(trajectory.tools) and trajectory.final is not None and \
        all(s.action is not None for s in trajectory.steps)


def aligned(trajectory: Trajectory, form: str, rng: random.Random, strict: bool = False) -> list[Message]:
    """The trajectory in ``form`` (``chat``, ``react`` or ``json``) with drawn phrasings."""
    if form == STRICT_JSON and not instruct_eligible(trajectory):
        raise ValueError(f"{trajectory.id}: the strict JSON form needs known tools and named calls")
    return render(trajectory, form, rng, strict=strict)


def negative_messages(negative: Negative, rng: random.Random) -> list[Message]:
    """A negative sample in the chat form (``Negative.prompt`` with drawn phrasings; kind (a)
    drops its plain system prompt 30% of the time), then the direct answer."""
    msgs = [Message(m["role"], m["content"]) for m in negative.prompt(CHAT, rng)]
    if negative.kind != IRRELEVANT_TOOLS and rng.random() < 0.3:
        msgs = msgs[1:]
    return msgs + [Message("assistant", negative.answer, REASON)]

