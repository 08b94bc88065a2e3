"""Hugging Face LlamaForCausalLM checkpoints: load and save safetensors folders.

A folder holds config.json and either `model.safetensors` or shards
`model-0000N-of-0000M.safetensors` listed in `model.safetensors.index.json`.
Loading builds the model on the meta device and fills it one tensor at a time from
memory-mapped files, so a 7B load never holds two copies of the weights in RAM.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from agentflan.config import ModelConfig
from agentflan.model import Llama

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some older exports carry; the model recomputes them.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def hf_name(name: str) -> str:
    """Our parameter name -> Hugging Face name."""
    return name if name.startswith("lm_head.") else f"model.{name}"


def our_name(hf: str) -> str:
    """Hugging Face parameter name -> ours."""
    return hf.removeprefix("model.")


def load_config(folder: str | os.PathLike) -> ModelConfig:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json in checkpoint folder")
    with open(path) as f:
        return ModelConfig.from_hf_dict(json.load(f), source=str(path))


def _weight_files(folder: Path) -> dict[Path, list[str]]:
    """Maps each safetensors file of the checkpoint to the tensor names it holds."""
    index = folder / INDEX_FILE
    if index.is_file():
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: missing 'weight_map'")
        files: dict[Path, list[str]] = defaultdict(list)
        for name, file in weight_map.items():
            files[folder / file].append(name)
        return dict(files)
    single = folder / SINGLE_FILE
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return {single: list(f.keys())}
    raise FileNotFoundError(f"{folder}: neither {SINGLE_FILE} nor {INDEX_FILE} found")


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_path, _, param_name = name.rpartition(".")
    module = model.get_submodule(module_path)
    module._parameters[param_name] = nn.Parameter(tensor, requires_grad=True)


def _stored_dtype(hf_config: dict) -> torch.dtype | None:
    name = hf_config.get("torch_dtype") or hf_config.get("dtype")
    return _DTYPES.get(name) if isinstance(name, str) else None


def load_hf(
    folder: str | os.PathLike, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> Llama:
    """Loads a LlamaForCausalLM safetensors folder into a Llama.

    dtype None keeps the checkpoint's dtype (config.json's torch_dtype, else the stored tensors').
    """
    folder = Path(folder)
    cfg = load_config(folder)
    with open(folder / "config.json") as f:
        dtype = dtype or _stored_dtype(json.load(f))
    device = torch.device(device) if device is not None else torch.device("cpu")
    with torch.device("meta"):
        model = Llama(cfg)
    expected = {hf_name(n): p.shape for n, p in model.named_parameters()}
    seen: set[str] = set()
    for path, names in _weight_files(folder).items():
        if not path.is_file():
            raise FileNotFoundError(f"{path}: listed in {INDEX_FILE} but missing")
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in names:
                if name.endswith(IGNORED_SUFFIXES):
                    continue
                if name not in expected:
                    raise ValueError(f"{path}: unexpected tensor {name!r} for a Llama checkpoint")
                tensor = f.get_tensor(name)
                if tensor.shape != expected[name]:
                    raise ValueError(
                        f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                        f"config.json implies {tuple(expected[name])}"
                    )
                dtype = dtype or tensor.dtype
                _set_parameter(model, our_name(name), tensor.to(device=device, dtype=dtype))
                seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        raise ValueError(f"{folder}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return model


def save_hf(
    model: Llama,
    folder: str | os.PathLike,
    state_dict: dict[str, torch.Tensor] | None = None,
    max_shard_bytes: int = 5 * 1024**3,
) -> None:
    """Writes config.json and safetensors shards that transformers' LlamaForCausalLM loads.

    state_dict: pass a gathered full state dict for sharded (FSDP) models; default model.state_dict().
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = state_dict if state_dict is not None else model.state_dict()
    tensors = {hf_name(n): t.detach().to("cpu").contiguous() for n, t in state.items()}
    dtype = next(iter(tensors.values())).dtype
    config = model.config.to_hf_dict()
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    with open(folder / "config.json", "w") as f:
        json.dump(config, f, indent=2)

    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += size
    for stale in [folder / SINGLE_FILE, folder / INDEX_FILE, *folder.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], folder / SINGLE_FILE, metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(folder / INDEX_FILE, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


# ---- resumable training state (model + optimizer + step), sharded with torch.distributed.checkpoint ----

TRAIN_STATE_PREFIX = "step_"


def save_train_state(folder: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    """Saves model and optimizer state for resuming (collective: every rank calls it; each writes its shards)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder = Path(folder)
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))
    if not dist.is_initialized() or dist.get_rank() == 0:
        # Written last: a folder without it is an interrupted save and is never resumed from.
        (folder / "train_state.json").write_text(json.dumps({"step": step}))


def load_train_state(folder: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Restores what save_train_state wrote into an identically built model and optimizer; returns the step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = Path(folder)
    meta = folder / "train_state.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{folder}: no train_state.json (not a training checkpoint, or its save was interrupted)")
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return int(json.loads(meta.read_text())["step"])


def latest_train_state(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete training checkpoint under run_dir/checkpoints, if any."""
    root = Path(run_dir) / "checkpoints"
    done = [p for p in root.glob(f"{TRAIN_STATE_PREFIX}*") if (p / "train_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.removeprefix(TRAIN_STATE_PREFIX)), default=None)
