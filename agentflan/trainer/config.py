"""Training options: the TrainConfig dataclass, YAML config files, command-line flags, and the
option checks that need no file.

Every field is a YAML key (``lr: 2.0e-5``) and a flag (``--lr 2e-5``); flags override the
file given with ``--config``. A field left ``None`` is derived later (``agentflan.trainer.plan``):
from the data, the checkpoint, the world size or the built-in default its help names. Paths
in a config file are relative to the file's folder (as in recipes); on the command line,
to the current folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agentflan import memory
from agentflan.cli import ArgumentParser
from agentflan.config import PRESETS
from agentflan.data.defaults import DEFAULT_PACK_LEN
from agentflan.data.packing import OVERLONG_POLICIES
from agentflan.data.sources import FORMATS
from agentflan.data.templates import TEMPLATES
from agentflan.distributed import AC_MODES, PARALLEL_MODES
from agentflan.trainer.errors import TrainError
from agentflan.yaml_files import YamlFileError, load_yaml

KERNELS = ("auto", "triton", "reference")
DTYPES = ("auto", "fp32", "bf16")
SAVE_DTYPES = ("auto", "fp32", "bf16")
RESUME_POLICIES = ("auto", "always", "never")
GROUPS = ("model", "lora", "data", "optimisation", "run", "telemetry", "dry run")

# Built-in values of the fields that default to None (derived when the data or model does not decide).
DEFAULT_PRESET = "tiny"
DEFAULT_STEPS = 200
DEFAULT_PACKS_PER_STEP = 4  # per rank
DEFAULT_WARMUP_STEPS = 20
DEFAULT_TEMPLATE = "agentflan"
DEFAULT_OVERLONG = "split"
DEFAULT_AC_EVERY = 2  # agentflan.builder.build_model's default
# LoRA: alpha defaults to twice the rank (LLaMA-Factory's default; scale 2); dropout to none (PEFT's default).
LORA_ALPHA_PER_RANK = 2.0
DEFAULT_LORA_DROPOUT = 0.0


def _opt(default: Any, group: str, help: str, choices: tuple[str, ...] | None = None, path: bool = False,
         default_factory: Any = None) -> Any:
    meta = {"group": group, "help": help, "choices": choices, "path": path}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """What to train, on what, how; see each field's help (``tools/train.py --help``)."""

    # model
    preset: str | None = _opt(None, "model", f"model shape trained from scratch (default {DEFAULT_PRESET}); with "
                                             "--init-from, the shape its config.json must have (a dry run without "
                                             "the folder takes the shape from it)", tuple(PRESETS))
    init_from: str | None = _opt(None, "model", "Hugging Face Llama folder to fine-tune (config.json, safetensors, "
                                                "tokenizer.model); under FSDP each rank reads only its shard",
                                 path=True)
    kernels: str = _opt("auto", "model", "auto: Triton on CUDA, PyTorch reference elsewhere", KERNELS)
    allow_vocab_mismatch: bool = _opt(False, "model", "train with a tokenizer whose vocabulary differs from "
                                                      "--init-from's: a smaller one leaves the extra rows unused, a "
                                                      "larger one adds rows set to the mean of the existing ones "
                                                      "(then every rank loads the whole checkpoint before sharding)")
    ac: str = _opt("none", "model", "activation checkpointing: none; full (every block recomputed in the backward, "
                                    "least memory); selective (every --ac-every-th block); attention (only the "
                                    "attention sub-layers). Losses are the same; compute rises", AC_MODES)
    ac_every: int | None = _opt(None, "model", f"with --ac selective: recompute every N-th block (default "
                                               f"{DEFAULT_AC_EVERY})")
    cpu_offload: bool = _opt(False, "model", "full fine-tuning with parameters, gradients and optimizer state in pinned "
                                             "host memory (FSDP2's CPUOffloadPolicy; FSDP even on one GPU, without "
                                             "torchrun); needs CUDA and host RAM of about 16 bytes a parameter")
    # lora
    lora_rank: int = _opt(0, "lora", "LoRA rank r (0: train every weight). The base is frozen, held in the compute "
                                     "dtype; adapters train in fp32 with their own AdamW; RUN/final is a PEFT adapter")
    lora_alpha: float | None = _opt(None, "lora", f"LoRA alpha: the update is scaled by alpha / r (default "
                                                  f"{LORA_ALPHA_PER_RANK:g} x the rank)")
    lora_dropout: float | None = _opt(None, "lora", f"dropout on the adapters' input, in [0, 1) (default "
                                                    f"{DEFAULT_LORA_DROPOUT:g})")
    lora_targets: list[str] | None = _opt(None, "lora", "projections to adapt: q_proj k_proj v_proj o_proj gate_proj "
                                                        "up_proj down_proj, short names (q, gate, ...) or all, "
                                                        "attention, mlp (default: all)")
    lora_rslora: bool = _opt(False, "lora", "rank-stabilised LoRA: scale by alpha / sqrt(r) (arXiv 2312.03732)")
    merge: bool = _opt(False, "lora", "also write RUN/merged: the base with the adapters merged in, a full Hugging "
                                      "Face model (tools/merge_lora.py does the same from RUN/final)")
    # data
    data: list[str] | None = _opt(None, "data", "conversation files, or one folder made by tools/prepare_data.py "
                                                "(default: the bundled tool-use corpus)", path=True)
    recipe: str | None = _opt(None, "data", "a data recipe (recipes/*.yaml), prepared once into RUN/data; "
                                            "excludes --data", path=True)
    data_root: str | None = _opt(None, "data", "folder the recipe's source paths are relative to (its 'root')",
                                 path=True)
    data_format: str | None = _opt(None, "data", "format of --data files (default auto)", ("auto", *FORMATS))
    skip_bad: bool | None = _opt(None, "data", "skip and count malformed records instead of stopping (default off)")
    tokenizer: str | None = _opt(None, "data", "SentencePiece model (default: --init-from's tokenizer.model, else "
                                               "the recipe's, else the bundled one)", path=True)
    template: str | None = _opt(None, "data", f"chat template (default: the prepared data's or recipe's, else "
                                              f"{DEFAULT_TEMPLATE})", tuple(TEMPLATES))
    pack_len: int | None = _opt(None, "data", f"tokens a pack (default: the prepared data's or recipe's, else "
                                              f"{DEFAULT_PACK_LEN})")
    overlong: str | None = _opt(None, "data", f"documents longer than a pack (default: the prepared data's or "
                                              f"recipe's, else {DEFAULT_OVERLONG})", OVERLONG_POLICIES)
    # optimisation
    steps: int | None = _opt(None, "optimisation", f"optimizer steps (default {DEFAULT_STEPS}); excludes --epochs")
    epochs: float | None = _opt(None, "optimisation", "passes over the data; sets --steps from the pack count")
    global_batch: int | None = _opt(None, "optimisation", "packs a step over all ranks; must divide by the world "
                                                          "size (default: --packs-per-step x ranks)")
    packs_per_step: int | None = _opt(None, "optimisation", f"packs a step on each rank (default: --global-batch / "
                                                            f"ranks, else {DEFAULT_PACKS_PER_STEP})")
    grad_accum: int = _opt(1, "optimisation", "micro-batches a step; divides the packs per rank")
    lr: float = _opt(3e-3, "optimisation", "peak learning rate")
    warmup_steps: int | None = _opt(None, "optimisation", f"linear warmup steps (default {DEFAULT_WARMUP_STEPS}); "
                                                          "excludes --warmup-ratio")
    warmup_ratio: float | None = _opt(None, "optimisation", "warmup as a fraction of the steps, in [0, 1)")
    warmup_start_lr: float = _opt(3e-4, "optimisation", "learning rate of the first warmup step")
    min_lr: float = _opt(3e-4, "optimisation", "learning rate the cosine decays to at the last step")
    weight_decay: float = _opt(0.1, "optimisation", "AdamW weight decay (not applied to norm weights)")
    beta1: float = _opt(0.9, "optimisation", "AdamW beta1")
    beta2: float = _opt(0.95, "optimisation", "AdamW beta2")
    grad_clip: float = _opt(1.0, "optimisation", "clip the global gradient norm to this (0: no clipping)")
    max_bad_steps: int = _opt(5, "optimisation", "abort after this many steps in a row with a non-finite loss or "
                                                 "gradient norm (each is skipped), or without a trained token")
    seed: int = _opt(0, "optimisation", "seed of the data order and the initial weights")
    # run
    out_dir: str = _opt("runs/default", "run", "run folder: config, metrics, checkpoints, final model", path=True)
    resume: str = _opt("auto", "run", "auto: continue from the newest checkpoint in the run folder if any; always: "
                                      "require one; never: start over (a folder holding a run also needs "
                                      "--overwrite)", RESUME_POLICIES)
    overwrite: bool = _opt(False, "run", "start over in a run folder that holds a run: when training starts, "
                                         "its files move to RUN/.replaced-TIME/, deleted when the new run finishes "
                                         "(a failed run leaves them there)")
    save: bool = _opt(True, "run", "write the final model as a Hugging Face folder (RUN/final)")
    save_dtype: str = _opt("auto", "run", "dtype of the final model's weights: auto (bf16 when computing in bf16, "
                                          "else fp32), fp32 (the master weights as trained), bf16 (half the size)",
                           SAVE_DTYPES)
    save_every: int = _opt(0, "run", "steps between training checkpoints (0: only at the end and on a signal)")
    keep_checkpoints: int = _opt(2, "run", "training checkpoints kept (the newest)")
    parallel: str = _opt("auto", "run", "data parallelism: auto (fsdp under torchrun with >1 rank, else none)",
                         PARALLEL_MODES)
    dtype: str = _opt("auto", "run", "compute dtype: auto (bf16 on CUDA, fp32 on CPU); weights stay fp32", DTYPES)
    # telemetry
    log_every: int = _opt(10, "telemetry", "steps between progress lines")
    peak_tflops: float | None = _opt(None, "telemetry", "device peak TFLOP/s for MFU (default: agentflan.perf's "
                                                        "table; none on CPU)")
    tensorboard: bool | None = _opt(None, "telemetry", "write TensorBoard events to RUN/tensorboard (default: when "
                                                       "tensorboard is installed)")
    # dry run
    dry_run: bool = _opt(False, "dry run", "check the options and files as a run would, then print the model size, "
                                           "FLOPs per token and memory per rank, and exit (1 if it does not fit "
                                           "--gpu); reads no data or weights, needs no torchrun or GPU")
    world_size: int | None = _opt(None, "dry run", "with --dry-run: the ranks to plan for (default: torchrun's "
                                                   "WORLD_SIZE, else 1)")
    gpu: str | None = _opt(None, "dry run", f"with --dry-run: the card to judge the memory against, one of "
                                            f"{', '.join(memory.DEVICE_MEMORY_MIB)} (any case), or its memory in GiB "
                                            f"(default: the current CUDA device, else no verdict)")


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(name: str) -> tuple[type, bool]:
    """(int | float | str | bool | list, whether None is allowed) of a field."""
    hint = _HINTS[name]
    args = typing.get_args(hint)
    optional = isinstance(hint, types.UnionType) and type(None) in args
    if optional:
        (hint,) = [a for a in args if a is not type(None)]
    return (typing.get_origin(hint) or hint), optional


# ---- YAML config files ----

def _coerce(name: str, value: Any, where: str) -> Any:
    """A YAML value checked against the field's type and choices."""
    kind, optional = _base_type(name)
    if value is None:
        if optional:
            return None
        raise TrainError(f"{where}: key {name!r} cannot be null")
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        if isinstance(value, str):  # PyYAML reads 2e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is list:
        value = [value] if isinstance(value, str) else value
        ok = isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)
    else:
        ok = isinstance(value, str)
    if not ok:
        expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
                    list: "a path or a list of paths" if FIELDS[name].metadata["path"] else "a name or a list of names",
                    }[kind]
        raise TrainError(f"{where}: key {name!r} must be {expected}, got {value!r}")
    choices = FIELDS[name].metadata["choices"]
    if choices and value not in choices:
        raise TrainError(f"{where}: key {name!r} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _suggestion(key: str) -> str:
    candidates = [key.replace("-", "_")] if key.replace("-", "_") in FIELDS else []
    candidates += difflib.get_close_matches(key, FIELDS, n=1, cutoff=0.6)
    return f" (did you mean {candidates[0]!r}?)" if candidates else ""


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The options set in a YAML config file (a mapping of TrainConfig keys).

    Relative paths are taken from the file's folder. Raises TrainError naming the file for an
    unreadable file, invalid YAML, an unknown key (with the closest valid key), a wrong type
    or a value outside the key's choices.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise TrainError(f"{path}: cannot read the config file ({err.strerror or err})") from None
    try:
        raw = load_yaml(text, str(path))
    except YamlFileError as err:
        raise TrainError(str(err)) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise TrainError(f"{path}: a config file is a mapping of keys, got {type(raw).__name__}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in FIELDS:
            raise TrainError(f"{path}: unknown key {key!r}{_suggestion(str(key))}")
        value = _coerce(key, value, str(path))
        if FIELDS[key].metadata["path"] and value is not None:
            value = [_relative_to(path.parent, v) for v in value] if isinstance(value, list) \
                else _relative_to(path.parent, value)
        values[key] = value
    return values


def _relative_to(folder: Path, value: str) -> str:
    expanded = os.path.expanduser(value)
    return expanded if os.path.isabs(expanded) else os.path.normpath(folder / expanded)


def to_yaml(cfg: TrainConfig) -> str:
    """The config as YAML that ``--config`` reads back (paths in it are absolute)."""
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, default_flow_style=False)


# ---- command-line flags ----

# Options that exclude each other (check_options refuses both; parse_args names a config file's key).
EXCLUSIVE = (("data", "recipe"), ("steps", "epochs"), ("warmup_steps", "warmup_ratio"))
GIVEN = "_given"  # namespace attribute: each option's (flag as typed, value it set), in order


def _recording(action: type[argparse.Action]) -> type[argparse.Action]:
    """``action`` that also records what each occurrence set, so that two flags setting one option
    to different values (--no-resume and --resume always) are an error rather than last-one-wins."""
    class Recording(action):  # type: ignore[misc, valid-type]
        def __call__(self, parser, namespace, values, option_string=None):
            super().__call__(parser, namespace, values, option_string)
            given = getattr(namespace, GIVEN, None)
            if given is None:
                given = {}
                setattr(namespace, GIVEN, given)
            given.setdefault(self.dest, []).append((option_string, values, getattr(namespace, self.dest)))

    Recording.__name__ = f"Recording{action.__name__}"
    return Recording


def _conflicting_flags(given: dict[str, list[tuple[str, Any, Any]]]) -> str | None:
    """'--no-resume and --resume always ...' when two flags of different names set one option to
    different values. A flag repeated keeps its last value and a boolean's --x/--no-x pair its last
    spelling (the usual way to override a wrapper script's flag); list flags add up."""
    for name, uses in given.items():
        kind = _base_type(name)[0]
        if kind in (list, bool) or len({opt for opt, _, _ in uses}) < 2:
            continue
        if len({repr(value) for _, _, value in uses}) > 1:
            shown = dict.fromkeys(opt if raw is None or raw == [] else f"{opt} {raw}" for opt, raw, _ in uses)
            return f"{' and '.join(shown)} set {flag(name)} to different values: give it once"
    return None


def build_parser() -> argparse.ArgumentParser:
    """The flags of tools/train.py: one per TrainConfig field, plus --config."""
    parser = ArgumentParser(
        prog="tools/train.py",
        description="Train a Llama on Agent-FLAN data (run under torchrun for several GPUs or processes).",
        epilog="Flags override the --config file; a flag given twice keeps its last value, except that list flags "
               "(--data, --lora-targets) add up, and flags of different names setting one option (--resume, "
               "--no-resume) to different values are an error. Values marked 'default:' are derived when not given. "
               "Signals: SIGTERM or SIGUSR1 finish the step, write a checkpoint and exit 0; SIGINT (Ctrl-C) the same, "
               "exiting 130; a second signal exits at once. The same command resumes.",
    )
    parser.add_argument("--config", metavar="FILE", help="YAML file of options (keys as the flags, with _ for -)")
    groups = {g: parser.add_argument_group(g) for g in GROUPS}
    defaults = TrainConfig()
    for name, f in FIELDS.items():
        kind, _ = _base_type(name)
        meta = f.metadata
        help_text = meta["help"]
        default = getattr(defaults, name)
        if default is not None and "default" not in help_text and not isinstance(default, bool):
            help_text += f" (default {default})"
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text,
                                  "action": _recording(argparse._StoreAction)}
        if kind is bool:
            kwargs["action"] = _recording(argparse.BooleanOptionalAction)
        elif kind is list:
            # Repeated, the flag adds to the list (--data a --data b == --data a b); it replaces a config file's list.
            kwargs.update(nargs="+", action=_recording(argparse._ExtendAction),
                          metavar="PATH" if meta["path"] else "NAME")
        else:
            kwargs["type"] = {int: int, float: float}.get(kind, str)
            if meta["choices"]:
                kwargs["choices"] = meta["choices"]
            else:
                kwargs["metavar"] = {int: "N", float: "X"}.get(kind, "PATH" if meta["path"] else "VALUE")
        if name == "resume":  # a bare --resume keeps its older meaning: require a checkpoint
            kwargs.update(nargs="?", const="always")
        groups[meta["group"]].add_argument(flag(name), **kwargs)
    groups["run"].add_argument("--no-resume", dest="resume", action=_recording(argparse._StoreConstAction), const="never",
                               default=argparse.SUPPRESS, help="the same as --resume never")
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The TrainConfig of a command line: the --config file's keys, overridden by the flags.

    Raises TrainError for a bad config file; exits 2 (argparse) for a bad flag."""
    parser = build_parser()
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        known = [f for action in parser._actions for f in action.option_strings]
        name = unknown[0].split("=")[0]
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6) if name.startswith("--") else []
        parser.error(f"unrecognized argument {unknown[0]!r}" + (f" (did you mean {close[0]}?)" if close else ""))
    args = vars(namespace)
    conflict = _conflicting_flags(args.pop(GIVEN, {}))
    if conflict:
        raise TrainError(conflict)
    config_file = args.pop("config", None)
    values = load_config_file(config_file) if config_file else {}
    for key, other in EXCLUSIVE:
        for in_file, as_flag in ((key, other), (other, key)):
            if in_file in values and as_flag in args and in_file not in args:
                raise TrainError(f"{config_file}: key {in_file!r} and {flag(as_flag)} exclude each other: remove the "
                                 f"key from the file, or drop {flag(as_flag)}")
    values.update(args)
    return TrainConfig(**values)


# ---- checks that need no file ----

def check_options(cfg: TrainConfig) -> None:
    """Ranges, choices and combinations of options; raises TrainError naming the flag."""
    for name in FIELDS:  # TrainConfig built in code skips the YAML and flag checks
        value = getattr(cfg, name)
        if value is not None:
            _coerce(name, value, "options")
    positive = ["global_batch", "packs_per_step", "grad_accum", "max_bad_steps", "keep_checkpoints", "log_every"]
    for name in positive:
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise TrainError(f"{flag(name)} must be at least 1, got {value}")
    if cfg.steps is not None and cfg.steps < 1:
        raise TrainError(f"--steps must be at least 1, got {cfg.steps}")
    if cfg.steps is not None and cfg.epochs is not None:
        raise TrainError("give --steps or --epochs, not both")
    if cfg.epochs is not None and not (math.isfinite(cfg.epochs) and cfg.epochs > 0):
        raise TrainError(f"--epochs must be a positive number, got {cfg.epochs}")
    if cfg.pack_len is not None and cfg.pack_len < 2:
        raise TrainError(f"--pack-len must be at least 2 (a token and its successor), got {cfg.pack_len}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise TrainError(f"--lr must be a positive number, got {cfg.lr}")
    for name in ("warmup_start_lr", "min_lr", "weight_decay", "grad_clip"):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value >= 0):
            raise TrainError(f"{flag(name)} must be a number >= 0, got {value}")
    if cfg.min_lr > cfg.lr:
        raise TrainError(f"--min-lr ({cfg.min_lr}) is above --lr ({cfg.lr}): the cosine decays from --lr to --min-lr")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            raise TrainError(f"{flag(name)} must be in [0, 1), got {getattr(cfg, name)}")
    if cfg.warmup_steps is not None and cfg.warmup_ratio is not None:
        raise TrainError("give --warmup-steps or --warmup-ratio, not both")
    if cfg.warmup_steps is not None and cfg.warmup_steps < 0:
        raise TrainError(f"--warmup-steps must be at least 0, got {cfg.warmup_steps}")
    if cfg.warmup_ratio is not None and not 0 <= cfg.warmup_ratio < 1:
        raise TrainError(f"--warmup-ratio must be in [0, 1), got {cfg.warmup_ratio}")
    if cfg.save_every < 0:
        raise TrainError(f"--save-every must be at least 0 (0: no periodic checkpoints), got {cfg.save_every}")
    if cfg.peak_tflops is not None and not (math.isfinite(cfg.peak_tflops) and cfg.peak_tflops > 0):
        raise TrainError(f"--peak-tflops must be a positive number, got {cfg.peak_tflops}")
    if cfg.ac_every is not None and cfg.ac != "selective":
        raise TrainError(f"--ac-every applies to --ac selective only (--ac is {cfg.ac})")
    if cfg.ac_every is not None and cfg.ac_every < 1:
        raise TrainError(f"--ac-every must be at least 1, got {cfg.ac_every}")
    if cfg.save_dtype != "auto" and not cfg.save:
        raise TrainError(f"--save-dtype {cfg.save_dtype} has nothing to apply to with --no-save")
    if cfg.cpu_offload and cfg.parallel in ("none", "ddp"):
        raise TrainError(f"--cpu-offload runs through FSDP2's CPUOffloadPolicy: it needs --parallel fsdp (or auto), "
                         f"not {cfg.parallel}")
    _check_lora(cfg)
    for name in ("world_size", "gpu"):
        if getattr(cfg, name) is not None and not cfg.dry_run:
            raise TrainError(f"{flag(name)} applies to --dry-run only (a run's ranks and devices are torchrun's)")
    if cfg.world_size is not None and cfg.world_size < 1:
        raise TrainError(f"--world-size must be at least 1, got {cfg.world_size}")
    if cfg.gpu is not None:
        try:
            memory.device_memory(cfg.gpu)
        except ValueError as err:
            raise TrainError(f"--gpu: {err}") from None
    if cfg.data is not None and cfg.recipe is not None:
        raise TrainError("--data and --recipe exclude each other")
    if cfg.data_root is not None and cfg.recipe is None:
        raise TrainError("--data-root applies to a --recipe only")
    if cfg.recipe is not None and cfg.data_format is not None:
        raise TrainError("--data-format applies to --data files; a recipe names each source's format")
    if cfg.allow_vocab_mismatch and cfg.init_from is None:
        raise TrainError("--allow-vocab-mismatch applies to --init-from only (a model trained from scratch takes the "
                         "tokenizer's vocabulary)")
    if cfg.resume == "always" and cfg.overwrite:
        raise TrainError("--overwrite starts the run over; it contradicts --resume always")


def _check_lora(cfg: TrainConfig) -> None:
    """The LoRA options: each applies only with --lora-rank, and each value is in range."""
    if cfg.lora_rank < 0:
        raise TrainError(f"--lora-rank must be at least 0 (0: no LoRA), got {cfg.lora_rank}")
    if cfg.lora_rank == 0:
        given = [flag(n) for n in ("lora_alpha", "lora_dropout", "lora_targets") if getattr(cfg, n) is not None]
        given += [flag(n) for n in ("lora_rslora", "merge") if getattr(cfg, n)]
        if given:
            raise TrainError(f"{given[0]} applies to LoRA only: add --lora-rank R (e.g. 16)")
        return
    if cfg.lora_alpha is not None and not (math.isfinite(cfg.lora_alpha) and cfg.lora_alpha > 0):
        raise TrainError(f"--lora-alpha must be a positive number, got {cfg.lora_alpha}")
    if cfg.lora_dropout is not None and not 0 <= cfg.lora_dropout < 1:
        raise TrainError(f"--lora-dropout must be in [0, 1), got {cfg.lora_dropout}")
    if cfg.lora_targets is not None:
        from agentflan.lora import parse_targets

        try:
            parse_targets(cfg.lora_targets)
        except ValueError as err:
            raise TrainError(f"--lora-targets: {err}") from None
    if cfg.merge and not cfg.save:
        raise TrainError("--merge writes RUN/merged beside the final adapter; it contradicts --no-save")
