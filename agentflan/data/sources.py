"""Readers for the four source formats, all into the one internal ``Conversation`` type.

Formats (``format=``; ``auto`` detects it from the first record, see ``classify_record``):

``agentflan``      ``{"id", "conversation": [{"role", "content", "loss"?}]}`` (the Agent-FLAN
                   release; see ``agentflan.data.conversation``). An empty conversation is
                   an error, as the release never has one.
``agentinstruct``  ``{"id", "conversations": [{"from": "human"|"gpt", "value", "loss": null|bool}]}``:
                   human -> user, gpt -> assistant. ``loss: false`` on a gpt turn (the
                   in-context examples) leaves it untrained; null or missing is the default.
``toolbench``      ``{"id", "conversations": [{"from": "system"|"user"|"assistant"|"function", "value"}]}``:
                   function (a tool's observation) -> the internal ``tool`` role, never trained.
``sharegpt``       ``{"id", "conversations": [{"from": "human"|"gpt"|"system", "value"}]}``. The
                   export tags some answers with the chatbot's name and some questions with
                   "user" (ChatHub shares in the real dump): human and user -> user; gpt,
                   chatgpt, bing and bard -> assistant.

In every format unknown keys are ignored, ``loss`` (where given) means the same thing, and
for the ``conversations`` formats an empty list is a conversation with nothing to train on
(the real ShareGPT dump has 126): it is yielded and counted as untrained, not an error.

Containers (``container=``; ``auto`` looks at the first non-blank byte): JSONL, one record
a line, or one JSON array of records. Arrays are streamed in chunks (``chunk_size``), so
memory stays at about one chunk plus the largest record whatever the file size: each
record is decoded by the C JSON decoder straight out of the chunk buffer
(``JSONDecoder.raw_decode``), which finds the record's end and parses it in one pass.
Only when a record fails to decode does a Python scanner (strings and brackets) decide
between "the buffer ends inside the record" (read more and retry; at the end of the file
this is a truncation) and "the record is complete but malformed" (a bad record, whose
extent the scanner found so reading can go on after it).

Bad input: strict by default, the first bad record raises ``DataFormatError`` naming the
file, the line (JSONL) or byte offset and line (arrays) and the reason. With
``skip_bad=True`` bad records are skipped and counted by kind in ``SourceReader.report``
(with the first few examples). A JSON array that ends inside a record (the real ShareGPT
dump does) is not an error in either mode: every complete record is yielded and the
truncation is reported with its byte offset. Errors in the array's own syntax (a missing
comma between records, text after the closing bracket, a malformed record whose end
cannot be found) leave nothing to resynchronise on and raise in both modes.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from agentflan.data.conversation import (
    Conversation,
    DataFormatError,
    Message,
    RecordError,
    parse_agentflan_record,
    parse_id,
    parse_loss,
    place,
)

FORMATS = ("agentflan", "agentinstruct", "toolbench", "sharegpt")
CONTAINERS = ("jsonl", "array")
MAX_EXAMPLES = 5  # skip examples kept per file, in file order

# "from" value -> internal role, per format.
FROM_ROLES: dict[str, dict[str, str]] = {
    "agentinstruct": {"human": "user", "gpt": "assistant"},
    "toolbench": {"system": "system", "user": "user", "assistant": "assistant", "function": "tool"},
    "sharegpt": {"human": "user", "user": "user", "system": "system",
                 "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"},
}


@dataclass(frozen=True)
class Truncation:
    """Where a JSON array file ends early: ``offset`` is the first byte of the incomplete
    record (the file size when the file ends between records)."""

    offset: int
    line: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"offset": self.offset, "line": self.line, "reason": self.reason}


@dataclass
class SourceReport:
    """What reading one file gave: nothing is dropped without a count here."""

    path: str
    format: str
    container: str
    size: int  # bytes
    records: int = 0  # conversations yielded
    untrained: int = 0  # of those, conversations with no trained turn
    skipped: dict[str, int] = field(default_factory=dict)  # kind -> bad records skipped
    examples: list[dict[str, Any]] = field(default_factory=list)  # the first MAX_EXAMPLES skips
    truncation: Truncation | None = None

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "format": self.format, "container": self.container, "bytes": self.size,
            "records": self.records, "untrained": self.untrained,
            "skipped": dict(sorted(self.skipped.items())), "skip_examples": list(self.examples),
            "truncation": self.truncation.to_dict() if self.truncation else None,
        }

    def summary(self) -> str:
        line = f"{self.path}: {self.records} conversations ({self.format}, {self.container})"
        if self.untrained:
            line += f", {self.untrained} with no trained turn"
        if self.skipped:
            line += ", skipped " + ", ".join(f"{n} {kind}" for kind, n in sorted(self.skipped.items()))
        if self.truncation:
            line += f"; truncated at byte {self.truncation.offset}: {self.truncation.reason}"
        return line


def _parse_turns(record: object, roles: dict[str, str]) -> tuple[str, list[Message]]:
    """The ``{"id", "conversations": [{"from", "value", "loss"?}]}`` formats."""
    if not isinstance(record, dict):
        raise RecordError("not an object", f"record is {type(record).__name__}, expected an object")
    rid = parse_id(record)
    if "conversations" not in record:
        raise RecordError("missing conversation", "record has no 'conversations'")
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise RecordError("bad conversation", f"'conversations' is {type(turns).__name__}, expected a list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError("bad message", f"conversations[{i}] is {type(turn).__name__}, expected an object")
        if "from" not in turn:
            raise RecordError("bad message", f"conversations[{i}] has no 'from'")
        if "value" not in turn:
            raise RecordError("bad message", f"conversations[{i}] has no 'value'")
        sender = turn["from"]
        role = roles.get(sender) if isinstance(sender, str) else None
        if role is None:
            raise RecordError("unknown role", f"conversations[{i}] has unknown 'from' {sender!r} "
                                              f"(expected one of {', '.join(roles)})")
        value = turn["value"]
        if not isinstance(value, str):
            raise RecordError("bad content", f"conversations[{i}].value is {type(value).__name__}, expected a string")
        loss = turn.get("loss")  # checked inline: this loop runs once per message of the corpus
        if loss is not None and loss is not True and loss is not False:
            parse_loss(turn, f"conversations[{i}]")  # raises with the reason
        messages.append(Message(role, value, loss))
    return rid, messages


PARSERS: dict[str, Callable[[object], tuple[str, list[Message]]]] = {
    "agentflan": parse_agentflan_record,
    **{name: (lambda record, roles=roles: _parse_turns(record, roles)) for name, roles in FROM_ROLES.items()},
}


def classify_record(record: object) -> str | None:
    """The format a decoded record is written in, or None when it fits none.

    ``conversation`` with role/content is agentflan; for ``conversations``, a ``function``
    or ``assistant`` sender (or ``user`` without human/gpt) is ToolBench, a ``loss`` key on
    any turn is AgentInstruct, anything else ShareGPT. A record with no turns is ambiguous.
    """
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("conversation"), list):
        return "agentflan"
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        return None
    senders = {t.get("from") for t in turns if isinstance(t, dict)}
    if senders & {"function", "assistant"} or ("user" in senders and not senders & {"human", "gpt"}):
        return "toolbench"
    if any(isinstance(t, dict) and "loss" in t for t in turns):
        return "agentinstruct"
    return "sharegpt"


def _utf8_complete(raw: bytes) -> int:
    """Length of the longest prefix of ``raw`` that does not end inside a UTF-8 sequence."""
    n = len(raw)
    for back in range(1, min(4, n) + 1):
        byte = raw[n - back]
        if byte < 0x80:
            return n
        if byte >= 0xC0:  # the lead byte of the last sequence
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return n - back if need > back else n
    return n


_WS = re.compile(r"[ \t\n\r]*")
# A JSON string, or a bracket, or (where the string pattern fails, i.e. the buffer ends
# inside a string) a lone quote.
_SCAN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[][{}]|"', re.S)
_SCALAR = re.compile(r"[-+.0-9A-Za-z]*")
# What json.JSONDecoder reports past the error position when the text was cut short inside
# a token: a \uXXXX escape, a number's fraction or exponent, or a literal (NaN and Infinity too).
_CUT_ESCAPE = re.compile(r"u[0-9a-fA-F]{0,4}")  # 4: cut right after a surrogate
_CUT_TOKEN = re.compile(r"|\.|[eE][-+]?|-?(?:I(?:n(?:f(?:i(?:n(?:i(?:t)?)?)?)?)?)?)?|t(?:r(?:u)?)?|"
                        r"f(?:a(?:l(?:s)?)?)?|n(?:u(?:l)?)?|N(?:a)?")
_PAIRS = {"}": "{", "]": "["}
_OPEN, _CLOSED, _LOST = 0, 1, 2
_ESCAPED = re.compile("[\udc80-\udcff]")  # bytes that were not valid UTF-8 (surrogateescape)


def _scan_value(buf: str, pos: int) -> tuple[int, int]:
    """Where the JSON value starting at ``buf[pos]`` ends, judged by strings and brackets only.

    Returns (_CLOSED, end) when the value's closing bracket or quote is in ``buf``,
    (_OPEN, -1) when ``buf`` ends inside the value, and (_LOST, where) when its end cannot
    be told (it does not start with a bracket or quote, or its brackets do not match).
    """
    if buf[pos] not in '{["':
        # A number or literal: unfinished if it runs to the end of the buffer.
        end = _SCALAR.match(buf, pos).end()
        return (_OPEN, -1) if end == len(buf) else (_LOST, pos)
    stack: list[str] = []
    for m in _SCAN.finditer(buf, pos):
        token = m.group()
        if token[0] == '"':
            if len(token) == 1:
                return _OPEN, -1
            if not stack:
                return _CLOSED, m.end()
        elif token in "[{":
            stack.append(token)
        else:
            if not stack or stack[-1] != _PAIRS[token]:
                return _LOST, m.start()
            stack.pop()
            if not stack:
                return _CLOSED, m.end()
    return _OPEN, -1


def _cut_short(err: json.JSONDecodeError) -> bool:
    """True when the decode error means the text ends too early (a complete file may fix
    it), False when it lies inside the text (no continuation makes it valid), e.g. an
    invalid escape that threw the bracket-and-quote scan off the record's real end."""
    if err.msg.startswith("Unterminated string"):
        return True
    tail = err.doc[err.pos:]
    if err.msg.startswith("Invalid \\uXXXX escape"):
        return _CUT_ESCAPE.fullmatch(tail) is not None
    return _CUT_TOKEN.fullmatch(tail.rstrip(" \t\n\r")) is not None


def _column_of(path: str, offset: int) -> int:
    """1-based character column of the byte at ``offset`` (json's column: a BOM does not
    count, an undecodable byte counts as one character)."""
    start = offset
    with open(path, "rb") as f:
        while start > 0:
            step = min(start, 1 << 16)
            f.seek(start - step)
            newline = f.read(step).rfind(b"\n")
            start -= step
            if newline >= 0:
                start += newline + 1
                break
        f.seek(start)
        head = f.read(offset - start)
    if start == 0 and head.startswith(codecs.BOM_UTF8):
        head = head[len(codecs.BOM_UTF8):]
    return len(head.decode("utf-8", "surrogateescape")) + 1


class _TruncatedFile(Exception):
    """Internal: the array ends early; carries the Truncation for the report."""

    def __init__(self, truncation: Truncation) -> None:
        self.truncation = truncation


class _ArrayReader:
    """Streams the elements of one JSON array file: yields (value | RecordError, line, offset).

    ``buf[pos:]`` is the decoded text not consumed yet; ``byte`` and ``line`` are the file
    position of ``buf[pos]``. Undecodable bytes are kept as surrogate escapes and their
    offsets remembered, so the record holding one is reported, not the whole file.
    """

    def __init__(self, path: str, name: str, chunk_size: int, max_record_bytes: int) -> None:
        self.path = path
        self.name = name  # for messages
        self.chunk_size = chunk_size
        self.max_record_bytes = max_record_bytes
        self.buf = ""
        self.pos = 0
        self.byte = 0
        self.line = 1
        self.ascii = True
        self.eof = False
        self.pending = b""  # bytes of a UTF-8 sequence cut by the chunk boundary
        self.read_bytes = 0  # bytes taken from the file
        self.bad_bytes: list[int] = []  # offsets of invalid UTF-8 bytes not yet passed
        self.truncation: Truncation | None = None
        self.decoder = json.JSONDecoder()

    # -- buffer ----------------------------------------------------------------------

    def _fill(self, file) -> None:
        """Reads at least one more chunk into the buffer, dropping what was consumed. The
        read size grows with the buffer, so a record much larger than a chunk is retried
        a logarithmic number of times, not once per chunk."""
        self.buf = self.buf[self.pos:]
        self.pos = 0
        data = file.read(max(self.chunk_size, len(self.buf)))
        start = self.read_bytes - len(self.pending)  # file offset of raw[0]
        self.read_bytes += len(data)
        raw = self.pending + data
        if data:
            cut = _utf8_complete(raw)
        else:
            self.eof = True
            cut = len(raw)
        self.pending = raw[cut:]
        raw = raw[:cut]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", "surrogateescape")
            for m in _ESCAPED.finditer(text):
                self.bad_bytes.append(start + len(text[: m.start()].encode("utf-8", "surrogateescape")))
        self.buf += text
        self.ascii = self.buf.isascii()

    def _bytes_between(self, a: int, b: int) -> int:
        return b - a if self.ascii else len(self.buf[a:b].encode("utf-8", "surrogateescape"))

    def _advance(self, end: int) -> None:
        self.line += self.buf.count("\n", self.pos, end)
        self.byte += self._bytes_between(self.pos, end)
        self.pos = end

    def _skip_ws(self, file) -> bool:
        """Skips whitespace; False when the file ends first."""
        while True:
            self._advance(_WS.match(self.buf, self.pos).end())
            if self.pos < len(self.buf):
                return True
            if self.eof:
                return False
            self._fill(file)

    def _forget_bad_bytes(self) -> None:
        """Drops the invalid bytes already passed (they belonged to the record just read)."""
        self.bad_bytes = [b for b in self.bad_bytes if b >= self.byte]

    def _position(self, line: int, offset: int, pos: int) -> str:
        """``pos`` (in the buffer, inside the record starting at ``self.pos``, file line
        ``line`` and byte ``offset``) as json reports a place in the whole file: line and
        character column, plus the byte offset. Error path only: the record's own column
        may need a look back in the file for the start of its line."""
        at = offset + self._bytes_between(self.pos, pos)
        newlines = self.buf.count("\n", self.pos, pos)
        if newlines:
            column = pos - self.buf.rindex("\n", self.pos, pos)
        else:
            column = _column_of(self.path, offset) + pos - self.pos
        return f"line {line + newlines} column {column}, byte {at}"

    def _syntax_error(self, reason: str) -> DataFormatError:
        return DataFormatError(self.name, self.line, reason, offset=self.byte, kind="array syntax")

    # -- records -----------------------------------------------------------------------

    def _value(self, file, n_values: int) -> tuple[object, int, int]:
        """Decodes the value at ``pos`` and moves past it; a malformed one comes back as a RecordError."""
        line, offset = self.line, self.byte
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as err:
                status, end = _scan_value(self.buf, self.pos)
                if status == _CLOSED:
                    at = self._position(line, offset, err.pos)
                    self._advance(end)
                    self._forget_bad_bytes()
                    return RecordError("invalid JSON", f"invalid JSON ({_json_error(err.msg, at)})"), line, offset
                if status == _LOST:
                    at = self._position(line, offset, err.pos)
                    raise DataFormatError(
                        self.name, line,
                        f"invalid JSON ({_json_error(err.msg, at)}) in a record whose end cannot be found, "
                        f"so no record after it can be read", offset=offset, kind="invalid JSON") from None
                if self.eof and not _cut_short(err):
                    # The scan ran to the end of the file, but the error lies inside the data.
                    at = self._position(line, offset, err.pos)
                    raise DataFormatError(
                        self.name, line, f"invalid JSON ({_json_error(err.msg, at)}) in a record whose end cannot "
                        f"be found, so no record after it can be read", offset=offset, kind="invalid JSON") from None
                if self.eof:
                    raise _TruncatedFile(Truncation(
                        offset, line, f"the file ends inside record {n_values + 1} "
                                      f"(bytes {offset}-{self.read_bytes} are an incomplete record)")) from None
            else:
                # An object, array or string is complete at its closing bracket or quote;
                # a number or literal is complete only where something else follows it.
                if self.eof or self.buf[self.pos] in '{["' or \
                        _SCALAR.match(self.buf, self.pos).end() < len(self.buf):
                    self._advance(end)
                    if self.bad_bytes and self.bad_bytes[0] < self.byte:
                        bad = self.bad_bytes[0]
                        self._forget_bad_bytes()
                        return RecordError("invalid UTF-8", f"not valid UTF-8 (byte {bad})"), line, offset
                    return value, line, offset
            if len(self.buf) - self.pos > self.max_record_bytes:
                raise DataFormatError(self.name, line, f"record is larger than {self.max_record_bytes} bytes "
                                      "(max_record_bytes)", offset=offset, kind="record too large")
            self._fill(file)

    def records(self) -> Iterator[tuple[object, int, int]]:
        with open(self.path, "rb") as file:
            while not self.buf and not self.eof:
                self._fill(file)
            if self.buf.startswith("\ufeff"):  # a BOM: 3 bytes, not part of the JSON
                self._advance(1)
            if not self._skip_ws(file) or self.buf[self.pos] != "[":
                raise self._syntax_error("expected a JSON array ('[')")
            self._advance(self.pos + 1)
            n_values = 0
            try:
                if not self._skip_ws(file):
                    raise _TruncatedFile(Truncation(self.byte, self.line, "the file ends right after '['"))
                if self.buf[self.pos] != "]":
                    while True:
                        yield self._value(file, n_values)
                        n_values += 1
                        if not self._skip_ws(file):
                            raise _TruncatedFile(Truncation(
                                self.byte, self.line,
                                f"the file ends after {n_values} complete records without the closing ']'"))
                        c = self.buf[self.pos]
                        if c == "]":
                            break
                        if c != ",":
                            raise self._syntax_error(f"expected ',' or ']' after a record, found {c!r}")
                        self._advance(self.pos + 1)
                        if not self._skip_ws(file):
                            raise _TruncatedFile(Truncation(
                                self.byte, self.line,
                                f"the file ends after {n_values} complete records and a ','"))
                        if self.buf[self.pos] == "]":
                            raise self._syntax_error("trailing ',' before ']'")
                self._advance(self.pos + 1)
                if self._skip_ws(file):
                    raise self._syntax_error(f"unexpected {self.buf[self.pos]!r} after the array's closing ']'")
            except _TruncatedFile as cut:
                self.truncation = cut.truncation


def _jsonl_records(path: str) -> Iterator[tuple[object, int, int]]:
    """Yields (value | RecordError, line, offset) for each non-blank line.

    Positions inside a bad line are the ones Python's json reports for the line alone
    (1-based column, in characters) or, for bytes that are not UTF-8, the file's byte
    offset: the line's own newline is not part of the record, so an error at its end is
    at the end of the line, not at "column 1" of the next.
    """
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            start = offset
            offset += len(raw)
            body = raw[len(codecs.BOM_UTF8):] if lineno == 1 and raw.startswith(codecs.BOM_UTF8) else raw
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError as err:
                at = offset - len(body) + err.start
                yield RecordError("invalid UTF-8", f"not valid UTF-8 ({err.reason} at byte {at})"), lineno, start
                continue
            text = text.rstrip("\r\n")
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                reason = f"invalid JSON ({_json_error(err.msg, f'column {err.colno}')})"
                yield RecordError("invalid JSON", reason), lineno, start
                continue
            yield value, lineno, start


def detect_container(path: str | os.PathLike) -> str:
    """``array`` when the first non-blank byte (after a BOM) is '[', else ``jsonl``."""
    with open(path, "rb") as f:
        head = f.read(4096)
        while head:
            rest = head.lstrip(codecs.BOM_UTF8 if head.startswith(codecs.BOM_UTF8) else b"").lstrip(b" \t\r\n")
            if rest:
                return "array" if rest[:1] == b"[" else "jsonl"
            head = f.read(4096)
    return "jsonl"


def _json_error(message: str, where: str) -> str:
    """json's message and the place: 'Expecting value at column 3', and 'Unterminated string
    starting at column 3' (that message already ends in 'at')."""
    return f"{message} {where}" if message.endswith(" at") else f"{message} at {where}"


class FormatDetectionError(ValueError):
    """A file whose format cannot be detected from its first record. ``reason`` says why;
    the message adds the advice to name the format (a recipe's ``format``, --format)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}; name the format ({', '.join(FORMATS)})")


class SourceReader:
    """Iterates the conversations of one file; ``report`` counts what was read, skipped and cut.

        reader = SourceReader("sharegpt.json", "sharegpt", skip_bad=True)
        for conv in reader: ...
        print(reader.report.summary())

    ``name`` is the path written into conversations and errors (default: ``path``).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        format: str = "auto",
        *,
        skip_bad: bool = False,
        container: str = "auto",
        name: str | None = None,
        chunk_size: int = 1 << 20,
        max_record_bytes: int = 1 << 30,
    ) -> None:
        if format != "auto" and format not in FORMATS:
            raise ValueError(f"unknown source format {format!r}; known formats: auto, {', '.join(FORMATS)}")
        if container != "auto" and container not in CONTAINERS:
            raise ValueError(f"unknown container {container!r}; known: auto, {', '.join(CONTAINERS)}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.path = str(path)
        self.name = name if name is not None else self.path
        if not Path(self.path).is_file():
            raise FileNotFoundError(f"source file not found: {self.name}")
        self.skip_bad = skip_bad
        self.chunk_size = chunk_size
        self.max_record_bytes = max_record_bytes
        self.container = detect_container(self.path) if container == "auto" else container
        self.format = self._detect() if format == "auto" else format
        self.report = SourceReport(self.name, self.format, self.container, os.path.getsize(self.path))
        self._used = False

    def _raw(self) -> Iterator[tuple[object, int, int]]:
        if self.container == "jsonl":
            return _jsonl_records(self.path)
        self._array = _ArrayReader(self.path, self.name, self.chunk_size, self.max_record_bytes)
        return self._array.records()

    def _detect(self) -> str:
        for value, line, offset in self._raw():
            where = place(self.name, line, offset if self.container == "array" else None)
            if isinstance(value, RecordError):
                raise FormatDetectionError(f"{where}: cannot detect the format from the first record ({value})")
            found = classify_record(value)
            if found is None:
                raise FormatDetectionError(f"{where}: the first record fits no known format ({', '.join(FORMATS)})")
            return found
        raise FormatDetectionError(f"{self.name}: no record to detect the format from")

    def _bad(self, err: RecordError, line: int, offset: int) -> None:
        """Raises in strict mode; otherwise counts the record under its kind."""
        at_offset = offset if self.container == "array" else None
        if not self.skip_bad:
            raise DataFormatError(self.name, line, str(err), offset=at_offset, kind=err.kind)
        report = self.report
        report.skipped[err.kind] = report.skipped.get(err.kind, 0) + 1
        if len(report.examples) < MAX_EXAMPLES:
            report.examples.append({"line": line, "offset": offset, "kind": err.kind, "reason": str(err)})

    def __iter__(self) -> Iterator[Conversation]:
        if self._used:
            raise RuntimeError(f"{self.name}: a SourceReader is read once (its report covers one pass)")
        self._used = True
        parse = PARSERS[self.format]
        report = self.report
        array = self.container == "array"
        for value, line, offset in self._raw():
            if isinstance(value, RecordError):
                self._bad(value, line, offset)
                continue
            try:
                rid, messages = parse(value)
            except RecordError as err:
                self._bad(err, line, offset)
                continue
            conv = Conversation(rid, messages, self.name, line, offset if array else None)
            report.records += 1
            if not conv.has_trained_turn:
                report.untrained += 1
            yield conv
        if array:
            report.truncation = self._array.truncation
