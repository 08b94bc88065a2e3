"""Tokenizer over a SentencePiece BPE model file (Llama-2's tokenizer.model or the bundled one).

The work is done by ``agentflan._C.BpeTokenizer``, a C++ reimplementation that reads the
``.model`` file itself and returns exactly the ids and text SentencePiece returns for BPE
models; the sentencepiece package is not needed at run time.

Special pieces in text. SentencePiece never matches control pieces (``<s>``, ``</s>``,
``<unk>``) in text: "</s>" typed by a user is five characters. It does match user-defined
pieces (the bundled tokenizer's ``<|Human|>:``, ``<|eot|>``, ...), which is what a chat
template wants for its markers and what it must not allow in message content. So
``encode(text, allow_special=False)`` encodes content: user-defined pieces written in the
text are normalized and run through BPE and byte fallback like any other characters, and
the ids are only ever NORMAL, byte or (without byte fallback) unknown pieces. For a model
without user-defined pieces both modes give the same ids. The content mode has no
sentencepiece switch; it equals sentencepiece on a copy of the model whose user-defined
pieces are turned into control pieces (which it never matches), except that a
one-character user-defined piece's character falls back to its bytes (sentencepiece
cannot encode a one-character control piece).

Text in the middle of a line: SentencePiece puts a space ("▁") before every text it
encodes (the dummy prefix); ``add_dummy_prefix=False`` leaves it out, so that a text
encoded on its own gets the ids it has after other text, e.g. a chat template's segments.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agentflan._C import BpeTokenizer


class PieceType(enum.IntEnum):
    """SentencePiece's piece types (``ModelProto.SentencePiece.Type``, same numbers)."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


@dataclass(frozen=True)
class ModelSpec:
    """What a ``.model`` file holds besides its merge behaviour: every piece with its score
    and type, and the trainer and normalizer settings that shape encoding."""

    pieces: list[str]
    scores: list[float]
    types: list[PieceType]
    byte_fallback: bool
    treat_whitespace_as_suffix: bool
    normalizer_name: str  # "identity" for Llama-2; "nmt_nfkc", ... when a charsmap applies
    has_charsmap: bool
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool
    escape_whitespaces: bool
    has_denormalizer: bool


class Tokenizer:
    """Text <-> token ids. ``encode`` never adds BOS/EOS; callers place them as ids."""

    def __init__(self, model_path: str | os.PathLike) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        # Raises ValueError naming the path for a corrupt file or a non-BPE model.
        self._bpe = BpeTokenizer(str(path))

    def encode(self, text: str, allow_special: bool = True, add_dummy_prefix: bool = True) -> list[int]:
        """The ids of ``text`` (no BOS/EOS). The defaults are SentencePiece's encoding, in
        which user-defined pieces written in the text become their ids;
        ``allow_special=False`` encodes them as plain text (see the module docstring).
        ``add_dummy_prefix=False`` leaves out the space SentencePiece puts before every
        text (when the model adds one), for text that continues a line. Raises TypeError
        when ``text`` is not a str."""
        return self._bpe.encode(text, allow_special=allow_special, add_dummy_prefix=add_dummy_prefix)

    def encode_batch(
        self, texts: Sequence[str], num_threads: int = 0, allow_special: bool = True, add_dummy_prefix: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encodes many texts at once on ``num_threads`` threads (0 = all cores), each as
        ``encode(text, allow_special, add_dummy_prefix)`` does, without holding the GIL.

        Returns ``(ids, offsets)``: flat int32 ids and int64 offsets of length
        ``len(texts) + 1``; text ``i`` encodes to ``ids[offsets[i]:offsets[i + 1]]``.
        """
        return self._bpe.encode_batch(texts, num_threads, allow_special=allow_special,
                                      add_dummy_prefix=add_dummy_prefix)

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

    def model_spec(self) -> ModelSpec:
        """The pieces, scores, types and settings of the model file."""
        spec = self._bpe.model_spec()
        spec["types"] = [PieceType(t) for t in spec["types"]]
        return ModelSpec(**spec)

    def piece_to_id(self, piece: str) -> int:
        """The id of ``piece``; ``unk_id`` when the vocabulary has no such piece."""
        return self._bpe.piece_to_id(piece)

    def id_to_piece(self, id: int) -> str:
        """Raises IndexError for an id outside the vocabulary."""
        return self._bpe.id_to_piece(id)
