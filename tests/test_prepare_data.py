"""tools/prepare_data.py and agentflan.data.prepare: counts, determinism, atomicity, memory.

Corpora are generated fresh on every run (the seed is printed and named in assertion
messages; AGENTFLAN_TEST_SEED=<seed> replays one).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from agentflan.data.conversation import DataFormatError
from agentflan.data.defaults import DEFAULT_OVERLONG, DEFAULT_PACK_LEN, DEFAULT_TEMPLATE, DEFAULT_TOKENIZER
from agentflan.data.loader import PreparedDataset
from agentflan.data.packing import plan_packs
from agentflan.data.prepare import fill_packs, prepare
from agentflan.data.recipe import recipe_from_dict
from agentflan.data.sources import SourceReader
from agentflan.corpus.default import write_corpus
from agentflan.data.templates import encode_conversation
from agentflan.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
WORDS = ["weather", "Oslo", "tool", "answer", "the", "call", "result", "temperature", "is", "a", "city",
         "price", "{\"x\": 1}", "\u00e9t\u00e9", "\u4e2d\u6587", "\U0001F99C", "42", "Thought:", "Action:", "\\n"]




def words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randrange(lo, hi)))


def sharegpt_record(rng: random.Random, i: int) -> dict:
    turns = [{"from": "human" if t % 2 == 0 else "gpt", "value": words(rng, 0, 60)}
             for t in range(rng.randrange(2, 7))]
    return {"id": f"sg_{i}", "conversations": turns}


def make_corpus(folder: Path, rng: random.Random) -> dict:
    """Four files, one per format, with the quirks; returns what they hold by construction."""
    folder.mkdir(parents=True, exist_ok=True)
    n_af = rng.randrange(40, 80)
    write_corpus(folder / "agentflan.jsonl", n=n_af, seed=rng.randrange(2**31))

    sharegpt = [sharegpt_record(rng, i) for i in range(rng.randrange(30, 60))]
    sharegpt[3] = {"id": "sg_empty", "conversations": []}
    sharegpt[7] = {"id": "sg_question", "conversations": [{"from": "human", "value": "hello?"}]}
    texts = [json.dumps(r, ensure_ascii=rng.random() < 0.5, indent=2) for r in sharegpt]
    data = ("[\n  " + ",\n  ".join(texts) + "\n]\n").encode()
    last_start = data.rindex(texts[-1].encode("utf-8"))
    cut = last_start + rng.randrange(1, len(texts[-1].encode()) - 1)
    (folder / "sharegpt.json").write_bytes(data[:cut])

    toolbench = []
    for i in range(rng.randrange(10, 20)):
        toolbench.append({"id": f"Step {i}: query {i}", "conversations": [
            {"from": "system", "value": "Use tools."}, {"from": "user", "value": words(rng, 1, 20)},
            {"from": "assistant", "value": "\nThought: " + words(rng, 1, 10) + "\nAction: f\nAction Input: {}"},
            {"from": "function", "value": json.dumps({"error": "", "response": words(rng, 1, 30)})},
            {"from": "assistant", "value": "Done: " + words(rng, 1, 10)}]})
    (folder / "toolbench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toolbench))

    agentinstruct = [{"id": f"os_{i}", "conversations": [
        {"from": "human", "value": words(rng, 1, 30), "loss": None},
        {"from": "gpt", "value": words(rng, 1, 30), "loss": rng.choice([None, True])}]} for i in range(12)]
    bad = [{"id": "bad_role", "conversations": [{"from": "robot", "value": "x"}]},
           {"id": "bad_loss", "conversations": [{"from": "gpt", "value": "x", "loss": "no"}]},
           {"id": "bad_role2", "conversations": [{"from": "alien", "value": "x"}]}]
    for b in bad:
        agentinstruct.insert(rng.randrange(len(agentinstruct) + 1), b)
    (folder / "agentinstruct.json").write_text(json.dumps(agentinstruct))
    return {"agentflan": n_af, "sharegpt": len(sharegpt) - 1, "sharegpt_untrained": 2,
            "sharegpt_cut": last_start, "toolbench": len(toolbench), "agentinstruct": 12,
            "agentinstruct_skipped": {"unknown role": 2, "bad loss": 1}}


def corpus_recipe(folder: Path, **extra) -> dict:
    return {"sources": [{"path": "agentflan.jsonl", "format": "agentflan"},
                        {"path": "sharegpt.json", "format": "sharegpt"},
                        {"path": "toolbench.jsonl", "format": "toolbench"},
                        {"path": "agentinstruct.json", "format": "agentinstruct", "skip_bad": True}],
            "pack_len": 4096, **extra}


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_manifest_counts_and_contents_match_the_input(tmp_path: Path, tok: Tokenizer, seed: int) -> None:
    rng = random.Random(seed)
    truth = make_corpus(tmp_path / "data", rng)
    recipe = recipe_from_dict(corpus_recipe(tmp_path / "data", template="llama2-chat"), tmp_path / "data")
    manifest = prepare(recipe, tmp_path / "out", num_threads=2)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest
    msg = f"seed {seed}"

    files = [f for s in manifest["sources"] for f in s["files"]]
    assert [f["path"] for f in files] == ["agentflan.jsonl", "sharegpt.json", "toolbench.jsonl", "agentinstruct.json"]
    assert [f["records"] for f in files] == [truth["agentflan"], truth["sharegpt"], truth["toolbench"],
                                             truth["agentinstruct"]], msg
    assert [f["untrained"] for f in files] == [0, truth["sharegpt_untrained"], 0, 0], msg
    assert files[3]["skipped"] == truth["agentinstruct_skipped"]
    assert [e["kind"] for e in files[3]["skip_examples"]] and len(files[3]["skip_examples"]) == 3
    assert manifest["totals"]["skipped"] == truth["agentinstruct_skipped"]
    assert manifest["truncations"] == [{"path": "sharegpt.json", "offset": truth["sharegpt_cut"],
                                        "line": (tmp_path / "data/sharegpt.json").read_bytes()[
                                            :truth["sharegpt_cut"]].count(b"\n") + 1,
                                        "reason": files[1]["truncation"]["reason"]}]

    # Independently: encode every conversation one by one and pack the lengths.
    docs = []
    for spec, name in zip(recipe.sources, ["agentflan.jsonl", "sharegpt.json", "toolbench.jsonl",
                                           "agentinstruct.json"]):
        for conv in SourceReader(tmp_path / "data" / name, spec.format, skip_bad=True):
            enc = encode_conversation(conv, tok, "llama2-chat")
            if enc.loss_mask.any():
                docs.append(enc)
    lengths = np.array([len(d.ids) for d in docs])
    plan = plan_packs(lengths, 4096)
    totals = manifest["totals"]
    n_records = sum(truth[k] for k in ("agentflan", "sharegpt", "toolbench", "agentinstruct"))
    assert totals["records"] == n_records and totals["untrained"] == truth["sharegpt_untrained"]
    assert totals["documents"] == len(docs) == n_records - truth["sharegpt_untrained"], msg
    assert totals["tokens"] == int(lengths.sum()), msg
    assert totals["trained_tokens"] == sum(int(d.loss_mask.sum()) for d in docs), msg
    assert (totals["packs"], totals["pieces"]) == (plan.n_packs, plan.stats.n_pieces)
    assert totals["packing_efficiency"] == round(plan.stats.efficiency, 6)
    assert totals["overlong"] == {"policy": "split", "documents": 0, "split": 0, "truncated": 0, "tokens_dropped": 0}
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256(DEFAULT_TOKENIZER.read_bytes()).hexdigest()
    assert manifest["recipe"] == recipe.to_dict()
    assert (manifest["template"], manifest["pack_len"], manifest["overlong"], manifest["format_version"]) == (
        "llama2-chat", 4096, "split", 2)
    assert manifest["totals"]["max_token_id"] == max(int(d.ids.max()) for d in docs)
    assert [s["documents"] for s in manifest["sources"]] == [s["selected_documents"] for s in manifest["sources"]]

    # Every document is in the shards exactly once, as one piece, with its mask.
    ds = PreparedDataset(tmp_path / "out")
    pieces = Counter()
    for p in range(ds.n_packs):
        tokens, mask, bounds = ds.pack(p)
        for a, b in zip(bounds[:-1], bounds[1:]):
            pieces[(tokens[a:b].tobytes(), mask[a:b].tobytes())] += 1
    assert pieces == Counter((d.ids.tobytes(), d.loss_mask.tobytes()) for d in docs), msg


def test_manifest_records_each_shard_file_and_pack_checksum(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    make_corpus(tmp_path / "data", rng)
    pack_len = rng.choice([256, 512, 1000])
    recipe = recipe_from_dict(corpus_recipe(tmp_path / "data", pack_len=pack_len), tmp_path / "data")
    manifest = prepare(recipe, tmp_path / "out", shard_tokens=rng.randrange(2000, 9000))
    out = tmp_path / "out"
    msg = f"seed {seed}, pack_len {pack_len}"
    assert len(manifest["shards"]) > 1, msg
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json"] + [f"{sh['name']}.{a}.npy" for sh in manifest["shards"] for a in
                             ("tokens", "loss_mask", "pieces", "packs", "pack_crc32")])
    for shard in manifest["shards"]:
        for array, recorded in shard["files"].items():
            data = (out / f"{shard['name']}.{array}.npy").read_bytes()
            assert recorded == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, (array, msg)
        tokens = np.load(out / f"{shard['name']}.tokens.npy")
        mask = np.load(out / f"{shard['name']}.loss_mask.npy")
        pieces = np.load(out / f"{shard['name']}.pieces.npy")
        packs = np.load(out / f"{shard['name']}.packs.npy")
        crc = np.load(out / f"{shard['name']}.pack_crc32.npy")
        assert crc.dtype == np.uint32 and crc.shape == (shard["packs"], 2), msg
        for p in range(shard["packs"]):
            a, b = pieces[packs[p]], pieces[packs[p + 1]]
            assert crc[p].tolist() == [zlib.crc32(tokens[a:b].tobytes()), zlib.crc32(mask[a:b].tobytes())], msg
        assert shard["max_token_id"] == int(tokens.max()), msg
    assert manifest["totals"]["max_token_id"] == max(sh["max_token_id"] for sh in manifest["shards"])


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_prepared_folders_and_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    make_corpus(tmp_path / "data", random.Random(umask))
    recipe = recipe_from_dict(corpus_recipe(tmp_path / "data", pack_len=512), tmp_path / "data")
    old = os.umask(umask)
    try:
        prepare(recipe, tmp_path / "nested" / "out", shard_tokens=5000)
        first = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "nested" / "out").iterdir()}
        prepare(recipe, tmp_path / "nested" / "out", shard_tokens=5000, overwrite=True)  # the replacing path
    finally:
        os.umask(old)
    for folder in (tmp_path / "nested", tmp_path / "nested" / "out"):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask, (folder, oct(folder.stat().st_mode))
    files = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "nested" / "out").iterdir()}
    assert len(files) > 5 and files == first
    assert set(files.values()) == {0o666 & ~umask}, {k: oct(v) for k, v in files.items()}
    assert leftovers(tmp_path / "nested") == []


def test_a_failed_write_names_the_file_and_the_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk fails a write with an OSError that names no file; prepare names it and
    leaves nothing behind."""
    import errno

    import agentflan.data.prepare as prepare_module

    make_corpus(tmp_path / "data", random.Random(3))
    recipe = recipe_from_dict(corpus_recipe(tmp_path / "data", pack_len=512), tmp_path / "data")
    real_fsync = os.fsync
    calls = []

    def full(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)
    monkeypatch.setattr(prepare_module.os, "fsync", full)
    with pytest.raises(OSError) as info:
        prepare(recipe, tmp_path / "out", shard_tokens=5000)
    assert info.value.errno == errno.ENOSPC
    assert re.fullmatch(r"/\S+/\.out\.\w+\.tmp/shard-00000\.pieces\.npy: cannot write \(No space left on device\)",
                        str(info.value)), str(info.value)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_rerun_reproduces_the_same_bytes(tmp_path: Path, seed: int) -> None:
    make_corpus(tmp_path / "data", random.Random(seed))
    recipe = recipe_from_dict(corpus_recipe(tmp_path / "data", pack_len=512), tmp_path / "data")
    prepare(recipe, tmp_path / "a", num_threads=1, shard_tokens=3000)
    # Another output folder, another thread count, another batch size: same bytes.
    prepare(recipe, tmp_path / "b", num_threads=2, batch_chars=1000, shard_tokens=3000)
    first = folder_bytes(tmp_path / "a")
    assert len([n for n in first if n.endswith(".tokens.npy")]) > 1  # several shards
    assert folder_bytes(tmp_path / "b") == first, f"seed {seed}"
    # The same inputs seen from another folder (a copy, another recipe location): same bytes.
    copy = tmp_path / "elsewhere" / "data"
    copy.parent.mkdir()
    os.rename(tmp_path / "data", copy)
    prepare(recipe_from_dict(corpus_recipe(copy, pack_len=512), copy), tmp_path / "c", shard_tokens=3000)
    assert folder_bytes(tmp_path / "c") == first
    assert str(tmp_path).encode() not in first["manifest.json"]
    # Rewriting in place gives the same bytes too.
    prepare(recipe_from_dict(corpus_recipe(copy, pack_len=512), copy), tmp_path / "a", shard_tokens=3000,
            overwrite=True)
    assert folder_bytes(tmp_path / "a") == first


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_failures_leave_no_half_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_corpus(tmp_path / "data", random.Random(0))
    good = recipe_from_dict(corpus_recipe(tmp_path / "data"), tmp_path / "data")
    out = tmp_path / "out"
    # A bad record late in the input (strict source): nothing is written.
    strict = recipe_from_dict({**corpus_recipe(tmp_path / "data"), "skip_bad": False,
                               "sources": corpus_recipe(tmp_path / "data")["sources"][:3]
                               + [{"path": "agentinstruct.json", "format": "agentinstruct"}]}, tmp_path / "data")
    with pytest.raises(DataFormatError, match=r"agentinstruct\.json: byte \d+ \(line 1\): conversations\[0\]"):
        prepare(strict, out)
    assert not out.exists() and leftovers(tmp_path) == []

    prepare(good, out)
    before = folder_bytes(out)
    with pytest.raises(FileExistsError, match="already holds a prepared dataset; pass overwrite=True"):
        prepare(good, out)
    # A crash while the shards are written: the old dataset stays whole and valid.
    import agentflan.data.prepare as prepare_module

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(prepare_module, "_write_array", crash)
    with pytest.raises(OSError, match="disk full"):
        prepare(good, out, overwrite=True)
    assert folder_bytes(out) == before and leftovers(tmp_path) == []
    PreparedDataset(out)

    stranger = tmp_path / "notes"
    stranger.mkdir()
    (stranger / "todo.txt").write_text("mine")
    monkeypatch.undo()
    with pytest.raises(FileExistsError, match="is not a prepared dataset .* refusing to replace it"):
        prepare(good, stranger, overwrite=True)
    assert (stranger / "todo.txt").read_text() == "mine"


def first_overlong(path: Path, fmt: str, tok: Tokenizer, template: str, pack_len: int) -> tuple[str, int, int]:
    """Independently: (place, length) of the first trained conversation longer than
    pack_len in file order, and how many there are."""
    found = []
    for conv in SourceReader(path, fmt, skip_bad=True):
        enc = encode_conversation(conv, tok, template)
        if enc.loss_mask.any() and len(enc.ids) > pack_len:
            where = f"{path}:{conv.line}" if conv.offset is None else f"{path}: byte {conv.offset} (line {conv.line})"
            found.append((where, len(enc.ids)))
    return found[0][0], found[0][1], len(found)


def test_overlong_policies_are_counted_or_named(tmp_path: Path, tok: Tokenizer, seed: int) -> None:
    rng = random.Random(seed)
    data = tmp_path / "data"
    make_corpus(data, rng)
    pack_len = rng.randrange(100, 160)
    body = corpus_recipe(data, pack_len=pack_len)
    where, length, _ = first_overlong(data / "agentflan.jsonl", "agentflan", tok, "agentflan", pack_len)
    expected = (f"{where}: the conversation is {length} tokens, longer than pack_len {pack_len} "
                f"(overlong: error; use split or truncate)")
    with pytest.raises(ValueError) as info:
        prepare(recipe_from_dict({**body, "overlong": "error"}, data), tmp_path / "e")
    assert str(info.value) == expected, f"seed {seed}"
    # A repeat source's overlong document fails as soon as it is tokenized: before a bad
    # record in a later file is reached.
    strict_later = {"sources": [{"path": "agentflan.jsonl"}, {"path": "agentinstruct.json", "format": "agentinstruct"}],
                    "pack_len": pack_len, "overlong": "error"}
    with pytest.raises(ValueError) as info:
        prepare(recipe_from_dict(strict_later, data), tmp_path / "e")
    assert str(info.value) == expected and not isinstance(info.value, DataFormatError)
    # A weighted source is checked once the mix is drawn; records of a JSON array are
    # named by byte offset and line; every overlong document is counted.
    weighted = {"sources": [{"path": "sharegpt.json", "format": "sharegpt", "weight": 1.0}], "pack_len": pack_len,
                "overlong": "error", "template": "plain"}
    where, length, count = first_overlong(data / "sharegpt.json", "sharegpt", tok, "plain", pack_len)
    more = f"; {count - 1} more document(s) are longer too" if count > 1 else ""
    with pytest.raises(ValueError) as info:
        prepare(recipe_from_dict(weighted, data), tmp_path / "e")
    assert str(info.value) == (f"{where}: the conversation is {length} tokens, longer than pack_len {pack_len} "
                               f"(overlong: error; use split or truncate){more}"), f"seed {seed}"
    assert leftovers(tmp_path) == [] and not (tmp_path / "e").exists()

    m = prepare(recipe_from_dict({**body, "overlong": "truncate"}, data), tmp_path / "t")
    split = prepare(recipe_from_dict(body, data), tmp_path / "s")
    over = m["totals"]["overlong"]
    assert over["documents"] == over["truncated"] > 0 and over["tokens_dropped"] > 0
    assert m["totals"]["tokens"] + over["tokens_dropped"] == split["totals"]["tokens"]
    assert split["totals"]["overlong"]["split"] == over["documents"]


def test_weighted_mix_end_to_end(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    make_corpus(tmp_path / "data", rng)
    body = {"sources": [{"path": "agentflan.jsonl", "format": "agentflan", "repeat": 2},
                        {"path": "sharegpt.json", "weight": 0.5}], "pack_len": 2048, "seed": seed % 1000}
    m = prepare(recipe_from_dict(body, tmp_path / "data"), tmp_path / "out")
    af, sg = m["sources"]
    assert af["selected_documents"] == 2 * af["documents"] and af["epochs"] == 2.0
    assert sg["format"] == "auto" and sg["files"][0]["format"] == "sharegpt"
    # Half the tokens of the mix, to within one ShareGPT conversation.
    assert abs(sg["selected_tokens"] - af["selected_tokens"]) <= sg["tokens"], f"seed {seed}"
    assert abs(sg["share"] - 0.5) < 0.1 and m["totals"]["documents"] == af["selected_documents"] + \
        sg["selected_documents"]
    again = prepare(recipe_from_dict(body, tmp_path / "data"), tmp_path / "again")
    assert again == m


def test_command_line(tmp_path: Path) -> None:
    make_corpus(tmp_path / "data", random.Random(2))
    run = lambda *args: subprocess.run([sys.executable, str(REPO / "tools" / "prepare_data.py"), *args],
                                       capture_output=True, text=True, cwd=tmp_path)
    done = run("out", "--source", "data/toolbench.jsonl", "data/sharegpt.json", "--pack-len", "256",
               "--template", "plain")
    assert done.returncode == 0, done.stderr
    assert "/data/sharegpt.json: " in done.stdout and "truncated at byte" in done.stdout
    assert "packs of 256" in done.stdout
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["path"] for s in manifest["recipe"]["sources"]] == ["data/toolbench.jsonl", "data/sharegpt.json"]
    assert manifest["template"] == "plain"

    bad = run("out2", "--source", "data/agentinstruct.json", "--format", "agentinstruct")
    assert bad.returncode == 1 and "unknown 'from' 'robot'" in bad.stderr and "byte" in bad.stderr
    assert not (tmp_path / "out2").exists()
    skipped = run("out2", "--source", "data/agentinstruct.json", "--skip-bad")
    assert skipped.returncode == 0 and "skipped 1 bad loss, 2 unknown role" in skipped.stdout

    recipe = tmp_path / "r.yaml"
    recipe.write_text("sources: [{path: data/agentflan.jsonl, weight: 1.0}]\npack_len: 512\n")
    assert run("out3", "--recipe", str(recipe), "--seed", "3").returncode == 0
    assert json.loads((tmp_path / "out3" / "manifest.json").read_text())["seed"] == 3
    missing = run("out4", "--recipe", str(recipe), "--tokenizer", "none.model")
    assert missing.returncode == 1 and "tokenizer not found" in missing.stderr


def test_command_line_defaults_verify_and_flag_errors(tmp_path: Path) -> None:
    make_corpus(tmp_path / "data", random.Random(4))
    run = lambda *args: subprocess.run([sys.executable, str(REPO / "tools" / "prepare_data.py"), *args],
                                       capture_output=True, text=True, cwd=tmp_path)
    # No --pack-len, template or overlong anywhere: the trainer's defaults.
    recipe = tmp_path / "r.yaml"
    recipe.write_text("sources: [data/toolbench.jsonl]\n")
    for out, args in (("a", ["--source", "data/toolbench.jsonl"]), ("b", ["--recipe", str(recipe)])):
        done = run(out, *args)
        assert done.returncode == 0, done.stderr
        manifest = json.loads((tmp_path / out / "manifest.json").read_text())
        assert (manifest["pack_len"], manifest["template"], manifest["overlong"]) == (
            DEFAULT_PACK_LEN, DEFAULT_TEMPLATE, DEFAULT_OVERLONG)

    ok = run("a", "--verify")
    assert ok.returncode == 0 and "shard files match the manifest" in ok.stdout, ok.stderr
    tokens = tmp_path / "a" / "shard-00000.tokens.npy"
    data = bytearray(tokens.read_bytes())
    data[-1] ^= 1
    tokens.write_bytes(bytes(data))
    bad = run("a", "--verify")
    assert bad.returncode == 1 and bad.stderr == (f"error: a/{tokens.name}: sha256 differs from the manifest's: the "
                                                  f"file changed after it was prepared; prepare the data again\n")

    for args, message in [(["a", "--verify", "--pack-len", "64"], "--pack-len does not apply to --verify"),
                          (["a", "--verify", "--format", "sharegpt"], "--format does not apply to --verify"),
                          (["c", "--recipe", str(recipe), "--format", "sharegpt"], "--format applies to --source"),
                          (["c", "--source", "data/toolbench.jsonl", "--root", "data"], "--root applies to recipes"),
                          (["c", "--source", "data/toolbench.jsonl", "--num-threads", "-1"], "--num-threads must be")]:
        done = run(*args)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
    assert not (tmp_path / "c").exists()

    # An OSError (here: the output's parent is a file) is one error line naming the path.
    (tmp_path / "blocker").write_text("")
    done = run("blocker/out", "--source", "data/toolbench.jsonl")
    assert done.returncode == 1 and done.stderr.startswith("error: ") and "blocker" in done.stderr, done.stderr
    assert len(done.stderr.splitlines()) == 1


def _load_tool():
    spec = importlib.util.spec_from_file_location("prepare_data_tool", REPO / "tools" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("args,message", [
    (["{out}", "--source", "{data}/toolbench.jsonl", "--num-threads", "-1"], "--num-threads must be >= 0, got -1"),
    (["{out}", "--source", "{data}/toolbench.jsonl", "--root", "{data}"], "--root applies to recipes only"),
    (["{out}", "--source", "{data}/toolbench.jsonl", "--seed", "5"], "--seed applies to recipes only"),
    (["{out}", "--source", "{data}/toolbench.jsonl", "--mix-by", "conversations"], "--mix-by applies to recipes only"),
    (["{out}", "--recipe", "{repeat}", "--seed", "5"], "--seed shapes the sampling of 'weight' sources"),
    (["{out}", "--recipe", "{repeat}", "--mix-by", "conversations"], "--mix-by shapes the sampling of 'weight' sources"),
    (["{out}", "--recipe", "{repeat}", "--format", "sharegpt"], "--format applies to --source files only"),
    (["{out}", "--source", "{data}/toolbench.jsonl", "--batch-chars", "0"], "--batch-chars must be >= 1, got 0"),
    (["{out}", "--source", "{data}/toolbench.jsonl", "--shard-tokens", "-4"], "--shard-tokens must be >= 1, got -4"),
    (["{out}", "--source", "{data}/toolbench.jsonl", "--pack-len", "0"], "--pack-len must be >= 1, got 0"),
    (["{prepared}", "--verify", "--pack-len", "64"], "--pack-len does not apply to --verify"),
    (["{prepared}", "--verify", "--overwrite"], "--overwrite does not apply to --verify"),
    (["{prepared}", "--source", "{data}/toolbench.jsonl"], "already holds a prepared dataset; pass --overwrite"),
])
def test_tool_flag_mistakes_are_one_error_line_naming_the_flag(args, message, tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    make_corpus(data, random.Random(len(message)))
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "manifest.json").write_text("{}")
    before = (tmp_path / "prepared" / "manifest.json").read_text()
    (tmp_path / "repeat.yaml").write_text("sources: [{path: data/toolbench.jsonl, repeat: 2}]\n")
    paths = {"out": tmp_path / "c", "data": data, "repeat": tmp_path / "repeat.yaml", "prepared": tmp_path / "prepared"}
    rc = _load_tool().main([a.format(**{k: str(v) for k, v in paths.items()}) for a in args])
    out, err = capsys.readouterr()
    assert rc != 0 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert "overwrite=True" not in err and "batch_chars" not in err
    assert not (tmp_path / "c").exists()
    assert (tmp_path / "prepared" / "manifest.json").read_text() == before


def check_plan_covers(plan, lengths: np.ndarray, msg: str) -> None:
    """Every token of every document lies in exactly one piece; packs hold at most capacity."""
    cover = [[] for _ in lengths]
    for d, start, n in zip(plan.doc_index.tolist(), plan.doc_start.tolist(), plan.piece_len.tolist()):
        cover[d].append((start, n))
    for d, pieces in enumerate(cover):
        pos = 0
        for start, n in sorted(pieces):
            assert start == pos and n > 0, f"document {d}: {sorted(pieces)}; {msg}"
            pos += n
        assert pos == lengths[d], f"document {d} covered to {pos} of {lengths[d]}; {msg}"
    fill = np.add.reduceat(plan.piece_len, plan.pack_offsets[:-1])
    assert fill.max() <= plan.capacity and np.all(np.diff(plan.pack_offsets) > 0), msg


def test_fill_packing_compacts_a_plan_and_keeps_every_token(seed: int) -> None:
    rng = np.random.default_rng(seed)
    capacity = 4096
    # Like ShareGPT's dump at 4096: half the documents a little longer than half a pack.
    lengths = np.concatenate([rng.integers(2049, 2800, 3000), rng.integers(1, 2048, 3000),
                              rng.integers(4097, 20000, 30)])
    rng.shuffle(lengths)
    ffd = plan_packs(lengths, capacity)
    filled, report = fill_packs(ffd)
    msg = f"seed {seed}"
    check_plan_covers(filled, lengths, msg)
    assert ffd.stats.efficiency < 0.9 and filled.stats.efficiency >= 0.995, msg
    assert filled.n_packs == ffd.n_packs - report.packs_emptied
    assert filled.stats.real_tokens == ffd.stats.real_tokens == lengths.sum()
    assert 0 < report.documents_cut <= report.pieces_moved <= report.fragments
    # Staying packs keep their own pieces, in order, before anything moved in.
    own = {tuple(ffd.doc_index[ffd.pack_offsets[p]:ffd.pack_offsets[p + 1]]) for p in range(ffd.n_packs)}
    heads = 0
    for p in range(filled.n_packs):
        docs = tuple(filled.doc_index[filled.pack_offsets[p]:filled.pack_offsets[p + 1]])
        heads += any(docs[:n] in own for n in range(1, len(docs) + 1))
    assert heads == filled.n_packs, msg
    # Already tight plans are left alone.
    tight = plan_packs(np.full(64, 1024), 4096)
    assert fill_packs(tight)[0] is tight


def test_fill_packing_end_to_end(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    # Half the conversations a little longer than half a pack, half short.
    def answer(i: int) -> str:
        return " ".join(["Oslo"] * rng.randrange(400, 460)) if i % 2 else words(rng, 2, 60)
    records = [{"id": f"c{i}", "conversations": [{"from": "human", "value": "weather?"},
                                                 {"from": "gpt", "value": answer(i)}]} for i in range(80)]
    (tmp_path / "chat.json").write_text(json.dumps(records))
    body = {"sources": [{"path": "chat.json", "format": "sharegpt"}], "pack_len": 1 << 20}
    prepare(recipe_from_dict(body, tmp_path), tmp_path / "whole")
    ds = PreparedDataset(tmp_path / "whole")
    lengths = np.diff(ds.pack(0)[2])
    pack_len = 2 * int(np.sort(lengths)[-40]) - 1  # the 40 long conversations are longer than half a pack
    ffd = prepare(recipe_from_dict({**body, "pack_len": pack_len}, tmp_path), tmp_path / "ffd")
    fill = prepare(recipe_from_dict({**body, "pack_len": pack_len, "packing": "fill"}, tmp_path), tmp_path / "fill")
    a, b = PreparedDataset(tmp_path / "ffd"), PreparedDataset(tmp_path / "fill")
    msg = f"seed {seed}, pack_len {pack_len}"
    assert ffd["totals"]["packing_efficiency"] < 0.9, msg
    assert fill["totals"]["packing"] == "fill" and fill["totals"]["fill"]["packs_emptied"] > 0, msg
    # Rooms under 32 tokens (4% of these packs) stay empty, and the last pack may be partial.
    assert b.n_packs < a.n_packs and fill["totals"]["packing_efficiency"] > 0.9, msg
    for key in ("tokens", "trained_tokens", "documents"):
        assert fill["totals"][key] == ffd["totals"][key]

    def counts(ds: PreparedDataset) -> Counter:
        return Counter(np.concatenate([ds.pack(p)[0] for p in range(ds.n_packs)]).tolist())
    assert counts(a) == counts(b), msg
    assert "cut to fill packs" in b.summary()
    next(b.batches(2, 1, 2))


# --------------------------------------------------------------------------- memory

_MEASURE = r"""
import json, sys
from agentflan.data.prepare import prepare
from agentflan.data.recipe import recipe_from_dict

def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

recipe = recipe_from_dict({"sources": [{"path": sys.argv[1], "format": "sharegpt"}], "pack_len": 2048}, "/")
base = rss("VmRSS")
prepare(recipe, sys.argv[2], batch_chars=1 << 20, num_threads=2)
print(json.dumps({"growth": rss("VmHWM") - base}))
"""


def write_big_sharegpt(path: Path, size: int, rng: random.Random) -> int:
    """A ShareGPT JSON array of about ``size`` bytes, from a pool of distinct records."""
    pool = [json.dumps({"conversations": sharegpt_record(rng, i)["conversations"]}, ensure_ascii=False)[1:]
            for i in range(300)]
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n")
        i = 0
        while written < size:
            text = f'{{"id": "big_{i}", ' + pool[i % len(pool)]
            f.write(("  " if i == 0 else ",\n  ") + text)
            written += len(text) + 4
            i += 1
        f.write("\n]\n")
    return path.stat().st_size


def test_memory_stays_bounded_as_the_corpus_grows(tmp_path: Path, seed: int) -> None:
    """Peak RSS growth of prepare, in a fresh process, for a corpus and one six times
    larger: streaming keeps the difference small, whereas holding the tokens alone (4 + 1
    bytes a token) would add more than the extra corpus's size."""
    rng = random.Random(seed)
    growth, sizes, tokens = [], [], []
    for n, size in enumerate((8 << 20, 48 << 20)):
        path = tmp_path / f"corpus{n}.json"
        sizes.append(write_big_sharegpt(path, size, rng))
        out = tmp_path / f"out{n}"
        done = subprocess.run([sys.executable, "-c", _MEASURE, str(path), str(out)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        growth.append(json.loads(done.stdout)["growth"])
        tokens.append(json.loads((out / "manifest.json").read_text())["totals"]["tokens"])
        path.unlink()
    extra_tokens_bytes = 5 * (tokens[1] - tokens[0])
    assert extra_tokens_bytes > sizes[1] - sizes[0]  # what an in-memory implementation would add at least
    assert growth[1] - growth[0] < (sizes[1] - sizes[0]) / 4, (
        f"peak RSS grew by {growth[0] / 1e6:.1f} MB for {sizes[0] / 1e6:.0f} MB and {growth[1] / 1e6:.1f} MB "
        f"for {sizes[1] / 1e6:.0f} MB of input (seed {seed})")
