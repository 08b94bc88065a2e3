"""Paths of the data bundled with the package: a tool-use corpus and a tokenizer trained on it."""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_CORPUS: Path = ASSETS / "agentflan_tooluse.jsonl"
DEFAULT_TOKENIZER: Path = ASSETS / "tokenizer.model"
