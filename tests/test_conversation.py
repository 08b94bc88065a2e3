import json
import re
from pathlib import Path

import pytest

from agentflan.data.conversation import Conversation, DataFormatError, Message, read_agentflan_jsonl


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD = json.dumps({"id": "ok_0", "conversation": [{"role": "user", "content": "hi"},
                                                   {"role": "assistant", "content": "hello"}]})


def test_reads_records_tolerating_extra_keys_missing_loss_and_empty_content(tmp_path: Path) -> None:
    path = _write(tmp_path / "data.jsonl", [
        json.dumps({"id": "toolbench_tflan_3", "source": "toolbench", "conversation": [
            {"role": "system", "content": "You can use tools.", "type": "instruction"},
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": "Thought: check it", "loss": True, "type": "function_call"},
            {"role": "user", "content": "{\"temp\": 3}", "loss": False},
            {"role": "assistant", "content": ""},
        ]}),
        "",
        "   ",
        json.dumps({"id": 17, "conversation": [{"role": "user", "content": "x", "loss": None},
                                               {"role": "assistant", "content": "ex", "loss": False}]}),
    ])
    convs = list(read_agentflan_jsonl(path))
    assert [c.id for c in convs] == ["toolbench_tflan_3", "17"]
    assert [c.line for c in convs] == [1, 4]  # blank lines are skipped but still counted
    assert all(c.source == str(path) for c in convs)
    assert convs[0].messages == [
        Message("system", "You can use tools.", None),
        Message("user", "Weather in Oslo?", None),
        Message("assistant", "Thought: check it", True),
        Message("user", "{\"temp\": 3}", False),
        Message("assistant", "", None),
    ]
    assert convs[1].messages == [Message("user", "x", None), Message("assistant", "ex", False)]


def test_trained_turns_follow_the_maintainers_rule() -> None:
    # Assistant turns train unless loss is false; system and user turns never, whatever they say.
    assert Message("assistant", "a", None).trained
    assert Message("assistant", "a", True).trained
    assert not Message("assistant", "a", False).trained
    assert not Message("user", "observation", True).trained
    assert not Message("system", "s", True).trained
    assert not Message("user", "u", None).trained


BAD_LINES = {
    "truncated JSON": ('{"id": "t", "conversation": [{"role": "user", "content": "cut', "invalid JSON"),
    "record without conversation": ('{"id": "t", "conversations": []}', "no 'conversation'"),
    "conversation not a list": ('{"id": "t", "conversation": {"role": "user"}}', "'conversation' is dict"),
    "empty conversation": ('{"id": "t", "conversation": []}', "'conversation' is empty"),
    "record not an object": ('["id", "conversation"]', "record is list"),
    "record without id": ('{"conversation": [{"role": "user", "content": "x"}]}', "no 'id'"),
    "message without role": ('{"id": "t", "conversation": [{"from": "human", "content": "x"}]}',
                             "conversation[0] has no 'role'"),
    "message without content": ('{"id": "t", "conversation": [{"role": "user", "value": "x"}]}',
                                "conversation[0] has no 'content'"),
    "message not an object": ('{"id": "t", "conversation": ["hello"]}', "conversation[0] is str"),
    "content not a string": ('{"id": "t", "conversation": [{"role": "user", "content": ["x"]}]}',
                             "conversation[0].content is list"),
    "unknown role": ('{"id": "t", "conversation": [{"role": "user", "content": "x"}, '
                     '{"role": "function", "content": "{}"}]}', "conversation[1] has unknown role 'function'"),
    "string loss": ('{"id": "t", "conversation": [{"role": "assistant", "content": "x", "loss": "true"}]}',
                    "conversation[0].loss is \"true\""),
    "integer loss": ('{"id": "t", "conversation": [{"role": "assistant", "content": "x", "loss": 1}]}',
                     "conversation[0].loss is 1"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_raises_naming_file_line_and_reason(tmp_path: Path, case: str) -> None:
    bad, reason = BAD_LINES[case]
    path = _write(tmp_path / "bad.jsonl", [GOOD, "", GOOD, bad, GOOD])
    reader = read_agentflan_jsonl(path)
    # The lines before the bad one are delivered first: the reader streams.
    assert [c.line for c in (next(reader), next(reader))] == [1, 3]
    with pytest.raises(DataFormatError) as info:
        next(reader)
    err = info.value
    assert (err.path, err.line) == (str(path), 4)
    assert str(err).startswith(f"{path}:4: ")
    assert reason in str(err)


def test_file_ending_mid_record_reports_the_last_line(tmp_path: Path) -> None:
    path = tmp_path / "cut.jsonl"
    path.write_text(GOOD + "\n" + GOOD[: len(GOOD) // 2], encoding="utf-8")
    with pytest.raises(DataFormatError, match=rf"^{re.escape(str(path))}:2: invalid JSON"):
        list(read_agentflan_jsonl(path))


def test_invalid_utf8_reports_its_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + '{"id": "x", "conversation": [{"role": "user", "content": "caf\xe9"}]}'
                     .encode("latin-1") + b"\n")
    with pytest.raises(DataFormatError, match=rf"^{re.escape(str(path))}:2: not valid UTF-8"):
        list(read_agentflan_jsonl(path))


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        list(read_agentflan_jsonl(tmp_path / "nowhere.jsonl"))


def test_tool_role_is_read_and_never_trained(tmp_path: Path) -> None:
    path = _write(tmp_path / "tool.jsonl", [json.dumps({"id": "t", "conversation": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "call"},
        {"role": "tool", "content": "{\"ok\": true}", "loss": True}, {"role": "assistant", "content": "a"}]})])
    (conv,) = read_agentflan_jsonl(path)
    assert [m.role for m in conv.messages] == ["user", "assistant", "tool", "assistant"]
    assert [m.trained for m in conv.messages] == [False, True, False, True]
    assert conv.has_trained_turn
    assert not Conversation("x", [Message("tool", "obs", True), Message("user", "u", None)], "f", 1).has_trained_turn
    assert not Conversation("x", [], "f", 1).has_trained_turn


def test_errors_carry_kind_and_position() -> None:
    jsonl = DataFormatError("data/a.jsonl", 7, "invalid JSON (x)", kind="invalid JSON")
    assert str(jsonl) == "data/a.jsonl:7: invalid JSON (x)" and jsonl.offset is None and jsonl.kind == "invalid JSON"
    array = DataFormatError("data/b.json", 3, "record is int, expected an object", offset=1234, kind="not an object")
    assert str(array) == "data/b.json: byte 1234 (line 3): record is int, expected an object"
    assert (array.path, array.line, array.offset, array.reason) == ("data/b.json", 3, 1234,
                                                                   "record is int, expected an object")


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_kinds(tmp_path: Path, case: str) -> None:
    bad, _ = BAD_LINES[case]
    path = _write(tmp_path / "bad.jsonl", [bad])
    with pytest.raises(DataFormatError) as info:
        list(read_agentflan_jsonl(path))
    expected = {"truncated JSON": "invalid JSON", "record without conversation": "missing conversation",
                "conversation not a list": "bad conversation", "empty conversation": "empty conversation",
                "record not an object": "not an object", "record without id": "missing id",
                "message without role": "bad message", "message without content": "bad message",
                "message not an object": "bad message", "content not a string": "bad content",
                "unknown role": "unknown role", "string loss": "bad loss", "integer loss": "bad loss"}
    assert info.value.kind == expected[case]
