"""encode_files and PackedDataset: every document keeps its file and line, and errors name them.

Corpora are drawn fresh on every run (AGENTFLAN_TEST_SEED=<seed> replays one).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from agentflan.data.conversation import DataFormatError
from agentflan.data.dataset import PackedDataset, encode_files
from agentflan.data.packing import OverlongDocumentError
from agentflan.data.sources import SourceReader
from agentflan.data.templates import encode_conversation
from agentflan.tokenizer import Tokenizer

WORDS = ["weather", "Oslo", "tool", "answer", "the", "call", "result", "42", "\u00e9t\u00e9", "Action:"]


def words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randrange(lo, hi)))


def agentflan_record(rng: random.Random, i: int, trained: bool = True) -> dict:
    turns = [{"role": "user", "content": words(rng, 1, 30)},
             {"role": "assistant", "content": words(rng, 1, 60), "loss": trained}]
    return {"id": f"af_{i}", "conversation": turns}


def write_files(folder: Path, rng: random.Random) -> list[Path]:
    """A JSONL file with blank lines, untrained and bad lines, and a ShareGPT JSON array."""
    lines = [json.dumps(agentflan_record(rng, -1))]  # a good first record: the format is detected from it
    for i in range(rng.randrange(20, 40)):
        kind = rng.random()
        lines.append("" if kind < 0.1 else "{oops" if kind < 0.15 else
                     json.dumps(agentflan_record(rng, i, trained=kind > 0.25)))
    lines.insert(rng.randrange(1, len(lines) + 1), "{oops")  # at least one bad line
    jsonl = folder / "a.jsonl"
    jsonl.write_text("\n".join(lines) + "\n", encoding="utf-8")
    records = [{"id": f"sg_{i}", "conversations": [{"from": "human", "value": words(rng, 1, 20)},
                                                   {"from": "gpt", "value": words(rng, 0, 40)}][: rng.randrange(1, 3)]}
               for i in range(rng.randrange(10, 30))]
    array = folder / "b.json"
    array.write_text(json.dumps(records, indent=rng.choice([None, 2]), ensure_ascii=False), encoding="utf-8")
    return [jsonl, array]


def kept_documents(paths: list[Path], tok: Tokenizer, template: str) -> list[tuple[str, np.ndarray]]:
    """Independently: (place, ids) of every conversation with a trained token, in file order."""
    out = []
    for path in paths:
        for conv in SourceReader(path, skip_bad=True):
            enc = encode_conversation(conv, tok, template)
            if enc.loss_mask.any():
                where = f"{path}:{conv.line}" if conv.offset is None else \
                    f"{path}: byte {conv.offset} (line {conv.line})"
                out.append((where, enc.ids))
    return out


def test_every_document_keeps_its_file_and_line(tmp_path: Path, tok: Tokenizer, seed: int) -> None:
    rng = random.Random(seed)
    paths = write_files(tmp_path, rng)
    corpus = encode_files(paths, tok, "agentflan", skip_bad=True)
    expected = kept_documents(paths, tok, "agentflan")
    assert corpus.n_docs == len(expected) and corpus.files == tuple(str(p) for p in paths), f"seed {seed}"
    assert corpus.doc_file.dtype == np.int32 and corpus.doc_line.dtype == corpus.doc_offset.dtype == np.int64
    for d, (where, ids) in enumerate(expected):
        assert corpus.where(d) == where, f"document {d}, seed {seed}"
        np.testing.assert_array_equal(corpus.tokens[corpus.doc_offsets[d]:corpus.doc_offsets[d + 1]], ids)
    with pytest.raises(DataFormatError, match=rf"^{paths[0]}:\d+: invalid JSON"):
        encode_files(paths, tok, "agentflan")


def test_an_overlong_document_is_named_by_file_and_line(tmp_path: Path, tok: Tokenizer, seed: int) -> None:
    """The issue's case: the sixth kept document (index 5) is too long; the error named
    "document 5". It must name the file and line, here line 8 (a blank line and an
    untrained conversation come before it)."""
    rng = random.Random(seed)
    short = [json.dumps(agentflan_record(rng, i)) for i in range(9)]
    long = json.dumps({"id": "long", "conversation": [{"role": "user", "content": "Oslo " * 300},
                                                      {"role": "assistant", "content": "ok"}]})
    lines = short[:3] + [""] + [json.dumps(agentflan_record(rng, 99, trained=False))] + short[3:5] + [long] + short[5:]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    corpus = encode_files([path], tok, "agentflan")
    length = int(np.diff(corpus.doc_offsets)[5])
    assert length > 300 and corpus.where(5) == f"{path}:8"
    pack_len = max(int(np.diff(corpus.doc_offsets)[[0, 1, 2, 3, 4, 6, 7]].max()), length // 2)
    more = int((np.diff(corpus.doc_offsets) > pack_len).sum()) - 1
    with pytest.raises(OverlongDocumentError) as info:
        PackedDataset(corpus, pack_len, "error")
    tail = f"; {more} more document(s) are longer too" if more else ""
    assert str(info.value) == (f"{path}:8: the conversation is {length} tokens, longer than pack_len {pack_len} "
                               f"(overlong: error; use split or truncate){tail}")
    assert (info.value.doc, info.value.length, info.value.n_overlong) == (5, length, more + 1)
    PackedDataset(corpus, pack_len, "split")


def test_random_overlong_documents_are_named_in_either_container(tmp_path: Path, tok: Tokenizer, seed: int) -> None:
    rng = random.Random(seed)
    paths = write_files(tmp_path, rng)
    expected = kept_documents(paths, tok, "plain")
    lengths = np.array([len(ids) for _, ids in expected])
    pack_len = int(rng.choice(sorted(lengths)[len(lengths) // 3: -1]))
    over = np.flatnonzero(lengths > pack_len)
    first = int(over[0])
    message = (f"{expected[first][0]}: the conversation is {lengths[first]} tokens, longer than pack_len {pack_len} "
               f"(overlong: error; use split or truncate)")
    corpus = encode_files(paths, tok, "plain", skip_bad=True)
    with pytest.raises(OverlongDocumentError) as info:
        PackedDataset(corpus, pack_len, "error")
    more = f"; {len(over) - 1} more document(s) are longer too" if len(over) > 1 else ""
    assert str(info.value) == message + more, f"seed {seed}, pack_len {pack_len}"
    # Told the limit, encode_files stops at the first overlong document, naming it.
    with pytest.raises(OverlongDocumentError) as info:
        encode_files(paths, tok, "plain", skip_bad=True, max_doc_tokens=pack_len)
    assert str(info.value) == message and info.value.doc == first, f"seed {seed}, pack_len {pack_len}"
    assert encode_files(paths, tok, "plain", skip_bad=True, max_doc_tokens=int(lengths.max())).n_docs == len(lengths)


def test_the_overlong_check_comes_before_later_files_are_read(tmp_path: Path, tok: Tokenizer) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"id": "x", "conversation": [{"role": "user", "content": "Oslo " * 50},
                                                          {"role": "assistant", "content": "ok"}]}) + "\n")
    bad = tmp_path / "b.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(OverlongDocumentError, match=rf"^{path}:1: the conversation is \d+ tokens"):
        encode_files([path, bad], tok, "agentflan", format="agentflan", max_doc_tokens=20)
    with pytest.raises(DataFormatError, match=rf"^{bad}:1: invalid JSON"):
        encode_files([path, bad], tok, "agentflan", format="agentflan")
