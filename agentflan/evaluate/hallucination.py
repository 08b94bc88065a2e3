"""Agent-H-style hallucination checks on replies where a plain, direct reply was right.

Agent-FLAN (arXiv 2403.12881, section 3.3) measures two kinds on its Agent-H benchmark:

``H_ReAct``    the reply takes the form of a tool call: Agent-H counts replies containing
               "Thought:" or "Action:". Here: a ReAct label (``Thought:``, ``Action:``,
               ``Action Input:``) at the start of a line, or a JSON object calling a tool
               (``{"tool": ..., "arguments": ...}`` or ``{"name": ..., "arguments": ...}``
               anywhere in the text), or a reply that opens with ``{`` (a strict-JSON step
               or the chat form's arguments object, well formed or not: structured output
               where a sentence was due).
               One exception keeps the rule fair to a model prompted in ReAct: when the
               system prompt itself demands the ReAct format (tools offered, ReAct form),
               ``Thought: ...\\nFinal Answer: ...`` is that format's direct answer and
               does not count.
``H_General``  the reply announces a tool use in plain words: Agent-H counts phrases like
               "I will use" and "I need to call". Here: any pattern of ``GENERAL_PATTERNS``
               (first-person announcements of using, calling, querying, searching or
               checking something; naming a tool function, a word with an underscore from
               the tool world's catalogue or any name in backticks followed by "tool",
               "function" or "API"). Refusals do not match: "I can't look up live prices"
               and "I don't have access to a weather service" are the right replies.

HScore = 0.5 * ((1 - H_ReAct) + (1 - H_General)) (the paper's definition), in percent here.
"""

from __future__ import annotations

import re

from agentflan.evaluate.reading import first_json_object
from agentflan.toolworld.catalogue import TOOLS_BY_NAME
from agentflan.toolworld.protocol import REACT, parse_react

_REACT_LABEL = re.compile(r"^[ \t>*#-]*(Thought|Action Input|Action)[ \t]*:", re.M | re.I)

_SUBJECT = r"(?:I(?:'ll| will| shall| am going to|'m going to| need to| have to| must| should| want to| would| can)" \
           r"|let me|let's|we(?:'ll| will| need to| should))"
_USE = r"(?:use|call|invoke|run|execute|query|consult|access|search|look(?: it)? up|check|fetch|retrieve|send|" \
       r"create|schedule|book|add|convert|calculate|compute|translate)"
# (name, regex) pairs: a reply matching any of them announces a tool use.
GENERAL_PATTERNS: tuple[tuple[str, str], ...] = (
    ("first-person tool use", rf"\b{_SUBJECT}\s+(?:first\s+|now\s+|quickly\s+)?{_USE}\b[^.!?\n]*"
                              r"\b(?:tool|function|api|calculator|database|search engine|web|service|system|calendar|"
                              r"the internet|online)\b"),
    ("announced call", rf"\b{_SUBJECT}\s+(?:first\s+|now\s+)?(?:use|call|invoke|execute|query)\b"),
    ("using a tool", r"\b(?:using|use|call|calling|invoke|invoking|with)\s+(?:the\s+|a\s+|an\s+)?`?[\w.-]+`?\s+"
                     r"(?:tool|function|api|plugin)\b"),
    ("tool name", r"`[A-Za-z_][\w.-]*`|\b(?:" + "|".join(sorted((n for n in TOOLS_BY_NAME if "_" in n), key=len,
                                                                      reverse=True)) + r")\b"),
    ("searching", rf"\b{_SUBJECT}\s+(?:first\s+|now\s+)?(?:search|look(?: it)? up|check|fetch|retrieve)\b"),
)
_GENERAL = tuple((name, re.compile(pattern, re.I)) for name, pattern in GENERAL_PATTERNS)


def react_evidence(text: str, react_prompted: bool = False) -> str | None:
    """What makes ``text`` an H_ReAct reply (a ReAct label or a JSON tool call), or None.
    ``react_prompted``: the system prompt demands ReAct, so a well-formed ReAct final
    answer is allowed."""
    if react_prompted and parse_react(text).kind == "final":
        return None
    label = _REACT_LABEL.search(text)
    if label is not None:
        return label.group(0).strip()
    if text.lstrip().startswith("{"):
        return "a JSON object reply"
    value = first_json_object(text)
    if value is not None and isinstance(value.get("tool", value.get("name")), str) and "arguments" in value:
        return f"JSON call of {value.get('tool', value.get('name'))!r}"
    return None


def general_evidence(text: str) -> str | None:
    """The first phrase of ``text`` announcing a tool use (``GENERAL_PATTERNS``), as
    ``"<pattern name>: <matched text>"``, or None."""
    for name, pattern in _GENERAL:
        m = pattern.search(text)
        if m is not None:
            return f"{name}: {m.group(0)}"
    return None


def react_prompted(form: str, tools_offered: bool) -> bool:
    """Whether a prompt in ``form`` demands the ReAct format: tools are offered in the ReAct form."""
    return form == REACT and tools_offered


def hscore(h_react: float, h_general: float) -> float:
    """HScore in percent from H_ReAct and H_General in percent (arXiv 2403.12881)."""
    return 0.5 * ((100.0 - h_react) + (100.0 - h_general))
