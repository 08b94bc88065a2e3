"""Recipes: parsing, path resolution, clear errors, and the deterministic mixing sampler."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from agentflan.data.defaults import (
    DEFAULT_CORPUS,
    DEFAULT_OVERLONG,
    DEFAULT_PACK_LEN,
    DEFAULT_TEMPLATE,
    DEFAULT_TOKENIZER,
)
from agentflan.data.recipe import (
    RecipeError,
    SourceSpec,
    load_recipe,
    recipe_from_dict,
    recipe_from_files,
    select_documents,
)

REPO = Path(__file__).resolve().parents[1]



@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """recipes/r.yaml beside data/{a,b}.jsonl, data/sub/c.json and tok/t.model."""
    for name in ("data/a.jsonl", "data/b.jsonl", "data/sub/c.json", "tok/t.model"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}\n")
    (tmp_path / "recipes").mkdir()
    return tmp_path


def write_recipe(tree: Path, body: dict) -> Path:
    path = tree / "recipes" / "r.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_full_recipe_resolves_paths_relative_to_the_recipe(tree: Path) -> None:
    path = write_recipe(tree, {
        "root": "../data",
        "sources": [{"path": "*.jsonl", "format": "agentflan", "repeat": 2},
                    {"path": "sub/c.json", "format": "sharegpt", "weight": 0.25, "skip_bad": True},
                    "a.jsonl"],
        "tokenizer": "../tok/t.model", "template": "llama2-chat", "pack_len": 2048, "overlong": "truncate",
        "seed": 7, "mix_by": "conversations", "skip_bad": False,
    })
    r = load_recipe(path)
    assert r.root == (tree / "data").resolve()
    assert r.tokenizer == (tree / "tok/t.model").resolve()
    assert (r.template, r.pack_len, r.overlong, r.seed, r.mix_by) == ("llama2-chat", 2048, "truncate", 7,
                                                                      "conversations")
    assert r.sources == (
        SourceSpec("*.jsonl", "agentflan", None, 2, False),
        SourceSpec("sub/c.json", "sharegpt", 0.25, None, True),
        SourceSpec("a.jsonl", "auto", None, 1, False),  # a bare path: format auto, repeat 1
    )
    assert r.files(0) == [(tree / "data/a.jsonl").resolve(), (tree / "data/b.jsonl").resolve()]
    assert r.display_path(1, r.files(1)[0]) == "sub/c.json"
    # What a manifest records: no absolute path, no tokenizer path.
    assert r.to_dict() == {
        "sources": [{"path": "*.jsonl", "format": "agentflan", "skip_bad": False, "repeat": 2},
                    {"path": "sub/c.json", "format": "sharegpt", "skip_bad": True, "weight": 0.25},
                    {"path": "a.jsonl", "format": "auto", "skip_bad": False, "repeat": 1}],
        "template": "llama2-chat", "pack_len": 2048, "overlong": "truncate", "seed": 7, "mix_by": "conversations",
        "packing": "ffd",
    }


def test_defaults_and_overrides(tree: Path) -> None:
    path = write_recipe(tree, {"sources": ["../data/a.jsonl"]})
    r = load_recipe(path)
    assert (r.template, r.pack_len, r.overlong, r.seed, r.mix_by, r.packing) == (
        DEFAULT_TEMPLATE, DEFAULT_PACK_LEN, DEFAULT_OVERLONG, 0, "tokens", "ffd")
    assert (DEFAULT_TEMPLATE, DEFAULT_PACK_LEN, DEFAULT_OVERLONG) == ("agentflan", 1024, "split")
    assert r.tokenizer == DEFAULT_TOKENIZER and r.root == (tree / "recipes").resolve()
    r = load_recipe(path, {"pack_len": 512, "root": tree / "data", "tokenizer": tree / "tok/t.model"})
    assert r.pack_len == 512 and r.root == (tree / "data").resolve()


def test_absolute_and_command_line_paths_never_reach_outputs(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    absolute = str((tree / "data/a.jsonl").resolve())
    r = recipe_from_dict({"sources": [absolute]}, tree)
    assert r.to_dict()["sources"][0]["path"] == "a.jsonl"
    assert r.display_path(0, r.files(0)[0]) == "a.jsonl"
    monkeypatch.chdir(tree)
    r = recipe_from_files(["data/a.jsonl", "data/sub/c.json"], "sharegpt", pack_len=64)
    assert [s.path for s in r.sources] == ["data/a.jsonl", "data/sub/c.json"]
    assert r.display_path(1, r.files(1)[0]) == "data/sub/c.json" and r.pack_len == 64


BAD = {
    "unknown key": ({"sources": ["../data/a.jsonl"], "pack_length": 9}, r"unknown key 'pack_length'"),
    "unknown source key": ({"sources": [{"path": "../data/a.jsonl", "wieght": 0.5}]},
                           r"sources\[0\]: unknown key 'wieght' \(did you mean 'weight'\? known: path, format, weight, repeat, "
                           r"skip_bad\)"),
    "missing file": ({"sources": ["../data/a.jsonl", "../data/missing.jsonl"]},
                     r"sources\[1\]: file not found: '../data/missing.jsonl' \(looked for .*data/missing.jsonl\)"),
    "glob without match": ({"sources": ["../data/*.parquet"]}, r"sources\[0\]: no file matches '../data/\*.parquet'"),
    "no sources": ({"template": "agentflan"}, r"'sources' must be a non-empty list"),
    "empty sources": ({"sources": []}, r"'sources' must be a non-empty list"),
    "source not a mapping": ({"sources": [3]}, r"sources\[0\]: expected a mapping"),
    "no path": ({"sources": [{"format": "sharegpt"}]}, r"sources\[0\]: 'path' must be a non-empty string"),
    "weight and repeat": ({"sources": [{"path": "../data/a.jsonl", "weight": 0.5, "repeat": 1}]},
                          r"give 'weight' or 'repeat', not both"),
    "zero weight": ({"sources": [{"path": "../data/a.jsonl", "weight": 0}]}, r"'weight' must be a number in \(0, 1\]"),
    "weight above 1": ({"sources": [{"path": "../data/a.jsonl", "weight": 1.5}]}, r"'weight' must be a number"),
    "weight string": ({"sources": [{"path": "../data/a.jsonl", "weight": "50%"}]}, r"'weight' must be a number"),
    "weight bool": ({"sources": [{"path": "../data/a.jsonl", "weight": True}]}, r"'weight' must be a number"),
    "weight nan": ({"sources": [{"path": "../data/a.jsonl", "weight": float("nan")}]}, r"'weight' must be a number"),
    "zero repeat": ({"sources": [{"path": "../data/a.jsonl", "repeat": 0}]}, r"'repeat' must be an integer >= 1"),
    "fractional repeat": ({"sources": [{"path": "../data/a.jsonl", "repeat": 1.5}]}, r"'repeat' must be an integer"),
    "weights not summing to 1": ({"sources": [{"path": "../data/a.jsonl", "weight": 0.5},
                                              {"path": "../data/b.jsonl", "weight": 0.3}]},
                                 r"the weights sum to 0.8; with no 'repeat' source .* must sum to 1"),
    "weights leaving nothing for repeats": ({"sources": [{"path": "../data/a.jsonl", "weight": 1.0},
                                                         {"path": "../data/b.jsonl", "repeat": 1}]},
                                            r"the weights sum to 1; next to 'repeat' sources they must sum to less"),
    "unknown format": ({"sources": [{"path": "../data/a.jsonl", "format": "alpaca"}]}, r"unknown format 'alpaca'"),
    "unknown template": ({"sources": ["../data/a.jsonl"], "template": "chatml"}, r"unknown template 'chatml'"),
    "bad pack_len": ({"sources": ["../data/a.jsonl"], "pack_len": 0}, r"'pack_len' must be a positive integer"),
    "bad overlong": ({"sources": ["../data/a.jsonl"], "overlong": "drop"}, r"'overlong' must be one of"),
    "bad packing": ({"sources": ["../data/a.jsonl"], "packing": "bfd"}, r"'packing' must be one of ffd, fill"),
    "bad mix_by": ({"sources": ["../data/a.jsonl"], "mix_by": "bytes"}, r"'mix_by' must be one of tokens"),
    "bad seed": ({"sources": ["../data/a.jsonl"], "seed": -1}, r"'seed' must be a non-negative integer"),
    "seed without a weight source": ({"sources": ["../data/a.jsonl"], "seed": 3},
                                     r"'seed' shapes the sampling of 'weight' sources, and this recipe has none"),
    "mix_by without a weight source": ({"sources": [{"path": "../data/a.jsonl", "repeat": 2}],
                                        "mix_by": "conversations"},
                                       r"'mix_by' shapes the sampling of 'weight' sources, and this recipe has none"),
    "bad skip_bad": ({"sources": ["../data/a.jsonl"], "skip_bad": "yes"}, r"'skip_bad' must be true or false"),
    "missing tokenizer": ({"sources": ["../data/a.jsonl"], "tokenizer": "nope.model"},
                          r"tokenizer not found: 'nope.model'"),
    "missing root": ({"sources": ["a.jsonl"], "root": "../elsewhere"}, r"root folder not found: '../elsewhere'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recipe_is_rejected_with_file_key_and_reason(tree: Path, case: str) -> None:
    body, pattern = BAD[case]
    path = write_recipe(tree, body)
    with pytest.raises(RecipeError, match=pattern) as info:
        load_recipe(path)
    # The file, and the line of the key at fault (a missing key has none).
    line = r"" if case == "no sources" else r":\d+"
    assert re.match(rf"{re.escape(str(path))}{line}: ", str(info.value)), str(info.value)


LINED = """\
# a comment, then the keys
template: agentflan
sources:
  - ../data/a.jsonl
  - path: ../data/b.jsonl
    {key}: {value}
pack_len: {pack_len}
"""


@pytest.mark.parametrize("key,value,pack_len,pattern", [
    ("wieght", "0.5", "512", r":6: sources\[1\]: unknown key 'wieght' \(did you mean 'weight'\? known: path, "),
    ("weight", "2", "512", r":6: sources\[1\]: 'weight' must be a number"),
    ("repeat", "0", "512", r":6: sources\[1\]: 'repeat' must be an integer"),
    ("format", "alpaca", "512", r":6: sources\[1\]: unknown format 'alpaca'"),
    ("repeat", "1", "-4", r":7: 'pack_len' must be a positive integer, got -4"),
    ("pack_length", "9", "512", r":6: sources\[1\]: unknown key 'pack_length' \(known: path"),
])
def test_errors_name_the_line_of_the_key_and_suggest_a_close_one(tree: Path, key: str, value: str, pack_len: str,
                                                                 pattern: str) -> None:
    path = tree / "recipes" / "r.yaml"
    path.write_text(LINED.format(key=key, value=value, pack_len=pack_len))
    with pytest.raises(RecipeError, match=re.escape(str(path)) + pattern):
        load_recipe(path)


def test_missing_files_and_top_level_keys_are_named_by_line(tree: Path) -> None:
    path = tree / "recipes" / "r.yaml"
    path.write_text(LINED.format(key="repeat", value="1", pack_len="512").replace("b.jsonl", "missing.jsonl"))
    with pytest.raises(RecipeError, match=rf"^{re.escape(str(path))}:5: sources\[1\]: file not found"):
        load_recipe(path)
    path.write_text("sources: [../data/a.jsonl]\n\npack_lenght: 5\n")
    with pytest.raises(RecipeError, match=rf"^{re.escape(str(path))}:3: unknown key 'pack_lenght' \(did you mean "
                                          r"'pack_len'\? known: sources, "):
        load_recipe(path)
    # A value from the command line is not in the file: no line is named for it.
    path.write_text("sources: [../data/a.jsonl]\npack_len: 512\n")
    with pytest.raises(RecipeError, match=rf"^{re.escape(str(path))}: 'pack_len' must be a positive integer, got 0"):
        load_recipe(path, {"pack_len": 0})


def test_unreadable_recipe_files(tree: Path) -> None:
    with pytest.raises(RecipeError, match="recipe not found: .*none.yaml"):
        load_recipe(tree / "none.yaml")
    path = tree / "recipes" / "broken.yaml"
    path.write_text("sources: [a\n  - b: {")
    with pytest.raises(RecipeError, match=r"broken.yaml:2:6: not valid YAML: while parsing a flow sequence"):
        load_recipe(path)
    path.write_text("sources:\n  - {path: a.jsonl, repeat: 1\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value) == (f"{path}:3:1: not valid YAML: while parsing a flow mapping begun on line 2, column 5; "
                               f"expected ',' or '}}', but got the end of the file")
    path.write_text("sources: [a.jsonl]\npack_len: 512\nsources:\n  - b.jsonl\n")  # the first list would be lost
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value) == f"{path}:3:1: key 'sources' repeated (first on line 1); the later one would silently " \
                              f"replace it"
    path.write_text("sources:\n  - {path: a.jsonl, repeat: 1, repeat: 2}\n")
    with pytest.raises(RecipeError, match=r"broken.yaml:2:32: key 'repeat' repeated \(first on line 2\)"):
        load_recipe(path)
    path.write_text("- just\n- a list\n")
    with pytest.raises(RecipeError, match=r"a recipe is a mapping of keys, got list"):
        load_recipe(path)


def test_shipped_recipes() -> None:
    default = load_recipe(REPO / "recipes" / "default.yaml")
    assert default.files(0) == [DEFAULT_CORPUS] and default.tokenizer == DEFAULT_TOKENIZER
    assert default.sources[0].repeat == 1 and default.template == "agentflan"
    # The default recipe packs as the trainer does by default: it writes none of the shared defaults.
    assert (default.pack_len, default.template, default.overlong) == (DEFAULT_PACK_LEN, DEFAULT_TEMPLATE,
                                                                       DEFAULT_OVERLONG)
    assert not {"pack_len", "template", "overlong"} & set(yaml.safe_load((REPO / "recipes" / "default.yaml").read_text()))

    paper = load_recipe(REPO / "recipes" / "agentflan.yaml", check_files=False)
    agent = [s for s in paper.sources if s.format == "agentflan"]
    assert sorted(Path(s.path).name for s in agent) == sorted([
        "agent_instruct_react.jsonl", "agent_instruct_tflan.jsonl", "toolbench_instruct_j1s1_3k.jsonl",
        "toolbench_negative.jsonl", "toolbench_react_10p.jsonl", "toolbench_tflan_60p_r10r5u7.jsonl",
        "toolbench_tflan_cot_30p.jsonl"])
    assert all(s.repeat == 1 and s.weight is None for s in agent)  # taken as released, no resampling
    (general,) = [s for s in paper.sources if s.format == "sharegpt"]
    assert general.weight == 0.5 and paper.mix_by == "tokens"  # 1:1 by tokens against the agent data
    assert paper.root == REPO and paper.pack_len == 8192


def test_agentflan_recipe_finds_files_under_a_given_root(tmp_path: Path) -> None:
    paper = load_recipe(REPO / "recipes" / "agentflan.yaml", check_files=False)
    for spec in paper.sources:
        (tmp_path / spec.path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / spec.path).write_text("")
    r = load_recipe(REPO / "recipes" / "agentflan.yaml", {"root": tmp_path, "tokenizer": DEFAULT_TOKENIZER})
    assert [r.files(i)[0] for i in range(len(r.sources))] == [(tmp_path / s.path).resolve() for s in r.sources]
    with pytest.raises(RecipeError, match=r"sources\[\d\]: file not found: 'data/toolbench_negative.jsonl'"):
        (tmp_path / "data/toolbench_negative.jsonl").unlink()
        load_recipe(REPO / "recipes" / "agentflan.yaml", {"root": tmp_path, "tokenizer": DEFAULT_TOKENIZER})


# --------------------------------------------------------------------------- sampling


def spec(weight: float | None = None, repeat: int | None = None) -> SourceSpec:
    return SourceSpec("x", "auto", weight, repeat if weight is None and repeat is not None else
                      (None if weight is not None else 1), False)


def random_units(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(1, 3000, size=n).astype(np.int64)


def test_repeat_is_exact(seed: int) -> None:
    rng = np.random.default_rng(seed)
    units = [random_units(rng, 50), random_units(rng, 7)]
    a, b = select_documents(units, [spec(repeat=3), spec(repeat=1)], seed)
    assert a.indices.tolist() == list(range(50)) * 3 and b.indices.tolist() == list(range(7))
    assert a.units == 3 * units[0].sum() and (a.epochs, b.epochs) == (3.0, 1.0)


def test_weights_next_to_repeats_are_fractions_of_the_mix(seed: int) -> None:
    rng = np.random.default_rng(seed)
    units = [random_units(rng, 400), random_units(rng, 3000), random_units(rng, 100)]
    specs = [spec(repeat=1), spec(weight=0.3), spec(weight=0.2)]
    sel = select_documents(units, specs, seed)
    total = sum(s.units for s in sel)
    assert sel[0].indices.tolist() == list(range(400))
    for s, u, w in zip(sel[1:], units[1:], (0.3, 0.2)):
        # Whole documents: the share is met to within one document of the mix.
        assert abs(s.units - w * total) <= u.max(), f"seed {seed}"
        assert s.units == u[s.indices].sum()
    # Source 1 has plenty: sampled without replacement. Source 2 is small: whole epochs, then a sample.
    assert len(np.unique(sel[1].indices)) == len(sel[1].indices) and sel[1].epochs < 1
    expected_epochs = 0.2 * (units[0].sum() / 0.5) / units[2].sum()
    assert expected_epochs > 1.2, f"seed {seed}"  # the case this test is about: more than one epoch
    assert abs(sel[2].epochs - expected_epochs) * units[2].sum() <= units[2].max(), f"seed {seed}"
    counts = np.bincount(sel[2].indices, minlength=100)
    assert set(counts.tolist()) <= {math.floor(expected_epochs), math.floor(expected_epochs) + 1}


def test_weights_alone_make_the_largest_mix_without_repeats(seed: int) -> None:
    rng = np.random.default_rng(seed)
    units = [random_units(rng, 500), random_units(rng, 900)]
    sel = select_documents(units, [spec(weight=0.6), spec(weight=0.4)], seed)
    total = sum(s.units for s in sel)
    limiting = int(np.argmin([units[0].sum() / 0.6, units[1].sum() / 0.4]))
    assert sel[limiting].indices.tolist() == list(range(len(units[limiting])))  # taken whole
    other = 1 - limiting
    assert abs(sel[other].units - (0.6, 0.4)[other] * total) <= units[other].max()
    assert all(len(np.unique(s.indices)) == len(s.indices) for s in sel)


def test_sampling_is_deterministic_by_seed(seed: int) -> None:
    rng = np.random.default_rng(seed)
    units = [random_units(rng, 200), random_units(rng, 2000)]
    specs = [spec(repeat=1), spec(weight=0.25)]
    first = select_documents(units, specs, seed)
    again = select_documents([u.copy() for u in units], specs, seed)
    assert first[1].indices.tolist() == again[1].indices.tolist()
    other = select_documents(units, specs, seed + 1)
    assert first[1].indices.tolist() != other[1].indices.tolist()
    assert np.all(np.diff(first[1].indices) > 0)  # file order within the sample


def test_conversation_units_and_empty_sources() -> None:
    ones = [np.ones(10, dtype=np.int64), np.ones(40, dtype=np.int64)]
    a, b = select_documents(ones, [spec(repeat=1), spec(weight=0.5)], 0)
    assert len(b.indices) == 10  # 1:1 by conversations
    with pytest.raises(RecipeError, match=r"sources\[1\] \(x\) has no document with a trained token"):
        select_documents([ones[0], np.zeros(0, dtype=np.int64)], [spec(repeat=1), spec(weight=0.5)], 0)
    with pytest.raises(RecipeError, match="the 'repeat' sources hold no document"):
        select_documents([np.zeros(0, dtype=np.int64), ones[1]], [spec(repeat=1), spec(weight=0.5)], 0)
