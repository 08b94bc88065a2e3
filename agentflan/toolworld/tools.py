"""Tool descriptions and argument checking, the way a strict JSON API checks a request.

A ``Tool`` has a name, a description and typed parameters (a JSON-schema subset: string,
number, integer, boolean; optional enum; required or not). ``Tool.check`` validates one
call's arguments and raises ``ToolError`` with the error a real API returns for a bad
request, so an agent sees what it got wrong and can retry:

``invalid_arguments``  the arguments are not a JSON object (or not JSON at all)
``unknown_parameter``  a key the tool does not take
``missing_parameter``  a required key is absent
``invalid_type``       a value of the wrong JSON type ("12" for a number, 2.5 for an integer)
``invalid_value``      the right type but not an accepted value (an enum miss, a bad date)
``not_found``          a well-formed request for something that does not exist (an unknown city)
``unknown_tool``       a call to a name that is not in the tool set

An error observation is ``{"error": {"type": ..., "message": ...}}``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable

JSON = dict[str, Any]
PARAM_TYPES = ("string", "number", "integer", "boolean")
ERROR_TYPES = ("invalid_arguments", "unknown_parameter", "missing_parameter", "invalid_type", "invalid_value",
               "not_found", "unknown_tool")


class ToolError(Exception):
    """A call the tool refuses; ``type`` is one of ``ERROR_TYPES``."""

    def __init__(self, type: str, message: str) -> None:
        if type not in ERROR_TYPES:
            raise ValueError(f"unknown tool error type {type!r}")
        self.type = type
        self.message = message
        super().__init__(message)

    def observation(self) -> JSON:
        return {"error": {"type": self.type, "message": self.message}}


@dataclass(frozen=True)
class Param:
    name: str
    type: str  # one of PARAM_TYPES
    description: str = ""
    enum: tuple[str, ...] | None = None
    required: bool = True

    def schema(self) -> JSON:
        out: JSON = {"type": self.type}
        if self.description:
            out["description"] = self.description
        if self.enum:
            out["enum"] = list(self.enum)
        return out


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


@dataclass(frozen=True, eq=False, repr=False)  # identity semantics: each tool is one catalogue object
class Tool:
    name: str
    description: str
    params: tuple[Param, ...]
    run: Callable[..., JSON]  # run(world, **checked_arguments) -> observation; may raise ToolError

    def __repr__(self) -> str:
        return f"Tool({self.name!r})"

    def spec(self) -> JSON:
        """The tool as a function-calling schema: ``{"name", "description", "parameters"}``."""
        return {
            "name": self.name,
            "description": self.description,
            "parameters": {"type": "object", "properties": {p.name: p.schema() for p in self.params},
                           "required": [p.name for p in self.params if p.required]},
        }

    def signature(self) -> str:
        """One line, e.g. ``get_weather(city: string, unit?: "celsius" | "fahrenheit"): Current weather...``."""
        parts = []
        for p in self.params:
            kind = " | ".join(f'"{v}"' for v in p.enum) if p.enum else p.type
            note = f" ({p.description})" if p.description else ""
            parts.append(f"{p.name}{'' if p.required else '?'}: {kind}{note}")
        return f"{self.name}({', '.join(parts)}): {self.description}"

    def check(self, arguments: object) -> JSON:
        """The arguments, validated and with integral numbers as ints; raises ToolError."""
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as err:
                raise ToolError("invalid_arguments", f"{self.name}: arguments are not valid JSON ({err.msg})") from None
        if not isinstance(arguments, dict):
            raise ToolError("invalid_arguments",
                            f"{self.name}: arguments must be a JSON object, got {_type_name(arguments)}")
        known = {p.name: p for p in self.params}
        for key in arguments:
            if key not in known:
                raise ToolError("unknown_parameter", f"{self.name}: unknown parameter '{key}' "
                                                     f"(accepted: {', '.join(known)})")
        out: JSON = {}
        for p in self.params:
            if p.name not in arguments or arguments[p.name] is None:
                if p.required:
                    raise ToolError("missing_parameter", f"{self.name}: missing required parameter '{p.name}'")
                continue
            out[p.name] = _check_value(self.name, p, arguments[p.name])
        return out


def _check_value(tool: str, p: Param, value: object) -> object:
    got = _type_name(value)
    if p.type == "string":
        if not isinstance(value, str):
            raise ToolError("invalid_type", f"{tool}: parameter '{p.name}' must be a string, got {got}")
        if p.enum and value not in p.enum:
            raise ToolError("invalid_value", f"{tool}: parameter '{p.name}' must be one of "
                                             f"{', '.join(p.enum)}; got '{value}'")
        return value
    if p.type == "boolean":
        if not isinstance(value, bool):
            raise ToolError("invalid_type", f"{tool}: parameter '{p.name}' must be a boolean, got {got}")
        return value
    if got != "number":
        raise ToolError("invalid_type", f"{tool}: parameter '{p.name}' must be a {p.type}, got {got}")
    if p.type == "integer":
        if isinstance(value, float) and not value.is_integer():
            raise ToolError("invalid_type", f"{tool}: parameter '{p.name}' must be an integer, got {value}")
        return int(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolError("invalid_value", f"{tool}: parameter '{p.name}' must be a finite number")
    return int(value) if isinstance(value, float) and value.is_integer() else value


def string(name: str, description: str = "", enum: tuple[str, ...] | None = None, required: bool = True) -> Param:
    return Param(name, "string", description, enum, required)


def number(name: str, description: str = "", required: bool = True) -> Param:
    return Param(name, "number", description, None, required)


def integer(name: str, description: str = "", required: bool = True) -> Param:
    return Param(name, "integer", description, None, required)
