"""The agent an evaluation drives: any callable from a batch of conversations to replies.

    Agent = Callable[[Sequence[conversation]], Sequence[str | None]]

A conversation is a list of ``{"role", "content"}`` messages (system first, ending with a
user turn). The reply to each is its text, or None when the agent cannot continue that
conversation (it does not fit the model's context); the evaluator counts those as failed
turns. Scripted agents (tests, baselines) are plain functions; a model is wrapped by
``GeneratorAgent``, which runs ``Generator.chat`` greedily, ``max_batch`` conversations at a
time, and keeps counts of what it generated.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from agentflan.generate import Generator, SamplingParams

Conversation = Sequence[Mapping[str, str]]
Agent = Callable[[Sequence[Conversation]], Sequence["str | None"]]

DEFAULT_MAX_NEW_TOKENS = 256  # a gold reply of the tool world is at most about 150 tokens


@dataclass
class GenerationStats:
    """What a GeneratorAgent did: replies given, tokens generated, replies cut at the token
    limit, conversations beyond the context, and seconds spent generating."""

    replies: int = 0
    new_tokens: int = 0
    cut_at_limit: int = 0
    beyond_context: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, float | int]:
        return {"replies": self.replies, "new_tokens": self.new_tokens, "cut_at_limit": self.cut_at_limit,
                "beyond_context": self.beyond_context, "seconds": round(self.seconds, 2)}


@dataclass
class GeneratorAgent:
    """A Generator as an Agent: greedy replies of at most ``max_new_tokens`` tokens, run
    ``max_batch`` conversations at a time (None: all at once); greedy replies do not depend
    on the batching. A conversation whose prompt fills the model's context gets None."""

    generator: Generator
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    max_batch: int | None = 32
    stats: GenerationStats = field(default_factory=GenerationStats)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")

    def __call__(self, conversations: Sequence[Conversation]) -> list[str | None]:
        if not conversations:
            return []
        started = time.perf_counter()
        context = self.generator.model.config.max_seq_len
        prompts = self.generator.chat_prompts(conversations)
        fits = [i for i, p in enumerate(prompts) if len(p) < context]
        replies: list[str | None] = [None] * len(conversations)
        if fits:
            params = SamplingParams(max_new_tokens=self.max_new_tokens)  # greedy
            done = self.generator.chat([conversations[i] for i in fits], params, max_batch=self.max_batch)
            for i, completion in zip(fits, done):
                replies[i] = completion.text
                self.stats.new_tokens += len(completion.token_ids)
                self.stats.cut_at_limit += completion.finish_reason == "length"
        self.stats.replies += len(fits)
        self.stats.beyond_context += len(conversations) - len(fits)
        self.stats.seconds += time.perf_counter() - started
        return replies
