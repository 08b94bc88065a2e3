"""Real tokenizer models that tests compare against, found in installed packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def llama2_tokenizer_path() -> Path:
    """The Llama-2-like SentencePiece model shipped by mistral_common (32,000 pieces, no
    user-defined pieces). Skips the calling test where the package or the file is missing."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("mistral_common is not installed (pip install mistral_common); it ships the Llama-2-like model")
    path = Path(spec.submodule_search_locations[0]) / "data" / "tokenizer.model.v1"
    if not path.is_file():
        pytest.skip(f"this mistral_common version lacks {path}")
    return path
