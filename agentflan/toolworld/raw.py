"""Trajectories written as the raw records of the corpora Agent-FLAN was built from.

AgentInstruct (THUDM)::

    {"id": "toolworld_12", "conversations": [
        {"from": "human", "loss": null, "value": "<instructions: tools and the ReAct format>"},
        {"from": "gpt", "loss": false, "value": "OK."},
        ... an optional in-context example task, its gpt turns "loss": false ...
        {"from": "human", "loss": null, "value": "<query>"},
        {"from": "gpt", "loss": true, "value": "Thought: ...\\nAction: get_weather\\nAction Input: {...}"},
        {"from": "human", "loss": null, "value": "Observation: {...}"}, ...
        {"from": "gpt", "loss": true, "value": "Thought: ...\\nFinal Answer: ..."}]}

ToolBench (OpenBMB), processed form::

    {"id": "Step 2: <query>", "conversations": [
        {"from": "system", "value": "<instructions> ... the following APIs: [<specs>, <Finish>]"},
        {"from": "user", "value": "\\n<query>\\nBegin!\\n"},
        {"from": "assistant", "value": "\\nThought: ...\\nAction: get_weather\\nAction Input: {...}"},
        {"from": "function", "value": "{\\"error\\": \\"\\", \\"response\\": \\"{...}\\"}"}, ...
        {"from": "assistant", "value": "\\nThought: ...\\nAction: Finish\\nAction Input: {\\"return_type\\":
            \\"give_answer\\", \\"final_answer\\": \\"...\\"}"}]}

A tool error comes back in ToolBench as ``{"error": "<message>", "response": ""}``.
``generate_raw`` writes the tool world's tasks in either shape, some with a mistake and
its recovery; ``agentflan.corpus.parse`` reads both shapes (ours and the real files) back.
"""

from __future__ import annotations

import json
import random
from typing import Iterator

from agentflan.toolworld.protocol import REACT, dumps, react_final_text, react_step_text, system_prompt
from agentflan.toolworld.recovery import trajectory_with_recovery
from agentflan.toolworld.tasks import Task, generate_tasks
from agentflan.toolworld.tools import JSON
from agentflan.toolworld.trajectory import Trajectory

AGENTINSTRUCT, TOOLBENCH = "agentinstruct", "toolbench"
SHAPES = (AGENTINSTRUCT, TOOLBENCH)

FINISH_SPEC = {"name": "Finish",
               "description": "Call this when the task is done (give_answer, with the final answer) or when it "
                              "cannot be done (give_up_and_restart).",
               "parameters": {"type": "object", "properties": {
                   "return_type": {"type": "string", "enum": ["give_answer", "give_up_and_restart"]},
                   "final_answer": {"type": "string", "description": "the answer shown to the user"}},
                   "required": ["return_type"]}}
# The phrase before the tool list in ToolBench's system prompt; readers find the list by it.
TOOLBENCH_API_MARKER = "Specifically, you have access to the following APIs: "
TOOLBENCH_INSTRUCTIONS = (
    "You are an agent that solves the task below with function calls. At each step, write a short Thought about "
    "where things stand and what to do next, then call one function with Action and Action Input. Each call "
    "returns a result and moves you to a new state. When the task is done, call Finish with return_type "
    "\"give_answer\" and the final answer; if it cannot be done, call Finish with return_type "
    "\"give_up_and_restart\".\n")


def _observation_text(shape: str, observation: str) -> str:
    """A step's observation (the tool's JSON) as the shape's environment turn writes it."""
    if shape == AGENTINSTRUCT:
        return f"Observation: {observation}"
    value = json.loads(observation)
    if isinstance(value, dict) and isinstance(value.get("error"), dict):
        return dumps({"error": value["error"]["message"], "response": ""})
    return dumps({"error": "", "response": observation})


def _react_turns(trajectory: Trajectory, loss: bool) -> list[JSON]:
    turns = [{"from": "human", "loss": None, "value": trajectory.query}]
    for step in trajectory.steps:
        turns.append({"from": "gpt", "loss": loss, "value": react_step_text(step)})
        if step.observation is not None:
            turns.append({"from": "human", "loss": None, "value": _observation_text(AGENTINSTRUCT, step.observation)})
    if trajectory.final is not None:
        turns.append({"from": "gpt", "loss": loss, "value": react_final_text(trajectory.final)})
    return turns


def agentinstruct_record(trajectory: Trajectory, record_id: str, example: Trajectory | None = None,
                         listing_style: int = 0) -> JSON:
    """The AgentInstruct record of ``trajectory``, after the in-context ``example`` if given.
    ``listing_style`` 0 lists one tool spec a line, 1 a JSON array (both machine-readable)."""
    tools = list(trajectory.tools or ())
    if example is not None:
        tools += [t for t in example.tools or () if t["name"] not in {x["name"] for x in tools}]
    instructions = system_prompt(REACT, tools, listing_style=listing_style)
    turns = [{"from": "human", "loss": None, "value": instructions}, {"from": "gpt", "loss": False, "value": "OK."}]
    if example is not None:
        turns += _react_turns(example, loss=False)
    return {"id": record_id, "conversations": turns + _react_turns(trajectory, loss=True)}


def toolbench_record(trajectory: Trajectory, indent: int | None = None) -> JSON:
    """The processed-ToolBench record of ``trajectory``; ``indent`` pretty-prints Action Inputs."""
    def step_text(thought: str, name: str, arguments: object) -> str:
        return f"\nThought: {thought}\nAction: {name}\nAction Input: {json.dumps(arguments, ensure_ascii=False, indent=indent)}"

    specs = list(trajectory.tools or ()) + [FINISH_SPEC]
    turns = [{"from": "system", "value": TOOLBENCH_INSTRUCTIONS + TOOLBENCH_API_MARKER + dumps(specs)},
             {"from": "user", "value": f"\n{trajectory.query}\nBegin!\n"}]
    for step in trajectory.steps:
        turns.append({"from": "assistant", "value": step_text(step.thought, step.action or "", step.arguments or {})})
        if step.observation is not None:
            turns.append({"from": "function", "value": _observation_text(TOOLBENCH, step.observation)})
    if trajectory.final is not None:
        final = ({"return_type": "give_up_and_restart"} if trajectory.final.gave_up else
                 {"return_type": "give_answer", "final_answer": trajectory.final.answer})
        turns.append({"from": "assistant", "value": step_text(trajectory.final.thought, "Finish", final)})
    return {"id": f"Step {len(trajectory.steps) + 1}: {trajectory.query}", "conversations": turns}


def generate_raw(shape: str, n: int, seed: int = 0, split: str = "train", recovery_share: float = 0.1,
                 example_share: float = 0.1) -> Iterator[JSON]:
    """``n`` raw records of ``shape`` from the tool world's ``split`` tasks; a pure function of
    the arguments. ``recovery_share`` of them hold a mistake and its recovery; in the
    AgentInstruct shape ``example_share`` open with an in-context example task."""
    if shape not in SHAPES:
        raise ValueError(f"unknown raw shape {shape!r} (known: {', '.join(SHAPES)})")
    tasks = generate_tasks(split, n, seed)
    for i, task in enumerate(tasks):
        rng = random.Random(f"raw|{shape}|{split}|{seed}|{i}")
        trajectory = _trajectory(task, rng, recovery_share)
        if shape == TOOLBENCH:
            yield toolbench_record(trajectory, indent=rng.choice([None, None, 2]))
            continue
        example = None
        if rng.random() < example_share:
            other = next(generate_tasks(split, 1, seed=rng.randrange(2**31)))
            example = other.trajectory()
        yield agentinstruct_record(trajectory, f"toolworld_{split}_{seed}_{i}", example, listing_style=rng.choice([0, 1]))


def _trajectory(task: Task, rng: random.Random, recovery_share: float) -> Trajectory:
    return trajectory_with_recovery(task, rng) if rng.random() < recovery_share else task.trajectory()
