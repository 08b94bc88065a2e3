"""Tokenizer over a SentencePiece BPE model file (Llama-2's tokenizer.model or the bundled one).

The work is done by ``agentflan._C.BpeTokenizer``, a C++ reimplementation that reads the
``.model`` file itself and returns exactly the ids and text SentencePiece returns for BPE
models; the sentencepiece package is not needed at run time.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from agentflan._C import BpeTokenizer


class Tokenizer:
    """Text <-> token ids. ``encode`` never adds BOS/EOS; callers place them as ids."""

    def __init__(self, model_path: str | os.PathLike) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        # Raises ValueError naming the path for a corrupt file or a non-BPE model.
        self._bpe = BpeTokenizer(str(path))

    def encode(self, text: str) -> list[int]:
        return self._bpe.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Encodes many texts at once on ``num_threads`` threads (0 = all cores).

        Returns ``(ids, offsets)``: flat int32 ids and int64 offsets of length
        ``len(texts) + 1``; text ``i`` encodes to ``ids[offsets[i]:offsets[i + 1]]``.
        """
        return self._bpe.encode_batch(texts, num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        if not isinstance(ids, (np.ndarray, list, tuple)):
            ids = list(ids)
        return self._bpe.decode(np.asarray(ids, dtype=np.int64))

    @property
    def bos_id(self) -> int:
        return self._bpe.bos_id

    @property
    def eos_id(self) -> int:
        return self._bpe.eos_id

    @property
    def unk_id(self) -> int:
        return self._bpe.unk_id

    @property
    def pad_id(self) -> int:
        """-1 when the model defines no padding piece (Llama-2's does not)."""
        return self._bpe.pad_id

    @property
    def vocab_size(self) -> int:
        return self._bpe.vocab_size

    def piece_to_id(self, piece: str) -> int:
        """The id of ``piece``; ``unk_id`` when the vocabulary has no such piece."""
        return self._bpe.piece_to_id(piece)

    def id_to_piece(self, id: int) -> str:
        """Raises IndexError for an id outside the vocabulary."""
        return self._bpe.id_to_piece(id)
