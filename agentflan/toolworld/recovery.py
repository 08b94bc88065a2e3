"""Trajectories with a mistake and its recovery: one wrong call, the error the tool really
returns for it, a thought that reads the error, and the corrected call.

The mistakes are the ones agents make against real APIs: a required parameter left out
(``missing_parameter``), a number sent as a string (``invalid_type``), a parameter under a
wrong name (``unknown_parameter``), or a value in the wrong form: a spoken date for
YYYY-MM-DD, a unit's name for its symbol, a city for an IANA time zone (``invalid_value``).
"""

from __future__ import annotations

import datetime as dt
import random

from agentflan.toolworld.catalogue import TOOLS_BY_NAME
from agentflan.toolworld.protocol import dumps
from agentflan.toolworld.tables import MONTHS, TIMEZONES, UNITS
from agentflan.toolworld.tasks import GoldCall, Task
from agentflan.toolworld.tools import JSON
from agentflan.toolworld.trajectory import Final, Step, Trajectory
from agentflan.toolworld.world import is_error

# parameter -> the name an agent might guess instead
WRONG_NAMES = {"city": "location", "date": "day", "amount": "value", "expression": "expr", "symbol": "ticker",
               "query": "q", "word": "term", "timezone": "tz", "sql": "query", "order_id": "id", "text": "phrase",
               "target_language": "language", "to": "recipient", "title": "name", "start_time": "time",
               "from_unit": "from", "to_unit": "to", "from_currency": "from", "to_currency": "to",
               "country": "name", "origin": "from", "destination": "to", "weight_kg": "weight",
               "height_cm": "height", "principal": "amount", "years": "term_years", "days": "n_days",
               "start_date": "from_date", "end_date": "to_date", "event_id": "id", "value": "amount"}
_CITY_OF_ZONE = {tz: city for city, tz, _ in TIMEZONES}

RECOVERY_THOUGHTS = ("The call failed: {message}. I'll fix the arguments and call {name} again.",
                     "That didn't work ({message}). Let me correct the call.",
                     "The tool returned an error: {message}. I'll retry with corrected arguments.")


def _wrong_value(name: str, value: object) -> object | None:
    """A value of the right type in a form the tool rejects, or None when there is none."""
    if not isinstance(value, str):
        return None
    if name in ("date", "start_date", "end_date"):
        try:
            day = dt.date.fromisoformat(value)
        except ValueError:
            return None
        return f"{MONTHS[day.month - 1]} {day.day}, {day.year}"
    if name in ("from_unit", "to_unit") and value in UNITS:
        return UNITS[value][2]
    if name == "timezone":
        return _CITY_OF_ZONE.get(value)
    return None


def mistakes(call: GoldCall) -> list[JSON]:
    """Wrong argument sets for ``call``, one per kind of mistake that applies to it."""
    tool = TOOLS_BY_NAME[call.name]
    args = call.arguments
    out = []
    for p in tool.params:
        if p.name not in args:
            continue
        if p.required:
            out.append({k: v for k, v in args.items() if k != p.name})
        if p.type in ("number", "integer"):
            out.append({**args, p.name: str(args[p.name])})
        wrong_name = WRONG_NAMES.get(p.name)
        if wrong_name and wrong_name not in args:
            out.append({(wrong_name if k == p.name else k): v for k, v in args.items()})
        wrong = _wrong_value(p.name, args[p.name])
        if wrong is not None:
            out.append({**args, p.name: wrong})
    return out


def trajectory_with_recovery(task: Task, rng: random.Random) -> Trajectory:
    """The task's gold trajectory with one drawn mistake before one drawn gold call; the
    mistake is run in the task's world, so its observation is the tool's real error."""
    target = rng.randrange(len(task.calls))
    options = mistakes(task.calls[target])
    rng.shuffle(options)
    world = task.world()
    steps: list[Step] = []
    for i, call in enumerate(task.calls):
        thought = call.thought
        if i == target:
            for wrong in options:
                observation = world.call(call.name, wrong, task.tools)
                if is_error(observation):
                    steps.append(Step(call.thought, call.name, wrong, dumps(observation)))
                    thought = rng.choice(RECOVERY_THOUGHTS).format(message=observation["error"]["message"],
                                                                   name=call.name)
                    break
        steps.append(Step(thought, call.name, dict(call.arguments), dumps(world.call(call.name, call.arguments,
                                                                                      task.tools))))
    return Trajectory(task.id, task.query, tuple(steps), Final(task.final_thought, task.answer), task.tool_specs())
