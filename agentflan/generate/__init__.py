"""Generation from agentflan and Hugging Face Llama-2 folders: a KV-cache engine with
batched prompts of different lengths, greedy / temperature / top-k / top-p sampling with a
seed, stop ids and stop strings, streaming, and the chat templates.

    from agentflan.generate import Generator, SamplingParams

    gen = Generator.from_folder("runs/default/final")
    replies = gen.chat([[{"role": "user", "content": "What is 17 * 23?"}]],
                       SamplingParams(max_new_tokens=128))
    print(replies[0].text, replies[0].finish_reason)
"""

from agentflan.generate.engine import Completion, TextCallback, generate
from agentflan.generate.generator import (
    DEFAULT_TEMPLATE,
    FolderInfo,
    Generator,
    check_kernels,
    check_model_folder,
    resolve_device,
    resolve_dtype,
    to_conversation,
    trained_template,
)
from agentflan.generate.sampling import SamplingParams, restrict_logits, sample
from agentflan.generate.text import TextStream, decode_continuation

__all__ = [
    "Completion",
    "DEFAULT_TEMPLATE",
    "FolderInfo",
    "Generator",
    "SamplingParams",
    "TextCallback",
    "TextStream",
    "check_kernels",
    "check_model_folder",
    "decode_continuation",
    "generate",
    "resolve_device",
    "resolve_dtype",
    "restrict_logits",
    "sample",
    "to_conversation",
    "trained_template",
]
