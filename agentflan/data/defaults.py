"""Paths of the data bundled with the package (a tool-use corpus and a tokenizer trained on it)
and the defaults the trainer and the data tools share."""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_CORPUS: Path = ASSETS / "agentflan_tooluse.jsonl"
DEFAULT_TOKENIZER: Path = ASSETS / "tokenizer.model"
# Tokens per pack when neither a flag, a config nor a recipe says otherwise: the trainer and
# tools/prepare_data.py share it (the paper's configs set 8192 explicitly).
DEFAULT_PACK_LEN = 1024
# The chat template and the policy for documents longer than a pack, where neither a flag,
# a config nor a recipe names one (the trainer, recipes and tools/prepare_data.py share them).
DEFAULT_TEMPLATE = "agentflan"
DEFAULT_OVERLONG = "split"
