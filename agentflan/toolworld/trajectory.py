"""An agent trajectory independent of how it is written: the query, the steps (thought,
tool call, observation) and the final answer.

The tool world's tasks become trajectories (``agentflan.toolworld.tasks``), trajectories
are written as raw AgentInstruct / ToolBench records (``agentflan.toolworld.raw``), raw
records are read back into trajectories (``agentflan.corpus.parse``) and trajectories are
rendered in the protocol's forms (``agentflan.toolworld.protocol``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

JSON = dict[str, Any]


@dataclass(frozen=True)
class Step:
    """One Thought / Action / Action Input / Observation step.

    ``action`` is the tool name, or None for a free-form command (AgentInstruct's
    ``Act: go to shelf 1``), whose text is then ``arguments``. ``arguments`` is the parsed
    JSON object, the input text verbatim when it is not a JSON object, or None when the
    action takes no input. ``observation`` is the environment's reply as written in the
    source, None when the trajectory ends on this step. ``raw`` is the assistant text as the
    source wrote it (kept for the ReAct form), empty for generated steps.
    """

    thought: str
    action: str | None
    arguments: JSON | str | None
    observation: str | None
    raw: str = ""


@dataclass(frozen=True)
class Final:
    """The closing turn: a final answer, or giving up (ToolBench's ``give_up_and_restart``)."""

    thought: str
    answer: str
    gave_up: bool = False
    raw: str = ""


@dataclass(frozen=True)
class Turn:
    """A message outside the task proper (an in-context example turn), kept verbatim."""

    role: str  # "user" | "assistant"
    content: str


@dataclass(frozen=True)
class Trajectory:
    """``tools`` are function specs (``{"name", "description", "parameters"}``) when known;
    ``instructions`` is the source's own system text (None for generated trajectories);
    ``context`` the in-context example turns before the query, never trained."""

    id: str
    query: str
    steps: tuple[Step, ...]
    final: Final | None
    tools: tuple[JSON, ...] | None = None
    instructions: str | None = None
    context: tuple[Turn, ...] = field(default=())

    @property
    def tool_names(self) -> tuple[str, ...]:
        return tuple(t["name"] for t in self.tools) if self.tools else ()
