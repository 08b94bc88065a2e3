import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from agentflan.corpus.build import output_paths
from agentflan.corpus.default import DEFAULT_SIZE, plan, write_corpus
from agentflan.data.conversation import Conversation, read_agentflan_jsonl
from agentflan.data.defaults import DEFAULT_CORPUS, DEFAULT_TOKENIZER
from agentflan.data.templates import AGENTFLAN_SPECIAL_PIECES, TEMPLATES, encode_conversation
from agentflan.tokenizer import Tokenizer
from agentflan.toolworld import CHAT, REACT, World, parse_arguments, parse_react, parse_tool_choice
from agentflan.toolworld.catalogue import TOOLS_BY_NAME
from agentflan.toolworld.negatives import KINDS
from agentflan.toolworld.protocol import FACETS

MANIFEST = output_paths(DEFAULT_CORPUS)[1]
# Tools whose answers depend on their arguments only (not on the world's seed or state).
PURE_TOOLS = {"calculator", "convert_units", "convert_currency", "days_between", "add_days", "calculate_bmi",
              "loan_payment", "define_word", "translate_text", "get_country_info", "web_search"}


@pytest.fixture(scope="module")
def corpus() -> list[Conversation]:
    return list(read_agentflan_jsonl(DEFAULT_CORPUS))


@pytest.fixture(scope="module")
def raw() -> list[dict]:
    return [json.loads(line) for line in DEFAULT_CORPUS.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_shipped_corpus_and_manifest_are_the_generator_output_byte_for_byte(tmp_path: Path) -> None:
    out = tmp_path / "agentflan_tooluse.jsonl"
    write_corpus(out)
    assert out.read_bytes() == DEFAULT_CORPUS.read_bytes()
    assert output_paths(out)[1].read_bytes() == MANIFEST.read_bytes()


def test_manifest_describes_the_shipped_corpus(raw: list[dict]) -> None:
    import hashlib

    manifest = json.loads(MANIFEST.read_text())
    assert manifest["sha256"] == hashlib.sha256(DEFAULT_CORPUS.read_bytes()).hexdigest()
    assert manifest["conversations"] == len(raw) == DEFAULT_SIZE
    forms = Counter(r["id"].split("/", 1)[0] for r in raw)
    assert manifest["forms"] == dict(forms)
    trajectories, instruct, negatives = plan(DEFAULT_SIZE)
    assert sum(s["trajectories"] for s in manifest["inputs"]) == trajectories
    assert manifest["options"]["instruct_samples"] == instruct and manifest["options"]["negatives"] == negatives
    assert all(not s["skipped"] for s in manifest["inputs"])  # train split only, all generated records parse
    # Trained turns per facet in the file match the manifest.
    trained = Counter(m["facet"] for r in raw for m in r["conversation"] if m.get("facet") and m["loss"])
    assert {f: manifest["facets"][f]["trained_turns_after"] for f in FACETS} == {f: trained[f] for f in FACETS}


def test_shipped_corpus_has_the_documented_mix(corpus: list[Conversation], raw: list[dict]) -> None:
    assert len({c.id for c in corpus}) == len(corpus)
    forms = Counter(c.id.split("/", 1)[0] for c in corpus)
    assert set(forms) == {"chat", "react", "instruct-json", "instruct-react", "negative-no_tools",
                          "negative-irrelevant_tools"}
    assert forms["react"] == round(0.1 * (forms["chat"] + forms["react"]))  # the paper's 10% ReAct share
    messages = [m for c in corpus for m in c.messages]
    assert any(m.role == "assistant" and m.loss is False for m in messages)  # in-context turns, facet weights
    assert all(any(m.trained for m in c.messages) for c in corpus)  # every conversation has something to learn
    facets = {m.get("facet") for r in raw for m in r["conversation"] if m["role"] == "assistant"}
    assert facets == set(FACETS) | {None}  # None: the in-context acknowledgement turns


def test_negative_samples_answer_without_calling_a_tool(raw: list[dict]) -> None:
    negatives = [r for r in raw if r["id"].startswith("negative-")]
    kinds = Counter(r["id"].split("/")[0].removeprefix("negative-") for r in negatives)
    assert set(kinds) == set(KINDS) and abs(kinds[KINDS[0]] - kinds[KINDS[1]]) <= 1
    for r in negatives:
        turns = r["conversation"]
        system = turns[0]["content"] if turns[0]["role"] == "system" else ""
        assert ("Tools:" in system) == r["id"].startswith("negative-irrelevant_tools"), r["id"]
        answers = [t for t in turns if t["role"] == "assistant"]
        assert len(answers) == 1 and answers[0]["loss"] is True
        assert not any(s in answers[0]["content"] for s in ("Action:", "Thought:", "`", "I will use", "I'll use"))


def _observation(text: str) -> dict:
    """The tool's JSON from an observation turn in any of the shipped styles."""
    body = json.loads(text.removeprefix("Observation: "))
    if set(body) == {"error", "response"}:
        return json.loads(body["response"]) if body["error"] == "" else {"error": body["error"]}
    return body


def test_every_call_to_a_pure_tool_gets_what_the_tool_returns(raw: list[dict]) -> None:
    # Calls read back with the protocol's own parsers, re-run in a fresh world: the recorded
    # observation is the tool's answer (errors compared by message: ToolBench keeps only that).
    world = World(0)
    checked = Counter()
    for r in raw:
        form = r["id"].split("/", 1)[0]
        turns = r["conversation"]
        for i, turn in enumerate(turns[:-1]):
            if turn["role"] != "assistant" or turn.get("facet") is None:
                continue
            if form == CHAT and turn["facet"] == "understand":
                name = parse_tool_choice(turns[i - 2]["content"], list(TOOLS_BY_NAME)).name
                arguments = parse_arguments(turn["content"]).arguments
            elif form == REACT:
                step = parse_react(turn["content"])
                if step.kind != "call":
                    continue
                name, arguments = step.name, step.arguments
            else:
                continue
            if name not in PURE_TOOLS:
                continue
            expected = world.call(name, arguments)
            if "error" in expected:
                expected = {"error": expected["error"]["message"]}
            got = _observation(turns[i + 1]["content"])
            if isinstance(got.get("error"), dict):
                got = {"error": got["error"]["message"]}
            assert got == expected, (r["id"], name, arguments)
            checked[name] += 1
    assert len(checked) >= 8 and checked["calculator"] > 100, checked


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


def test_make_default_corpus_equals_build_corpus_on_its_raw_files(tmp_path: Path, seed: int) -> None:
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    n = 40 + seed % 40
    made = tmp_path / "made.jsonl"
    proc = subprocess.run([sys.executable, str(repo / "tools/make_default_corpus.py"), "--out", str(made), "--n", str(n),
                           "--seed", str(seed), "--raw-dir", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    raw = sorted(tmp_path.glob("toolworld_*.jsonl"))
    assert [p.name for p in raw] == ["toolworld_agentinstruct.jsonl", "toolworld_toolbench.jsonl"]
    _, instruct, negatives = plan(n)
    built = tmp_path / "built.jsonl"
    proc = subprocess.run([sys.executable, str(repo / "tools/build_corpus.py"), "--input", str(raw[0]), "--input",
                           str(raw[1]), "--output", str(built), "--instruct-samples", str(instruct), "--negatives",
                           str(negatives), "--seed", str(seed)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert built.read_bytes() == made.read_bytes() and sum(1 for _ in read_agentflan_jsonl(built)) == n
    (tmp_path / "a_file").write_text("")
    proc = subprocess.run([sys.executable, str(repo / "tools/make_default_corpus.py"), "--out", str(made),
                           "--raw-dir", str(tmp_path / "a_file")], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.startswith("error: --raw-dir") and "not a folder" in proc.stderr


def test_make_default_corpus_refuses_unwritable_or_existing_outputs_before_any_work(tmp_path: Path, seed: int,
                                                                                 capsys) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_default_corpus_tool", Path(__file__).resolve().parents[1] / "tools" / "make_default_corpus.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    small = ["--n", str(4 + seed % 8), "--seed", str(seed % 1000)]
    mine = tmp_path / "mine.jsonl"
    mine.write_text(f"a user's file {seed}\n")
    folder = tmp_path / "afolder"
    folder.mkdir()
    raw = tmp_path / "raw"

    def refused(*args: str, words: str) -> None:
        capsys.readouterr()
        assert tool.main([*args, *small]) == 1, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and words in err, err

    refused("--out", str(mine), words="mine.jsonl: exists (use --overwrite")
    refused("--out", str(folder), "--overwrite", words="is a folder; give the path of a file")
    refused("--out", str(mine / "x.jsonl"), "--overwrite", words="mine.jsonl is a file, not a folder")
    refused("--out", str(tmp_path / "new" / "c.jsonl"), "--raw-dir", str(mine), words="--raw-dir")
    refused("--out", str(raw / "toolworld_toolbench.jsonl"), "--raw-dir", str(raw), "--overwrite",
            words="is the same file as --raw-dir's")
    assert mine.read_text() == f"a user's file {seed}\n" and list(folder.iterdir()) == []
    assert not raw.exists() and not (tmp_path / "new").exists()
    assert not [p for p in tmp_path.rglob(".*") if p.name.endswith(".tmp")]

    assert tool.main(["--out", str(tmp_path / "c.jsonl"), "--raw-dir", str(raw), *small]) == 0
    made = (tmp_path / "c.jsonl").read_bytes()
    refused("--out", str(tmp_path / "d.jsonl"), "--raw-dir", str(raw), words="toolworld_agentinstruct.jsonl: exists")
    assert tool.main(["--out", str(mine), "--raw-dir", str(raw), "--overwrite", *small]) == 0
    assert mine.read_bytes() == made
