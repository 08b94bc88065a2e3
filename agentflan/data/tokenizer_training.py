"""Training of the bundled SentencePiece tokenizer on text rendered from a corpus."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterator

try:  # only tokenizer training needs the sentencepiece library; agentflan's own tokenizer does not
    import sentencepiece as spm
except ImportError as err:
    raise ImportError("training a tokenizer needs sentencepiece: pip install 'agentflan[tools]'") from err

from agentflan.data.conversation import read_agentflan_jsonl
from agentflan.data.templates import (
    AGENTFLAN_SPECIAL_PIECES,
    ASSISTANT_MARKER,
    END_OF_TURN,
    HUMAN_MARKER,
    SYSTEM_MARKER,
)

_MARKERS = {"system": SYSTEM_MARKER, "user": HUMAN_MARKER, "assistant": ASSISTANT_MARKER}


def training_lines(corpus: str | os.PathLike) -> Iterator[str]:
    """The corpus as the agentflan template writes it, one text line at a time.

    SentencePiece trains on single lines, so newlines never end up inside a piece; that
    keeps "\\n" a byte-fallback token, where the templates' segments may split (see
    ``agentflan.data.templates``).
    """
    for conv in read_agentflan_jsonl(corpus):
        for msg in conv.messages:
            text = f"{_MARKERS[msg.role]} {msg.content.strip()}"
            if msg.role == "assistant":
                text += END_OF_TURN
            for line in text.split("\n"):
                if line.strip():
                    yield line


def train_tokenizer(corpus: str | os.PathLike, out: str | os.PathLike, vocab_size: int = 4096) -> None:
    """Trains a Llama-2-style BPE model on ``corpus`` and writes it to ``out``.

    Llama-2's settings: unk 0, bos 1, eos 2, no pad, byte fallback, digits split one by
    one, a dummy prefix, no whitespace folding and no Unicode normalization. The agentflan
    template's markers are user-defined pieces, so each is one token. A single thread and
    the corpus in file order make the output the same bytes on every run.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=training_lines(corpus),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        character_coverage=0.9999,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=list(AGENTFLAN_SPECIAL_PIECES),
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    Path(out).write_bytes(model.getvalue())
