"""Raw agent records (AgentInstruct, ToolBench; ours or the released files) read into
``Trajectory`` objects, by deterministic rules.

Assistant turns are read leniently, the way the released corpora write them: labels are
case-insensitive and may stand alone on their line (``Thought:``/``Think:``,
``Action:``/``Act:``, ``Action Input:``, ``Final Answer:``). A turn becomes

* a tool call: ``Action: <name>`` with ``Action Input: <input>`` (parsed as a JSON object,
  else kept verbatim), or ``Action: <name>`` followed by a fenced code block (AgentInstruct's
  ``Act: bash`` and ``Action: Operation`` with SQL), whose code is the input;
* a free-form action: ``Action: <command>`` on its own (``Act: go to shelf 1``);
* a final answer: ``Final Answer: ...``, or ToolBench's ``Action: Finish`` with
  ``give_answer`` (``give_up_and_restart`` is a give-up);
* a thought alone (a step with no action).

A turn with none of these labels raises ``RecordError`` (kind ``unparsed step``), as do a
record with no query (``no query``) and turns after the final answer (``turns after the
final answer``); the corpus builder turns these into file:line errors or skip counts.
"""

from __future__ import annotations

import ast
import json
import re

from agentflan.data.conversation import Conversation, Message, RecordError
from agentflan.toolworld.raw import TOOLBENCH_API_MARKER
from agentflan.toolworld.trajectory import Final, Step, Trajectory, Turn

_LABEL = re.compile(r"^[ \t>*#]*(thought|think|action[ \t]*input|action|act|final[ \t]*answer)[ \t]*:", re.I | re.M)
_FENCE = re.compile(r"^([^\n`]*?)\s*```[^\n]*\n(.*?)\n?```\s*$", re.S)
_CANONICAL = {"thought": "thought", "think": "thought", "action": "action", "act": "action"}


def _label_name(raw: str) -> str:
    key = re.sub(r"[ \t]+", " ", raw.lower())
    return _CANONICAL.get(key, key)


def has_labels(text: str) -> bool:
    return _LABEL.search(text) is not None


def parse_arguments_text(text: str) -> dict | str:
    """An Action Input: a JSON object when it is one, else the text verbatim (stripped)."""
    text = text.strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, dict) else text


def parse_assistant_turn(text: str, where: str) -> Step | Final:
    """One assistant turn of a raw trajectory as a step or the final answer (see the module doc)."""
    marks = list(_LABEL.finditer(text))
    if not marks:
        raise RecordError("unparsed step", f"{where}: no Thought, Action or Final Answer label")
    sections: dict[str, str] = {}
    lead = text[:marks[0].start()].strip()
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        name = _label_name(m.group(1))
        if name in sections:
            raise RecordError("unparsed step", f"{where}: '{m.group(1)}' appears twice")
        sections[name] = text[m.end():end].strip()
    thought = sections.get("thought", lead)
    if "final answer" in sections:
        return Final(thought, sections["final answer"], raw=text)
    if "action" not in sections:
        if "action input" in sections:
            raise RecordError("unparsed step", f"{where}: an Action Input without an Action")
        return Step(thought, None, None, None, raw=text)
    action = sections["action"]
    if "action input" in sections:
        if "\n" in action:
            raise RecordError("unparsed step", f"{where}: the Action is not a single name")
        arguments = parse_arguments_text(sections["action input"])
        if action == "Finish":
            return _finish(thought, arguments, text, where)
        return Step(thought, action, arguments, None, raw=text)
    fenced = _FENCE.match(action)
    if fenced and fenced.group(1).strip() and "\n" not in fenced.group(1).strip():
        return Step(thought, fenced.group(1).strip(), fenced.group(2), None, raw=text)
    return Step(thought, None, action, None, raw=text)


def _finish(thought: str, arguments: dict | str, text: str, where: str) -> Final:
    if not isinstance(arguments, dict):
        raise RecordError("unparsed step", f"{where}: Finish with an Action Input that is not a JSON object")
    kind = arguments.get("return_type")
    if kind == "give_answer":
        answer = arguments.get("final_answer", "")
        if not isinstance(answer, str):
            answer = json.dumps(answer, ensure_ascii=False)
        return Final(thought, answer, raw=text)
    if isinstance(kind, str) and kind.startswith("give_up"):
        return Final(thought, "", gave_up=True, raw=text)
    raise RecordError("unparsed step", f"{where}: Finish with return_type {kind!r}")


def extract_tools(text: str) -> tuple[dict, ...] | None:
    """The function specs listed in a system or instruction text, or None.

    Finds a list of objects with a ``"name"`` (JSON, or a Python literal as some ToolBench
    exports write it) after ToolBench's API marker or anywhere, or a run of lines that are
    each such an object. ToolBench's ``Finish`` is not a tool and is dropped.
    """
    starts = [text.index(TOOLBENCH_API_MARKER) + len(TOOLBENCH_API_MARKER)] if TOOLBENCH_API_MARKER in text else []
    starts += [m.start() for m in re.finditer(r"\[\s*\{", text)]
    for start in starts:
        found = _list_at(text, start)
        if found is not None:
            return found
    lines = []
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            if lines:
                break
            continue
        if not (isinstance(value, dict) and isinstance(value.get("name"), str)):
            if lines:
                break
            continue
        lines.append(value)
    return _specs(lines)


def _list_at(text: str, start: int) -> tuple[dict, ...] | None:
    start = text.find("[", start)
    if start < 0:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError:
        end = _matching_bracket(text, start)
        if end < 0:
            return None
        try:
            value = ast.literal_eval(text[start:end + 1])
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return None
    return _specs(value) if isinstance(value, list) else None


def _matching_bracket(text: str, start: int) -> int:
    depth, quote, escaped = 0, "", False
    for i in range(start, len(text)):
        c = text[i]
        if quote:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _specs(items: list) -> tuple[dict, ...] | None:
    if not items or not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in items):
        return None
    specs = tuple(t for t in items if t["name"] != "Finish")
    return specs or None


def _steps(messages: list[Message], first: int, where: str) -> tuple[tuple[Step, ...], Final | None]:
    """Reads assistant turns from ``first`` on, each with the environment turn after it."""
    steps: list[Step] = []
    final = None
    i = first
    while i < len(messages):
        msg = messages[i]
        if final is not None:
            raise RecordError("turns after the final answer", f"{where}[{i}]: a turn after the final answer")
        if msg.role != "assistant":
            raise RecordError("unparsed step", f"{where}[{i}]: expected an assistant turn, got {msg.role}")
        turn = parse_assistant_turn(msg.content, f"{where}[{i}]")
        if isinstance(turn, Final):
            final = turn
            i += 1
            continue
        observation = None
        if i + 1 < len(messages) and messages[i + 1].role in ("user", "tool"):
            observation = messages[i + 1].content
            i += 1
        steps.append(Step(turn.thought, turn.action, turn.arguments, observation, raw=turn.raw))
        i += 1
    if not steps and final is None:
        raise RecordError("no steps", f"{where}: no assistant turn after the query")
    return tuple(steps), final


def trajectory_from_agentinstruct(conv: Conversation) -> Trajectory:
    """An AgentInstruct record: instructions in the first human turn (followed by an
    acknowledgement or in-context example turns, the gpt ones ``loss: false``), then the
    query and the ReAct steps, observations as human turns."""
    msgs = conv.messages
    last_context = max((i for i, m in enumerate(msgs) if m.role == "assistant" and m.loss is False), default=-1)
    if last_context < 0 and len(msgs) >= 3 and msgs[1].role == "assistant" and not has_labels(msgs[1].content):
        last_context = 1  # an acknowledgement ("OK.") without a loss flag
    query_at = last_context + 1
    if query_at >= len(msgs) or msgs[query_at].role != "user":
        raise RecordError("no query", f"conversations[{query_at}]: expected the task's human turn after the "
                                      "instructions and in-context turns")
    instructions = msgs[0].content if query_at > 0 and msgs[0].role == "user" else None
    context = tuple(Turn(m.role, m.content) for m in msgs[1 if instructions is not None else 0:query_at])
    steps, final = _steps(msgs, query_at + 1, "conversations")
    tools = extract_tools(instructions) if instructions else None
    return Trajectory(conv.id, msgs[query_at].content, steps, final, tools, instructions, context)


def trajectory_from_toolbench(conv: Conversation) -> Trajectory:
    """A processed ToolBench record: system (with the API list), the user query, then
    assistant steps with ``function`` observations, closing with a ``Finish`` call."""
    msgs = conv.messages
    i = 0
    instructions = None
    if msgs and msgs[0].role == "system":
        instructions, i = msgs[0].content, 1
    if i >= len(msgs) or msgs[i].role != "user":
        raise RecordError("no query", f"conversations[{i}]: expected the user's query")
    query = re.sub(r"\s*Begin!\s*$", "", msgs[i].content.strip()).strip()
    steps, final = _steps(msgs, i + 1, "conversations")
    tools = extract_tools(instructions) if instructions else None
    return Trajectory(conv.id, query, steps, final, tools, instructions)


READERS = {"agentinstruct": trajectory_from_agentinstruct, "toolbench": trajectory_from_toolbench}
