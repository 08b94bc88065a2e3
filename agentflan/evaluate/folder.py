"""A model folder as an agent, and the agent form it was trained for.

``trained_form(folder)`` answers from the run that wrote the folder: a run's ``final/``
sits in its run folder next to ``config.yaml`` (``config.json`` from older trainers), whose
``data`` files or ``recipe`` sources are corpora built by ``tools/build_corpus.py``, each
with a manifest beside it counting its conversations by form. The form with the most
trajectories (``chat``, Agent-FLAN's aligned form, or ``react``) is the one the model was
trained for; strict-format instruction samples and negatives do not vote. A folder whose
run or manifests cannot be found says nothing (None), and the evaluator falls back to
``chat``, the form of the bundled corpus.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import yaml

from agentflan.corpus.build import output_paths
from agentflan.data.recipe import RecipeError, load_recipe
from agentflan.evaluate.agent import DEFAULT_MAX_NEW_TOKENS, GeneratorAgent
from agentflan.generate import Generator
from agentflan.toolworld.protocol import CHAT, REACT

RUN_CONFIGS = ("config.yaml", "config.json")


def _run_config(folder: Path) -> tuple[Path, dict] | None:
    for name in RUN_CONFIGS:
        path = folder.parent / name
        if not path.is_file():
            continue
        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8"))  # YAML reads JSON too
        except (OSError, yaml.YAMLError):
            return None
        if isinstance(config, dict) and "pack_len" in config:  # a training run's config, not a model's
            return path, config
    return None


def _corpus_files(config_path: Path, config: dict) -> list[Path]:
    files = []
    data = config.get("data")
    for entry in data if isinstance(data, list) else [data] if isinstance(data, str) else []:
        if isinstance(entry, str):
            files.append(Path(entry) if os.path.isabs(entry) else config_path.parent / entry)
    recipe = config.get("recipe")
    if isinstance(recipe, str):
        path = Path(recipe) if os.path.isabs(recipe) else config_path.parent / recipe
        try:
            loaded = load_recipe(path, check_files=False)
        except (RecipeError, OSError):
            return files
        files += [Path(s.path) if os.path.isabs(s.path) else loaded.root / s.path for s in loaded.sources]
    return files


def trained_form(folder: str | os.PathLike) -> tuple[str, str] | None:
    """(form, evidence) for the agent form ``folder`` was trained for, from its run's corpus
    manifests (module doc), or None when they cannot be found."""
    folder = Path(folder).resolve()
    found = _run_config(folder)
    if found is None:
        return None
    config_path, config = found
    votes: Counter = Counter()
    manifests = []
    for corpus in _corpus_files(config_path, config):
        manifest = output_paths(corpus)[1]
        try:
            forms = json.loads(manifest.read_text(encoding="utf-8")).get("forms", {})
        except (OSError, json.JSONDecodeError, AttributeError):
            continue
        if not isinstance(forms, dict):
            continue
        manifests.append(manifest.name)
        for form in (CHAT, REACT):
            if isinstance(forms.get(form), int):
                votes[form] += forms[form]
    if not votes:
        return None
    form = max((CHAT, REACT), key=lambda f: votes[f])
    counts = ", ".join(f"{votes[f]} {f}" for f in (CHAT, REACT))
    return form, f"{config_path.name} -> {', '.join(manifests)}: {counts} trajectories"


def load_agent(folder: str | os.PathLike, device: str | None = None, dtype: str | None = None,
               template: str | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
               max_batch: int | None = 32) -> GeneratorAgent:
    """The model in ``folder`` as an agent (``Generator.from_folder``: template None is the
    one the folder was trained with). An adapter folder (LoRA) would be applied to the
    generator's model here, before it is wrapped."""
    generator = Generator.from_folder(folder, device=device, dtype=dtype, template=template)
    return GeneratorAgent(generator, max_new_tokens=max_new_tokens, max_batch=max_batch)
