"""PreparedDataset: the batches of PackedDataset, from memory-mapped shards; validation."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from agentflan.data.dataset import PackedDataset, encode_files
from agentflan.data.loader import PreparedDataset, PreparedDatasetError
from agentflan.data.packing import PackedBatch
from agentflan.data.prepare import prepare
from agentflan.data.recipe import recipe_from_dict
from agentflan.data.synthetic import write_corpus
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
    with pytest.raises(PreparedDatasetError, match="format version 99, but this agentflan reads version 1"):
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
    rewrite()
    pieces = tmp_path / "out" / "shard-00000.pieces.npy"
    original = np.load(pieces)
    broken = original.copy()
    broken[2], broken[3] = broken[3], broken[2]
    np.save(pieces, broken)
    with pytest.raises(PreparedDatasetError, match="piece offsets are not increasing"):
        PreparedDataset(tmp_path / "out")
    np.save(pieces, original)
    (tmp_path / "out" / "shard-00000.packs.npy").unlink()
    with pytest.raises(PreparedDatasetError, match=r"shard-00000.packs.npy: missing"):
        PreparedDataset(tmp_path / "out")
