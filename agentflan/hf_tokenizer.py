"""Hugging Face tokenizer files for a model folder: ``transformers`` tokenizes, chats and stops
exactly as agentflan trained.

``write_hf_tokenizer(folder, tokenizer_model_path, template)`` writes

* ``tokenizer.model``: the SentencePiece model itself;
* ``tokenizer.json``: the same BPE for the ``tokenizers`` library, built here from the model
  file: every piece with its id, the merges in SentencePiece's order (the higher the merged
  piece's score, the earlier; SentencePiece merges the best-scoring pair first), byte
  fallback, SentencePiece's dummy prefix and space escaping as a ``Metaspace``
  pre-tokenizer (prepend scheme ``first``: only the start of the text gets the "▁", not
  text after a special token) and the matching decoder; control and user-defined pieces
  (``<s>``, ``</s>``, ``<unk>``, the agentflan markers) are special added tokens. This is
  the pipeline ``transformers.LlamaTokenizer`` (``legacy=False``) builds, so
  ``AutoTokenizer``, ``LlamaTokenizer`` and ``LlamaTokenizerFast`` load the same tokenizer;
* ``tokenizer_config.json``: the special tokens, ``add_bos_token`` (``encode`` puts BOS
  first, as training does) and the chat template;
* ``special_tokens_map.json``;
* ``generation_config.json``: BOS and the EOS ids, which include the template's end of turn
  (``stop_token_ids``), so ``generate()`` stops where a trained answer ends. An existing
  generation config keeps its other keys;
* ``agentflan.json``: ``{"template": NAME}``, the agentflan template's name, so that a copied
  folder still tells ``agentflan.generate`` how it chats (``read_template``).

The chat template (Jinja, one per agentflan template) renders messages (``role`` one of
system, user, tool, assistant; ``content`` a string) to the text whose tokenization is
``encode_conversation`` id for id, and with ``add_generation_prompt=True`` to
``encode_generation_prompt``. What cannot match by design: ``transformers`` matches added
tokens inside the rendered text, so message content holding ``<s>``, ``</s>``, ``<unk>`` or a
marker piece (``<|eot|>``) is tokenized to that token there, where agentflan keeps it text
(``Tokenizer.encode(..., allow_special=False)``); encode such content with
``split_special_tokens=True`` to get text. Plain ``encode(text)`` equals agentflan's
``[BOS] + encode(text)`` except for text that starts with a space or with a user-defined
piece, where SentencePiece's lone dummy-prefix "▁" is not produced (the ``first`` prepend
scheme sees a leading space as the prefix and does not prefix added tokens).

Supported models: BPE with byte fallback, no normalization rules, a dummy prefix and no
whitespace folding (Llama-2's settings and the bundled tokenizer's); others raise ValueError
before anything is written, as ``transformers``' Llama pipeline cannot reproduce them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from agentflan.data.templates import (
    ASSISTANT_MARKER,
    END_OF_TURN,
    HUMAN_MARKER,
    SYSTEM_MARKER,
    TEMPLATES,
    agentflan_end_of_turn_id,
    stop_token_ids,
)
from agentflan.tokenizer import ModelSpec, PieceType, Tokenizer

SPACE = "\u2581"  # SentencePiece's escaped space
TEMPLATE_RECORD = "agentflan.json"
FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
         "generation_config.json", TEMPLATE_RECORD)


def _check_supported(spec: ModelSpec, tokenizer: Tokenizer, origin: str) -> None:
    problems = []
    if spec.has_charsmap or spec.normalizer_name not in ("identity", ""):
        problems.append(f"normalization rule {spec.normalizer_name!r} (only 'identity')")
    if spec.remove_extra_whitespaces:
        problems.append("whitespace folding (remove_extra_whitespaces)")
    if not spec.add_dummy_prefix or spec.treat_whitespace_as_suffix or not spec.escape_whitespaces:
        problems.append("no dummy prefix, whitespace as suffix or unescaped spaces")
    if not spec.byte_fallback:
        problems.append("byte fallback off")
    if PieceType.UNUSED in spec.types:
        problems.append("UNUSED pieces")
    if spec.has_denormalizer:
        problems.append("a denormalizer")
    if tokenizer.bos_id < 0 or tokenizer.eos_id < 0:
        problems.append("no BOS or EOS piece")
    if problems:
        raise ValueError(f"{origin}: cannot write Hugging Face tokenizer files for a model with " + "; ".join(problems)
                         + " (transformers' Llama tokenizer pipeline cannot reproduce it)")


def _merges(spec: ModelSpec) -> list[list[str]]:
    """Every split of every NORMAL piece into two NORMAL pieces, best merged score first.

    SentencePiece merges the adjacent pair whose concatenation is the highest-scoring piece,
    the leftmost on ties; ``tokenizers`` merges the lowest-ranked pair, so the rank follows
    the score (then the id of the merged piece, then the split point).
    """
    normal = {p for p, t in zip(spec.pieces, spec.types) if t == PieceType.NORMAL}
    ranked = []
    for i, (piece, score, kind) in enumerate(zip(spec.pieces, spec.scores, spec.types)):
        if kind != PieceType.NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, i, cut, left, right))
    ranked.sort()
    return [[left, right] for *_, left, right in ranked]


def _added_token(token_id: int, content: str) -> dict:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def check_hf_compatible(tokenizer_model_path: str | os.PathLike) -> None:
    """Raises ValueError (naming the file and each unsupported setting) unless
    ``write_hf_tokenizer`` can write files for this model, FileNotFoundError when it is
    missing; cheap, for a trainer to call before any work."""
    tokenizer = Tokenizer(tokenizer_model_path)
    _check_supported(tokenizer.model_spec(), tokenizer, str(tokenizer_model_path))


def tokenizer_json(tokenizer: Tokenizer) -> dict:
    """The ``tokenizers`` serialization of ``tokenizer``'s model (see the module docstring).
    Raises ValueError for a model it cannot reproduce."""
    spec = tokenizer.model_spec()
    _check_supported(spec, tokenizer, "tokenizer")
    bos, unk = tokenizer.id_to_piece(tokenizer.bos_id), tokenizer.id_to_piece(tokenizer.unk_id)
    added = [_added_token(i, p) for i, (p, t) in enumerate(zip(spec.pieces, spec.types))
             if t in (PieceType.UNKNOWN, PieceType.CONTROL, PieceType.USER_DEFINED)]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Metaspace", "replacement": SPACE, "prepend_scheme": "first", "split": False},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [tokenizer.bos_id], "tokens": [bos]}},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ]},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
            "vocab": {piece: i for i, piece in enumerate(spec.pieces)},
            "merges": _merges(spec),
        },
    }


# Jinja for each template. Every tag trims the whitespace around it, so only the string
# expressions produce text; each mirrors the renderer of the same name in
# agentflan.data.templates (the tests compare them id for id). Content is stripped (Jinja's
# trim is Python's str.strip) and roles are checked.
_ROLE_CHECK = (
    "{%- if message['role'] not in ['system', 'user', 'tool', 'assistant'] -%}"
    "{{- raise_exception('unknown role ' ~ message['role'] ~ '; known roles: system, user, tool, assistant') -}}"
    "{%- endif -%}"
    "{%- set text = (message['content'] or '') | trim -%}"
)

_AGENTFLAN_JINJA = (
    "{%- set markers = {'system': '" + SYSTEM_MARKER + "', 'user': '" + HUMAN_MARKER + "', 'tool': '"
    + HUMAN_MARKER + "', 'assistant': '" + ASSISTANT_MARKER + "'} -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}" + _ROLE_CHECK +
    "{{- ('\\n' if not loop.first else '') + markers[message['role']] + ((' ' + text) if text else '') -}}"
    "{%- if message['role'] == 'assistant' -%}{{- END_OF_TURN -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- ('\\n' if messages else '') + '" + ASSISTANT_MARKER + "' -}}{%- endif -%}"
)

_LLAMA2_JINJA = (
    "{%- macro block(system, user) -%}"
    "{{- ' [INST]' + ((' <<SYS>>\\n' + system | join('\\n\\n') + '\\n<</SYS>>\\n\\n') if system else ' ')"
    " + user | join('\\n\\n') + ' [/INST]' -}}"
    "{%- endmacro -%}"
    "{%- set ns = namespace(system=[], user=[]) -%}"
    "{%- for message in messages -%}" + _ROLE_CHECK +
    "{%- if message['role'] == 'system' -%}{%- set ns.system = ns.system + [text] -%}"
    "{%- elif message['role'] != 'assistant' -%}{%- set ns.user = ns.user + [text] -%}"
    "{%- else -%}"
    "{{- bos_token + block(ns.system, ns.user) + ((' ' + text) if text else '') + eos_token -}}"
    "{%- set ns.system = [] -%}{%- set ns.user = [] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.system or ns.user -%}{{- bos_token + block(ns.system, ns.user) -}}{%- endif -%}"
)

_PLAIN_JINJA = (
    "{%- set ns = namespace(prompt=[]) -%}"
    "{%- for message in messages -%}" + _ROLE_CHECK +
    "{%- if message['role'] == 'assistant' -%}"
    "{{- bos_token + ((' ' + ns.prompt | join('\\n\\n') + '\\n\\n' + text) if ns.prompt"
    " else ((' ' + text) if text else '')) + eos_token -}}"
    "{%- set ns.prompt = [] -%}"
    "{%- elif text -%}{%- set ns.prompt = ns.prompt + [text] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.prompt -%}{{- bos_token + ' ' + ns.prompt | join('\\n\\n') + ('\\n\\n' if add_generation_prompt else '') -}}"
    "{%- elif add_generation_prompt -%}{{- bos_token -}}{%- endif -%}"
)

_JINJA = {"agentflan": _AGENTFLAN_JINJA, "llama2-chat": _LLAMA2_JINJA, "plain": _PLAIN_JINJA}


def chat_template(tokenizer: Tokenizer, template: str = "agentflan") -> str:
    """The Jinja chat template for ``template`` with ``tokenizer`` (the agentflan template
    closes turns with ``<|eot|>`` when the tokenizer has that piece, else with EOS).
    Raises ValueError for an unknown template."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; known templates: {', '.join(TEMPLATES)}")
    jinja = _JINJA[template]
    if template == "agentflan":
        closing = "eos_token" if agentflan_end_of_turn_id(tokenizer) == tokenizer.eos_id else f"'{END_OF_TURN}'"
        jinja = jinja.replace("END_OF_TURN", closing)
    return jinja


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def write_hf_tokenizer(folder: str | os.PathLike, tokenizer_model_path: str | os.PathLike,
                       template: str = "agentflan") -> list[Path]:
    """Writes the tokenizer, chat-template and generation files of ``FILES`` into ``folder``
    (created if missing) for the SentencePiece model at ``tokenizer_model_path`` and the chat
    ``template``; returns their paths.

    Everything is checked and built first, then each file replaces its predecessor whole
    (a failed call leaves the folder as it was). Raises FileNotFoundError for a missing
    model, ValueError for an unknown template or a model the Hugging Face Llama pipeline
    cannot reproduce (see the module docstring).
    """
    folder = Path(folder)
    model_path = Path(tokenizer_model_path)
    tokenizer = Tokenizer(model_path)
    jinja = chat_template(tokenizer, template)
    _check_supported(tokenizer.model_spec(), tokenizer, str(model_path))
    tok_json = tokenizer_json(tokenizer)
    bos, eos, unk = (tokenizer.id_to_piece(i) for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id))
    markers = [a["content"] for a in tok_json["added_tokens"] if a["content"] not in (bos, eos, unk)]

    def token(content: str) -> dict:
        return {k: v for k, v in _added_token(0, content).items() if k not in ("id", "special")}

    special_map = {"bos_token": token(bos), "eos_token": token(eos), "unk_token": token(unk)}
    if markers:
        special_map["additional_special_tokens"] = [token(m) for m in markers]
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"}
                                 for a in tok_json["added_tokens"]},
        "additional_special_tokens": markers,
        "chat_template": jinja,
    }
    generation_path = folder / "generation_config.json"
    generation = json.loads(generation_path.read_text()) if generation_path.is_file() else {}
    generation.update({"bos_token_id": tokenizer.bos_id, "eos_token_id": stop_token_ids(tokenizer, template)})

    folder.mkdir(parents=True, exist_ok=True)
    umask = os.umask(0)
    os.umask(umask)
    # Staged in a hidden folder beside the targets (same file system), then moved in.
    with tempfile.TemporaryDirectory(dir=folder, prefix=".tokenizer-") as tmp_name:
        tmp = Path(tmp_name)
        shutil.copyfile(model_path, tmp / "tokenizer.model")
        _write_json(tmp / "tokenizer.json", tok_json)
        _write_json(tmp / "tokenizer_config.json", config)
        _write_json(tmp / "special_tokens_map.json", special_map)
        _write_json(tmp / "generation_config.json", generation)
        _write_json(tmp / TEMPLATE_RECORD, {"template": template})
        for name in FILES:
            os.chmod(tmp / name, 0o666 & ~umask)  # as a plain open() would create it
            os.replace(tmp / name, folder / name)
    return [folder / name for name in FILES]


def read_template(folder: str | os.PathLike) -> str | None:
    """The agentflan template recorded in ``folder``'s ``agentflan.json`` (written by
    ``write_hf_tokenizer``), None when the folder has none. Raises ValueError naming the file
    when it is not a JSON object with a string ``template``."""
    path = Path(folder) / TEMPLATE_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable ({err})") from None
    template = record.get("template") if isinstance(record, dict) else None
    if not isinstance(template, str):
        raise ValueError(f"{path}: expected {{\"template\": NAME}}, got {record!r}")
    return template


__all__ = ["FILES", "TEMPLATE_RECORD", "chat_template", "check_hf_compatible", "read_template", "tokenizer_json",
           "write_hf_tokenizer"]
