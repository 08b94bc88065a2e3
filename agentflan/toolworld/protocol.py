"""The agent protocol: how tools are offered, how an agent's turns are written and read.

Three forms, one set of rules for the corpus builder (which writes them) and the evaluator
(which reads a model's replies in them and drives it turn by turn):

``react``  ReAct text. The system prompt lists the tools and the format; each assistant
           turn is ``Thought: ...\\nAction: <tool>\\nAction Input: {json}``, the tool's
           result returns as a user turn ``Observation: {json}``, and the last assistant
           turn is ``Thought: ...\\nFinal Answer: ...`` (ToolBench's closing
           ``Action: Finish`` with ``{"return_type": "give_answer", "final_answer": ...}``
           is read as a final answer too).
``chat``   Agent-FLAN's aligned form (arXiv 2403.12881, section 3.1): a step is three
           assistant turns, each after a short elicit statement from the user: the thought
           (facet ``reason``), the tool choice (``retrieve``; "I'll use `get_weather`."),
           the arguments as a bare JSON object (``understand``); the observation returns as
           a user turn holding the tool's JSON. After the last observation the agent thinks,
           answers the tool question with "no tool", and on the third elicit gives the
           final answer (``reason``)::

               user:       What's the weather in Lisbon?
               assistant:  I need the current weather in Lisbon.
               user:       Which tool will you use next, if any?
               assistant:  I'll use `get_weather`.
               user:       What are the arguments? Reply with a JSON object.
               assistant:  {"city": "Lisbon"}
               user:       {"city": "Lisbon", "temperature": 18, ...}
               assistant:  It is 18°C and cloudy there; that answers the question.
               user:       Which tool will you use next, if any?
               assistant:  No tool is needed now: I can answer.
               user:       Then what is your final answer?
               assistant:  It's 18°C and cloudy in Lisbon right now.

``json``   Strict JSON, for instruction-following samples: each assistant turn is one
           object, ``{"thought", "tool", "arguments"}`` for a call or ``{"thought",
           "final_answer"}``; results return as JSON user turns.

In ``react`` and ``json`` every assistant turn is facet ``instruct`` (producing the
required format). The elicit statements and reply phrasings have several variants (drawn
by the corpus builder's seeded generator); index 0 of each is canonical, and the evaluator
sends the canonical ones. ``Episode`` is the state machine that drives a model through a
task in any form; ``teacher_forcing`` gives the gold history before every assistant turn.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from agentflan.toolworld.tools import JSON, Tool
from agentflan.toolworld.trajectory import Final, Step, Trajectory
from agentflan.toolworld.world import World

REACT, CHAT, STRICT_JSON = "react", "chat", "json"
FORMS = (REACT, CHAT, STRICT_JSON)
# Agent-FLAN's capability decomposition, named as T-Eval names its facets.
INSTRUCT, REASON, RETRIEVE, UNDERSTAND = "instruct", "reason", "retrieve", "understand"
FACETS = (INSTRUCT, REASON, RETRIEVE, UNDERSTAND)

ELICIT_TOOL = ("Which tool will you use next, if any?", "OK. Which tool do you need now, if any?",
               "Do you need a tool for this? If so, which one?", "What tool should be called next, if any?")
ELICIT_ARGUMENTS = ("What are the arguments? Reply with a JSON object.", "Give the arguments as a JSON object.",
                    "Which arguments will you pass? Answer with JSON.")
ELICIT_INPUT = ("What is the input?", "Give the input.")  # for a tool whose input is text, not JSON
ELICIT_ACTION = ("What is your next action?", "What do you do next?")
ELICIT_ANSWER = ("Then what is your final answer?", "Please give your final answer.", "OK, what is the answer?")
CHOICE_REPLY = ("I'll use `{name}`.", "I will call `{name}`.", "The right tool for this is `{name}`.", "`{name}`")
NO_TOOL_REPLY = ("No tool is needed now: I can answer.", "None. I have what I need to answer.",
                 "No more tools; I can give the answer now.")
FINAL_THOUGHT = "I have what I need to answer."
EMPTY_THOUGHT = "Let me take the next step."
GIVE_UP_ANSWER = "I could not complete this task with the available tools."

_NO_TOOL = re.compile(r"\b(no tools?|none|no more tools|not need|needs? no|without a tool|answer now)\b", re.I)


def _pick(options: Sequence[str], rng: random.Random | None) -> str:
    return options[0] if rng is None else rng.choice(options)


def dumps(obj: object) -> str:
    """JSON as the protocol writes it: compact separators with spaces, UTF-8 kept."""
    return json.dumps(obj, ensure_ascii=False)


# --------------------------------------------------------------------------- system prompts


def tool_listing(tools: Sequence[JSON], style: int = 0) -> str:
    """The tools for a system prompt: 0 one JSON spec a line, 1 a JSON array, 2 one signature a line."""
    if style == 1:
        return dumps(list(tools))
    if style == 2:
        return "\n".join(f"- {_signature(t)}" for t in tools)
    return "\n".join(dumps(t) for t in tools)


def _signature(spec: JSON) -> str:
    params = spec.get("parameters", {})
    required = set(params.get("required", []))
    parts = []
    for name, prop in params.get("properties", {}).items():
        kind = " | ".join(f'"{v}"' for v in prop["enum"]) if "enum" in prop else prop.get("type", "any")
        note = f" ({prop['description']})" if prop.get("description") else ""
        parts.append(f"{name}{'' if name in required else '?'}: {kind}{note}")
    return f"{spec['name']}({', '.join(parts)}): {spec.get('description', '')}"


_CHAT_INTROS = (
    "You are a helpful assistant that can use the tools below. Think about the request first. When a tool "
    "is needed you will be asked which one to use and then for its arguments, given as a JSON object; its "
    "result comes back in the next message. Use a tool only when the request needs one.",
    "You can call the tools listed below. Reason about the request; when asked which tool to use, name it "
    "(or say none is needed), and when asked for arguments, reply with a JSON object. Tool results are sent "
    "back to you. Answer directly when no tool is needed.",
)


def system_prompt(form: str, tools: Sequence[JSON] | None, instructions: str | None = None,
                  rng: random.Random | None = None, strict: bool = False, listing_style: int | None = None) -> str:
    """The system prompt of ``form`` offering ``tools`` (function specs).

    Without tools, ``instructions`` (a source's own system text) stands in for the listing.
    ``strict`` adds the demand to follow the format exactly (instruction-following samples).
    ``rng`` draws the phrasing and the listing style (see ``tool_listing``) unless
    ``listing_style`` fixes it; None gives the canonical prompt.
    """
    style = listing_style if listing_style is not None else 0 if rng is None else rng.choice([0, 1, 2])
    listing = tool_listing(tools, style) if tools else (instructions or "")
    if form == CHAT:
        return f"{_pick(_CHAT_INTROS, rng)}\n\nTools:\n{listing}" if tools else \
            f"{_pick(_CHAT_INTROS, rng)}\n\n{listing}".rstrip()
    names = ", ".join(t["name"] for t in tools) if tools else "the actions described above"
    strictness = "Follow this output format exactly and write nothing outside it.\n" if strict else ""
    if form == REACT:
        return (f"Answer the user's request as well as you can. You can use these tools:\n{listing}\n\n"
                f"{strictness}Reply in this format:\n"
                "Thought: your reasoning about what to do next\n"
                f"Action: the tool to use, one of [{names}]\n"
                "Action Input: the tool's arguments as a JSON object\n"
                "The result comes back as an Observation. Repeat Thought, Action and Action Input as needed, "
                "then finish with:\n"
                "Thought: I now know the final answer\n"
                "Final Answer: the answer for the user")
    if form == STRICT_JSON:
        return (f"You can use these tools:\n{listing}\n\n{strictness}"
                "Reply with exactly one JSON object and nothing else. To call a tool: "
                '{"thought": "...", "tool": "<tool name>", "arguments": {...}}. When you can answer: '
                '{"thought": "...", "final_answer": "..."}. Tool results come back as JSON.')
    raise ValueError(f"unknown form {form!r} (known: {', '.join(FORMS)})")


# --------------------------------------------------------------------------- replies

@dataclass(frozen=True)
class Reply:
    """A model reply read in the protocol, or the gold content of an assistant turn.

    ``kind``: ``call`` (name and arguments; react/json), ``final`` (answer; react/json and
    the chat answer turn), ``thought`` (chat), ``choice`` (chat: a tool ``name``),
    ``no_tool`` (chat: no tool is needed), ``arguments`` (chat), ``action`` (a free-form
    command, in ``answer``), or ``malformed`` (``reason`` says why).
    """

    kind: str
    thought: str = ""
    name: str | None = None
    arguments: JSON | str | None = None
    answer: str | None = None
    reason: str = ""


def malformed(reason: str) -> Reply:
    return Reply("malformed", reason=reason)


_LABEL = re.compile(r"^[ \t]*(Thought|Action Input|Action|Final Answer|Observation)[ \t]*:", re.M | re.I)


def _sections(text: str) -> list[tuple[str, str]]:
    """(label, body) for each ReAct label at a line start, in order; a lead before any label is ''."""
    out = []
    marks = list(_LABEL.finditer(text))
    if not marks or marks[0].start() > 0 and text[:marks[0].start()].strip():
        out.append(("", text[:marks[0].start()] if marks else text))
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        out.append((m.group(1).lower(), text[m.end():end].strip()))
    return out


def _json_object(text: str, what: str) -> JSON | Reply:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        return malformed(f"{what} is not valid JSON ({err.msg} at column {err.colno})")
    if not isinstance(value, dict):
        return malformed(f"{what} is not a JSON object")
    return value


def parse_react(text: str) -> Reply:
    """Reads a ReAct reply strictly: one Thought, then one Action with its Action Input (a JSON
    object), or a Final Answer; ``Action: Finish`` with ``give_answer`` is a final answer."""
    parts = _sections(text.strip())
    labels = [label for label, _ in parts]
    if "" in labels:
        return malformed("text before the first label")
    if "observation" in labels:
        return malformed("the reply writes an Observation itself")
    if any(labels.count(label) > 1 for label in set(labels)):
        return malformed("a label appears more than once")
    body = dict(parts)
    if "thought" not in body:
        return malformed("no Thought")
    thought = body["thought"]
    if "final answer" in body:
        if "action" in body or "action input" in body:
            return malformed("both an Action and a Final Answer")
        if labels[-1] != "final answer" or labels[0] != "thought":
            return malformed("labels out of order")
        return Reply("final", thought=thought, answer=body["final answer"])
    if "action" not in body:
        return malformed("no Action or Final Answer")
    if labels != ["thought", "action", "action input"]:
        return malformed("expected Thought, Action, Action Input in this order")
    name = body["action"]
    if not name or "\n" in name:
        return malformed("the Action is not a single tool name")
    arguments = _json_object(body["action input"], "the Action Input")
    if isinstance(arguments, Reply):
        return arguments
    if name == "Finish":
        kind = arguments.get("return_type")
        if kind == "give_answer" and isinstance(arguments.get("final_answer"), str):
            return Reply("final", thought=thought, answer=arguments["final_answer"])
        if isinstance(kind, str) and kind.startswith("give_up"):
            return Reply("final", thought=thought, answer=GIVE_UP_ANSWER)
        return malformed("Finish without a give_answer final_answer")
    return Reply("call", thought=thought, name=name, arguments=arguments)


def parse_json_reply(text: str) -> Reply:
    """Reads a strict-JSON reply: ``{"thought", "tool", "arguments"}`` or ``{"thought", "final_answer"}``."""
    value = _json_object(text.strip(), "the reply")
    if isinstance(value, Reply):
        return value
    thought = value.get("thought", "")
    if not isinstance(thought, str):
        return malformed("'thought' is not a string")
    keys = set(value) - {"thought"}
    if keys == {"final_answer"}:
        if not isinstance(value["final_answer"], str):
            return malformed("'final_answer' is not a string")
        return Reply("final", thought=thought, answer=value["final_answer"])
    if keys == {"tool", "arguments"}:
        if not isinstance(value["tool"], str) or not value["tool"]:
            return malformed("'tool' is not a tool name")
        if not isinstance(value["arguments"], (dict, str)):
            return malformed("'arguments' is not a JSON object")
        return Reply("call", thought=thought, name=value["tool"], arguments=value["arguments"])
    return malformed(f"expected keys thought + tool + arguments or thought + final_answer, got {sorted(value)}")


def parse_tool_choice(text: str, tool_names: Sequence[str]) -> Reply:
    """Reads a chat tool-choice reply: a tool named in backticks (or as a bare word) is a
    choice; a "no tool" phrasing without a tool name is ``no_tool``."""
    text = text.strip()
    ticked = re.findall(r"`([^`\n]+)`", text)
    if ticked:
        return Reply("choice", name=ticked[0].strip())
    for word in re.findall(r"[A-Za-z_][A-Za-z0-9_.-]*", text):
        if word in tool_names:
            return Reply("choice", name=word)
    if _NO_TOOL.search(text):
        return Reply("no_tool")
    return malformed("names no tool and does not say that none is needed")


def parse_arguments(text: str, lenient: bool = False) -> Reply:
    """Reads a chat arguments reply: exactly one JSON object (``lenient``: the first JSON
    object anywhere in the text, e.g. inside a code fence)."""
    text = text.strip()
    if lenient:
        start = text.find("{")
        if start >= 0:
            try:
                value, _ = json.JSONDecoder().raw_decode(text, start)
            except json.JSONDecodeError:
                value = None
            if isinstance(value, dict):
                return Reply("arguments", arguments=value)
    value = _json_object(text, "the arguments")
    return value if isinstance(value, Reply) else Reply("arguments", arguments=value)


# --------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Message:
    """One rendered turn. ``facet`` tags assistant turns of the task; ``trained`` is False
    for in-context example turns; ``gold`` is what the turn says, read as a Reply."""

    role: str
    content: str
    facet: str | None = None
    trained: bool = True
    gold: Reply | None = None

    def as_chat(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


def arguments_text(arguments: JSON | str | None) -> str:
    """A step's arguments as the protocol writes them: JSON for an object, the text verbatim otherwise."""
    if arguments is None:
        return "{}"
    return arguments if isinstance(arguments, str) else dumps(arguments)


def react_step_text(step: Step) -> str:
    thought = f"Thought: {step.thought}\n" if step.thought else "Thought:\n"
    if step.action is None and step.arguments is None:
        return thought.rstrip("\n")
    if step.action is None:
        return f"{thought}Action: {arguments_text(step.arguments)}"
    return f"{thought}Action: {step.action}\nAction Input: {arguments_text(step.arguments)}"


def react_final_text(final: Final) -> str:
    return f"Thought: {final.thought or 'I now know the final answer.'}\nFinal Answer: {_final_answer(final)}"


def _final_answer(final: Final) -> str:
    return GIVE_UP_ANSWER if final.gave_up and not final.answer else final.answer


def observation_text(observation: str, form: str, verbatim: bool) -> str:
    """A tool result as the user turn of ``form``: the source's text when ``verbatim``; otherwise
    ReAct labels it ``Observation:`` and the other forms send it bare."""
    if verbatim or form != REACT:
        return observation
    return f"Observation: {observation}"


def render(trajectory: Trajectory, form: str, rng: random.Random | None = None, strict: bool = False,
           system: str | None = None) -> list[Message]:
    """The trajectory as a conversation in ``form``: system, in-context turns, query, steps, final.

    ``rng`` draws the phrasing variants (None: the canonical ones); ``strict`` asks for the
    format exactly in the system prompt; ``system`` replaces the generated system prompt. In
    the ReAct form, steps read from a source keep the source's own text (``Step.raw``) and
    its instructions; observations read from a source are always kept verbatim.
    """
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r} (known: {', '.join(FORMS)})")
    sourced = any(s.raw for s in trajectory.steps) or bool(trajectory.final and trajectory.final.raw)
    if system is None:
        if form == REACT and sourced and trajectory.instructions is not None and not strict:
            system = trajectory.instructions
        else:
            system = system_prompt(form, trajectory.tools, trajectory.instructions, rng, strict)
    msgs = [Message("system", system)]
    msgs += [Message(t.role, t.content, trained=False) for t in trajectory.context]
    msgs.append(Message("user", trajectory.query))
    for step in trajectory.steps:
        msgs += _render_step(step, form, rng, keep_raw=sourced and not strict)
        if step.observation is not None:
            msgs.append(Message("user", observation_text(step.observation, form, verbatim=sourced)))
    if trajectory.final is not None:
        msgs += _render_final(trajectory.final, form, rng, keep_raw=sourced and not strict)
    return msgs


def _render_step(step: Step, form: str, rng: random.Random | None, keep_raw: bool) -> list[Message]:
    if form == REACT:
        if step.action is not None:
            gold = Reply("call", thought=step.thought, name=step.action, arguments=step.arguments)
        elif step.arguments is not None:
            gold = Reply("action", thought=step.thought, answer=arguments_text(step.arguments))
        else:
            gold = Reply("thought", thought=step.thought)
        text = step.raw if keep_raw and step.raw else react_step_text(step)
        return [Message("assistant", text, INSTRUCT, gold=gold)]
    if form == STRICT_JSON:
        body = {"thought": step.thought, "tool": step.action, "arguments": step.arguments
                if step.arguments is not None else {}}
        return [Message("assistant", dumps(body), INSTRUCT,
                        gold=Reply("call", thought=step.thought, name=step.action, arguments=body["arguments"]))]
    thought = step.thought or EMPTY_THOUGHT
    msgs = [Message("assistant", thought, REASON, gold=Reply("thought", thought=thought))]
    if step.action is None and step.arguments is None:  # a thought with no action
        return msgs
    if step.action is None:
        text = arguments_text(step.arguments)
        return msgs + [Message("user", _pick(ELICIT_ACTION, rng)),
                       Message("assistant", text, UNDERSTAND, gold=Reply("action", answer=text))]
    args = step.arguments if step.arguments is not None else {}
    return msgs + [
        Message("user", _pick(ELICIT_TOOL, rng)),
        Message("assistant", _pick(CHOICE_REPLY, rng).format(name=step.action), RETRIEVE,
                gold=Reply("choice", name=step.action)),
        Message("user", _pick(ELICIT_INPUT if isinstance(args, str) else ELICIT_ARGUMENTS, rng)),
        Message("assistant", arguments_text(args), UNDERSTAND, gold=Reply("arguments", arguments=args)),
    ]


def _render_final(final: Final, form: str, rng: random.Random | None, keep_raw: bool) -> list[Message]:
    answer = _final_answer(final)
    gold = Reply("final", thought=final.thought, answer=answer)
    if form == REACT:
        return [Message("assistant", final.raw if keep_raw and final.raw else react_final_text(final), INSTRUCT,
                        gold=gold)]
    if form == STRICT_JSON:
        return [Message("assistant", dumps({"thought": final.thought, "final_answer": answer}), INSTRUCT, gold=gold)]
    thought = final.thought or FINAL_THOUGHT
    return [
        Message("assistant", thought, REASON, gold=Reply("thought", thought=thought)),
        Message("user", _pick(ELICIT_TOOL, rng)),
        Message("assistant", _pick(NO_TOOL_REPLY, rng), RETRIEVE, gold=Reply("no_tool")),
        Message("user", _pick(ELICIT_ANSWER, rng)),
        Message("assistant", answer, REASON, gold=gold),
    ]


@dataclass(frozen=True)
class ForcedStep:
    """The gold history before one assistant turn, the facet that turn exercises and its gold content."""

    messages: list[dict[str, str]]
    facet: str
    gold: Reply


def teacher_forcing(trajectory: Trajectory, form: str) -> Iterator[ForcedStep]:
    """For each trained assistant turn of the canonical rendering: the messages before it (as
    ``{"role", "content"}`` dicts), its facet and its gold content (T-Eval's step-by-step
    scoring with the gold history given)."""
    msgs = render(trajectory, form)
    for i, m in enumerate(msgs):
        if m.role == "assistant" and m.trained and m.gold is not None:
            yield ForcedStep([x.as_chat() for x in msgs[:i]], m.facet or "", m.gold)


# --------------------------------------------------------------------------- driving an agent


@dataclass(frozen=True)
class ExecutedCall:
    name: str
    arguments: JSON | str
    observation: JSON


@dataclass
class Episode:
    """Drives an agent through one task in ``form``, turn by turn, with tools run in ``world``.

        episode = Episode(task.query, task.tools, task.world(), "chat")
        while not episode.done:
            episode.feed(model.reply(episode.messages))   # the messages so far, system first
        episode.final_answer, episode.calls, episode.failure

    ``messages`` always ends with a user turn the agent must answer; ``expects`` names what
    that answer should be (``thought``, ``choice``, ``arguments`` or ``answer`` in the chat
    form, ``step`` in react/json). The episode ends at a final answer, at a malformed reply
    (``failure`` says why) or after ``max_steps`` tool calls.
    """

    query: str
    tools: Sequence[Tool]
    world: World
    form: str = CHAT
    system: str | None = None
    max_steps: int = 8
    messages: list[dict[str, str]] = field(init=False)
    expects: str = field(init=False)
    calls: list[ExecutedCall] = field(init=False, default_factory=list)
    final_answer: str | None = field(init=False, default=None)
    failure: str | None = field(init=False, default=None)
    _pending: str | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"unknown form {self.form!r} (known: {', '.join(FORMS)})")
        system = self.system if self.system is not None else system_prompt(self.form, [t.spec() for t in self.tools])
        self.messages = [{"role": "system", "content": system}, {"role": "user", "content": self.query}]
        self.expects = "thought" if self.form == CHAT else "step"

    @property
    def done(self) -> bool:
        return self.final_answer is not None or self.failure is not None

    def _say(self, reply: str, user: str | None) -> None:
        self.messages.append({"role": "assistant", "content": reply})
        if user is not None:
            self.messages.append({"role": "user", "content": user})

    def _execute(self, name: str, arguments: JSON | str) -> str:
        observation = self.world.call(name, arguments, self.tools)
        self.calls.append(ExecutedCall(name, arguments, observation))
        if len(self.calls) >= self.max_steps:
            self.failure = f"no final answer after {self.max_steps} tool calls"
        return observation_text(dumps(observation), self.form, verbatim=False)

    def feed(self, reply: str) -> Reply:
        """Takes the agent's next reply, runs any call it completes, and adds the next user turn."""
        if self.done:
            raise RuntimeError("the episode is over")
        if self.form == CHAT:
            return self._feed_chat(reply)
        parsed = parse_react(reply) if self.form == REACT else parse_json_reply(reply)
        if parsed.kind == "final":
            self._say(reply, None)
            self.final_answer = parsed.answer
        elif parsed.kind == "call":
            self._say(reply, None)
            self.messages.append({"role": "user", "content": self._execute(parsed.name, parsed.arguments)})
        else:
            self._say(reply, None)
            self.failure = f"malformed {self.form} reply: {parsed.reason}"
        return parsed

    def _feed_chat(self, reply: str) -> Reply:
        state = self.expects
        if state == "thought":
            if not reply.strip():
                parsed = malformed("empty thought")
            else:
                parsed = Reply("thought", thought=reply.strip())
                self._say(reply, ELICIT_TOOL[0])
                self.expects = "choice"
        elif state == "choice":
            parsed = parse_tool_choice(reply, [t.name for t in self.tools])
            if parsed.kind == "choice":
                self._pending = parsed.name
                self._say(reply, ELICIT_ARGUMENTS[0])
                self.expects = "arguments"
            elif parsed.kind == "no_tool":
                self._say(reply, ELICIT_ANSWER[0])
                self.expects = "answer"
        elif state == "arguments":
            parsed = parse_arguments(reply)
            if parsed.kind == "arguments":
                self._say(reply, None)
                self.messages.append({"role": "user", "content": self._execute(self._pending, parsed.arguments)})
                self.expects = "thought"
        else:
            parsed = Reply("final", answer=reply.strip())
            self._say(reply, None)
            self.final_answer = parsed.answer
        if parsed.kind == "malformed":
            self._say(reply, None)
            self.failure = f"malformed {state} reply: {parsed.reason}"
        return parsed
