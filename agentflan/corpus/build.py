"""Corpus construction: raw AgentInstruct / ToolBench files become Agent-FLAN JSONL plus a
manifest beside it (and, with general data, a recipe that mixes it in).

The steps (arXiv 2403.12881, section 3; see ``agentflan.toolworld.protocol`` for the forms):

1. Read: every input file's format is detected (``agentinstruct`` or ``toolbench``) and
   each record read into a trajectory (``agentflan.corpus.parse``). Strict by default: the
   first bad record raises ``DataFormatError`` with file, line and reason; ``skip_bad``
   counts bad records by reason instead.
2. Format alignment: a seeded ``react_share`` of the trajectories stays in ReAct form (the
   source's own text); the rest become the aligned multi-turn chat. ``instruct_samples``
   more conversations repeat trajectories in a strict format (alternately strict JSON and
   strict ReAct) under a system prompt that demands it exactly.
3. Negatives: ``negatives`` samples from the tool world's train split, the two kinds
   alternating (``agentflan.toolworld.negatives``).
4. Capability decomposition: every assistant turn is tagged with its facet and the facet
   weights are applied by turning the loss off on a seeded share of each facet's turns
   (``agentflan.corpus.facets``).
5. General data: with ``general`` files, a recipe ``<output stem>.recipe.yaml`` mixes the
   corpus with them at ``general_ratio`` general tokens per agent token (paper: 1:1)
   through ``agentflan.data.recipe``; ``tools/prepare_data.py --recipe`` builds it.

Everything is decided by the inputs and the options (with ``seed``); the output, its
manifest and recipe are written only when the whole build succeeded, and an existing
output is replaced only with ``overwrite``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from agentflan.corpus.align import aligned, instruct_eligible, negative_messages, record
from agentflan.corpus.facets import PAPER_WEIGHTS, UNIFORM_WEIGHTS, FacetTurns, apply_weights, facet_table
from agentflan.corpus.parse import READERS
from agentflan.data.conversation import DataFormatError, RecordError
from agentflan.data.defaults import DEFAULT_PACK_LEN, DEFAULT_TOKENIZER
from agentflan.data.recipe import recipe_from_dict
from agentflan.data.sources import MAX_EXAMPLES, FormatDetectionError, SourceReader
from agentflan.output_paths import OutputPathError, check_output_file, same_file
from agentflan.tokenizer import Tokenizer
from agentflan.toolworld.negatives import generate_negatives
from agentflan.toolworld.protocol import CHAT, FACETS, REACT, STRICT_JSON
from agentflan.toolworld.trajectory import Trajectory

JSON = dict[str, Any]

# The paper's proportions (Agent-FLAN release: about 2,000 instruction-following samples and
# 761 negatives in 34,442 rows), used when no count is given.
INSTRUCT_SHARE = 2000 / 34442
NEGATIVE_SHARE = 761 / 34442
RAW_FORMATS = tuple(READERS)
ARMS = ("react", "aligned", "full")


class BuildError(ValueError):
    """A build that cannot start (bad option, missing or unsuitable file, existing output)."""


@dataclass(frozen=True)
class BuildOptions:
    react_share: float = 0.1  # share of trajectories kept in ReAct form (paper: 10% of ToolBench)
    instruct_samples: int | None = None  # strict-format samples; None: INSTRUCT_SHARE of the trajectories
    negatives: int | None = None  # negative samples; None: NEGATIVE_SHARE of the trajectories
    facet_weights: Mapping[str, float] = field(default_factory=lambda: dict(PAPER_WEIGHTS))
    general: tuple[str, ...] = ()  # ShareGPT files mixed in by the recipe
    general_ratio: float = 1.0  # general tokens per agent token (paper: 1:1)
    seed: int = 0
    skip_bad: bool = False
    tokenizer: str = str(DEFAULT_TOKENIZER)  # for the token counts of the manifest (and the recipe)
    overwrite: bool = False

    def to_dict(self) -> JSON:
        out = dataclasses.asdict(self)
        out["facet_weights"] = dict(self.facet_weights)
        out["general"] = [Path(p).name for p in self.general]
        out["tokenizer"] = Path(self.tokenizer).name
        del out["overwrite"], out["seed"]  # the seed is a top-level manifest key
        return out


def arm_options(arm: str, **overrides: Any) -> BuildOptions:
    """The options of one arm of the replication (each from the same raw files):

    ``react``   (A) the agent data in ReAct form only: no alignment, no weights, no negatives;
    ``aligned`` (B) aligned chat (10% ReAct, strict-format samples) with the paper's facet weights;
    ``full``    (C) ``aligned`` plus negatives and the general-data mix (needs ``general``).
    """
    if arm == "react":
        base = BuildOptions(react_share=1.0, instruct_samples=0, negatives=0, facet_weights=dict(UNIFORM_WEIGHTS))
    elif arm == "aligned":
        base = BuildOptions(negatives=0)
    elif arm == "full":
        base = BuildOptions()
    else:
        raise BuildError(f"unknown arm {arm!r} (known: {', '.join(ARMS)})")
    options = dataclasses.replace(base, **overrides)
    if arm == "full" and not options.general:
        raise BuildError("arm full mixes general chat data: give the ShareGPT file(s) with --general")
    return options


def check_options(options: BuildOptions) -> None:
    """Raises BuildError for an option out of range, naming it by its tools/build_corpus.py flag."""
    if not 0 <= options.react_share <= 1:
        raise BuildError(f"--react-share must be in [0, 1], got {options.react_share}")
    for name in ("instruct_samples", "negatives"):
        value = getattr(options, name)
        if value is not None and value < 0:
            raise BuildError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    if set(options.facet_weights) != set(FACETS) or not all(0 <= w <= 1 for w in options.facet_weights.values()):
        raise BuildError(f"--facet-weights must give each of {', '.join(FACETS)} a weight in [0, 1]")
    if not options.general_ratio > 0:
        raise BuildError(f"--general-ratio must be positive, got {options.general_ratio}")
    if options.seed < 0:
        raise BuildError(f"--seed must be >= 0, got {options.seed}")


def check_outputs(inputs: Sequence[str | os.PathLike], output: str | os.PathLike, options: BuildOptions) -> None:
    """Raises BuildError unless the corpus, its manifest and (with general data) its recipe can be
    written: each a file path that is none of the input, general or tokenizer files, not a folder,
    in an existing folder, and absent unless ``overwrite``."""
    out, manifest_path, recipe_path = output_paths(output)
    given = [("--input", p) for p in inputs] + [("--general", p) for p in options.general]
    for i, (flag, path) in enumerate(given):  # one file twice would double its records silently
        for other_flag, other in given[:i]:
            if Path(path).exists() and same_file(path, other):
                raise BuildError(f"{flag} {path}: the same file as {other_flag} {other}; give each file once")
    read = given + [("--tokenizer", options.tokenizer)]
    try:
        for path in [out, manifest_path] + ([recipe_path] if options.general else []):
            check_output_file(path, "--output" if path == out else f"--output's {path.name}",
                              overwrite=options.overwrite, inputs=read)
    except OutputPathError as err:
        raise BuildError(str(err)) from None
    if not out.parent.is_dir():
        raise BuildError(f"--output {out}: the folder {out.parent} does not exist")


def output_paths(output: str | os.PathLike) -> tuple[Path, Path, Path]:
    """(corpus, manifest, recipe) paths: ``out.jsonl``, ``out.manifest.json``, ``out.recipe.yaml``."""
    out = Path(output)
    stem = out.name[:-len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out, out.with_name(f"{stem}.manifest.json"), out.with_name(f"{stem}.recipe.yaml")


@dataclass
class _InputStats:
    path: str
    format: str
    records: int = 0
    trajectories: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[JSON] = field(default_factory=list)

    def skip(self, kind: str, line: int, reason: str) -> None:
        self.skipped[kind] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append({"line": line, "kind": kind, "reason": reason})

    def to_dict(self) -> JSON:
        return {"path": self.path, "format": self.format, "records": self.records, "trajectories": self.trajectories,
                "skipped": dict(sorted(self.skipped.items())), "skip_examples": self.examples}


def _open_inputs(inputs: Sequence[str | os.PathLike], skip_bad: bool) -> list[SourceReader]:
    readers = []
    for path in inputs:
        try:
            reader = SourceReader(path, skip_bad=skip_bad, name=str(path))
        except FormatDetectionError as err:
            raise BuildError(f"{err.reason}; --input takes raw agent trajectories ({' or '.join(RAW_FORMATS)})") \
                from None
        except (FileNotFoundError, ValueError) as err:
            raise BuildError(str(err)) from None
        if reader.format not in RAW_FORMATS:
            raise BuildError(f"{path}: detected {reader.format} records; --input takes raw agent trajectories "
                             f"({' or '.join(RAW_FORMATS)}); general chat goes in --general")
        readers.append(reader)
    return readers


def _check_general(paths: Sequence[str | os.PathLike]) -> None:
    for path in paths:
        try:
            fmt = SourceReader(path, name=str(path)).format
        except FormatDetectionError as err:
            raise BuildError(f"{err.reason}; --general takes ShareGPT chat files") from None
        except (FileNotFoundError, ValueError) as err:
            raise BuildError(str(err)) from None
        if fmt != "sharegpt":
            raise BuildError(f"{path}: detected {fmt} records; --general takes ShareGPT chat files")


def read_trajectories(reader: SourceReader) -> tuple[list[Trajectory], _InputStats]:
    """The trajectories of one raw file; bad records raise (strict) or are counted (skip_bad)."""
    stats = _InputStats(Path(reader.name).name, reader.format)
    parse = READERS[reader.format]
    out = []
    for conv in reader:
        try:
            out.append(parse(conv))
        except RecordError as err:
            if not reader.skip_bad:
                raise DataFormatError(reader.name, conv.line, str(err), offset=conv.offset, kind=err.kind) from None
            stats.skip(err.kind, conv.line, str(err))
    stats.records = reader.report.records + reader.report.n_skipped
    stats.trajectories = len(out)
    for kind, n in reader.report.skipped.items():
        stats.skipped[kind] += n
    stats.examples = sorted(reader.report.examples + stats.examples, key=lambda e: e["line"])[:MAX_EXAMPLES]
    return out, stats


def _notes(trajectories: Sequence[Trajectory]) -> JSON:
    steps = [s for t in trajectories for s in t.steps]
    return {
        "steps": len(steps),
        "free_form_actions": sum(s.action is None and s.arguments is not None for s in steps),
        "thought_only_steps": sum(s.action is None and s.arguments is None for s in steps),
        "non_json_action_inputs": sum(s.action is not None and isinstance(s.arguments, str) for s in steps),
        "empty_thoughts": sum(not s.thought for s in steps),
        "without_final_answer": sum(t.final is None for t in trajectories),
        "gave_up": sum(bool(t.final and t.final.gave_up) for t in trajectories),
        "tools_not_found_in_instructions": sum(t.tools is None for t in trajectories),
        "strict_form_eligible": sum(instruct_eligible(t) for t in trajectories),
    }


def _unique_ids(records: list[JSON]) -> None:
    seen: Counter = Counter()
    for rec in records:
        seen[rec["id"]] += 1
        if seen[rec["id"]] > 1:
            rec["id"] = f"{rec['id']}#{seen[rec['id']]}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def build_corpus(inputs: Sequence[str | os.PathLike], output: str | os.PathLike,
                 options: BuildOptions = BuildOptions()) -> JSON:
    """Builds the corpus at ``output`` from the raw ``inputs``; returns the manifest (also
    written beside it). Raises BuildError before any work for unusable options or files,
    DataFormatError for a bad record (unless ``skip_bad``)."""
    check_options(options)
    if not inputs:
        raise BuildError("no --input file")
    check_outputs(inputs, output, options)
    out, manifest_path, recipe_path = output_paths(output)
    readers = _open_inputs(inputs, options.skip_bad)
    _check_general(options.general)
    try:
        tokenizer = Tokenizer(options.tokenizer)
    except (FileNotFoundError, ValueError) as err:
        raise BuildError(str(err)) from None

    trajectories: list[tuple[str, Trajectory]] = []
    input_stats = []
    for reader in readers:
        found, stats = read_trajectories(reader)
        stem = Path(reader.name).stem
        trajectories += [(stem, t) for t in found]
        input_stats.append(stats)
    if not trajectories:
        raise BuildError("no trajectory to build from (every record was skipped)")

    n = len(trajectories)
    rng = random.Random(f"build|{options.seed}")
    n_react = round(options.react_share * n)
    react = set(rng.sample(range(n), n_react))
    records: list[JSON] = []
    forms: Counter = Counter()
    for i, (stem, traj) in enumerate(trajectories):
        form = REACT if i in react else CHAT
        records.append(record(f"{form}/{stem}/{traj.id}", aligned(traj, form, rng)))
        forms[form] += 1

    eligible = [i for i, (_, t) in enumerate(trajectories) if instruct_eligible(t)]
    if options.instruct_samples is None:  # the paper's share, of the trajectories that can take a strict form
        n_instruct = min(round(INSTRUCT_SHARE * n), len(eligible))
    elif options.instruct_samples > len(eligible):
        raise BuildError(f"{options.instruct_samples} instruction-following samples asked for, but only "
                         f"{len(eligible)} trajectories have known tools and named calls")
    else:
        n_instruct = options.instruct_samples
    for k, i in enumerate(sorted(rng.sample(eligible, n_instruct))):
        stem, traj = trajectories[i]
        form = STRICT_JSON if k % 2 == 0 else REACT
        records.append(record(f"instruct-{form}/{stem}/{traj.id}", aligned(traj, form, rng, strict=True)))
        forms[f"instruct-{form}"] += 1

    n_negative = round(NEGATIVE_SHARE * n) if options.negatives is None else options.negatives
    for neg in generate_negatives("train", n_negative, options.seed):
        records.append(record(f"negative-{neg.kind}/{neg.id}", negative_messages(neg, rng)))
        forms[f"negative-{neg.kind}"] += 1
    _unique_ids(records)

    turns = FacetTurns.of(records, tokenizer)
    before = turns.trained(records)
    apply_weights(records, turns, dict(options.facet_weights), options.seed)
    after = turns.trained(records)

    data = "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in records).encode("utf-8")
    manifest: JSON = {
        "output": out.name,
        "sha256": _sha256(data),
        "conversations": len(records),
        "seed": options.seed,
        "options": options.to_dict(),
        "inputs": [s.to_dict() for s in input_stats],
        "forms": dict(sorted(forms.items())),
        "facets": facet_table(turns, before, after),
        "trained_tokens": {"before": int(turns.tokens[before].sum()), "after": int(turns.tokens[after].sum())},
        "notes": _notes([t for _, t in trajectories]),
        "tokenizer": {"name": Path(options.tokenizer).name, "sha256": _sha256(Path(options.tokenizer).read_bytes())},
        "general": None,
    }
    recipe = None
    if options.general:
        recipe = _recipe(out, recipe_path, options)
        manifest["general"] = {"files": [Path(p).name for p in options.general], "ratio": options.general_ratio,
                               "recipe": recipe_path.name}
    _write_atomic(out, data)
    if recipe is not None:
        _write_atomic(recipe_path, recipe.encode("utf-8"))
    _write_atomic(manifest_path, (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    return manifest


def _relative(path: str | os.PathLike, folder: Path) -> str:
    try:
        return Path(os.path.relpath(Path(path).resolve(), folder.resolve())).as_posix()
    except ValueError:  # another drive
        return str(Path(path).resolve())


def _recipe(out: Path, recipe_path: Path, options: BuildOptions) -> str:
    """A recipe taking the corpus once and the general files at ``general_ratio`` tokens per agent token."""
    weight = options.general_ratio / (1 + options.general_ratio)
    folder = recipe_path.parent
    lines = [
        f"# {out.name} (built by tools/build_corpus.py) mixed with general chat at {options.general_ratio:g} general",
        "# token(s) per agent token, measured in tokens of the rendered conversations (Agent-FLAN mixes",
        "# ShareGPT 1:1). Build it with: python tools/prepare_data.py OUT_DIR --recipe " + recipe_path.name,
        "sources:",
        f"  - {{path: {json.dumps(out.name)}, format: agentflan, repeat: 1}}",
    ]
    for i, path in enumerate(options.general):
        share = weight / len(options.general)
        skip = ", skip_bad: true" if options.skip_bad else ""
        lines.append(f"  - {{path: {json.dumps(_relative(path, folder))}, format: sharegpt, weight: {share!r}{skip}}}")
    lines += ["mix_by: tokens", "template: agentflan", f"pack_len: {DEFAULT_PACK_LEN}", f"seed: {options.seed}"]
    if Path(options.tokenizer).resolve() != DEFAULT_TOKENIZER.resolve():
        lines.append(f"tokenizer: {json.dumps(_relative(options.tokenizer, folder))}")
    text = "\n".join(lines) + "\n"
    recipe_from_dict(yaml.safe_load(text), folder, name=recipe_path.name, check_files=False)  # valid by construction
    return text

