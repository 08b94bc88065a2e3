"""A model folder ready to generate: weights, tokenizer, chat template and stop ids.

Works on our runs' ``final/`` folders and on any Hugging Face Llama-2 folder
(``config.json``, safetensors weights, ``tokenizer.model``), optionally with a LoRA adapter
folder in PEFT's format (a LoRA run's ``final/``), merged into the weights as they load.
Everything that can be checked without the weights (the folder, its config, its tokenizer,
the template, the adapter's config and shapes, the device and dtype) is checked by
``check_model_folder`` before any weight is read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml

from agentflan.adapter import Adapter, merge_into, read_adapter
from agentflan.checkpoint import load_config, load_hf
from agentflan.config import ModelConfig
from agentflan.data.conversation import ROLES, Conversation, Message
from agentflan.data.templates import TEMPLATES, encode_generation_prompts, stop_strings, stop_token_ids
from agentflan.generate.engine import Completion, TextCallback, generate
from agentflan.generate.sampling import SamplingParams
from agentflan.hf_tokenizer import read_template
from agentflan.kernels import ENV_VAR, KERNEL_BACKENDS
from agentflan.model import Llama
from agentflan.tokenizer import Tokenizer

DEFAULT_TEMPLATE = "agentflan"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# A chat message as the evaluator and the CLI hold it: {"role": ..., "content": ...}.
ChatMessage = Mapping[str, str]


@dataclass(frozen=True)
class FolderInfo:
    """What a model folder holds, read without its weights."""

    folder: Path
    config: ModelConfig
    tokenizer: Tokenizer
    template: str | None  # the template the folder says it was trained with, if it says
    eos_ids: tuple[int, ...]  # generation_config.json's eos_token_id(s), else ()
    adapter: Adapter | None = None  # a LoRA adapter to merge into the weights


def trained_template(folder: str | os.PathLike) -> str | None:
    """The chat template the folder was trained with, if recorded: its ``agentflan.json``
    (``agentflan.hf_tokenizer.read_template``; tools/train.py writes it into ``final/``), else
    the ``template`` of the run's config next to ``final/`` (``config.yaml``, or the
    ``config.json`` of older runs). Raises ValueError naming a malformed ``agentflan.json``."""
    recorded = read_template(folder)
    if recorded is not None:
        return recorded
    run_dir = Path(folder).resolve().parent
    for name, parse in (("config.yaml", yaml.safe_load), ("config.json", json.loads)):
        path = run_dir / name
        if not path.is_file():
            continue
        try:
            run = parse(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):
            continue
        # Only a training run's config (it has the trainer's keys) says how the folder was trained.
        if isinstance(run, dict) and isinstance(run.get("template"), str) and "pack_len" in run:
            return run["template"]
    return None


def _generation_eos_ids(folder: Path) -> tuple[int, ...]:
    path = folder / "generation_config.json"
    if not path.is_file():
        return ()
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except (OSError, json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"{path}: not a JSON object ({err})") from None
    if eos is None:
        return ()
    ids = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{path}: eos_token_id is {eos!r}, expected an id or a list of ids")
    return tuple(ids)


def check_model_folder(folder: str | os.PathLike, adapter: str | os.PathLike | None = None) -> FolderInfo:
    """Reads and checks everything but the weights; raises FileNotFoundError or ValueError
    naming the file and the reason. With a LoRA adapter folder, the adapter must fit the model,
    and its tokenizer.model, template record and generation_config.json (those it was trained
    with, when it has them) win over the model folder's."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such model folder")
    if not (folder / "config.json").is_file() and (folder / "adapter_config.json").is_file():
        raise ValueError(f"{folder}: a LoRA adapter, not a model: give its base model folder and the adapter "
                         f"separately (base_model_name_or_path in its adapter_config.json may name the base)")
    config = load_config(folder)
    adapter = Path(adapter) if adapter is not None else None
    lora = read_adapter(adapter) if adapter is not None else None
    if lora is not None:
        lora.check_base(config, folder)
    own = adapter if adapter is not None and (adapter / "tokenizer.model").is_file() else folder
    tokenizer_path = own / "tokenizer.model"
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"{tokenizer_path}: the model folder has no SentencePiece tokenizer.model")
    tokenizer = Tokenizer(tokenizer_path)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"{tokenizer_path}: {tokenizer.vocab_size} pieces, more than the model's vocab_size {config.vocab_size}"
        )
    weights = [folder / "model.safetensors", folder / "model.safetensors.index.json"]
    if not any(w.is_file() for w in weights):
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    template = trained_template(adapter) if adapter is not None else None
    template = template or trained_template(folder)
    if template is not None and template not in TEMPLATES:
        template = None  # a run of a newer version with a template this one lacks: fall back
    eos_ids = _generation_eos_ids(adapter) if adapter is not None else ()
    return FolderInfo(folder, config, tokenizer, template, eos_ids or _generation_eos_ids(folder), lora)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None or 'auto': CUDA when available, else CPU. Raises ValueError for an unusable device."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {str(device)!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None or 'auto': bf16 on CUDA, fp32 elsewhere (CPU matmuls are fastest in fp32)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def check_kernels(kernels: str, device: torch.device) -> None:
    """Raises ValueError, before any weight loads, for a kernel backend the device cannot run:
    an unknown name, or Triton (asked for directly or through AGENTFLAN_KERNELS) off CUDA."""
    if kernels not in KERNEL_BACKENDS:
        raise ValueError(f"kernels must be one of {', '.join(KERNEL_BACKENDS)}, got {kernels!r}")
    chosen = os.environ.get(ENV_VAR, "auto") if kernels == "auto" else kernels
    if chosen == "triton" and device.type != "cuda":
        source = "kernels" if kernels == "triton" else f"the {ENV_VAR} environment variable"
        raise ValueError(f"{source} asks for Triton kernels, which need CUDA; the device is {device} "
                         f"(use reference or auto kernels there)")


def to_conversation(messages: Conversation | Sequence[ChatMessage], where: str = "conversation") -> Conversation:
    """A Conversation from {"role", "content"} dicts; raises ValueError naming the bad message."""
    if isinstance(messages, Conversation):
        return messages
    parsed = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or not isinstance(msg.get("content"), str) or msg.get("role") not in ROLES:
            raise ValueError(
                f"{where}: message {i}: expected {{\"role\": one of {', '.join(ROLES)}, \"content\": a string}}, "
                f"got {msg!r}"
            )
        parsed.append(Message(role=msg["role"], content=msg["content"], loss=None))
    if not parsed:
        raise ValueError(f"{where}: no messages")
    return Conversation(id=where, messages=parsed, source="<chat>", line=0)


class Generator:
    """A Llama and its tokenizer, with a chat template: raw-text, token-id and chat generation.

    Every sequence, raw or chat, stops at the tokenizer's EOS and the folder's
    generation_config.json EOS ids (as transformers' generate does: our runs' folders list the
    template's end of turn there); chat() stops at the template's end of turn as well.
    """

    def __init__(
        self, model: Llama, tokenizer: Tokenizer, template: str = DEFAULT_TEMPLATE, eos_ids: Sequence[int] = ()
    ) -> None:
        if template not in TEMPLATES:
            raise ValueError(f"unknown chat template {template!r}; known templates: {', '.join(TEMPLATES)}")
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} pieces, the model only {model.config.vocab_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = template
        self.eos_ids = tuple(dict.fromkeys([tokenizer.eos_id, *eos_ids]))

    @classmethod
    def from_folder(
        cls,
        folder: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        template: str | None = None,
        kernels: str = "auto",
        adapter: str | os.PathLike | None = None,
    ) -> Generator:
        """Loads a model folder. template None: the one the folder (or adapter) was trained with,
        else agentflan. adapter: a LoRA adapter folder in PEFT's format (e.g. a LoRA run's final/),
        merged into the weights once loaded (in fp32, each weight rounded once to dtype): decoding
        then costs what the base model's does. See check_model_folder for the files it brings.
        Raises ValueError (check_kernels) for Triton kernels off CUDA, before loading."""
        info = check_model_folder(folder, adapter)
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        if template is not None and template not in TEMPLATES:
            raise ValueError(f"unknown chat template {template!r}; known templates: {', '.join(TEMPLATES)}")
        check_kernels(kernels, device)
        model = load_hf(info.folder, dtype=dtype, device=device)
        if info.adapter is not None:
            merge_into(model, info.adapter)
        model.kernels = kernels
        return cls(model, info.tokenizer, template or info.template or DEFAULT_TEMPLATE, info.eos_ids)

    def _with_stops(self, params: SamplingParams, ids: Sequence[int], strings: Sequence[str] = ()) -> SamplingParams:
        return replace(
            params,
            stop_token_ids=tuple(dict.fromkeys([*params.stop_token_ids, *ids])),
            stop_strings=tuple(dict.fromkeys([*params.stop_strings, *strings])),
        )

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams = SamplingParams(),
        on_text: TextCallback | None = None,
        max_batch: int | None = None,
    ) -> list[Completion]:
        """Continues token-id prompts (BOS included where wanted); stops at EOS and the folder's
        generation_config.json EOS ids too. on_text and max_batch as in agentflan.generate.generate."""
        params = self._with_stops(params, self.eos_ids)
        return generate(self.model, prompts, params, self.tokenizer, on_text, max_batch=max_batch)

    def complete(
        self,
        prompts: Sequence[str],
        params: SamplingParams = SamplingParams(),
        on_text: TextCallback | None = None,
        max_batch: int | None = None,
    ) -> list[Completion]:
        """Continues raw texts (each encoded after a BOS, no template); stops as generate() does."""
        ids = [[self.tokenizer.bos_id, *self.tokenizer.encode(p)] for p in prompts]
        return self.generate(ids, params, on_text, max_batch)

    def chat_prompts(self, conversations: Sequence[Conversation | Sequence[ChatMessage]]) -> list[list[int]]:
        """Each conversation's ids under the template, followed by the opening of the assistant's
        reply (``agentflan.data.templates.encode_generation_prompt``). Raises ValueError naming
        the conversation when it is empty, malformed or ends with an assistant turn."""
        convs = [to_conversation(c, f"conversation {i}") for i, c in enumerate(conversations)]
        ids, offsets = encode_generation_prompts(convs, self.tokenizer, self.template)
        return [ids[offsets[i] : offsets[i + 1]].tolist() for i in range(len(convs))]

    def chat_stops(self) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """What ends an assistant turn: the template's end-of-turn ids, EOS and the folder's
        generation_config.json EOS ids; and the template's marker texts, which a reply never holds."""
        ids = tuple(dict.fromkeys([*stop_token_ids(self.tokenizer, self.template), *self.eos_ids]))
        return ids, stop_strings(self.template)

    def chat(
        self,
        conversations: Sequence[Conversation | Sequence[ChatMessage]],
        params: SamplingParams = SamplingParams(),
        on_text: TextCallback | None = None,
        max_batch: int | None = None,
    ) -> list[Completion]:
        """The assistant's next reply to each conversation, batched (max_batch at a time; None: all).

        Each conversation is a Conversation or a list of {"role", "content"} messages (roles
        system, user, assistant, tool) ending with a system, user or tool turn. A reply ends
        at the template's end of turn, at one of its marker texts (cut off) or at a stop of
        params; its text is stripped of surrounding whitespace, as the templates store
        assistant turns (streamed text is not stripped).
        """
        ids, strings = self.chat_stops()
        done = generate(self.model, self.chat_prompts(conversations), self._with_stops(params, ids, strings),
                        self.tokenizer, on_text, max_batch=max_batch)
        for completion in done:
            completion.text = completion.text.strip()
        return done
