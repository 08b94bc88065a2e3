"""Batched generation: prefill the prompts into a KV cache, then one token per sequence a step.

Prompts of different lengths share one batch without padding: prefill runs them packed
(the training forward, `cu_seqlens` boundaries), and each sequence then owns one row of
the pre-allocated cache, its token at position p in column p. A decode step feeds every
unfinished sequence its last token at its own position and masks the columns past it.
When a sequence finishes (a stop id, a stop string, its token limit) its row leaves the
batch, so later steps compute only for the sequences still running.

One host synchronisation per step (the new ids, to check stops and stream text); the
recompute path (`use_cache=False`) runs the whole sequences through the training forward
every step and exists to check the cached one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from agentflan.generate.sampling import SamplingParams, sample
from agentflan.generate.text import TextStream, decode_continuation
from agentflan.model import Llama
from agentflan.tokenizer import Tokenizer

# on_text(prompt_index, new_text): called as each sequence's text becomes final.
TextCallback = Callable[[int, str], None]


@dataclass
class Completion:
    """What one prompt produced.

    token_ids: the generated ids; a stop token id that ended the sequence is its last id.
    text: the decoded continuation (as it reads after the prompt, leading space included),
        without the stop token and cut before a stop string; "" without a tokenizer.
    finish_reason: "stop" (a stop id or stop string) or "length" (max_new_tokens or the
        model's context reached).
    stop: the stop id or stop string that ended it, None for "length".
    """

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    stop: int | str | None = None


class _CachedSteps:
    """Logits of each running sequence's next token, from a KV cache."""

    def __init__(self, model: Llama, prompts: Sequence[Sequence[int]], max_len: int) -> None:
        self.model = model
        device = model.embed_tokens.weight.device
        lengths = [len(p) for p in prompts]
        self.cache = model.new_cache(len(prompts), max_len)
        self.ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        self.cu_seqlens = torch.tensor(cu, dtype=torch.int32, device=device)
        self.max_seqlen = max(lengths)

    def first(self) -> torch.Tensor:
        hidden = self.model.prefill(self.ids, self.cu_seqlens, self.cache, self.max_seqlen)  # (T, dim)
        return self.model.lm_head(hidden[self.cu_seqlens[1:] - 1])  # (B, vocab)

    def next(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.decode(tokens, self.cache))  # (B, vocab)

    def keep(self, rows: list[int]) -> None:
        self.cache.keep(rows)


class _RecomputeSteps:
    """The same logits from the whole sequences, recomputed by the training forward each step."""

    def __init__(self, model: Llama, prompts: Sequence[Sequence[int]]) -> None:
        self.model = model
        self.seqs = [list(p) for p in prompts]

    def first(self) -> torch.Tensor:
        device = self.model.embed_tokens.weight.device
        ids = torch.tensor([t for s in self.seqs for t in s], dtype=torch.long, device=device)
        ends = torch.tensor([len(s) for s in self.seqs], device=device).cumsum(0)
        cu_seqlens = torch.cat([ends.new_zeros(1), ends]).to(torch.int32)
        return self.model(ids, cu_seqlens)[ends - 1]  # (B, vocab)

    def next(self, tokens: torch.Tensor) -> torch.Tensor:
        for seq, token in zip(self.seqs, tokens.tolist()):
            seq.append(token)
        return self.first()

    def keep(self, rows: list[int]) -> None:
        self.seqs = [self.seqs[r] for r in rows]


def _check_prompts(model: Llama, prompts: Sequence[Sequence[int]]) -> None:
    vocab, context = model.config.vocab_size, model.config.max_seq_len
    if not prompts:
        raise ValueError("no prompts given")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty (it needs at least a BOS token)")
        if len(prompt) >= context:
            raise ValueError(
                f"prompt {i} has {len(prompt)} tokens, which leaves no room in the model's context of {context}"
            )
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {i} holds token id {bad[0]}, outside the vocabulary of {vocab}")


class _Sequence:
    """One prompt's progress: its generated ids, its text (when decoded as it goes), its end."""

    def __init__(self, prompt: Sequence[int], limit: int, stop_ids: set[int], text: TextStream | None) -> None:
        self.prompt = list(prompt)
        self.ids: list[int] = []
        self.limit = limit  # most new tokens: max_new_tokens or what the context leaves
        self.stop_ids = stop_ids
        self.text = text
        self.finish_reason: str | None = None
        self.stop: int | str | None = None

    def add(self, token: int) -> None:
        self.ids.append(token)
        if token in self.stop_ids:
            self.finish_reason, self.stop = "stop", token
        elif self.text is not None:
            self.text.push(token)
            if self.text.stop is not None:
                self.finish_reason, self.stop = "stop", self.text.stop
        if self.finish_reason is None and len(self.ids) >= self.limit:
            self.finish_reason = "length"
        if self.finish_reason is not None and self.text is not None:
            self.text.finish()  # text held back for an incomplete character may hold a stop string
            if self.finish_reason == "length" and self.text.stop is not None:
                self.finish_reason, self.stop = "stop", self.text.stop

    def new_text(self) -> str:
        return self.text.take(final=self.finish_reason is not None)

    def completion(self, tokenizer: Tokenizer | None) -> Completion:
        if self.text is not None:
            text = self.text.text
        elif tokenizer is not None:  # decoded once, at the end
            text = decode_continuation(tokenizer, self.prompt, self.ids[:-1] if self.finish_reason == "stop" else self.ids)
        else:
            text = ""
        return Completion(self.prompt, self.ids, text, self.finish_reason, self.stop)


@torch.inference_mode()
def generate(
    model: Llama,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams = SamplingParams(),
    tokenizer: Tokenizer | None = None,
    on_text: TextCallback | None = None,
    use_cache: bool = True,
    max_batch: int | None = None,
) -> list[Completion]:
    """Continues every prompt (a list of token ids, BOS included where wanted).

    Returns one Completion per prompt, in order. A sequence ends at the first of: an id in
    params.stop_token_ids (the caller adds EOS and end-of-turn ids there), a stop string
    (needs a tokenizer), params.max_new_tokens generated, or the model's context
    (config.max_seq_len) full. on_text(i, text) streams prompt i's final text as it grows
    (needs a tokenizer). max_batch bounds how many prompts run at once (the KV cache holds
    max_batch x (longest prompt + new tokens) positions): the prompts then run in batches
    of similar length, longest first; None runs them all in one batch. Greedy results do
    not depend on the batching. Raises ValueError for an empty or overlong prompt or an id
    outside the vocabulary, before any work.
    """
    _check_prompts(model, prompts)
    if tokenizer is None and (params.stop_strings or on_text is not None):
        raise ValueError("stop strings and streaming need a tokenizer")
    if max_batch is not None and max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    stop_ids = set(params.stop_token_ids)
    decode_as_we_go = tokenizer is not None and (params.stop_strings or on_text is not None)
    seqs = [
        _Sequence(p, min(params.max_new_tokens, model.config.max_seq_len - len(p)), stop_ids,
                  TextStream(tokenizer, p, params.stop_strings) if decode_as_we_go else None)
        for p in prompts
    ]
    generator = None
    if not params.greedy:
        generator = torch.Generator(device=model.embed_tokens.weight.device)
        if params.seed is None:
            generator.seed()  # a fresh nondeterministic seed, leaving torch's global generator alone
        else:
            generator.manual_seed(params.seed)
    order = list(range(len(seqs)))
    if max_batch is not None and max_batch < len(seqs):
        order.sort(key=lambda i: -len(seqs[i].prompt))  # similar lengths share a batch: less masked waste
    size = max_batch or len(seqs)
    for start in range(0, len(order), size):
        _run_batch(model, seqs, order[start : start + size], params, generator, on_text, use_cache)
    return [s.completion(tokenizer) for s in seqs]


def _run_batch(
    model: Llama,
    seqs: list[_Sequence],
    batch: list[int],
    params: SamplingParams,
    generator: torch.Generator | None,
    on_text: TextCallback | None,
    use_cache: bool,
) -> None:
    """Generates for seqs[i], i in batch, until each finishes."""
    prompts = [seqs[i].prompt for i in batch]
    if use_cache:
        steps = _CachedSteps(model, prompts, max(len(seqs[i].prompt) + seqs[i].limit for i in batch))
    else:
        steps = _RecomputeSteps(model, prompts)
    running = list(batch)  # prompt index of each batch row
    logits = steps.first()  # (B, vocab)
    while True:
        tokens = sample(logits.float(), params, generator)  # (B,)
        keep_rows = []
        for row, (i, token) in enumerate(zip(running, tokens.tolist())):  # the step's one host sync
            seqs[i].add(token)
            if on_text is not None and (new := seqs[i].new_text()):
                on_text(i, new)
            if seqs[i].finish_reason is None:
                keep_rows.append(row)
        if not keep_rows:
            return
        if len(keep_rows) < len(running):  # finished sequences leave the batch
            steps.keep(keep_rows)
            tokens = tokens[keep_rows]
            running = [running[r] for r in keep_rows]
        logits = steps.next(tokens)
