"""The bundled corpus (agentflan/assets/agentflan_tooluse.jsonl): raw trajectories of the tool
world's train split, half AgentInstruct-shaped and half ToolBench-shaped, built by
``build_corpus`` with the default options (aligned chat, 10% ReAct, the paper's facet
weights) except for more negatives than the paper's 2.2%, so that a small model sees
enough of both kinds. A pure function of ``(n, seed)``; ``tools/make_default_corpus.py``
writes it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from agentflan.corpus.build import BuildError, BuildOptions, build_corpus, output_paths
from agentflan.output_paths import OutputPathError, check_output_file, check_output_folder
from agentflan.toolworld.raw import SHAPES, generate_raw

DEFAULT_SEED = 2403_12881
DEFAULT_SIZE = 3000
NEGATIVE_SHARE = 0.15  # of the conversations
INSTRUCT_SHARE = 0.05


def plan(n: int) -> tuple[int, int, int]:
    """(trajectories, instruction samples, negatives) adding up to ``n`` conversations."""
    if n < 4:
        raise ValueError(f"the corpus needs at least 4 conversations, got {n}")
    negatives = round(NEGATIVE_SHARE * n)
    instruct = round(INSTRUCT_SHARE * n)
    return n - negatives - instruct, instruct, negatives


def raw_paths(folder: str | os.PathLike) -> list[Path]:
    """The raw files ``write_raw`` writes into ``folder``, one per shape."""
    return [Path(folder) / f"toolworld_{shape}.jsonl" for shape in SHAPES]


def write_raw(folder: str | os.PathLike, trajectories: int, seed: int) -> list[Path]:
    """Writes ``toolworld_agentinstruct.jsonl`` and ``toolworld_toolbench.jsonl`` (half the
    trajectories each) into ``folder``; returns their paths."""
    paths = raw_paths(folder)
    for k, (shape, path) in enumerate(zip(SHAPES, paths)):
        count = trajectories // 2 + (trajectories % 2 if k == 0 else 0)
        with open(path, "w", encoding="utf-8") as f:
            for rec in generate_raw(shape, count, seed):
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return paths


def check_targets(path: str | os.PathLike, raw_dir: str | os.PathLike | None, overwrite: bool) -> None:
    """Raises BuildError (naming --out or --raw-dir) unless the corpus, its manifest and the raw
    files can be written: a folder where a folder goes, never under a file, no output one of the
    raw files, and nothing replaced without ``overwrite``. Missing folders are fine (created)."""
    raws = raw_paths(raw_dir) if raw_dir is not None else []
    try:
        if raw_dir is not None:
            check_output_folder(raw_dir, "--raw-dir")
        for raw in raws:
            check_output_file(raw, f"--raw-dir's {raw.name}", overwrite=overwrite)
        for out in (Path(path), manifest_path(path)):
            check_output_file(out, "--out" if out == Path(path) else f"--out's {out.name}", overwrite=overwrite,
                              inputs=[("--raw-dir's", raw) for raw in raws])
    except OutputPathError as err:
        raise BuildError(str(err)) from None


def write_corpus(path: str | os.PathLike, n: int = DEFAULT_SIZE, seed: int = DEFAULT_SEED,
                 raw_dir: str | os.PathLike | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Writes ``n`` conversations to ``path`` and the manifest beside it, creating missing folders;
    returns the manifest. ``raw_dir`` keeps the raw files built from (default: a temporary
    folder). Raises BuildError before any work when a target cannot be written (see
    ``check_targets``) or exists and ``overwrite`` is false."""
    trajectories, instruct, negatives = plan(n)
    check_targets(path, raw_dir, overwrite)
    options = BuildOptions(instruct_samples=instruct, negatives=negatives, seed=seed, overwrite=overwrite)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if raw_dir is not None:
        Path(raw_dir).mkdir(parents=True, exist_ok=True)
        return build_corpus(write_raw(raw_dir, trajectories, seed), path, options)
    with tempfile.TemporaryDirectory() as tmp:
        return build_corpus(write_raw(tmp, trajectories, seed), path, options)


def manifest_path(path: str | os.PathLike) -> Path:
    return output_paths(path)[1]
