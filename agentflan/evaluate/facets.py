"""Step-by-step facet scores with the gold history given (T-Eval's teacher forcing).

Before every assistant turn of a task's gold rendering (``protocol.teacher_forcing``) the
agent is shown the gold conversation so far and replies once; the reply is scored on the
facets that turn exercises, so one early mistake does not cost every later step (T-Eval,
arXiv 2312.14033, evaluates each sub-process this way). The facets, named as T-Eval names
them:

``instruct``    the reply is well formed in the requested format (the strict reading of
                ``agentflan.evaluate.reading``): every react / json turn; in the chat form
                the turns that have a format, the tool choice and the JSON arguments.
``retrieve``    the reply takes the right next action: calls the gold tool, or, where the
                gold turn finishes (a final answer, the chat form's "no tool is needed"),
                calls none.
``understand``  the reply's arguments make the gold call (``matching.arguments_equal``):
                the react / json turns that call a tool, the chat form's arguments turns.
``reason``      the final answer is right (``matching.answer_is_right``): the turn that
                gives it. Thoughts are recorded but not scored (T-Eval scores them by
                sentence-embedding similarity, which needs a model this project does not ship).

Content facets use the lenient reading, so a format slip counts once, in ``instruct``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agentflan.evaluate.matching import answer_is_right, arguments_equal
from agentflan.evaluate.reading import ANSWER, ARGUMENTS, CHOICE, STEP, THOUGHT, Reading, read_reply, reply_dict
from agentflan.toolworld.catalogue import TOOLS_BY_NAME
from agentflan.toolworld.protocol import CHAT, INSTRUCT, REASON, RETRIEVE, UNDERSTAND, Reply, teacher_forcing
from agentflan.toolworld.tasks import Task

SCORED_FACETS = (INSTRUCT, RETRIEVE, UNDERSTAND, REASON)
_EXPECTS = {"thought": THOUGHT, "choice": CHOICE, "no_tool": CHOICE, "arguments": ARGUMENTS}


@dataclass
class ForcedTurn:
    """One teacher-forced turn of a task: the prompt, what it asks for and its gold content."""

    task: Task
    turn: int  # index of the assistant turn in the gold conversation
    messages: list[dict[str, str]]  # the gold history before it, system first
    expects: str  # reading.EXPECTS of the form
    gold: Reply
    tool: str | None  # the gold call's tool, for arguments and calls
    reply: str | None = None
    verdicts: dict[str, bool] = field(default_factory=dict)
    reading: Reading | None = None

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"turn": self.turn, "expects": self.expects, "gold": reply_dict(self.gold),
                               "reply": self.reply, "verdicts": self.verdicts}
        if self.reading is not None:
            out["parsed"] = reply_dict(self.reading.lenient)
            if not self.reading.well_formed:
                out["format_error"] = self.reading.strict.reason
        return out


def forced_turns(task: Task, form: str) -> list[ForcedTurn]:
    """The task's teacher-forced turns in ``form``, in order."""
    out = []
    tool = None
    for forced in teacher_forcing(task.trajectory(), form):
        gold = forced.gold
        if gold.kind == "choice" or gold.kind == "call":
            tool = gold.name
        if form == CHAT:
            expects = _EXPECTS.get(gold.kind, ANSWER)
        else:
            expects = STEP
        out.append(ForcedTurn(task, len(forced.messages), forced.messages, expects, gold,
                              tool if gold.kind in ("arguments", "call") else None))
    return out


def score_turn(turn: ForcedTurn, reply: str | None, form: str) -> dict[str, bool]:
    """Scores one reply on the facets its turn exercises (module doc); stores reply and verdicts."""
    names = [t.name for t in turn.task.tools]
    reading = read_reply(reply, form, turn.expects, names)
    got, gold = reading.lenient, turn.gold
    verdicts: dict[str, bool] = {}
    if form != CHAT or turn.expects in (CHOICE, ARGUMENTS):
        verdicts[INSTRUCT] = reading.well_formed
    if gold.kind in ("call", "choice"):
        verdicts[RETRIEVE] = got.kind in ("call", "choice") and got.name == gold.name
    elif gold.kind == "no_tool" or (gold.kind == "final" and form != CHAT):
        verdicts[RETRIEVE] = got.kind in ("no_tool", "final")
    if gold.kind in ("call", "arguments"):
        tool = TOOLS_BY_NAME.get(turn.tool or "")
        verdicts[UNDERSTAND] = got.kind in ("call", "arguments") and arguments_equal(got.arguments, gold.arguments, tool)
    if gold.kind == "final":
        verdicts[REASON] = got.kind == "final" and answer_is_right(got.answer, turn.task.answer_keys)
    turn.reply, turn.reading, turn.verdicts = reply, reading, verdicts
    return verdicts
