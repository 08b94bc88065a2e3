"""Data recipes: which source files make a training set, in what proportions, and how they
are tokenized and packed. A recipe is a YAML file::

    sources:                          # required, a non-empty list
      - path: data/agent_instruct_react.jsonl   # a file or a glob (sorted matches)
        format: agentflan             # agentflan | agentinstruct | toolbench | sharegpt | auto (default)
        repeat: 1                     # whole epochs of this source (an integer >= 1; the default)
      - path: data/ShareGPT_V3_unfiltered_cleaned_split.json
        format: sharegpt
        weight: 0.5                   # this source's fraction of the final mix (0 < weight <= 1)
        skip_bad: true                # per-source override of the recipe's skip_bad
    root: ..                          # folder the source paths are relative to (default: the recipe's folder)
    template: agentflan               # agentflan | llama2-chat | plain
    tokenizer: tokenizer.model        # SentencePiece model (default: the bundled one)
    pack_len: 8192                    # tokens a pack
    overlong: split                   # split | truncate | error: documents longer than pack_len
    packing: ffd                      # ffd | fill (see agentflan.data.prepare)
    seed: 0                           # sampling of weighted sources (an error without one)
    mix_by: tokens                    # tokens | conversations: the unit weights are measured in
                                      # (an error without a weight source)
    skip_bad: false                   # count and skip bad records instead of stopping

A key left out takes its value from ``RECIPE_DEFAULTS``; template, pack_len and overlong
default to the trainer's own defaults (``agentflan.data.defaults``), so data prepared
without them packs as the trainer would pack the same files.

Relative paths (``root``, ``tokenizer``) are relative to the recipe file's folder, and
source paths relative to ``root``. Unknown keys (with the closest known one suggested), a
missing file (named with the path as written and where it was looked for), a bad weight
or repeat raise ``RecipeError`` naming the recipe file and the line of the key at fault.

Mixing. A ``repeat: k`` source contributes every one of its documents k times. A
``weight: w`` source contributes a fraction w of the final mix, measured in ``mix_by``
units (tokens of the rendered documents, or conversations), and the weights fix the size
of the mix:

* with ``repeat`` sources, their total F is fixed and the weights must sum to less
  than 1: the mix holds F / (1 - sum of weights) units;
* with weights only, they must sum to 1 and the mix is the largest one in which no
  document repeats: the source that runs out first is taken whole, the others sampled.

A weighted source whose share exceeds what it holds is taken whole as many times as fits
and the rest sampled (its ``epochs`` in the manifest says so). Sampling draws documents
without replacement in a seeded random order until the share is met as closely as whole
documents allow; the same seed selects the same documents. Documents with no trained
token are left out (and counted) before any of this.
"""

from __future__ import annotations

import difflib
import glob
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from agentflan.data.defaults import (
    DEFAULT_OVERLONG,
    DEFAULT_PACK_LEN,
    DEFAULT_TEMPLATE,
    DEFAULT_TOKENIZER,
)
from agentflan.data.packing import OVERLONG_POLICIES
from agentflan.data.sources import FORMATS
from agentflan.data.templates import TEMPLATES
from agentflan.yaml_files import YamlFileError, load_yaml

MIX_UNITS = ("tokens", "conversations")
PACKINGS = ("ffd", "fill")
SOURCE_KEYS = ("path", "format", "weight", "repeat", "skip_bad")
RECIPE_KEYS = ("sources", "root", "template", "tokenizer", "pack_len", "overlong", "packing", "seed", "mix_by",
               "skip_bad")
# The value of each optional key a recipe leaves out (the tokenizer's is DEFAULT_TOKENIZER).
RECIPE_DEFAULTS: dict[str, Any] = {"root": ".", "template": DEFAULT_TEMPLATE, "pack_len": DEFAULT_PACK_LEN,
                                   "overlong": DEFAULT_OVERLONG, "packing": "ffd", "seed": 0, "mix_by": "tokens",
                                   "skip_bad": False}
_WEIGHT_SUM_TOLERANCE = 1e-9


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the recipe, the key and the reason."""


@dataclass(frozen=True)
class SourceSpec:
    path: str  # as written: a file or glob relative to the recipe's root
    format: str  # one of FORMATS or "auto"
    weight: float | None  # fraction of the final mix, or None for a repeat source
    repeat: int | None  # whole epochs, or None for a weighted source
    skip_bad: bool

    @property
    def shown_path(self) -> str:
        """The path as manifests show it: as written, or only the file name when it was
        written absolute (outputs never hold absolute paths)."""
        return Path(self.path).name if os.path.isabs(self.path) else Path(self.path).as_posix()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.shown_path, "format": self.format, "skip_bad": self.skip_bad}
        if self.weight is not None:
            out["weight"] = self.weight
        else:
            out["repeat"] = self.repeat
        return out


@dataclass(frozen=True)
class Recipe:
    sources: tuple[SourceSpec, ...]
    root: Path  # absolute folder the source paths are relative to
    template: str
    tokenizer: Path
    pack_len: int
    overlong: str
    seed: int
    mix_by: str
    packing: str
    name: str = "<recipe>"  # where the recipe came from, for messages
    source_places: tuple[str, ...] = ()  # each source's place in the recipe file ("r.yaml:7"), for messages

    def _where(self, index: int) -> str:
        place = self.source_places[index] if index < len(self.source_places) else self.name
        return f"{place}: sources[{index}]"

    def files(self, index: int) -> list[Path]:
        """The files of source ``index``: the path itself, or a glob's sorted matches."""
        spec = self.sources[index]
        pattern = self.root / spec.path
        if glob.has_magic(spec.path):
            found = sorted(Path(p).resolve() for p in glob.glob(str(pattern), recursive=True) if Path(p).is_file())
            if not found:
                raise RecipeError(f"{self._where(index)}: no file matches {spec.path!r} (looked in {self.root})")
            return found
        if not pattern.is_file():
            raise RecipeError(f"{self._where(index)}: file not found: {spec.path!r} (looked for {pattern})")
        return [pattern.resolve()]

    def display_path(self, index: int, file: Path) -> str:
        """A file's name in reports and manifests: relative to the root, or only its name
        when the source was given by absolute path; never absolute, so the same data
        prepared from another folder gives the same bytes."""
        if os.path.isabs(self.sources[index].path):
            return file.name
        return Path(os.path.relpath(file, self.root)).as_posix()

    def to_dict(self) -> dict[str, Any]:
        """The recipe as it determines the data (no absolute paths: the tokenizer is
        identified by its checksum in the manifest)."""
        return {
            "sources": [s.to_dict() for s in self.sources],
            "template": self.template,
            "pack_len": self.pack_len,
            "overlong": self.overlong,
            "seed": self.seed,
            "mix_by": self.mix_by,
            "packing": self.packing,
        }


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


Lines = Mapping[tuple, int]  # key path -> 1-based line in the recipe file: ("pack_len",), ("sources", 2, "weight")


def _yaml_lines(text: str) -> dict[tuple, int]:
    """The line of every top-level key, of every source entry and of each of its keys."""
    lines: dict[tuple, int] = {}
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if not isinstance(node, yaml.MappingNode):
        return lines
    for key, value in node.value:
        lines[(key.value,)] = key.start_mark.line + 1
        if key.value == "sources" and isinstance(value, yaml.SequenceNode):
            for i, item in enumerate(value.value):
                lines[("sources", i)] = item.start_mark.line + 1
                if isinstance(item, yaml.MappingNode):
                    for item_key, _ in item.value:
                        lines[("sources", i, item_key.value)] = item_key.start_mark.line + 1
    return lines


def _at(name: str, lines: Lines, *key: object) -> str:
    """``name:line`` of the most specific part of ``key`` the recipe file has a line for."""
    for n in range(len(key), 0, -1):
        if key[:n] in lines:
            return f"{name}:{lines[key[:n]]}"
    return name


def _unknown_key(key: object, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key {key!r} ({hint}known: {', '.join(known)})"


def _source(raw: object, index: int, name: str, skip_bad: bool, lines: Lines) -> SourceSpec:
    def fail(key: str | None, reason: str) -> RecipeError:
        place = _at(name, lines, "sources", index, *([key] if key else []))
        return RecipeError(f"{place}: sources[{index}]: {reason}")

    if isinstance(raw, str):
        raw = {"path": raw}
    if not isinstance(raw, Mapping):
        raise fail(None, f"expected a mapping with 'path', got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SOURCE_KEYS), key=str)
    if unknown:
        raise fail(unknown[0], _unknown_key(unknown[0], SOURCE_KEYS))
    path = raw.get("path")
    if not isinstance(path, str) or not path:
        raise fail("path", f"'path' must be a non-empty string, got {path!r}")
    fmt = raw.get("format", "auto")
    if fmt != "auto" and fmt not in FORMATS:
        raise fail("format", f"unknown format {fmt!r} (known: auto, {', '.join(FORMATS)})")
    weight, repeat = raw.get("weight"), raw.get("repeat")
    if weight is not None and repeat is not None:
        raise fail(None, "give 'weight' or 'repeat', not both")
    if weight is not None:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or not 0 < weight <= 1:
            raise fail("weight", f"'weight' must be a number in (0, 1] (a fraction of the mix), got {weight!r}")
        weight = float(weight)
    elif repeat is None:
        repeat = 1
    elif not _is_int(repeat) or repeat < 1:
        raise fail("repeat", f"'repeat' must be an integer >= 1 (whole epochs), got {repeat!r}")
    own_skip = raw.get("skip_bad", skip_bad)
    if not isinstance(own_skip, bool):
        raise fail("skip_bad", f"'skip_bad' must be true or false, got {own_skip!r}")
    return SourceSpec(path=path, format=fmt, weight=weight, repeat=repeat, skip_bad=own_skip)


def recipe_from_dict(raw: object, base_dir: str | os.PathLike, name: str = "<recipe>",
                     check_files: bool = True, lines: Lines | None = None) -> Recipe:
    """Validates a recipe given as a mapping; relative paths are taken from ``base_dir``.
    ``lines`` (from the YAML file, see ``load_recipe``) puts the line of the offending key
    into error messages: ``recipes/r.yaml:12: sources[3]: unknown key 'wieght' ...``."""
    lines = lines or {}

    def fail(key: str, reason: str) -> RecipeError:
        return RecipeError(f"{_at(name, lines, key)}: {reason}")

    if not isinstance(raw, Mapping):
        raise RecipeError(f"{name}: a recipe is a mapping of keys, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(RECIPE_KEYS), key=str)
    if unknown:
        raise fail(unknown[0], _unknown_key(unknown[0], RECIPE_KEYS))
    skip_bad = raw.get("skip_bad", RECIPE_DEFAULTS["skip_bad"])
    if not isinstance(skip_bad, bool):
        raise fail("skip_bad", f"'skip_bad' must be true or false, got {skip_bad!r}")
    sources = raw.get("sources")
    if not isinstance(sources, list) or not sources:
        raise fail("sources", "'sources' must be a non-empty list")
    specs = tuple(_source(s, i, name, skip_bad, lines) for i, s in enumerate(sources))

    weights = [s.weight for s in specs if s.weight is not None]
    total = sum(weights)
    if weights and len(weights) == len(specs) and abs(total - 1) > _WEIGHT_SUM_TOLERANCE:
        raise fail("sources", f"the weights sum to {total:g}; with no 'repeat' source they are the "
                              f"fractions of the whole mix and must sum to 1")
    if weights and len(weights) < len(specs) and total >= 1 - _WEIGHT_SUM_TOLERANCE:
        raise fail("sources", f"the weights sum to {total:g}; next to 'repeat' sources they must sum to "
                              f"less than 1 (the repeat sources fill the rest of the mix)")

    template = raw.get("template", RECIPE_DEFAULTS["template"])
    if template not in TEMPLATES:
        raise fail("template", f"unknown template {template!r} (known: {', '.join(TEMPLATES)})")
    pack_len = raw.get("pack_len", RECIPE_DEFAULTS["pack_len"])
    if not _is_int(pack_len) or pack_len < 1:
        raise fail("pack_len", f"'pack_len' must be a positive integer, got {pack_len!r}")
    overlong = raw.get("overlong", RECIPE_DEFAULTS["overlong"])
    if overlong not in OVERLONG_POLICIES:
        raise fail("overlong", f"'overlong' must be one of {', '.join(OVERLONG_POLICIES)}, got {overlong!r}")
    seed = raw.get("seed", RECIPE_DEFAULTS["seed"])
    if not _is_int(seed) or seed < 0:
        raise fail("seed", f"'seed' must be a non-negative integer, got {seed!r}")
    packing = raw.get("packing", RECIPE_DEFAULTS["packing"])
    if packing not in PACKINGS:
        raise fail("packing", f"'packing' must be one of {', '.join(PACKINGS)}, got {packing!r}")
    mix_by = raw.get("mix_by", RECIPE_DEFAULTS["mix_by"])
    if mix_by not in MIX_UNITS:
        raise fail("mix_by", f"'mix_by' must be one of {', '.join(MIX_UNITS)}, got {mix_by!r}")

    base = Path(base_dir).resolve()
    root = raw.get("root", RECIPE_DEFAULTS["root"])
    if not isinstance(root, (str, os.PathLike)):
        raise fail("root", f"'root' must be a path, got {root!r}")
    root_dir = (base / root).resolve()
    tokenizer = raw.get("tokenizer")
    if tokenizer is None:
        tokenizer_path = DEFAULT_TOKENIZER
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer_path = (base / tokenizer).resolve()
    else:
        raise fail("tokenizer", f"'tokenizer' must be a path, got {tokenizer!r}")

    recipe = Recipe(sources=specs, root=root_dir, template=template, tokenizer=Path(tokenizer_path),
                    pack_len=pack_len, overlong=overlong, seed=seed, mix_by=mix_by, packing=packing,
                    name=name, source_places=tuple(_at(name, lines, "sources", i) for i in range(len(specs))))
    if check_files:
        if not root_dir.is_dir():
            raise fail("root", f"root folder not found: {root!r} (looked for {root_dir})")
        for i in range(len(specs)):
            recipe.files(i)
        if not recipe.tokenizer.is_file():
            raise fail("tokenizer", f"tokenizer not found: {tokenizer!r} (looked for {recipe.tokenizer})")
    return recipe


def load_recipe(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None,
                check_files: bool = True) -> Recipe:
    """Reads a YAML recipe; ``overrides`` replace top-level keys before validation (the
    command line's --tokenizer, --pack-len, ...; relative override paths are taken from the
    current folder, not the recipe's). Errors name the file and the line of the key at fault
    (not for an overridden key, which the file does not hold)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe not found: {path}") from None
    try:
        raw = load_yaml(text, str(path))
    except YamlFileError as err:
        raise RecipeError(str(err)) from None
    lines = _yaml_lines(text)
    file_keys = set(raw) if isinstance(raw, Mapping) else set()
    if isinstance(raw, Mapping) and overrides:
        raw = dict(raw)
        for key, value in overrides.items():
            raw[key] = str(Path(value).resolve()) if key in ("root", "tokenizer") else value
        lines = {k: line for k, line in lines.items() if k[0] not in overrides}
    recipe = recipe_from_dict(raw, path.parent, name=str(path), check_files=check_files, lines=lines)
    if all(source.weight is None for source in recipe.sources):
        # A key the file sets must act: without a 'weight' source nothing is sampled or measured.
        for key in ("seed", "mix_by"):
            if key in file_keys and key not in (overrides or {}):
                raise RecipeError(f"{_at(str(path), lines, key)}: '{key}' shapes the sampling of 'weight' "
                                  f"sources, and this recipe has none (every source is repeated whole); "
                                  f"remove the key")
    return recipe


def recipe_from_files(paths: Sequence[str | os.PathLike], format: str = "auto", **settings: Any) -> Recipe:
    """A recipe of the given files, each taken once, relative to the current folder (the
    command line's --source form); ``settings`` are recipe keys (template, pack_len, ...)."""
    raw = {"sources": [{"path": os.fspath(p), "format": format} for p in paths], **settings}
    return recipe_from_dict(raw, os.getcwd(), name="command line")


@dataclass(frozen=True)
class Selection:
    """The documents one source contributes: indices into its documents, repeats included."""

    indices: np.ndarray  # int64, ascending within each epoch
    units: float  # mix units selected
    epochs: float  # units selected / units the source holds


def select_documents(units: Sequence[np.ndarray], specs: Sequence[SourceSpec], seed: int,
                     name: str = "<recipe>") -> list[Selection]:
    """Which documents of each source form the mix; ``units[s]`` holds each document's size
    in mix units (tokens, or 1 per conversation). Deterministic in ``seed``."""
    if len(units) != len(specs):
        raise ValueError(f"{len(units)} unit arrays for {len(specs)} sources")
    sizes = [float(np.sum(u, dtype=np.float64)) for u in units]
    fixed = sum(s.repeat * size for s, size in zip(specs, sizes) if s.repeat is not None)
    weighted = [i for i, s in enumerate(specs) if s.weight is not None]
    for i in weighted:
        if sizes[i] == 0:
            raise RecipeError(f"{name}: sources[{i}] ({specs[i].path}) has no document with a trained token "
                              f"to fill its weight {specs[i].weight} from")
    if len(weighted) == len(specs):
        total = min(sizes[i] / specs[i].weight for i in weighted)
    elif weighted:
        if fixed == 0:
            raise RecipeError(f"{name}: the 'repeat' sources hold no document with a trained token, so the "
                              f"weights have nothing to be fractions of")
        total = fixed / (1 - sum(specs[i].weight for i in weighted))
    out = []
    for i, (spec, u) in enumerate(zip(specs, units)):
        n = len(u)
        if spec.repeat is not None:
            out.append(Selection(np.tile(np.arange(n, dtype=np.int64), spec.repeat), spec.repeat * sizes[i],
                                 float(spec.repeat) if n else 0.0))
            continue
        target = spec.weight * total
        epochs = math.floor(target / sizes[i] + _WEIGHT_SUM_TOLERANCE)
        rest = max(0.0, target - epochs * sizes[i])
        order = np.random.default_rng([seed, i]).permutation(n)
        reached = np.concatenate([[0.0], np.cumsum(np.asarray(u, dtype=np.float64)[order])])
        take = int(np.searchsorted(reached, rest))  # reached[take - 1] < rest <= reached[take]
        if take > n or (take > 0 and rest - reached[take - 1] <= reached[take] - rest):
            take -= 1  # the shorter prefix is as close or closer
        parts = [np.arange(n, dtype=np.int64)] * epochs + [np.sort(order[:take])]
        chosen = np.concatenate(parts).astype(np.int64)
        selected = epochs * sizes[i] + float(reached[take])
        out.append(Selection(chosen, selected, selected / sizes[i]))
    return out
