"""When a call's arguments and a final answer are right.

Arguments (``arguments_equal``) are compared as the call a tool would receive, so that two
calls a strict JSON API treats alike are equal and any two it treats differently are not:

* key order does not matter (JSON objects are unordered);
* a key whose value is ``null`` is the key left out (``Tool.check`` drops it);
* an optional parameter left out equals it given at its default, read from the tool
  executor's signature (``get_weather(city, unit="celsius")``);
* numbers compare by value, whatever their formatting (``12``, ``12.0`` and ``1.2e1`` are
  one number; the tool accepts each for an integer parameter), but a number never equals a
  string or a boolean (``"12"`` for a number and ``true`` for ``1`` are type errors the
  tool refuses);
* strings compare exactly (case and spaces included: ``"lisbon"`` is a different call).

A final answer (``answer_is_right``) is right when it holds every answer key of the task
(``agentflan.toolworld.tasks.Task.answer_keys``): a key that is a number is found as a
number of the same value in the answer, however written (``1,234.50`` matches ``1234.5``
but not ``11,234.50``); any other key is found as a substring, ignoring case.
"""

from __future__ import annotations

import inspect
import json
import re
from decimal import Decimal, InvalidOperation
from typing import Any, Sequence

from agentflan.toolworld.tools import JSON, Tool

_NUMBER_KEY = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
# An unsigned number in running text: digits with optional thousands commas and decimals,
# not glued to a letter, a digit or a decimal point on either side.
_NUMBER_IN_TEXT = re.compile(r"(?<![\w.])(\d+(?:,\d{3})*(?:\.\d+)?)(?!\w|\.\d)")


def executor_defaults(tool: Tool) -> dict[str, Any]:
    """The default of each optional parameter of ``tool``, from its executor's signature."""
    optional = {p.name for p in tool.params if not p.required}
    out = {}
    for name, parameter in inspect.signature(tool.run).parameters.items():
        if name in optional and parameter.default is not inspect.Parameter.empty:
            out[name] = parameter.default
    return out


def canonical_arguments(arguments: JSON | str | None, tool: Tool | None = None) -> JSON | str | None:
    """``arguments`` as the call the tool receives: JSON text of an object parsed, null
    values dropped, and (with ``tool``) left-out optional parameters set to their defaults.
    Text that is not a JSON object is returned stripped (a free-form input); None stays None."""
    if arguments is None:
        return None
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError:
            return arguments.strip()
        if not isinstance(parsed, dict):
            return arguments.strip()
        arguments = parsed
    out = {k: v for k, v in arguments.items() if v is not None}
    if tool is not None:
        for name, default in executor_defaults(tool).items():
            out.setdefault(name, default)
    return out


def json_equal(a: Any, b: Any) -> bool:
    """JSON values equal: numbers by value (bool is not a number), strings exactly, arrays in
    order, objects by key set whatever the order."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) or isinstance(b, (int, float)):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and _number(a) == _number(b)
    if isinstance(a, dict) or isinstance(b, dict):
        return isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys() and \
            all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) or isinstance(b, list):
        return isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and \
            all(json_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _number(x: int | float) -> Decimal | float:
    try:
        return Decimal(x) if isinstance(x, int) else Decimal(repr(x))
    except InvalidOperation:  # inf, nan
        return x


def arguments_equal(got: JSON | str | None, gold: JSON | str | None, tool: Tool | None = None) -> bool:
    """Whether ``got`` makes the same call as ``gold`` (rules in the module doc); ``tool``
    is the gold call's tool, for the defaults of its optional parameters."""
    a, b = canonical_arguments(got, tool), canonical_arguments(gold, tool)
    if a is None or b is None:
        return a is b
    return json_equal(a, b)


def numbers_in(text: str) -> list[Decimal]:
    """Every number written in ``text``, by value (thousands commas allowed, a leading minus
    sign read as a sign unless it joins two words or numbers, as in 2024-05-03)."""
    out = []
    for m in _NUMBER_IN_TEXT.finditer(text):
        value = Decimal(m.group(1).replace(",", ""))
        start = m.start()
        if start > 0 and text[start - 1] in "-\u2212" and (start < 2 or not text[start - 2].isalnum()):
            value = -value
        out.append(value)
    return out


def key_in_answer(key: str, answer: str, numbers: Sequence[Decimal] | None = None) -> bool:
    """Whether one answer key is in ``answer`` (a number by value, other text ignoring case)."""
    if _NUMBER_KEY.fullmatch(key.strip()):
        value = Decimal(key.strip().replace(",", ""))
        return value in (numbers if numbers is not None else numbers_in(answer))
    return key.lower() in answer.lower()


def answer_is_right(answer: str | None, keys: Sequence[str]) -> bool:
    """Whether ``answer`` holds every key (see the module doc); None (no answer) is wrong."""
    if answer is None:
        return False
    numbers = numbers_in(answer)
    return all(key_in_answer(k, answer, numbers) for k in keys)
