"""Tokenizer over a SentencePiece model file (Llama-2's tokenizer.model or the bundled one)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import sentencepiece as spm


class Tokenizer:
    """Text <-> token ids. ``encode`` never adds BOS/EOS; callers place them as ids."""

    def __init__(self, model_path: str | os.PathLike) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        # Loading from bytes keeps SentencePiece's own file handling (and its messages,
        # which do not say what went wrong in plain words) out of the error path.
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=path.read_bytes())
        except RuntimeError as err:
            raise ValueError(f"{path}: not a valid SentencePiece model ({str(err).strip()})") from None

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def pad_id(self) -> int:
        """-1 when the model defines no padding piece (Llama-2's does not)."""
        return self._sp.pad_id()

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def piece_to_id(self, piece: str) -> int:
        """The id of ``piece``; ``unk_id`` when the vocabulary has no such piece."""
        return self._sp.piece_to_id(piece)

    def id_to_piece(self, id: int) -> str:
        if not 0 <= id < self.vocab_size:
            raise IndexError(f"token id {id} is outside the vocabulary (size {self.vocab_size})")
        return self._sp.id_to_piece(id)
