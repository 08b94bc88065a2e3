import ast
import json
import operator
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from agentflan.data.conversation import Conversation, read_agentflan_jsonl
from agentflan.data.defaults import DEFAULT_CORPUS, DEFAULT_TOKENIZER
from agentflan.data.synthetic import DEFAULT_SIZE, corpus_bytes
from agentflan.data.templates import AGENTFLAN_SPECIAL_PIECES, TEMPLATES, encode_conversation
from agentflan.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def corpus() -> list[Conversation]:
    return list(read_agentflan_jsonl(DEFAULT_CORPUS))



def test_shipped_corpus_is_the_generator_output_byte_for_byte() -> None:
    assert DEFAULT_CORPUS.read_bytes() == corpus_bytes()


def test_shipped_corpus_parses_and_has_the_documented_mix(corpus: list[Conversation]) -> None:
    assert len(corpus) == DEFAULT_SIZE
    assert len({c.id for c in corpus}) == len(corpus)
    forms = Counter(c.id.rsplit("_", 1)[0] for c in corpus)
    assert set(forms) == {"tooluse_react", "tooluse_react_finish", "tooluse_chat", "tooluse_chat_cot",
                          "tooluse_negative"}
    assert all(n >= 0.05 * len(corpus) for n in forms.values())
    messages = [m for c in corpus for m in c.messages]
    assert any(m.role == "assistant" and m.loss is False for m in messages)  # in-context examples
    assert any(m.role == "assistant" and m.loss is None for m in messages)  # no loss key
    # Every conversation has something to learn.
    assert all(any(m.trained for m in c.messages) for c in corpus)
    raw = [json.loads(line) for line in DEFAULT_CORPUS.read_text(encoding="utf-8").splitlines()]
    assert any("type" in m for r in raw for m in r["conversation"])  # extra message keys


def test_negative_samples_answer_without_calling_a_tool(corpus: list[Conversation]) -> None:
    negatives = [c for c in corpus if c.id.startswith("tooluse_negative_")]
    with_tools = [c for c in negatives if c.messages[0].role == "system" and "Tools:" in c.messages[0].content]
    # Both kinds: (a) no tools offered, (b) tools offered but not needed.
    assert 0 < len(with_tools) < len(negatives)
    for conv in negatives:
        answers = [m.content for m in conv.messages if m.role == "assistant"]
        assert len(answers) == 1
        assert not any(s in answers[0] for s in ("Action:", "Thought:", "`"))


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Pow: operator.pow}


def _evaluate(expr: str) -> Fraction:
    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.BinOp):
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        assert isinstance(node, ast.Constant)
        return Fraction(str(node.value))
    return ev(ast.parse(expr, mode="eval").body)


def test_calculator_observations_are_correct() -> None:
    # Every calculator call's observation is the true value of its expression (to 4 decimals).
    checked = 0
    for line in DEFAULT_CORPUS.read_text(encoding="utf-8").splitlines():
        turns = json.loads(line)["conversation"]
        for call, obs in zip(turns, turns[1:]):
            start = call["content"].find("{\"expression\"")
            if call["role"] != "assistant" or start < 0:
                continue
            args = json.loads(call["content"][start:].splitlines()[0])
            body = obs["content"]
            result = json.loads(body[body.index("{"):])
            result = result.get("response", result)["result"]
            assert abs(Fraction(str(result)) - _evaluate(args["expression"])) <= Fraction(1, 10**4) / 2, line
            checked += 1
    assert checked > 100


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_every_shipped_conversation_encodes(corpus: list[Conversation], tok: Tokenizer, template: str) -> None:
    for conv in corpus:
        enc = encode_conversation(conv, tok, template)
        assert enc.ids[0] == tok.bos_id
        assert 0 < int(enc.loss_mask.sum()) < len(enc.ids)
        assert int(enc.ids.min()) >= 0 and int(enc.ids.max()) < tok.vocab_size
        assert not np.any(enc.ids == tok.unk_id), conv.id  # byte fallback: nothing is unknown


def _fields(buf: bytes) -> dict[int, list]:
    """Top-level fields of a protobuf message: number -> values (varints as int, others as bytes)."""
    def varint(i: int) -> tuple[int, int]:
        shift = value = 0
        while True:
            byte = buf[i]
            value |= (byte & 0x7F) << shift
            i, shift = i + 1, shift + 7
            if byte < 0x80:
                return value, i
    out: dict[int, list] = {}
    i = 0
    while i < len(buf):
        key, i = varint(i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(i)
        elif wire == 2:
            size, i = varint(i)
            value, i = buf[i:i + size], i + size
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            assert wire == 1, f"unexpected wire type {wire}"
            value, i = buf[i:i + 8], i + 8
        out.setdefault(number, []).append(value)
    return out


def test_shipped_tokenizer_is_llama_style_bpe_with_byte_fallback(tok: Tokenizer) -> None:
    model = _fields(DEFAULT_TOKENIZER.read_bytes())
    trainer = _fields(model[2][0])  # ModelProto.trainer_spec
    normalizer = _fields(model[3][0])  # ModelProto.normalizer_spec
    assert trainer[3] == [2]  # TrainerSpec.model_type == BPE
    assert trainer[35] == [1]  # TrainerSpec.byte_fallback
    assert trainer[25] == [1]  # TrainerSpec.split_digits
    assert normalizer.get(3, [1]) == [1]  # NormalizerSpec.add_dummy_prefix (default true)
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, -1)
    assert tok.vocab_size == 4096
    assert [tok.id_to_piece(tok.piece_to_id(p)) for p in AGENTFLAN_SPECIAL_PIECES] == list(AGENTFLAN_SPECIAL_PIECES)
    assert len({tok.piece_to_id(p) for p in AGENTFLAN_SPECIAL_PIECES} - {tok.unk_id}) == 4
    text = "Zürich: 1234 km 🦜\n\tdone"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert "<0xF0>" in [tok.id_to_piece(i) for i in ids]  # the emoji goes through byte fallback
    assert [tok.id_to_piece(i) for i in tok.encode("1234")][-4:] == ["1", "2", "3", "4"]


def test_tokenizer_errors_name_the_path(tmp_path: Path, tok: Tokenizer) -> None:
    with pytest.raises(FileNotFoundError, match="missing.model"):
        Tokenizer(tmp_path / "missing.model")
    bad = tmp_path / "garbage.model"
    bad.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(ValueError, match="garbage.model: not a valid SentencePiece model"):
        Tokenizer(bad)
    with pytest.raises(IndexError, match="outside the vocabulary"):
        tok.id_to_piece(tok.vocab_size)
