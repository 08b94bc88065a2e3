"""LoRA adapter folders in PEFT's format: written from a trained model, read back, merged into a base.

A folder holds ``adapter_config.json`` (PEFT's LoraConfig keys: ``peft_type`` LORA, ``r``,
``lora_alpha``, ``lora_dropout``, ``target_modules``, ``use_rslora``, ...) and
``adapter_model.safetensors`` with PEFT's tensor names,
``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` (r, in_features) and
``...lora_B.weight`` (out_features, r), so that
``peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(BASE), FOLDER)`` loads it. Our
runs add the tokenizer files and template record (agentflan.hf_tokenizer) the adapter was trained with.

Merging adds s * B @ A (agentflan.lora) to each adapted weight, computed in fp32 and rounded
once to the stored dtype. `merge_folders` streams a base folder one tensor at a time (memory:
one tensor plus the adapter), `merge_into` merges into a loaded model, `export_merged` writes
a merged Hugging Face folder from a model being trained (any parallel mode, collective).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from agentflan.checkpoint import (
    CONFIG_FILE,
    IGNORED_SUFFIXES,
    CheckpointError,
    PlannedTensor,
    all_finite,
    atomic_folder,
    check_llama_tensors,
    hf_name,
    load_config,
    read_safetensors_header,
    stored_dtype,
    write_hf_folder,
)
from agentflan.config import ModelConfig
from agentflan.distributed import unwrap
from agentflan.lora import TARGETS, LoraSpec, clean_name, is_adapter, lora_modules
from agentflan.output_paths import OutputPathError, check_output_folder, same_file
from agentflan.model import Llama
from agentflan.sharded_checkpoint import export_hf

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM -> LoraModel -> LlamaForCausalLM
# What a model folder carries besides its weights (agentflan.hf_tokenizer writes them).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "agentflan.json")
_PARENT = {t: "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp" for t in TARGETS}
_NAME = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(lora_A|lora_B)\.weight")
# LoraConfig keys naming features these adapters do not have; each must be absent or off.
_UNSUPPORTED = {"use_dora": (False,), "fan_in_fan_out": (False,), "bias": ("none",), "modules_to_save": (None, []),
                "layers_to_transform": (None, []), "rank_pattern": (None, {}), "alpha_pattern": (None, {}),
                "trainable_token_indices": (None, {}, []), "target_parameters": (None, []), "lora_bias": (False,)}


def peft_name(name: str) -> str:
    """Our adapter parameter name (``layers.0.self_attn.q_proj.lora_A.weight``) -> PEFT's saved name."""
    return PEFT_PREFIX + hf_name(name)


def adapter_name(layer: int, target: str, part: str) -> str:
    """Our name of one adapter matrix: part is lora_A or lora_B."""
    return f"layers.{layer}.{_PARENT[target]}.{target}.{part}.weight"


def peft_config(spec: LoraSpec, base_model: str | None) -> dict:
    """adapter_config.json's content for ``spec`` (PEFT LoraConfig keys; others take PEFT's defaults)."""
    alpha = int(spec.alpha) if float(spec.alpha).is_integer() else spec.alpha
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "revision": None,
        "r": spec.rank, "lora_alpha": alpha, "lora_dropout": spec.dropout, "use_rslora": spec.rslora,
        "target_modules": list(spec.targets), "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {}, "use_dora": False, "inference_mode": True,
    }


@dataclass
class Adapter:
    """An adapter read from a folder: its spec and its tensors by our names (fp32 or as stored)."""

    folder: Path
    spec: LoraSpec
    tensors: dict[str, torch.Tensor]
    base_model: str | None  # adapter_config.json's base_model_name_or_path

    @property
    def n_layers(self) -> int:
        return 1 + max(int(_NAME.fullmatch(n).group(1)) for n in self.tensors)

    def delta(self, layer: int, target: str) -> torch.Tensor:
        """s * B @ A (out_features, in_features) in fp32 for one projection."""
        a = self.tensors[adapter_name(layer, target, "lora_A")].float()
        b = self.tensors[adapter_name(layer, target, "lora_B")].float()
        return b @ a * self.spec.scaling

    def check_base(self, cfg: ModelConfig, base: str | os.PathLike) -> None:
        """Raises ValueError unless the adapter fits a base model of shape ``cfg`` (layers and shapes)."""
        if self.n_layers != cfg.n_layers:
            raise ValueError(f"{self.folder}: adapts {self.n_layers} layers, the base {base} has {cfg.n_layers}")
        for target, (fan_in, fan_out) in self.spec.shapes(cfg).items():
            for part, shape in (("lora_A", (self.spec.rank, fan_in)), ("lora_B", (fan_out, self.spec.rank))):
                for layer in range(cfg.n_layers):
                    got = tuple(self.tensors[adapter_name(layer, target, part)].shape)
                    if got != shape:
                        raise ValueError(f"{self.folder}: {peft_name(adapter_name(layer, target, part))} has shape "
                                         f"{got}, the base {base} needs {shape}")


def _spec_from_config(path: Path, config: dict) -> LoraSpec:
    def bad(key: str, why: str) -> ValueError:
        return ValueError(f"{path}: {key} {config.get(key)!r}: {why}")

    if config.get("peft_type") != "LORA":
        raise bad("peft_type", "not a LoRA adapter")
    for key, allowed in _UNSUPPORTED.items():
        if config.get(key, allowed[0]) not in allowed:
            raise bad(key, f"not supported here (must be {allowed[0]!r})")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise bad("r", "the rank must be a positive integer")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise bad("lora_alpha", "must be a positive number")
    targets = config.get("target_modules")
    if targets == "all-linear":  # PEFT's shorthand: every linear layer but the output layer
        targets = list(TARGETS)
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise bad("target_modules", "must be a list of module names (a regular expression is not supported)")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise bad("target_modules", f"adapts {unknown[0]}: only the block projections {', '.join(TARGETS)} can be")
    dropout = config.get("lora_dropout") or 0.0
    try:
        return LoraSpec(rank, float(alpha), float(dropout), tuple(t for t in TARGETS if t in targets),
                        bool(config.get("use_rslora", False)))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def other_base_warning(base: str | os.PathLike, adapter_folder: str | os.PathLike) -> str | None:
    """A warning line when adapter_config.json's base_model_name_or_path names an existing local
    folder other than ``base`` (the adapter was trained on another model; shapes that fit do not
    make it the same one); None when it names ``base``, a hub id or nothing, or is unreadable
    (read_adapter reports that)."""
    try:
        recorded = json.loads((Path(adapter_folder) / ADAPTER_CONFIG).read_text(encoding="utf-8")) \
            .get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(recorded, str) or not recorded or not Path(recorded).is_dir() or same_file(recorded, base):
        return None
    return (f"warning: {adapter_folder} was trained on {recorded} (its {ADAPTER_CONFIG} says), not on {base}; "
            f"applying it to {base} anyway")


def read_adapter(folder: str | os.PathLike) -> Adapter:
    """Reads and checks an adapter folder (ours or PEFT's, LoRA on the block projections).

    Raises FileNotFoundError for a missing folder or file, ValueError naming the file for a
    malformed config, an unsupported feature (DoRA, biases, modules_to_save, per-layer ranks),
    a tensor that is not an adapter of a listed target, a missing or misshapen pair, or NaN/inf.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such adapter folder")
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (an adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_path}: unreadable ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: a JSON object was expected")
    spec = _spec_from_config(config_path, config)
    read_safetensors_header(weights_path)  # a truncated or corrupt file is named before any read
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(weights_path, framework="pt", device="cpu") as f:
        for stored in f.keys():
            match = _NAME.fullmatch(stored.removeprefix(PEFT_PREFIX).removeprefix("model."))
            if not stored.startswith(PEFT_PREFIX + "model.") or match is None or match.group(3) not in spec.targets \
                    or match.group(2) != _PARENT[match.group(3)]:
                raise ValueError(f"{weights_path}: unexpected tensor {stored!r} for a LoRA adapter of "
                                 f"{', '.join(spec.targets)}")
            tensor = f.get_tensor(stored)
            if not tensor.dtype.is_floating_point or not all_finite(tensor):
                raise ValueError(f"{weights_path}: tensor {stored!r} is not a finite float tensor")
            tensors[adapter_name(int(match.group(1)), match.group(3), match.group(4))] = tensor
    if not tensors:
        raise ValueError(f"{weights_path}: no adapter tensors")
    adapter = Adapter(folder, spec, tensors, config.get("base_model_name_or_path"))
    for layer in range(adapter.n_layers):
        for target in spec.targets:
            for part in ("lora_A", "lora_B"):
                if adapter_name(layer, target, part) not in tensors:
                    raise ValueError(f"{weights_path}: lacks {peft_name(adapter_name(layer, target, part))}")
    return adapter


@torch.no_grad()
def merge_into(model: Llama, adapter: Adapter) -> None:
    """Adds the adapter's update to a plain (unsharded, unwrapped) Llama's weights in place, in fp32,
    each rounded once to its dtype. Raises ValueError when the adapter does not fit the model."""
    adapter.check_base(model.config, "model")
    for layer, block in enumerate(model.layers):
        for target in adapter.spec.targets:
            weight = getattr(getattr(block, _PARENT[target]), target).weight
            weight.copy_((weight.float() + adapter.delta(layer, target).to(weight.device)).to(weight.dtype))


def check_merge_output(out: Path, base: Path, adapter_folder: Path, overwrite: bool) -> None:
    """Refuses an output folder that is, or holds, an input; a file; an existing folder without
    ``overwrite``; and, even with it, a folder that is not a model folder (no config.json), so
    that nothing but an earlier merged model is ever replaced. Raises OutputPathError."""
    for folder, what in ((base, "BASE"), (adapter_folder, "ADAPTER")):
        if same_file(out, folder) or out.resolve() in folder.resolve().parents:
            raise OutputPathError(f"{out}: the output folder is an input folder ({what} {folder}) or holds it; "
                                  "write the merged model elsewhere")
    check_output_folder(out, "OUT")
    if out.exists():
        if not overwrite:
            raise OutputPathError(f"OUT {out}: exists (use --overwrite to replace a merged model folder)")
        if not (out / CONFIG_FILE).is_file():
            raise OutputPathError(f"OUT {out}: is not a model folder (no {CONFIG_FILE}); refusing to replace it "
                                  "even with --overwrite")


def merge_folders(base: str | os.PathLike, adapter_folder: str | os.PathLike, out: str | os.PathLike,
                  dtype: torch.dtype | None = None, overwrite: bool = False) -> None:
    """Writes the base Hugging Face folder with the adapter merged in to ``out`` (a Hugging Face
    folder too), streaming one tensor at a time: each adapted weight is read, merged in fp32 and
    rounded once to ``dtype`` (None: the base's stored dtype). The tokenizer files come from the
    adapter folder when it has a tokenizer.model (the one trained with), else from the base.
    Everything is checked before any tensor is read. ``out`` must not exist, or, with
    ``overwrite``, be a model folder (one holding config.json), which is then replaced atomically.
    Raises FileNotFoundError, ValueError (OutputPathError for ``out``) or CheckpointError naming
    the file and the reason."""
    base, adapter_folder, out = Path(base), Path(adapter_folder), Path(out)
    if not base.is_dir():
        raise FileNotFoundError(f"BASE {base}: no such folder")
    if not adapter_folder.is_dir():
        raise FileNotFoundError(f"ADAPTER {adapter_folder}: no such folder")
    check_merge_output(out, base, adapter_folder, overwrite)
    cfg = load_config(base)
    files = check_llama_tensors(base, cfg)
    adapter = read_adapter(adapter_folder)
    adapter.check_base(cfg, base)
    dtype = dtype or stored_dtype(base)
    adapted = {hf_name(f"layers.{i}.{_PARENT[t]}.{t}.weight"): (i, t)
               for i in range(cfg.n_layers) for t in adapter.spec.targets}
    kept = {path: [name for name in names if not name.endswith(IGNORED_SUFFIXES)] for path, names in files.items()}
    plan = [PlannedTensor(name, files[path][name].shape, dtype or files[path][name].dtype)
            for path, names in kept.items() for name in names]

    def tensors():  # in plan order, one at a time
        for path, names in kept.items():
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in names:
                    tensor = f.get_tensor(name)
                    yield tensor.float() + adapter.delta(*adapted[name]) if name in adapted else tensor

    tokenizer_source = adapter_folder if (adapter_folder / "tokenizer.model").is_file() else base
    write_hf_folder(out, cfg, plan, tensors(), write_extra=lambda tmp: copy_tokenizer_files(tokenizer_source, tmp))


def copy_tokenizer_files(source: Path, folder: Path) -> None:
    """Copies the tokenizer, chat-template and generation files a model folder carries (TOKENIZER_FILES)."""
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)


# ---- from a model being trained (collective: every rank calls these) ----


def save_adapter(model: nn.Module, folder: str | os.PathLike, spec: LoraSpec, base_model: str | None,
                 dtype: torch.dtype = torch.float32, write_extra: Callable[[Path], None] | None = None) -> None:
    """Writes the model's adapters as a PEFT adapter folder (any parallel mode; collective).

    Each adapter tensor is gathered whole on every rank in turn (they are small: r * (in + out)
    each) and rank 0 writes them in ``dtype``, with adapter_config.json and whatever
    ``write_extra(tmp_folder)`` adds, into a folder published atomically. Raises CheckpointError
    on every rank naming the folder and the cause (NaN/inf in an adapter, a failed write); the
    previous folder is then left intact."""
    from torch.distributed.tensor import DTensor

    rank = dist.get_rank() if dist.is_initialized() else 0
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in unwrap(model).state_dict().items():
        name = clean_name(name)
        if is_adapter(name):
            if isinstance(tensor, DTensor):
                tensor = tensor.full_tensor()
            tensors[peft_name(name)] = tensor.detach().to("cpu", dtype).contiguous()
    error = None
    if rank == 0:
        try:
            bad = [name for name, t in tensors.items() if not all_finite(t)]
            if bad:
                raise CheckpointError(f"{folder}: refusing to save: {len(bad)} adapter tensors hold NaN or inf, "
                                      f"e.g. {bad[:3]}")
            with atomic_folder(folder) as tmp:
                save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
                (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config(spec, base_model), indent=2) + "\n")
                if write_extra is not None:
                    write_extra(tmp)
        except Exception as err:  # the other ranks must hear of it, not wait
            error = err if isinstance(err, CheckpointError) else CheckpointError(f"{folder}: {type(err).__name__}: {err}")
    message = None if error is None else str(error)
    if dist.is_initialized():
        shared = [message]
        dist.broadcast_object_list(shared, src=0)
        message = shared[0]
    if error is not None:
        raise error
    if message is not None:
        raise CheckpointError(message)


def export_merged(model: nn.Module, folder: str | os.PathLike, dtype: torch.dtype,
                  write_extra: Callable[[Path], None] | None = None) -> None:
    """Writes a full Hugging Face folder of the model with its LoRA adapters merged in, in ``dtype``
    (agentflan.sharded_checkpoint.export_hf, collective). Each adapted weight is merged on its own
    rank's rows: FSDP shards W (out, in) and B (out, r) by the same rows, so a rank adds its rows of
    s * B @ A to its rows of W, with A gathered whole (r, in). Raises CheckpointError like export_hf."""
    from torch.distributed.tensor import DTensor

    modules = {f"{name}.weight": module for name, module in lora_modules(model)}
    state = {name: t for name, t in unwrap(model).state_dict().items() if not is_adapter(clean_name(name))}

    @torch.no_grad()
    def merge(name: str, weight: torch.Tensor) -> torch.Tensor:
        module = modules.get(clean_name(name))
        if module is None:
            return weight
        a, b = module.lora_A.weight, module.lora_B.weight
        if isinstance(a, DTensor):
            a = a.full_tensor()
        if not isinstance(weight, DTensor):
            return weight.float() + (b.float() @ a.float()) * module.scaling
        local_w, local_b = weight.to_local(), b.to_local()
        if local_w.shape[0] != local_b.shape[0]:
            raise CheckpointError(f"{folder}: {name} and its lora_B are sharded differently")
        merged = local_w.float() + (local_b.float() @ a.float()) * module.scaling
        return DTensor.from_local(merged, weight.device_mesh, weight.placements, shape=weight.shape,
                                  stride=weight.stride())

    export_hf(model, folder, dtype=dtype, write_extra=write_extra, state_dict=state, transform=merge)


def is_adapter_folder(folder: str | os.PathLike) -> bool:
    """Whether a folder holds an adapter (adapter_config.json) rather than a whole model (config.json)."""
    folder = Path(folder)
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / CONFIG_FILE).is_file()
