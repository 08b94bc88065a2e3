"""From a TrainConfig to a RunPlan: every option resolved and checked against the files it
names, reading small files only (a recipe, a prepared folder's manifest, a checkpoint's
config.json and safetensors headers, the tokenizer), so a mistake is reported before any
tokenizing, weight loading or compute.

A dry run (``--dry-run``) resolves the same way for the ranks it plans for, with two
differences: a file the run would read but that is absent here (the checkpoint, its
tokenizer, a data file) is a warning, not an error, and the checks that concern this
machine (a process group, a visible GPU) are left to the real run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from agentflan import builder, checkpoint, hf_tokenizer
from agentflan.config import ModelConfig
from agentflan.data.defaults import DEFAULT_CORPUS, DEFAULT_PACK_LEN, DEFAULT_TOKENIZER
from agentflan.data.loader import MANIFEST_NAME, PreparedDataset, sha256_file
from agentflan.data.recipe import Recipe, RecipeError, load_recipe
from agentflan.distributed import DistInfo
from agentflan.lora import LoraSpec, parse_targets
from agentflan.tokenizer import Tokenizer
from agentflan.trainer import config as options
from agentflan.trainer.config import DEFAULT_AC_EVERY, TrainConfig, check_options, flag
from agentflan.trainer.errors import TrainError

TOKENIZER_FILE = "tokenizer.model"  # the tokenizer a Hugging Face Llama folder carries
# The fields of a model's shape that a --preset given with --init-from must agree on.
SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim")


class Checks:
    """What resolving verifies, as "ok: ..." lines, each passed to ``report`` as it is found. A file
    the run needs but that is absent raises TrainError, except in a dry run, where it is reported
    as a "warning: ... missing" line."""

    def __init__(self, dry_run: bool = False, report: Callable[[str], None] = lambda line: None) -> None:
        self.dry_run, self.report = dry_run, report
        self.lines: list[str] = []

    def _add(self, line: str) -> None:
        self.lines.append(line)
        self.report(line)

    def passed(self, text: str) -> None:
        self._add(f"ok: {text}")

    def missing(self, text: str) -> None:
        if not self.dry_run:
            raise TrainError(text)
        self._add(f"warning: {text}")


@dataclass
class RunPlan:
    """A resolved, checked run. ``cfg`` has every derivable field set (``steps`` and
    ``warmup_steps`` stay None until the data is counted when ``epochs`` sets them)."""

    cfg: TrainConfig
    mode: str  # none | ddp | fsdp
    bf16: bool
    data_kind: str  # files | prepared | recipe
    recipe: Recipe | None
    model_config: ModelConfig  # the shape trained (vocabulary resized if the tokenizer asks)
    checkpoint_vocab: int | None  # --init-from's vocabulary, when it differs from model_config's
    tokenizer_vocab: int | None  # None only in a dry run without the tokenizer file
    notes: list[str] = field(default_factory=list)  # lines to print at start
    checks: list[str] = field(default_factory=list)  # "ok: ..." and (dry run) "warning: ... missing" lines
    lora: LoraSpec | None = None  # adapters trained on a frozen base (--lora-rank)

    @property
    def adapter_params(self) -> int:
        """Trainable adapter parameters (0 without LoRA: every parameter trains)."""
        return self.lora.num_params(self.model_config) if self.lora else 0

    def describe_ac(self) -> str:
        """'full', 'selective every 2', ...: the activation checkpointing applied."""
        cfg = self.cfg
        return cfg.ac + (f" every {cfg.ac_every or DEFAULT_AC_EVERY}" if cfg.ac == "selective" else "")

    def describe_lora(self, base_precision: str) -> str:
        """'LoRA r=16 alpha=32 dropout 0.1 on q_proj,...: 39,976,960 trainable, base frozen in bf16'."""
        spec = self.lora
        assert spec is not None, "describe_lora needs a LoRA run"
        return (f"LoRA r={spec.rank} alpha={spec.alpha:g}{' (rsLoRA)' if spec.rslora else ''} dropout "
                f"{spec.dropout:g} on {','.join(spec.targets)}: {self.adapter_params:,} trainable, base frozen "
                f"in {base_precision}")


def resolve(cfg: TrainConfig, info: DistInfo, checks: Checks | None = None) -> RunPlan:
    """Checks ``cfg`` and derives what it leaves open; raises TrainError (or RecipeError) naming
    the flag or file. Reads no training data and no weights. ``checks``: where the checks are
    reported; ``Checks(dry_run=True, ...)`` plans a dry run for ``info.world_size`` ranks without
    a process group, missing files being warnings (see the module docstring)."""
    check_options(cfg)
    checks = checks or Checks()
    dry_run = checks.dry_run
    notes: list[str] = []
    mode, bf16 = _execution(cfg, info, dry_run)
    global_batch, per_rank = _batch(cfg, info.world_size)
    checkpoint_config = _checkpoint_config(cfg.init_from, checks) if cfg.init_from else None
    recipe = _recipe(cfg, checks) if cfg.recipe else None
    tokenizer = _tokenizer_path(cfg, recipe, checks)
    tokenizer_vocab = None
    if tokenizer is not None:
        tokenizer_vocab = _tokenizer_vocab(tokenizer)
        if cfg.save:  # the final save writes Hugging Face tokenizer files: refuse what they cannot express now
            try:
                hf_tokenizer.check_hf_compatible(tokenizer)
            except ValueError as err:
                raise TrainError(f"{err}: the final save (RUN/final) cannot write Hugging Face tokenizer files for "
                                 f"it; pass --no-save to train without a final model") from None
    data, kind, pack_len, template, overlong = _data(cfg, recipe, tokenizer, checks)
    model_config, checkpoint_vocab = _model_config(cfg, checkpoint_config, tokenizer, tokenizer_vocab, pack_len,
                                                   notes, checks)

    resolved = dataclasses.replace(
        cfg,
        preset=cfg.preset if cfg.init_from else (cfg.preset or options.DEFAULT_PRESET),
        init_from=_abs(cfg.init_from), data=data, recipe=_abs(cfg.recipe), data_root=_abs(cfg.data_root),
        data_format=None if kind != "files" else (cfg.data_format or "auto"),
        skip_bad=None if kind == "prepared" else bool(cfg.skip_bad),
        tokenizer=_abs(str(tokenizer)) if tokenizer is not None else None,
        template=template, pack_len=pack_len, overlong=overlong, global_batch=global_batch, packs_per_step=per_rank,
        parallel=mode, dtype="bf16" if bf16 else "fp32", out_dir=_abs(cfg.out_dir), tensorboard=_tensorboard(cfg),
        warmup_steps=None if cfg.warmup_ratio is not None else _or(cfg.warmup_steps, options.DEFAULT_WARMUP_STEPS),
        **_lora_options(cfg),
    )
    lora = _lora(resolved, model_config, checkpoint_vocab)
    plan = RunPlan(resolved, mode, bf16, kind, recipe, model_config, checkpoint_vocab, tokenizer_vocab, notes,
                   checks.lines, lora)
    if cfg.epochs is None:
        set_steps(plan, cfg.steps or options.DEFAULT_STEPS)
    return plan


def _model_config(cfg: TrainConfig, checkpoint_config: ModelConfig | None, tokenizer: Path | None,
                  tokenizer_vocab: int | None, pack_len: int, notes: list[str],
                  checks: Checks) -> tuple[ModelConfig, int | None]:
    """(the shape trained, --init-from's vocabulary when it differs from the tokenizer's)."""
    if cfg.init_from is None:
        if tokenizer_vocab is not None:
            checks.passed(f"tokenizer {tokenizer}: {tokenizer_vocab} pieces, the model's vocabulary")
        return builder.model_config(cfg.preset or options.DEFAULT_PRESET, tokenizer_vocab, max(pack_len, 2)), None
    if checkpoint_config is None:  # a dry run without the folder: the preset names the shape
        if cfg.preset is None:
            raise TrainError(f"--init-from {cfg.init_from} is missing here: give --preset (the checkpoint's shape, "
                             f"e.g. llama2-7b) to plan without it")
        shape = builder.model_config(cfg.preset, tokenizer_vocab)
        vocab = "the tokenizer's" if tokenizer_vocab is not None else "the preset's"
        checks.passed(f"model shape from --preset {cfg.preset}: {shape.num_params():,} parameters, vocabulary "
                      f"{shape.vocab_size} ({vocab})")
        return shape, None
    if cfg.preset is not None:
        expected = builder.model_config(cfg.preset)
        differ = [f"{name} {getattr(expected, name)} vs {getattr(checkpoint_config, name)}" for name in SHAPE_FIELDS
                  if getattr(expected, name) != getattr(checkpoint_config, name)]
        if differ:
            raise TrainError(f"--preset {cfg.preset} and --init-from {cfg.init_from} ({checkpoint.CONFIG_FILE}) are "
                             f"different shapes: {', '.join(differ)} (preset vs checkpoint)")
    if tokenizer_vocab is None or checkpoint_config.vocab_size == tokenizer_vocab:
        if tokenizer_vocab is not None:
            checks.passed(f"tokenizer {tokenizer}: {tokenizer_vocab} pieces, the checkpoint's vocabulary")
        return checkpoint_config, None
    checkpoint_vocab = checkpoint_config.vocab_size
    if not cfg.allow_vocab_mismatch:
        raise TrainError(
            f"tokenizer {tokenizer} has {tokenizer_vocab} pieces but --init-from {cfg.init_from} has a vocabulary "
            f"of {checkpoint_vocab}: pass the model's own tokenizer (--tokenizer), or --allow-vocab-mismatch")
    if tokenizer_vocab > checkpoint_vocab:
        notes.append(f"vocabulary: {checkpoint_vocab} -> {tokenizer_vocab} rows (new rows: mean of the old; every rank "
                     f"loads the whole checkpoint to add them)")
        return dataclasses.replace(checkpoint_config, vocab_size=tokenizer_vocab), checkpoint_vocab
    notes.append(f"vocabulary: the tokenizer uses {tokenizer_vocab} of the checkpoint's {checkpoint_vocab} rows")
    return checkpoint_config, checkpoint_vocab


def _lora_options(cfg: TrainConfig) -> dict[str, Any]:
    """The LoRA fields with their defaults filled in (none without --lora-rank)."""
    if cfg.lora_rank == 0:
        return {}
    return {
        "lora_alpha": cfg.lora_alpha if cfg.lora_alpha is not None else options.LORA_ALPHA_PER_RANK * cfg.lora_rank,
        "lora_dropout": cfg.lora_dropout if cfg.lora_dropout is not None else options.DEFAULT_LORA_DROPOUT,
        "lora_targets": list(parse_targets(cfg.lora_targets or ["all"])),
    }


def _lora(cfg: TrainConfig, model_config: ModelConfig, checkpoint_vocab: int | None) -> LoraSpec | None:
    """The adapters of a resolved config; a vocabulary grown from --init-from's is refused (an
    adapter carries no embedding rows, so the new ones could be neither trained nor exported)."""
    if cfg.lora_rank == 0:
        return None
    if checkpoint_vocab is not None and model_config.vocab_size > checkpoint_vocab:
        raise TrainError(f"--lora-rank with a tokenizer of {model_config.vocab_size} pieces and --init-from "
                         f"{cfg.init_from}'s vocabulary of {checkpoint_vocab}: a LoRA adapter cannot carry new "
                         f"embedding rows; train with the checkpoint's own tokenizer, or without LoRA")
    return LoraSpec(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, tuple(cfg.lora_targets), cfg.lora_rslora)


def set_steps(plan: RunPlan, steps: int) -> None:
    """Fixes the step count (and the warmup a --warmup-ratio derives from it)."""
    cfg = plan.cfg
    warmup = math.ceil(cfg.warmup_ratio * steps) if cfg.warmup_ratio is not None else cfg.warmup_steps
    plan.cfg = dataclasses.replace(cfg, steps=steps, warmup_steps=warmup)
    if 0 < steps <= warmup:
        # Warned, not scaled: the schedule stays the one the options name, and a resumed run keeps it.
        plan.notes.append(f"warning: the warmup ({warmup} steps) covers all {steps} steps: the LR never reaches --lr "
                          f"{cfg.lr:g} nor decays to --min-lr {cfg.min_lr:g}; lower --warmup-steps (default "
                          f"{options.DEFAULT_WARMUP_STEPS}) or use --warmup-ratio")


def steps_from_data(plan: RunPlan, n_packs: int) -> None:
    """Checks the data fills a global batch; with --epochs, sets the step count from it."""
    cfg = plan.cfg
    if n_packs < cfg.global_batch:
        raise TrainError(f"the data holds {n_packs} packs of {cfg.pack_len} tokens, fewer than one global batch of "
                         f"{cfg.global_batch} packs: lower --global-batch (or --packs-per-step) or --pack-len")
    if cfg.epochs is not None:
        per_epoch = n_packs // cfg.global_batch
        set_steps(plan, max(1, round(cfg.epochs * per_epoch)))
        plan.notes.append(f"--epochs {cfg.epochs:g}: {plan.cfg.steps} steps ({per_epoch} a pass over {n_packs} packs "
                          f"in global batches of {cfg.global_batch})")


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def _abs(path: str | None) -> str | None:
    return None if path is None else os.path.abspath(os.path.expanduser(path))


def _execution(cfg: TrainConfig, info: DistInfo, dry_run: bool) -> tuple[str, bool]:
    """The parallel mode and whether compute runs in bf16, checked against the machine (in a dry
    run, the machine planned for: ``info.device`` is CUDA when a GPU is named)."""
    mode = cfg.parallel
    if mode == "auto":
        mode = "none" if info.world_size == 1 and not cfg.cpu_offload else "fsdp"
    # One process with --cpu-offload gets a process group of its own (agentflan.distributed).
    distributed = dry_run or (dist.is_available() and dist.is_initialized()) or (
        cfg.cpu_offload and info.world_size == 1)
    if mode in ("ddp", "fsdp") and not distributed:
        raise TrainError(f"--parallel {mode} needs a process group: launch with torchrun "
                         f"(torchrun --nproc_per_node=N tools/train.py ...)")
    if mode == "none" and info.world_size > 1:
        raise TrainError(f"--parallel none with {info.world_size} ranks would train {info.world_size} separate models "
                         f"into one run folder: use --parallel ddp or fsdp")
    cuda = info.device.type == "cuda"
    if cfg.cpu_offload and not cuda and not dry_run:
        raise TrainError("--cpu-offload needs a CUDA GPU and none is visible: it keeps FSDP's shards, gradients and "
                         "optimizer state in pinned host memory and computes on the GPU")
    if cfg.kernels == "triton" and not dry_run:
        if not cuda and os.environ.get("TRITON_INTERPRET") != "1":  # first: installing triton would not help
            raise TrainError("--kernels triton needs a CUDA GPU and none is visible: use --kernels reference, or set "
                             "TRITON_INTERPRET=1 to run the kernels in Triton's interpreter on the CPU (slow)")
        if importlib.util.find_spec("triton") is None:
            raise TrainError("--kernels triton needs the triton package (pip install triton)")
    return mode, cfg.dtype == "bf16" or (cfg.dtype == "auto" and cuda)


def _batch(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """(global batch, packs per rank) in packs."""
    if cfg.global_batch is not None:
        if cfg.global_batch % world_size:
            raise TrainError(f"--global-batch {cfg.global_batch} does not divide among {world_size} ranks: use a "
                             f"multiple of {world_size} or another number of ranks")
        per_rank = cfg.global_batch // world_size
        if cfg.packs_per_step is not None and cfg.packs_per_step != per_rank:
            raise TrainError(f"--packs-per-step {cfg.packs_per_step} conflicts with --global-batch {cfg.global_batch} "
                             f"on {world_size} ranks ({per_rank} a rank): give one of them")
    else:
        per_rank = cfg.packs_per_step or options.DEFAULT_PACKS_PER_STEP
    if per_rank % cfg.grad_accum:
        raise TrainError(f"{per_rank} packs a rank do not split into --grad-accum {cfg.grad_accum} equal "
                         f"micro-batches: use a divisor of {per_rank}")
    return per_rank * world_size, per_rank


def _tensorboard(cfg: TrainConfig) -> bool:
    installed = importlib.util.find_spec("tensorboard") is not None
    if cfg.tensorboard and not installed:
        raise TrainError("--tensorboard needs the tensorboard package: pip install 'agentflan[tensorboard]'")
    return installed if cfg.tensorboard is None else cfg.tensorboard


def _checkpoint_config(folder: str, checks: Checks) -> ModelConfig | None:
    """--init-from's config.json, after checking every safetensors header against it
    (agentflan.checkpoint.check_llama_tensors); None in a dry run without the folder."""
    path = Path(folder)
    if not path.is_dir():
        checks.missing(f"--init-from {folder}: missing (no such folder)")
        return None
    if not (path / "config.json").is_file() and (path / "adapter_config.json").is_file():
        raise TrainError(f"--init-from {folder}: a LoRA adapter, not a model: give its base model folder, or merge "
                         f"the adapter into it first (tools/merge_lora.py BASE {folder} OUT)")
    try:
        model_config = checkpoint.load_config(path)
    except (OSError, ValueError, KeyError, TypeError) as err:
        detail = f"missing key {err}" if isinstance(err, KeyError) else str(err)
        raise TrainError(f"--init-from {folder}: unusable config.json: {detail}") from None
    try:
        files = checkpoint.check_llama_tensors(path, model_config)
    except FileNotFoundError as err:
        checks.missing(f"--init-from {folder}: weights missing ({err})")
        return model_config
    except checkpoint.CheckpointError as err:
        raise TrainError(str(err)) from None
    checks.passed(f"--init-from {folder}: config.json and {len(files)} safetensors header(s) hold its "
                  f"{model_config.num_params():,} parameters")
    return model_config


def _recipe(cfg: TrainConfig, checks: Checks) -> Recipe:
    """The recipe with the flags that override its keys; every source file must exist."""
    overrides: dict[str, Any] = {"pack_len": cfg.pack_len, "template": cfg.template, "overlong": cfg.overlong,
                                 "skip_bad": cfg.skip_bad, "root": cfg.data_root, "tokenizer": cfg.tokenizer}
    if cfg.tokenizer is None and cfg.init_from:
        own = Path(cfg.init_from) / TOKENIZER_FILE
        overrides["tokenizer"] = str(own) if own.is_file() else None
    recipe = load_recipe(cfg.recipe, {k: v for k, v in overrides.items() if v is not None}, check_files=False)
    if not recipe.root.is_dir():
        checks.missing(f"{recipe.name}: data root {recipe.root}: missing (no such folder; --data-root sets it)")
        return recipe
    found, complete = 0, True
    for i, spec in enumerate(recipe.sources):
        try:
            found += len(recipe.files(i))
        except RecipeError:
            complete = False
            checks.missing(f"{recipe.name}: sources[{i}] {spec.path}: missing (looked for {recipe.root / spec.path})")
    if complete:
        checks.passed(f"recipe {recipe.name}: every source present ({found} file(s) for {len(recipe.sources)} sources)")
    return recipe


def _tokenizer_path(cfg: TrainConfig, recipe: Recipe | None, checks: Checks) -> Path | None:
    """--tokenizer, else --init-from's tokenizer.model, else the recipe's, else the bundled one;
    None in a dry run without it."""
    if cfg.tokenizer is not None:
        path = Path(cfg.tokenizer)
        where = f"--tokenizer {cfg.tokenizer}"
    elif cfg.init_from:
        path = Path(cfg.init_from) / TOKENIZER_FILE
        if not path.is_file() and Path(cfg.init_from).is_dir():
            checks.missing(f"--init-from {cfg.init_from} has no {TOKENIZER_FILE} (missing): pass the model's "
                           f"tokenizer with --tokenizer")
            return None
        where = f"tokenizer {path} (--init-from's)"
    elif recipe is not None:
        path, where = recipe.tokenizer, f"tokenizer {recipe.tokenizer} ({recipe.name}'s)"
    else:
        return DEFAULT_TOKENIZER
    if not path.is_file():
        checks.missing(f"{where}: missing (no such file)")
        return None
    return path


def _tokenizer_vocab(path: Path) -> int:
    try:
        return Tokenizer(path).vocab_size
    except (OSError, ValueError) as err:
        raise TrainError(f"tokenizer {path}: {err}") from None


def _data(cfg: TrainConfig, recipe: Recipe | None, tokenizer: Path | None,
          checks: Checks) -> tuple[list[str] | None, str, int, str, str]:
    """(data paths, kind, pack_len, template, overlong) of the run's data."""
    if recipe is not None:
        return None, "recipe", recipe.pack_len, recipe.template, recipe.overlong
    paths = cfg.data if cfg.data is not None else [str(DEFAULT_CORPUS)]
    folders = [p for p in paths if Path(p).is_dir()]
    if folders and len(paths) > 1:
        raise TrainError(f"--data {folders[0]} is a folder: a prepared folder must be the only --data")
    if folders:
        settings = _prepared_settings(cfg, Path(folders[0]), tokenizer)
        checks.passed(f"--data {folders[0]}: a prepared folder (manifest read; packs of {settings[0]} tokens)")
        return [_abs(folders[0])], "prepared", *settings
    present = [p for p in paths if Path(p).is_file()]
    for p in paths:
        if p not in present:
            checks.missing(f"--data {p}: missing (no such file)")
    if present:
        checks.passed(f"--data: {len(present)} of {len(paths)} file(s) present")
    return ([_abs(p) for p in paths], "files", cfg.pack_len or DEFAULT_PACK_LEN, cfg.template or options.DEFAULT_TEMPLATE,
            cfg.overlong or options.DEFAULT_OVERLONG)


def _prepared_settings(cfg: TrainConfig, folder: Path, tokenizer: Path | None) -> tuple[int, str, str]:
    """A prepared folder's pack_len, template and overlong policy; a flag that says otherwise is an error."""
    if not (folder / MANIFEST_NAME).is_file():
        raise TrainError(f"--data {folder}: a folder, but no {MANIFEST_NAME}: not a prepared dataset (or its writing "
                         f"never finished); make one with tools/prepare_data.py")
    try:
        made = PreparedDataset(folder).settings  # reads the manifest and checks file sizes only
    except (OSError, ValueError) as err:
        raise TrainError(str(err)) from None
    for name in ("data_format", "skip_bad"):
        if getattr(cfg, name) is not None:
            raise TrainError(f"{flag(name)} applies to conversation files; {folder} is already prepared")
    for name, (given, value) in made.conflicts(pack_len=cfg.pack_len, template=cfg.template,
                                               overlong=cfg.overlong).items():
        raise TrainError(f"{flag(name)} {given} conflicts with the prepared data {folder} ({name} {value}): drop "
                         f"the flag, or prepare the data again with it")
    if tokenizer is not None and sha256_file(tokenizer) != made.tokenizer_sha256:
        raise TrainError(f"{folder} was tokenized with {made.tokenizer_name} (sha256 {made.tokenizer_sha256[:12]}...), "
                         f"not with {tokenizer}: pass the same --tokenizer")
    return made.pack_len, made.template, made.overlong


def device_dtype(plan: RunPlan) -> torch.dtype:
    """The dtype matmuls run in (for MFU's peak)."""
    return torch.bfloat16 if plan.bf16 else torch.float32
