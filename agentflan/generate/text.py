"""The decoded text of a sequence as it grows one token at a time, with stop strings.

SentencePiece text is not the concatenation of per-token pieces: a piece's leading "▁"
becomes a space except at the very start of a text, and a character outside the
vocabulary arrives as several byte tokens that decode to U+FFFD until the last one is
in. So each new token's text is found as the difference between the decodings of a
short window of ids with and without it (the windowed method of Hugging Face's
TextStreamer and vLLM's detokenizer), and held back while it ends in an incomplete
character. The window starts inside the prompt, so the first generated token decodes as
it would in running text (with its leading space).
"""

from __future__ import annotations

from collections.abc import Sequence

from agentflan.tokenizer import Tokenizer

# Prompt ids kept in front of the generated ones, so that the first generated piece is
# decoded with the spacing it has after the prompt.
PROMPT_CONTEXT = 4
INCOMPLETE = "\ufffd"


def decode_continuation(tokenizer: Tokenizer, prompt_ids: Sequence[int], ids: Sequence[int]) -> str:
    """The text ``ids`` add after the prompt, as it reads in the decoded whole."""
    context = list(prompt_ids[-PROMPT_CONTEXT:])
    return tokenizer.decode(context + list(ids))[len(tokenizer.decode(context)) :]


class TextStream:
    """The continuation text of one sequence; ``text`` only ever grows until a stop string cuts it.

    ``push(id)`` adds a generated id; ``stop`` becomes the stop string that ended the
    text (the text is cut before it); ``take()`` returns the text that is final and not
    yet returned (never a part that may turn out to begin a stop string).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stop_strings: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        context = list(prompt_ids[-PROMPT_CONTEXT:])
        self._ids = context  # the context, then every generated id
        self._generated_from = len(context)
        self._window = 0  # ids[window:read] decode to text already added
        self._read = len(context)
        self._stops = tuple(stop_strings)
        self._longest_stop = max((len(s) for s in self._stops), default=0)
        self.text = ""
        self.stop: str | None = None
        self._taken = 0

    def push(self, token_id: int) -> None:
        """Adds one generated id and searches the new text for the stop strings."""
        if self.stop is not None:
            raise RuntimeError("the text already ended at a stop string")
        self._ids.append(token_id)
        before = self._tokenizer.decode(self._ids[self._window : self._read])
        after = self._tokenizer.decode(self._ids[self._window :])
        if after.endswith(INCOMPLETE):
            return  # wait for the rest of the character
        if after.startswith(before):
            new = after[len(before) :]
        else:  # a decoder that rewrites earlier text: fall back to the whole continuation
            new = self._whole_text()[len(self.text) :]
        self._window, self._read = self._read, len(self._ids)
        self._append(new)

    def finish(self) -> None:
        """Adds text still held back (an incomplete character at the end decodes as U+FFFD)."""
        if self.stop is None and self._read < len(self._ids):
            self._append(self._whole_text()[len(self.text) :])
            self._read = len(self._ids)

    def take(self, final: bool = False) -> str:
        """Text not yet taken that no later token can change; with final, all the rest."""
        end = len(self.text) if final or self.stop is not None else len(self.text) - self._partial_stop()
        new = self.text[self._taken : end]
        self._taken = max(self._taken, end)
        return new

    def _whole_text(self) -> str:
        return decode_continuation(self._tokenizer, self._ids[: self._generated_from], self._ids[self._generated_from :])

    def _append(self, new: str) -> None:
        if not new:
            return
        start = max(0, len(self.text) - self._longest_stop + 1)
        self.text += new
        found = [(at, s) for s in self._stops if (at := self.text.find(s, start)) >= 0]
        if found:
            at, stop = min(found)
            self.text = self.text[:at]
            self.stop = stop

    def _partial_stop(self) -> int:
        """Length of the longest end of the text that is the beginning of a stop string."""
        for n in range(min(self._longest_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0
