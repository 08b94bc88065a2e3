"""Reading an agent's reply twice: strictly, as the protocol demands (instruction following),
and leniently, for what it says (retrieval, understanding, reasoning).

A format slip should cost a reply its instruction-following score once, not every facet:
``Thought: ...\\nAction: get_weather\\nAction Input: {"city": "Oslo"} Done.`` is malformed
ReAct, yet it names the right tool with the right arguments. So each reply gets two
readings (``Reading``): ``strict`` by the protocol's own parsers
(``agentflan.toolworld.protocol``), ``lenient`` by these rules:

* ReAct: the strict reading when it is well formed; else an ``Action:`` line naming a tool
  with the first JSON object after ``Action Input:`` is a call, and text after
  ``Final Answer:`` is a final answer.
* strict JSON: the first JSON object anywhere in the text, read as a call (``tool`` or
  ``name`` with ``arguments``) or a final answer (``final_answer``); other keys ignored.
* chat: a tool choice as ``parse_tool_choice`` reads it (it is already lenient), the first
  JSON object anywhere in an arguments reply, the text itself as a thought or an answer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Sequence

from agentflan.toolworld.protocol import (
    CHAT,
    REACT,
    STRICT_JSON,
    Reply,
    malformed,
    parse_arguments,
    parse_json_reply,
    parse_react,
    parse_tool_choice,
)

# What a chat-form reply answers: the elicit statement before it.
THOUGHT, CHOICE, ARGUMENTS, ANSWER = "thought", "choice", "arguments", "answer"
STEP = "step"  # a react / json reply: a call or a final answer
EXPECTS = {CHAT: (THOUGHT, CHOICE, ARGUMENTS, ANSWER), REACT: (STEP,), STRICT_JSON: (STEP,)}

_ACTION = re.compile(r"^[ \t]*Action[ \t]*:[ \t]*(\S[^\n]*?)[ \t]*$", re.M | re.I)
_ACTION_INPUT = re.compile(r"^[ \t]*Action[ \t]*Input[ \t]*:", re.M | re.I)
_FINAL = re.compile(r"^[ \t]*Final[ \t]*Answer[ \t]*:[ \t]*", re.M | re.I)
_NEXT_LABEL = re.compile(r"^[ \t]*(Thought|Action|Action Input|Observation|Final Answer)[ \t]*:", re.M | re.I)


@dataclass(frozen=True)
class Reading:
    """A reply read for its format (``strict``) and for its content (``lenient``)."""

    strict: Reply
    lenient: Reply

    @property
    def well_formed(self) -> bool:
        return self.strict.kind != "malformed"


def first_json_object(text: str, start: int = 0) -> dict[str, Any] | None:
    """The first JSON object in ``text`` at or after ``start``, or None."""
    decoder = json.JSONDecoder()
    at = text.find("{", start)
    while at >= 0:
        try:
            value, _ = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict):
            return value
        at = text.find("{", at + 1)
    return None


def _section_after(label: re.Match, text: str) -> str:
    rest = text[label.end():]
    nxt = _NEXT_LABEL.search(rest)
    return (rest[:nxt.start()] if nxt else rest).strip()


def lenient_react(text: str) -> Reply:
    """A ReAct reply read for its content (rules in the module doc)."""
    strict = parse_react(text)
    if strict.kind != "malformed":
        return strict
    action = _ACTION.search(text)
    if action is not None:
        name = action.group(1).strip()
        label = _ACTION_INPUT.search(text, action.end())
        arguments = first_json_object(text, label.end()) if label is not None else None
        if name == "Finish" and arguments is not None and isinstance(arguments.get("final_answer"), str):
            return Reply("final", answer=arguments["final_answer"])
        if name != "Finish" and arguments is not None:
            return Reply("call", name=name, arguments=arguments)
    final = _FINAL.search(text)
    if final is not None:
        return Reply("final", answer=_section_after(final, text))
    return strict


def lenient_json(text: str) -> Reply:
    """A strict-JSON reply read for its content (rules in the module doc)."""
    strict = parse_json_reply(text)
    if strict.kind != "malformed":
        return strict
    value = first_json_object(text)
    if value is None:
        return strict
    name = value.get("tool", value.get("name"))
    arguments = value.get("arguments")
    if isinstance(name, str) and name and isinstance(arguments, (dict, str)):
        return Reply("call", name=name, arguments=arguments)
    if isinstance(value.get("final_answer"), str):
        return Reply("final", answer=value["final_answer"])
    return strict


def read_reply(text: str | None, form: str, expects: str, tool_names: Sequence[str] = ()) -> Reading:
    """Both readings of one reply in ``form``, which answers ``expects`` (one of
    ``EXPECTS[form]``); ``tool_names`` are the tools offered (for a chat tool choice).
    None (the agent could not reply, e.g. a prompt beyond its context) reads as malformed."""
    if expects not in EXPECTS.get(form, ()):
        raise ValueError(f"a {form} reply answers one of {EXPECTS.get(form)}, not {expects!r}")
    if text is None:
        nothing = malformed("no reply (the conversation does not fit the model's context)")
        return Reading(nothing, nothing)
    if form == REACT:
        return Reading(parse_react(text), lenient_react(text))
    if form == STRICT_JSON:
        return Reading(parse_json_reply(text), lenient_json(text))
    if expects == CHOICE:
        choice = parse_tool_choice(text, tool_names)
        return Reading(choice, choice)
    if expects == ARGUMENTS:
        return Reading(parse_arguments(text), parse_arguments(text, lenient=True))
    if not text.strip():
        empty = malformed(f"empty {expects}")
        return Reading(empty, empty)
    reply = Reply("thought", thought=text.strip()) if expects == THOUGHT else Reply("final", answer=text.strip())
    return Reading(reply, reply)


def reply_dict(reply: Reply) -> dict[str, Any]:
    """A Reply as a JSON record: its kind and the fields it sets."""
    out: dict[str, Any] = {"kind": reply.kind}
    for key in ("thought", "name", "arguments", "answer", "reason"):
        value = getattr(reply, key)
        if value not in (None, ""):
            out[key] = value
    return out
