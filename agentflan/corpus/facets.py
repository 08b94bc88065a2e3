"""Capability decomposition: facet weights applied by turning the loss off on a share of a
facet's turns, and the trained tokens per facet.

Agent-FLAN (arXiv 2403.12881, section 3.2) weights the data of reasoning : retrieval :
understanding as 1 : 0.25 : 0.75 (``PAPER_WEIGHTS``; instruction following stays at 1).
The released files carry ``"loss": false`` on some assistant turns, which suggests (the
maintainers have not confirmed it) that the weights were applied by not training on part
of a facet's turns; one file is even named ``..._r10r5u7``. Here a weight w keeps exactly
round(w * n) of a facet's n trained turns, chosen by a seeded permutation, and sets
``"loss": false`` on the rest; the conversations themselves stay whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from agentflan.tokenizer import Tokenizer
from agentflan.toolworld.protocol import FACETS, INSTRUCT, REASON, RETRIEVE, UNDERSTAND

JSON = dict[str, Any]

PAPER_WEIGHTS = {INSTRUCT: 1.0, REASON: 1.0, RETRIEVE: 0.25, UNDERSTAND: 0.75}
UNIFORM_WEIGHTS = {f: 1.0 for f in FACETS}


def parse_facet_weights(text: str) -> dict[str, float]:
    """``"1:0.25:0.75"`` (reason : retrieve : understand, the paper's order) or
    ``"reason=1,retrieve=0.25,understand=0.75[,instruct=1]"``; unnamed facets weigh 1.
    Weights are in [0, 1] (a share of turns kept). Raises ValueError naming the problem."""
    weights = dict(UNIFORM_WEIGHTS)
    text = text.strip()
    if re.fullmatch(r"[^=,]+(:[^=,]+){2}", text):
        pairs = list(zip((REASON, RETRIEVE, UNDERSTAND), text.split(":")))
    else:
        pairs = []
        for item in text.split(","):
            if "=" not in item:
                raise ValueError(f"facet weight {item.strip()!r} is not facet=weight (or give R:RET:U)")
            name, value = item.split("=", 1)
            pairs.append((name.strip(), value))
    for name, value in pairs:
        if name not in FACETS:
            raise ValueError(f"unknown facet {name!r} (known: {', '.join(FACETS)})")
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"facet weight for {name} is not a number: {value.strip()!r}") from None
        if not 0 <= weight <= 1:
            raise ValueError(f"facet weight for {name} must be in [0, 1] (the share of its turns trained), got {weight}")
        weights[name] = weight
    return weights


@dataclass
class FacetTurns:
    """Where every faceted assistant turn of a list of records is, with its token count."""

    record: np.ndarray  # int64, record index
    turn: np.ndarray  # int64, index in the record's conversation
    facet: np.ndarray  # int8, index into FACETS
    tokens: np.ndarray  # int64, content tokens + 1 for the turn's closing token

    @classmethod
    def of(cls, records: Sequence[JSON], tokenizer: Tokenizer) -> "FacetTurns":
        where, texts = [], []
        for r, rec in enumerate(records):
            for t, turn in enumerate(rec["conversation"]):
                if turn.get("facet") is not None:
                    where.append((r, t, FACETS.index(turn["facet"])))
                    texts.append(turn["content"].strip())
        arr = np.asarray(where, dtype=np.int64).reshape(-1, 3)
        if texts:
            _, offsets = tokenizer.encode_batch(texts)
            tokens = np.diff(offsets).astype(np.int64) + 1
        else:
            tokens = np.zeros(0, dtype=np.int64)
        return cls(arr[:, 0], arr[:, 1], arr[:, 2].astype(np.int8), tokens)

    def trained(self, records: Sequence[JSON]) -> np.ndarray:
        return np.fromiter((records[r]["conversation"][t].get("loss") is not False
                            for r, t in zip(self.record.tolist(), self.turn.tolist())), dtype=bool, count=len(self.turn))


def apply_weights(records: Sequence[JSON], turns: FacetTurns, weights: dict[str, float], seed: int) -> None:
    """Turns the loss off on all but round(w * n) of each facet's n trained turns (in place)."""
    trained = turns.trained(records)
    for f, facet in enumerate(FACETS):
        idx = np.flatnonzero((turns.facet == f) & trained)
        keep = int(round(weights[facet] * len(idx)))
        if keep == len(idx):
            continue
        order = np.random.default_rng([seed, f]).permutation(len(idx))
        for i in idx[order[keep:]].tolist():
            records[turns.record[i]]["conversation"][turns.turn[i]]["loss"] = False


def facet_table(turns: FacetTurns, before: np.ndarray, after: np.ndarray) -> dict[str, JSON]:
    """Per facet: turns, trained turns and trained tokens before and after weighting."""
    out = {}
    for f, facet in enumerate(FACETS):
        mask = turns.facet == f
        out[facet] = {"turns": int(mask.sum()),
                      "trained_turns_before": int((mask & before).sum()),
                      "trained_turns_after": int((mask & after).sum()),
                      "trained_tokens_before": int(turns.tokens[mask & before].sum()),
                      "trained_tokens_after": int(turns.tokens[mask & after].sum())}
    return out
