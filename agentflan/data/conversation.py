"""The in-memory conversation type and the reader for Agent-FLAN JSONL files.

One record a line::

    {"id": "toolbench_tflan_60p_r10r5u7_3",
     "conversation": [{"role": "system", "content": "..."},
                      {"role": "user", "content": "..."},
                      {"role": "assistant", "content": "...", "loss": true}, ...]}

Roles are ``system``, ``user``, ``assistant`` and ``tool``. The released Agent-FLAN files
use the first three only (tool observations come back as ``user`` turns); ``tool`` is the
internal role of a tool observation in corpora that mark them (ToolBench's ``function``
turns, see ``agentflan.data.sources``). Unknown keys on records and messages are ignored,
``loss`` may be missing and content may be empty. Which turns are trained on follows the
dataset maintainers' rule: an assistant turn is a training target unless it says
``"loss": false`` (in-context examples do); system, user and tool turns never are,
whatever their ``loss`` says.

The other source formats are read by ``agentflan.data.sources``, which shares the error
types defined here: ``RecordError`` for a record that cannot be interpreted (with a short
``kind`` that reports count by) and ``DataFormatError`` when it is raised to the caller
with the file and position.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterator

ROLES = ("system", "user", "assistant", "tool")


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
    line: int  # 1-based line where the record starts
    offset: int | None = None  # byte offset of the record's first byte (JSON-array files)

    @property
    def has_trained_turn(self) -> bool:
        return any(m.trained for m in self.messages)


class RecordError(ValueError):
    """A record that cannot be interpreted. ``kind`` is a short, stable category (skip
    reports count by it); the message is the specific reason."""

    def __init__(self, kind: str, reason: str) -> None:
        self.kind = kind
        super().__init__(reason)


def place(path: str | os.PathLike, line: int, offset: int | None = None) -> str:
    """Where a record is, as every data error names it: ``path:line`` for a JSONL line,
    ``path: byte OFFSET (line LINE)`` for a record of a JSON array (line 1-based)."""
    return f"{os.fspath(path)}:{line}" if offset is None else f"{os.fspath(path)}: byte {offset} (line {line})"


class DataFormatError(ValueError):
    """A record of a data file that cannot be interpreted; the message names the file, the
    line (JSONL) or byte offset (JSON arrays, with the line for editors) and the reason."""

    def __init__(self, path: str | os.PathLike, line: int, reason: str, *, offset: int | None = None,
                 kind: str = "invalid record") -> None:
        self.path = str(path)
        self.line = line
        self.offset = offset
        self.reason = reason
        self.kind = kind
        super().__init__(f"{place(self.path, line, offset)}: {reason}")


def parse_loss(obj: dict, where: str) -> bool | None:
    """A message's optional ``loss``: true, false, or absent/null (= the role's default)."""
    loss = obj.get("loss")
    # JSON null counts as "not given": AgentInstruct, one of the corpora Agent-FLAN was
    # built from, writes loss: null on its human turns.
    if loss is not None and not isinstance(loss, bool):
        raise RecordError("bad loss", f"{where}.loss is {json.dumps(loss)}, expected true or false")
    return loss


def parse_id(record: dict) -> str:
    if "id" not in record:
        raise RecordError("missing id", "record has no 'id'")
    rid = record["id"]
    # Integer ids show up in hand-converted files; they identify a record just as well.
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise RecordError("bad id", f"'id' is {type(rid).__name__}, expected a string")
    return str(rid)


def _parse_message(obj: object, index: int) -> Message:
    where = f"conversation[{index}]"
    if not isinstance(obj, dict):
        raise RecordError("bad message", f"{where} is {type(obj).__name__}, expected an object")
    if "role" not in obj:
        raise RecordError("bad message", f"{where} has no 'role'")
    if "content" not in obj:
        raise RecordError("bad message", f"{where} has no 'content'")
    role = obj["role"]
    if role not in ROLES:
        raise RecordError("unknown role", f"{where} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
    content = obj["content"]
    if not isinstance(content, str):
        raise RecordError("bad content", f"{where}.content is {type(content).__name__}, expected a string")
    return Message(role=role, content=content, loss=parse_loss(obj, where))


def parse_agentflan_record(record: object) -> tuple[str, list[Message]]:
    """Validates one decoded Agent-FLAN record; raises RecordError with kind and reason."""
    if not isinstance(record, dict):
        raise RecordError("not an object", f"record is {type(record).__name__}, expected an object")
    rid = parse_id(record)
    if "conversation" not in record:
        raise RecordError("missing conversation", "record has no 'conversation'")
    turns = record["conversation"]
    if not isinstance(turns, list):
        raise RecordError("bad conversation", f"'conversation' is {type(turns).__name__}, expected a list")
    if not turns:
        raise RecordError("empty conversation", "'conversation' is empty")
    return rid, [_parse_message(m, i) for i, m in enumerate(turns)]


def read_agentflan_jsonl(path: str | os.PathLike) -> Iterator[Conversation]:
    """Yields the conversations of an Agent-FLAN JSONL file in file order.

    Blank lines are skipped. A line that cannot be interpreted raises DataFormatError
    naming the file, the 1-based line number and the reason; a missing file raises
    FileNotFoundError. ``agentflan.data.sources.SourceReader`` reads the same files with
    skip counting and the other source formats.
    """
    # Imported here: sources builds on this module's types.
    from agentflan.data.sources import SourceReader

    yield from SourceReader(path, "agentflan", container="jsonl")
