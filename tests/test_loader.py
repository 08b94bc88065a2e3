"""PreparedDataset: the batches of PackedDataset, from memory-mapped shards; validation."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest

from agentflan.data.dataset import PackedDataset, encode_files
from agentflan.data.defaults import DEFAULT_TOKENIZER
from agentflan.data.loader import PreparedDataset, PreparedDatasetError, PreparedSettings
from agentflan.data.packing import PackedBatch
from agentflan.data.prepare import prepare
from agentflan.data.recipe import recipe_from_dict
from agentflan.corpus.default import write_corpus
from agentflan.tokenizer import Tokenizer

FIELDS = ("input_ids", "labels", "loss_mask", "cu_seqlens", "position_ids")




@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, module_seed: int) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "fresh.jsonl"
    write_corpus(path, n=250, seed=module_seed)
    return path


def prepared(corpus: Path, out: Path, pack_len: int, template: str = "agentflan", **kwargs) -> PreparedDataset:
    recipe = recipe_from_dict({"sources": [str(corpus)], "pack_len": pack_len, "template": template}, corpus.parent)
    prepare(recipe, out, **kwargs)
    return PreparedDataset(out)


def assert_same(a: PackedBatch, b: PackedBatch, where: str) -> None:
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, f"{name} dtype; {where}"
        np.testing.assert_array_equal(x, y, err_msg=f"{name}; {where}")
    assert a.max_seqlen == b.max_seqlen, where


@pytest.mark.parametrize("pack_len,template,shard_tokens", [(1024, "agentflan", 1 << 28), (96, "llama2-chat", 5000),
                                                            (300, "plain", 20000)])
def test_batches_equal_packed_dataset(tmp_path: Path, corpus: Path, tok: Tokenizer, seed: int, pack_len: int,
                                      template: str, shard_tokens: int) -> None:
    ds = prepared(corpus, tmp_path / "out", pack_len, template, shard_tokens=shard_tokens)
    ref = PackedDataset(encode_files([corpus], tok, template), pack_len)
    assert ds.n_packs == ref.n_packs
    assert len(ds.manifest["shards"]) == (1 if shard_tokens > 1e6 else len(ds.manifest["shards"]))
    if shard_tokens < 1e6:
        assert len(ds.manifest["shards"]) > 2  # batches mix packs from several shards
    rng = random.Random(seed)
    fixed = [(3, 1, 2), (1, 0, 1), (2, 2, 3)]  # (packs per batch, rank, world size)
    drawn = [(rng.choice([1, 2, 5]), rank, world) for world in (rng.choice([1, 2, 3]),)
             for rank in (rng.randrange(world),)]
    for ppb, rank, world in fixed + drawn:
        run_seed = rng.randrange(1000)
        start = rng.randrange(0, 30)
        ours = ds.batches(ppb, rank, world, seed=run_seed, start_batch=start)
        theirs = ref.batches(ppb, rank, world, seed=run_seed, start_batch=start)
        per_epoch = ds.n_packs // (ppb * world)
        for i in range(min(2 * per_epoch + 3, 60)):  # across epoch boundaries
            assert_same(next(ours), next(theirs), f"batch {start + i}, ppb {ppb}, rank {rank}/{world}, seed {seed}")


def test_ranks_see_disjoint_packs_covering_the_set(tmp_path: Path, corpus: Path, seed: int) -> None:
    ds = prepared(corpus, tmp_path / "out", 512, shard_tokens=40000)
    key = {ds.pack(p)[0].tobytes(): p for p in range(ds.n_packs)}
    assert len(key) == ds.n_packs  # every pack is told apart by its tokens
    for world in (2, 3):
        per_epoch = ds.n_packs // world
        seen = []
        for rank in range(world):
            stream = ds.batches(1, rank, world, seed=seed % 997)
            seen.append([key[next(stream).input_ids.tobytes()] for _ in range(per_epoch)])
        flat = [p for packs in seen for p in packs]
        assert len(set(flat)) == len(flat) == per_epoch * world, f"world {world}, seed {seed}"
        assert ds.n_packs - len(flat) == ds.n_packs % world  # only the tail that cannot fill a step waits
        # The next epoch is another permutation, and covers the packs left out of this one.
        nxt = ds.batches(1, 0, world, seed=seed % 997, start_batch=per_epoch)
        assert [key[next(nxt).input_ids.tobytes()] for _ in range(per_epoch)] != seen[0]


def test_resume_at_step_k_continues_the_uninterrupted_run(tmp_path: Path, corpus: Path, seed: int) -> None:
    ds = prepared(corpus, tmp_path / "out", 256, shard_tokens=30000)
    per_epoch = ds.n_packs // (3 * 2)
    full = ds.batches(3, 1, 2, seed=seed % 991)
    run = [next(full) for _ in range(per_epoch + 5)]
    for k in (0, 1, per_epoch - 1, per_epoch, per_epoch + 2):
        resumed = PreparedDataset(tmp_path / "out").batches(3, 1, 2, seed=seed % 991, start_batch=k)
        for i in range(k, len(run)):
            assert_same(next(resumed), run[i], f"resumed at {k}, batch {i}, seed {seed}")


def test_summary_pack_and_arguments(tmp_path: Path, corpus: Path) -> None:
    ds = prepared(corpus, tmp_path / "out", 1024)
    t = ds.manifest["totals"]
    line = ds.summary()
    assert "\n" not in line and line.startswith(f"{t['documents']} docs -> {ds.n_packs} packs of 1024, efficiency ")
    assert "template agentflan, 1 shard(s)" in line
    assert ds.steps_per_epoch(4) == ds.n_packs // 4
    assert sum(len(ds.pack(p)[0]) for p in range(ds.n_packs)) == ds.n_tokens == t["tokens"]
    assert sum(int(ds.pack(p)[1].sum()) for p in range(ds.n_packs)) == ds.n_trained_tokens
    tokens, _, bounds = ds.pack(ds.n_packs - 1)
    assert bounds[0] == 0 and bounds[-1] == len(tokens) <= 1024
    with pytest.raises(IndexError):
        ds.pack(ds.n_packs)
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        next(ds.batches(ds.n_packs + 1))
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        next(ds.batches(1, rank=2, world_size=2))


def test_invalid_folders_are_named_with_the_reason(tmp_path: Path, corpus: Path) -> None:
    with pytest.raises(FileNotFoundError, match="prepared dataset not found"):
        PreparedDataset(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PreparedDatasetError, match="no manifest.json, so this is not a prepared dataset"):
        PreparedDataset(tmp_path / "empty")

    prepared(corpus, tmp_path / "out", 512)
    manifest_path = tmp_path / "out" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())

    def rewrite(**changes) -> None:
        manifest_path.write_text(json.dumps({**manifest, **changes}))

    rewrite(format_version=99)
    with pytest.raises(PreparedDatasetError, match="format version 99, but this agentflan reads version 2; prepare "
                                                   "the data again"):
        PreparedDataset(tmp_path / "out")
    rewrite(format_version=1)
    with pytest.raises(PreparedDatasetError, match=r"format version 1 \(written before shards carried checksums\), "
                                                   r"but this agentflan reads version 2; prepare the data again"):
        PreparedDataset(tmp_path / "out")
    rewrite(format="something-else")
    with pytest.raises(PreparedDatasetError, match="not a agentflan-packed manifest"):
        PreparedDataset(tmp_path / "out")
    manifest_path.write_text("{truncated")
    with pytest.raises(PreparedDatasetError, match="manifest.json: not valid JSON"):
        PreparedDataset(tmp_path / "out")
    rewrite(shards=None)
    with pytest.raises(PreparedDatasetError, match=r"manifest.json: malformed manifest \(TypeError"):
        PreparedDataset(tmp_path / "out")
    rewrite(totals={})
    with pytest.raises(PreparedDatasetError, match=r"manifest.json: malformed manifest \(KeyError: 'packs'"):
        PreparedDataset(tmp_path / "out")
    shard = dict(manifest["shards"][0])
    rewrite(shards=[{**shard, "tokens": shard["tokens"] + 1}])
    with pytest.raises(PreparedDatasetError, match=r"shard-00000.tokens.npy: holds int32 \(\d+,\), the manifest says"):
        PreparedDataset(tmp_path / "out")
    # Arrays consistent with each other but not with what was prepared (a manifest
    # rewritten to match): the piece offsets' own checks still catch them.
    pieces = tmp_path / "out" / "shard-00000.pieces.npy"
    original = np.load(pieces)
    broken = original.copy()
    broken[2], broken[3] = broken[3], broken[2]
    np.save(pieces, broken)
    files = {**shard["files"], "pieces": {"bytes": pieces.stat().st_size,
                                          "sha256": hashlib.sha256(pieces.read_bytes()).hexdigest()}}
    rewrite(shards=[{**shard, "files": files}])
    with pytest.raises(PreparedDatasetError, match="piece offsets are not increasing"):
        PreparedDataset(tmp_path / "out")
    rewrite()
    np.save(pieces, original)
    (tmp_path / "out" / "shard-00000.packs.npy").unlink()
    with pytest.raises(PreparedDatasetError, match=r"shard-00000.packs.npy: missing"):
        PreparedDataset(tmp_path / "out")


def corrupt(path: Path, at: int, value: bytes) -> None:
    """Overwrites bytes of a file in place (same size, as a careless copy or a bad disk would)."""
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(value)


def test_a_shard_changed_in_place_is_named_when_its_pack_is_read(tmp_path: Path, corpus: Path, seed: int) -> None:
    """The issue's case: shard tokens overwritten in place with other ids (same size), one
    of them past the vocabulary: the pack is refused by name instead of training silently
    or failing later with an IndexError."""
    rng = random.Random(seed)
    prepared(corpus, tmp_path / "out", 256, shard_tokens=20000)
    ds = PreparedDataset(tmp_path / "out", vocab_size=4096)
    shard = rng.randrange(len(ds.manifest["shards"]))
    name = ds.manifest["shards"][shard]["name"]
    first = sum(sh["packs"] for sh in ds.manifest["shards"][:shard])
    local = rng.randrange(ds.manifest["shards"][shard]["packs"])
    pieces = np.load(tmp_path / "out" / f"{name}.pieces.npy")
    packs = np.load(tmp_path / "out" / f"{name}.packs.npy")
    a, b = int(pieces[packs[local]]), int(pieces[packs[local + 1]])
    tokens = tmp_path / "out" / f"{name}.tokens.npy"
    header = len(tokens.read_bytes()) - 4 * ds.manifest["shards"][shard]["tokens"]
    at = rng.randrange(a, b)
    corrupt(tokens, header + 4 * at, np.int32(4096 + rng.randrange(10)).tobytes())
    msg = f"seed {seed}, shard {shard}, pack {local}"

    ds = PreparedDataset(tmp_path / "out", vocab_size=4096)  # opening reads no token: the size is right
    expected = (f"{tokens}: pack {local} of the shard (pack {first + local} of the dataset, tokens {a}..{b}) does not "
                f"match its checksum: the file changed after it was prepared; prepare the data again")
    with pytest.raises(PreparedDatasetError) as info:
        ds.pack(first + local)
    assert str(info.value) == expected, msg
    other = rng.choice([p for p in range(ds.n_packs) if p != first + local])
    ds.pack(other)  # the others still read
    with pytest.raises(PreparedDatasetError, match="does not match its checksum"):
        for batch in itertools.islice(ds.batches(1, seed=seed % 1000), ds.n_packs):  # one epoch reaches the pack
            assert batch.input_ids.max() < 4096, msg
    with pytest.raises(PreparedDatasetError, match=f"{tokens.name}: sha256 differs"):
        ds.verify()

    # The loss mask is checked the same way, and named.
    prepared(corpus, tmp_path / "fresh", 256, shard_tokens=20000)
    mask = tmp_path / "fresh" / f"{name}.loss_mask.npy"
    n_tokens = ds.manifest["shards"][shard]["tokens"]
    old = mask.read_bytes()[len(mask.read_bytes()) - n_tokens + at]
    corrupt(mask, len(mask.read_bytes()) - n_tokens + at, bytes([1 - old]))
    with pytest.raises(PreparedDatasetError, match=rf"^{mask}: pack {local} of the shard \(pack {first + local} "):
        PreparedDataset(tmp_path / "fresh").pack(first + local)


def test_files_of_the_wrong_size_or_changed_small_arrays_fail_at_open(tmp_path: Path, corpus: Path, seed: int) -> None:
    rng = random.Random(seed)
    prepared(corpus, tmp_path / "out", 512, shard_tokens=30000)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    shard = rng.choice(manifest["shards"])
    array = rng.choice(["tokens", "loss_mask", "pieces", "packs", "pack_crc32"])
    path = tmp_path / "out" / f"{shard['name']}.{array}.npy"
    original = path.read_bytes()
    size = shard["files"][array]["bytes"]
    for changed in (original[:-1], original + b"\0"):  # cut short, grown
        path.write_bytes(changed)
        with pytest.raises(PreparedDatasetError) as info:
            PreparedDataset(tmp_path / "out")
        assert str(info.value) == (f"{path}: {len(changed)} bytes, the manifest says {size}: the file changed after "
                                   f"it was prepared; prepare the data again"), f"seed {seed}"
    # The small arrays are read whole at open, and checked against their sha256.
    small = tmp_path / "out" / f"{shard['name']}.{rng.choice(['pieces', 'packs', 'pack_crc32'])}.npy"
    path.write_bytes(original)
    data = bytearray(small.read_bytes())
    data[rng.randrange(128, len(data))] ^= 1 << rng.randrange(8)
    small.write_bytes(bytes(data))
    with pytest.raises(PreparedDatasetError, match=rf"^{small}: sha256 differs from the manifest's"):
        PreparedDataset(tmp_path / "out")


def test_token_ids_past_the_vocabulary_name_the_shard_and_pack(tmp_path: Path, corpus: Path, tok: Tokenizer,
                                                              seed: int) -> None:
    rng = random.Random(seed)
    ds = prepared(corpus, tmp_path / "out", rng.choice([128, 300, 700]), shard_tokens=rng.randrange(8000, 30000))
    top = ds.settings.max_token_id
    assert top == max(int(ds.pack(p)[0].max()) for p in range(ds.n_packs)) and top < tok.vocab_size
    for vocab in (top + 1, tok.vocab_size, rng.randrange(top + 1, 10 * tok.vocab_size), np.int64(top + 1)):
        ds.check_vocab(vocab)
        PreparedDataset(tmp_path / "out", vocab_size=vocab)
    # Vocabulary sizes below some ids: the first pack (in pack order) holding one is named.
    all_ids = np.unique(np.concatenate([ds.pack(p)[0] for p in range(ds.n_packs)]))
    for vocab in (top, int(rng.choice(all_ids[len(all_ids) // 2:])), 1):
        first = next(p for p in range(ds.n_packs) if ds.pack(p)[0].max() >= vocab)
        shard = int(np.searchsorted(np.cumsum([sh["packs"] for sh in ds.manifest["shards"]]), first, side="right"))
        local = first - sum(sh["packs"] for sh in ds.manifest["shards"][:shard])
        tokens = tmp_path / "out" / f"{ds.manifest['shards'][shard]['name']}.tokens.npy"
        with pytest.raises(PreparedDatasetError) as info:
            PreparedDataset(tmp_path / "out", vocab_size=vocab)
        assert str(info.value).startswith(
            f"{tokens}: pack {local} of the shard (pack {first} of the dataset) holds token id "
            f"{int(ds.pack(first)[0].max())}, at or past the vocabulary size {vocab}; the data was tokenized with "
            f"tokenizer.model ({tok.vocab_size} pieces)"), f"vocab {vocab}, seed {seed}"
        with pytest.raises(PreparedDatasetError, match=f"pack {local} of the shard"):
            ds.check_vocab(vocab)
    for bad in (0, -5, 2.5, True, "32000"):
        with pytest.raises(ValueError, match="vocab_size must be a positive integer"):
            ds.check_vocab(bad)


def test_settings_tell_what_the_folder_was_prepared_with(tmp_path: Path, corpus: Path, tok: Tokenizer,
                                                         seed: int) -> None:
    rng = random.Random(seed)
    pack_len, template = rng.choice([96, 512, 2048]), rng.choice(["agentflan", "llama2-chat", "plain"])
    overlong = rng.choice(["split", "truncate"])
    recipe = recipe_from_dict({"sources": [str(corpus)], "pack_len": pack_len, "template": template,
                               "overlong": overlong, "packing": "fill"}, corpus.parent)
    prepare(recipe, tmp_path / "out")
    settings = PreparedDataset(tmp_path / "out").settings
    assert settings == PreparedSettings(
        pack_len=pack_len, template=template, overlong=overlong, packing="fill", tokenizer_name="tokenizer.model",
        tokenizer_sha256=hashlib.sha256(DEFAULT_TOKENIZER.read_bytes()).hexdigest(), vocab_size=tok.vocab_size,
        bos_id=tok.bos_id, eos_id=tok.eos_id, max_token_id=settings.max_token_id)
    assert 0 < settings.max_token_id < tok.vocab_size
    assert settings.conflicts(pack_len=pack_len, template=None, overlong=overlong) == {}
    assert settings.conflicts(pack_len=pack_len + 1, template="other", overlong="error", vocab_size=7) == {
        "pack_len": (pack_len + 1, pack_len), "template": ("other", template), "overlong": ("error", overlong),
        "vocab_size": (7, tok.vocab_size)}
    with pytest.raises(TypeError, match="unknown setting 'pack_length'"):
        settings.conflicts(pack_length=1)
