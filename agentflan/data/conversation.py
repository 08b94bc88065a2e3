"""The in-memory conversation type and the reader for Agent-FLAN JSONL files.

One record a line::

    {"id": "toolbench_tflan_60p_r10r5u7_3",
     "conversation": [{"role": "system", "content": "..."},
                      {"role": "user", "content": "..."},
                      {"role": "assistant", "content": "...", "loss": true}, ...]}

Roles are ``system``, ``user`` and ``assistant``; tool observations come back as ``user``
turns. Unknown keys on records and messages are ignored, ``loss`` may be missing and
content may be empty. Which turns are trained on follows the dataset maintainers' rule:
an assistant turn is a training target unless it says ``"loss": false`` (in-context
examples do); system and user turns never are, whatever their ``loss`` says.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str
    loss: bool | None

    @property
    def trained(self) -> bool:
        """Whether this turn's content is a training target."""
        return self.role == "assistant" and self.loss is not False


@dataclass(frozen=True, slots=True)
class Conversation:
    id: str
    messages: list[Message]
    source: str
    line: int


class DataFormatError(ValueError):
    """A line of a data file that cannot be interpreted; the message names file, line and reason."""

    def __init__(self, path: str | os.PathLike, line: int, reason: str) -> None:
        self.path = str(path)
        self.line = line
        self.reason = reason
        super().__init__(f"{self.path}:{line}: {reason}")


def _parse_message(obj: object, index: int) -> Message:
    """Validates one element of a record's conversation; raises ValueError with the reason."""
    where = f"conversation[{index}]"
    if not isinstance(obj, dict):
        raise ValueError(f"{where} is {type(obj).__name__}, expected an object")
    if "role" not in obj:
        raise ValueError(f"{where} has no 'role'")
    if "content" not in obj:
        raise ValueError(f"{where} has no 'content'")
    role = obj["role"]
    if role not in ROLES:
        raise ValueError(f"{where} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
    content = obj["content"]
    if not isinstance(content, str):
        raise ValueError(f"{where}.content is {type(content).__name__}, expected a string")
    loss = obj.get("loss")
    # JSON null counts as "not given": AgentInstruct, one of the corpora Agent-FLAN was
    # built from, writes loss: null on its human turns.
    if loss is not None and not isinstance(loss, bool):
        raise ValueError(f"{where}.loss is {json.dumps(loss)}, expected true or false")
    return Message(role=role, content=content, loss=loss)


def _parse_record(text: str) -> tuple[str, list[Message]]:
    """Validates one JSONL line; raises ValueError with the reason."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"record is {type(record).__name__}, expected an object")
    if "id" not in record:
        raise ValueError("record has no 'id'")
    rid = record["id"]
    # Integer ids show up in hand-converted files; they identify a record just as well.
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise ValueError(f"'id' is {type(rid).__name__}, expected a string")
    if "conversation" not in record:
        raise ValueError("record has no 'conversation'")
    turns = record["conversation"]
    if not isinstance(turns, list):
        raise ValueError(f"'conversation' is {type(turns).__name__}, expected a list")
    if not turns:
        raise ValueError("'conversation' is empty")
    return str(rid), [_parse_message(m, i) for i, m in enumerate(turns)]


def read_agentflan_jsonl(path: str | os.PathLike) -> Iterator[Conversation]:
    """Yields the conversations of an Agent-FLAN JSONL file in file order.

    Blank lines are skipped. A line that cannot be interpreted raises DataFormatError
    naming the file, the 1-based line number and the reason; a missing file raises
    FileNotFoundError.
    """
    source = str(Path(path))
    # Lines are read as bytes so that a bad UTF-8 sequence is reported with its line number.
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise DataFormatError(source, lineno, f"not valid UTF-8 ({err.reason} at byte {err.start})") from None
            if not text.strip():
                continue
            try:
                rid, messages = _parse_record(text)
            except ValueError as err:
                raise DataFormatError(source, lineno, str(err)) from None
            yield Conversation(id=rid, messages=messages, source=source, line=lineno)
