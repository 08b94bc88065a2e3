"""The training data of a plan: conversation files tokenized and packed in memory, a folder
prepared by tools/prepare_data.py (memory-mapped), or a recipe prepared once into RUN/data.

A recipe is prepared by rank 0 while the others wait. ``RUN/data.source.json`` records what
it was prepared from (the recipe's settings, each source file's path, size and modification
time, the tokenizer's sha256); a later start with the same record reuses RUN/data, one with
another record prepares it again, except when resuming, where changed data is an error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Union

import numpy as np

from agentflan.data.dataset import PackedDataset, encode_files
from agentflan.data.loader import MANIFEST_NAME, PreparedDataset, sha256_file
from agentflan.data.packing import IGNORE_INDEX, build_batch
from agentflan.data.prepare import prepare
from agentflan.data.recipe import Recipe
from agentflan.distributed import DistInfo
from agentflan.tokenizer import Tokenizer
from agentflan.trainer.collective import agree
from agentflan.trainer.errors import TrainError
from agentflan.trainer.plan import RunPlan
from agentflan.trainer.run_dir import write_atomic

PREPARED_DIR = "data"
SOURCE_RECORD = "data.source.json"

Dataset = Union[PackedDataset, PreparedDataset]


def load_data(plan: RunPlan, info: DistInfo, resuming: bool, say: Callable[[str], None]) -> Dataset:
    """The plan's dataset on every rank. Collective. Raises TrainError (or the data readers'
    errors, which name file and line) on every rank."""
    cfg = plan.cfg
    if plan.data_kind == "files":
        def encode() -> PackedDataset:
            # --overlong error stops at the first overlong document, named by file and line.
            limit = cfg.pack_len if cfg.overlong == "error" else None
            corpus = encode_files(cfg.data, Tokenizer(cfg.tokenizer), cfg.template, cfg.data_format, cfg.skip_bad,
                                  max_doc_tokens=limit)
            for line in corpus.reports:
                say(f"read {line}")
            return PackedDataset(corpus, cfg.pack_len, cfg.overlong)

        return agree(info, encode, also=(ValueError,))  # packing's overlong refusal is a ValueError
    if plan.data_kind == "prepared":
        return agree(info, lambda: PreparedDataset(cfg.data[0], vocab_size=plan.model_config.vocab_size),
                     also=(ValueError,))
    folder = Path(cfg.out_dir) / PREPARED_DIR
    agree(info, lambda: _prepare_recipe(plan.recipe, folder, resuming, say) if info.is_main else None,
          also=(ValueError, FileExistsError))
    return agree(info, lambda: PreparedDataset(folder, vocab_size=plan.model_config.vocab_size), also=(ValueError,))


def check_trainable(dataset: Dataset) -> None:
    """Raises TrainError when the data holds no trained token (no conversation has an assistant
    turn left after tokenizing), naming what was read and what was left out, and why."""
    if isinstance(dataset, PackedDataset):
        corpus = dataset.corpus
        if corpus.n_docs and corpus.n_trained_tokens:
            return
        if corpus.n_read == 0:
            raise TrainError("the data holds no conversation (the 'read' lines above count each file's records and "
                             "skips)")
        raise TrainError(f"no conversation in the data has a trained turn: {corpus.n_read} read, "
                         f"{corpus.n_untrained} left out for lack of one (only assistant turns are trained; the "
                         f"'read' lines above count each file's skipped records): check the data's roles, or "
                         f"--data-format")
    if dataset.n_trained_tokens == 0:
        raise TrainError(f"the prepared data holds no trained token ({dataset.summary()}): prepare it again from "
                         f"conversations with assistant turns")


ABORT_RISK = 0.05  # the chance of an abort for lack of trained tokens that refuses a run up front


def trained_packs(dataset: PackedDataset, chunk: int = 4096) -> int:
    """How many packs hold at least one trained label, counted on the batches the loop builds
    (a pass of the C++ packer over the corpus, a chunk of packs at a time)."""
    plan, corpus = dataset.plan, dataset.corpus
    pack_lens = np.add.reduceat(plan.piece_len, plan.pack_offsets[:-1]) if dataset.n_packs else np.zeros(0, np.int64)
    count = 0
    for first in range(0, dataset.n_packs, chunk):
        packs = np.arange(first, min(first + chunk, dataset.n_packs))
        batch = build_batch(plan, packs, corpus.tokens, corpus.doc_offsets, corpus.loss_mask)
        trained = np.concatenate([[0], np.cumsum(batch.labels != IGNORE_INDEX)])
        bounds = np.concatenate([[0], np.cumsum(pack_lens[packs])])
        count += int((trained[bounds[1:]] > trained[bounds[:-1]]).sum())
    return count


def check_packs_train(dataset: PackedDataset, global_batch: int, warn: Callable[[str], None],
                      steps: int | None = None, max_bad_steps: int | None = None) -> None:
    """Raises TrainError when no pack holds a trained label (the documents split into pieces too
    short to hold a target), or when ``steps`` steps hold ``max_bad_steps`` empty steps in a row,
    which abort the run, with a chance of ABORT_RISK or more (each step empty with probability
    q: about steps * q**max_bad_steps such runs); warns when many steps will be skipped."""
    n_trained = trained_packs(dataset)
    where = (f"{n_trained} of {dataset.n_packs} packs of --pack-len {dataset.plan.capacity} tokens hold a trained "
             f"token ({dataset.corpus.n_trained_tokens:,} trained tokens in the conversations, "
             f"{dataset.plan.stats.n_split} documents split)")
    if n_trained == 0:
        raise TrainError(f"{where}: no step can train; raise --pack-len")
    empty_steps = (1 - n_trained / dataset.n_packs) ** global_batch  # the packs of a step are drawn at random
    # Runs of max_bad_steps empty steps: about steps * q**k of them (Poisson), so P(at least one) ~ 1 - exp(-that).
    abort_chance = 1 - math.exp(-steps * empty_steps ** max_bad_steps) if steps and max_bad_steps else 0.0
    if abort_chance >= ABORT_RISK:
        raise TrainError(f"{where}: about {100 * empty_steps:.0f}% of the steps of global batches of {global_batch} "
                         f"packs would hold none, so {max_bad_steps} such steps in a row (--max-bad-steps), which end "
                         f"the run, have a {100 * abort_chance:.0f}% chance within {steps} steps; raise --pack-len or "
                         f"--global-batch")
    if empty_steps >= 0.1:
        warn(f"warning: {where}: about {100 * empty_steps:.0f}% of the steps of global batches of {global_batch} "
             f"packs will hold none and be skipped; raise --pack-len or --global-batch")


def _source_record(recipe: Recipe) -> dict[str, Any]:
    files = []
    for index in range(len(recipe.sources)):
        for file in recipe.files(index):
            stat = file.stat()
            files.append([str(file), stat.st_size, stat.st_mtime_ns])
    return {"recipe": recipe.to_dict(), "tokenizer_sha256": sha256_file(recipe.tokenizer), "files": files}


def _prepare_recipe(recipe: Recipe, folder: Path, resuming: bool, say: Callable[[str], None]) -> None:
    record_path = folder.parent / SOURCE_RECORD
    record = _source_record(recipe)
    previous = None
    if record_path.is_file():
        try:
            previous = json.loads(record_path.read_text(encoding="utf-8"))
        except ValueError:
            previous = None
    if previous == record and (folder / MANIFEST_NAME).is_file():
        say(f"data: {folder} (prepared earlier from {recipe.name})")
        return
    if resuming and previous is not None:
        raise TrainError(f"the data of {recipe.name} changed since this run started (its settings, source files or "
                         f"tokenizer differ from {record_path}): resume with the same data, or start over with "
                         f"--overwrite")
    say(f"data: preparing {recipe.name} into {folder}")
    prepare(recipe, folder, overwrite=True, log=lambda line: say(f"read {line}"))
    write_atomic(record_path, json.dumps(record, indent=1) + "\n")
