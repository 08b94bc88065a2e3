"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p.

Order as in Hugging Face transformers' sampling: divide by the temperature, keep the top-k
logits, then keep the nucleus (top-p, Holtzman et al. 2020, "The Curious Case of Neural
Text Degeneration") of what remains, renormalise and draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to generate. Raises ValueError, its message starting with the field's name, for
    values outside the ranges below.

    max_new_tokens: tokens to generate at most per sequence (>= 1); a sequence also stops
        where the model's context (config max_seq_len) is full.
    temperature: 0 is greedy (argmax, first index on ties); > 0 samples from softmax(logits / T).
    top_k: sample among the k most likely tokens only (0: no limit).
    top_p: sample from the smallest set of most likely tokens whose probability reaches
        top_p (1.0: no limit); 0 < top_p <= 1.
    seed: seeds the sampler's torch.Generator, so a run is reproducible for the same prompts,
        batch and device; None draws a fresh seed.
    stop_token_ids: ids that end a sequence (kept as its last id, never in its text), besides
        the EOS / end-of-turn ids the caller adds.
    stop_strings: texts that end a sequence where they first appear in its decoded output;
        the output text is cut before them (they may span several tokens).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: no limit), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop_strings):
            raise ValueError(f"stop_strings must be non-empty texts, got {list(self.stop_strings)!r}")
        # Lists are accepted and frozen, so the dataclass stays hashable and immutable.
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in self.stop_token_ids))
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def restrict_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Sets to -inf every logit outside the top-k, then outside the top-p nucleus.

    logits: (batch, vocab) float. top_k keeps the k largest logits per row (a value tied
    with the k-th largest is kept too); top_p then keeps, per row, the most likely tokens
    up to and including the first whose cumulative probability (softmax of what top-k
    kept, in descending order) reaches top_p. The most likely token is always kept.
    Returns a new tensor; the input is not modified.
    """
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (batch, 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # (batch, vocab) probability of the likelier tokens
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """The next token of each row: logits (batch, vocab) -> ids (batch,) int64, on logits' device.

    Sampling draws with the exponential race (argmax of p_i / E_i with E_i ~ Exp(1) picks i
    with probability p_i), which needs no host synchronisation.
    """
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = restrict_logits(logits.float() / params.temperature, params.top_k, params.top_p)
    probs = logits.softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(generator=generator)
    # An exact 0 draw would turn an excluded token's 0 / 0 into NaN, which argmax would pick.
    race.clamp_(min=torch.finfo(race.dtype).tiny)
    return (probs / race).argmax(dim=-1)
