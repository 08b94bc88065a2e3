"""Chat templates: a Conversation becomes token ids plus an exact per-token loss mask.

A template renders a conversation as a list of segments, each either text or one special
token id, and each either trained or not. Segments are tokenized one by one, so the mask
is exact by construction: a token is a target exactly when it came from a trained segment.
In every template the trained segments are an assistant turn's content and the single
token that closes that turn; role markers, system, user and tool-observation text never
are (tool observations arrive as ``user`` turns in Agent-FLAN data and as ``tool`` turns
from ToolBench; both render as untrained prompt text). Every message's content is
stripped of surrounding whitespace first (formatting noise in the source corpora, e.g.
ToolBench's leading "\\n" before "Thought:"; Meta's reference strips too), so the
trained text of a turn is ``content.strip()``.

``agentflan`` (the default; the paper's InternLM-style Human/Assistant markers)::

    <s><|System|>: {system}\\n<|Human|>: {user}\\n<|Assistant|>: {answer}<|eot|>\\n<|Human|>: {observation}\\n<|Assistant|>: {answer}<|eot|>

  ``<s>`` is the BOS id and comes once, at the start. Turns are separated by one "\\n";
  nothing follows the last turn. Tool observations are user turns in the Agent-FLAN data
  and ``tool`` turns render the same way, as ``<|Human|>:`` turns, so the two sources
  look alike to the model. An empty content drops the space after its marker.
  ``<|eot|>`` ends every assistant turn and is its trained closing token when the
  tokenizer has it as a single piece (the bundled tokenizer does); with a tokenizer that
  lacks it (stock Llama-2) the EOS id takes its place, so no vocabulary change is needed.
  Role markers are plain text: single pieces in the bundled tokenizer, several pieces in
  others, never trained either way since generation stops at the closing token.

``llama2-chat`` (Meta's reference format)::

    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer}</s><s>[INST] {observation} [/INST] {answer}</s>

  Each exchange is BOS, one ``[INST] ... [/INST]`` block, the answer and EOS; EOS is the
  trained closing token. The consecutive system/user messages before an assistant turn
  (the usual case being one tool observation; ``tool`` turns count as user turns) share
  one block: their system texts go, joined by a blank line, into the ``<<SYS>>`` section
  at its top, their user texts follow, joined by a blank line. An assistant turn with no such messages before it gets
  an empty block (``[INST]  [/INST]``). Trailing user turns form a last exchange with no
  answer and no EOS, as in Meta's generation prompt. Meta's reference puts a space
  between the answer and EOS; it is dropped here, because it tokenizes to a lone "▁"
  that would be either a trained non-content token or an untrained hole right before
  the target EOS.

``plain`` (role-free: no markers, for general text or base-model style data)::

    <s> {system}\\n\\n{user}\\n\\n{answer}</s><s> {observation}\\n\\n{answer}</s>

  Exchanges as in llama2-chat: BOS, the prompt (the non-empty system, user and tool texts
  before an assistant turn, joined by a blank line), a blank line, the answer and EOS,
  the trained closing token. An exchange with no prompt text is ``<s> {answer}</s>``;
  trailing prompt turns form a last exchange with no answer and no EOS. The leading
  space of each exchange is SentencePiece's dummy prefix (each exchange tokenizes as if
  encoded on its own); an answer after the blank line is tokenized as it is in running
  text, so its first piece carries no "▁". The trained tokens of a turn decode to exactly
  ``content.strip()`` in every template.

SentencePiece dummy prefix: SentencePiece prepends a space ("▁") to every string it
encodes, which is right at the start of a document but wrong in the middle of one. Every
text segment here is therefore encoded *without* that prefix (see ``encode_conversations``) and
each template writes the spaces it wants literally. For llama2-chat that includes the
leading space of each ``" [INST] ..."`` block, which reproduces the dummy prefix Meta's
reference gets by encoding every exchange as its own string; a trained answer segment is
``" " + answer``, whose space merges into the answer's first piece exactly as it does
when the whole line is encoded at once. Segment boundaries sit at a space, a special id,
a user-defined marker piece or a newline (a byte-fallback piece), where SentencePiece
splits anyway, so the segment-wise ids equal the ids of the whole rendered text.

Many conversations are encoded at once by ``encode_conversations``: all text segments of
the batch go through ``Tokenizer.encode_batch`` (C++, threads, no GIL), and the ids and
mask are assembled with a few vectorised passes. ``encode_conversation`` is the
same code on a batch of one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import numpy as np

from agentflan.data.conversation import Conversation
from agentflan.tokenizer import Tokenizer

SYSTEM_MARKER = "<|System|>:"
HUMAN_MARKER = "<|Human|>:"
ASSISTANT_MARKER = "<|Assistant|>:"
END_OF_TURN = "<|eot|>"
# The bundled tokenizer holds these as user-defined (single, never split) pieces.
AGENTFLAN_SPECIAL_PIECES = (SYSTEM_MARKER, HUMAN_MARKER, ASSISTANT_MARKER, END_OF_TURN)

# A segment is text (encoded without dummy prefix) or one token id, and whether it is trained.
Segment = tuple[str | int, bool]


@dataclass(frozen=True)
class EncodedConversation:
    ids: np.ndarray  # int32 (n,), starts with BOS
    loss_mask: np.ndarray  # uint8 (n,), 1 where the token is a training target


@dataclass(frozen=True)
class EncodedBatch:
    """Many encoded conversations, concatenated: conversation i is ``[offsets[i], offsets[i+1])``."""

    ids: np.ndarray  # int32 (total,)
    loss_mask: np.ndarray  # uint8 (total,)
    offsets: np.ndarray  # int64 (n+1,)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> EncodedConversation:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return EncodedConversation(self.ids[a:b], self.loss_mask[a:b])


def _bos(tokenizer: Tokenizer) -> int:
    if tokenizer.bos_id < 0:
        raise ValueError("the tokenizer defines no BOS token, which every template starts with")
    return tokenizer.bos_id


def _eos(tokenizer: Tokenizer) -> int:
    if tokenizer.eos_id < 0:
        raise ValueError("the tokenizer defines no EOS token")
    return tokenizer.eos_id


def agentflan_end_of_turn_id(tokenizer: Tokenizer) -> int:
    """The id that closes an assistant turn in the agentflan template (``<|eot|>``, else EOS)."""
    eot = tokenizer.piece_to_id(END_OF_TURN)
    return eot if eot != tokenizer.unk_id else _eos(tokenizer)


def _with_content(prefix: str, content: str) -> str:
    text = content.strip()
    return f"{prefix} {text}" if text else prefix


_AGENTFLAN_MARKERS = {"system": SYSTEM_MARKER, "user": HUMAN_MARKER, "tool": HUMAN_MARKER}


def _render_agentflan(conv: Conversation, tokenizer: Tokenizer) -> list[Segment]:
    eot = agentflan_end_of_turn_id(tokenizer)
    segments: list[Segment] = [(_bos(tokenizer), False)]
    pending = ""  # untrained text waiting for the next trained segment
    for i, msg in enumerate(conv.messages):
        sep = "\n" if i else ""
        if msg.role == "assistant":
            segments.append((pending + sep + ASSISTANT_MARKER, False))
            pending = ""
            segments.append((_with_content("", msg.content), msg.trained))
            segments.append((eot, msg.trained))
        else:
            pending += sep + _with_content(_AGENTFLAN_MARKERS[msg.role], msg.content)
    if pending:
        segments.append((pending, False))
    return segments


def _llama2_block(system: list[str], user: list[str]) -> str:
    body = "\n\n".join(user)
    if system:
        body = "<<SYS>>\n" + "\n\n".join(system) + "\n<</SYS>>\n\n" + body
    return f" [INST] {body} [/INST]"


def _render_llama2_chat(conv: Conversation, tokenizer: Tokenizer) -> list[Segment]:
    bos, eos = _bos(tokenizer), _eos(tokenizer)
    segments: list[Segment] = []
    system: list[str] = []
    user: list[str] = []
    for msg in conv.messages:
        text = msg.content.strip()
        if msg.role == "system":
            system.append(text)
        elif msg.role != "assistant":  # user turns and tool observations
            user.append(text)
        else:
            segments += [
                (bos, False),
                (_llama2_block(system, user), False),
                (_with_content("", text), msg.trained),
                (eos, msg.trained),
            ]
            system, user = [], []
    if system or user:
        segments += [(bos, False), (_llama2_block(system, user), False)]
    return segments


def _render_plain(conv: Conversation, tokenizer: Tokenizer) -> list[Segment]:
    bos, eos = _bos(tokenizer), _eos(tokenizer)
    segments: list[Segment] = []
    prompt: list[str] = []
    for msg in conv.messages:
        text = msg.content.strip()
        if msg.role != "assistant":
            if text:
                prompt.append(text)
            continue
        segments.append((bos, False))
        if prompt:
            segments.append((" " + "\n\n".join(prompt) + "\n\n", False))
            segments.append((text, msg.trained))
        else:
            segments.append((_with_content("", text), msg.trained))
        segments.append((eos, msg.trained))
        prompt = []
    if prompt:
        segments += [(bos, False), (" " + "\n\n".join(prompt), False)]
    return segments


TEMPLATES: dict[str, Callable[[Conversation, Tokenizer], list[Segment]]] = {
    "agentflan": _render_agentflan,
    "llama2-chat": _render_llama2_chat,
    "plain": _render_plain,
}


def _renderer(template: str) -> Callable[[Conversation, Tokenizer], list[Segment]]:
    render = TEMPLATES.get(template)
    if render is None:
        raise ValueError(f"unknown chat template {template!r}; known templates: {', '.join(TEMPLATES)}")
    return render


def _where(conv: Conversation) -> str:
    return f"{conv.source}:{conv.line}: conversation {conv.id!r}"


def encode_conversations(
    convs: Sequence[Conversation], tokenizer: Tokenizer, template: str = "agentflan", num_threads: int = 1
) -> EncodedBatch:
    """Token ids and loss masks of many conversations under ``template``, tokenized on
    ``num_threads`` threads (0 = all cores); identical to ``encode_conversation`` on each.

    Text segments are encoded without the dummy prefix: SentencePiece offers no per-call
    switch for it, so each is encoded behind a "\\n" and the ids of a lone "\\n"
    (``newline``: "▁" + byte <0x0A> for Llama-style models) are cut off. A newline is a
    byte-fallback piece that never merges with its neighbours; should a tokenizer merge it
    anyway, the prefix check fails loudly instead of cutting at the wrong place.
    """
    render = _renderer(template)
    texts: list[str] = []
    specials: list[int] = []
    is_text: list[bool] = []
    trained: list[bool] = []
    seg_counts = np.zeros(len(convs) + 1, dtype=np.int64)
    for c, conv in enumerate(convs):
        try:
            segments = render(conv, tokenizer)
        except ValueError as err:
            raise ValueError(f"{_where(conv)}: {err}") from None
        seg_counts[c + 1] = len(segments)
        for piece, is_trained in segments:
            if isinstance(piece, int):
                specials.append(piece)
                is_text.append(False)
            else:
                texts.append("\n" + piece)
                is_text.append(True)
            trained.append(is_trained)

    newline = np.asarray(tokenizer.encode("\n"), dtype=np.int32)
    flat, text_offsets = tokenizer.encode_batch(texts, num_threads)
    starts, lengths = text_offsets[:-1], np.diff(text_offsets)
    prefixed = lengths >= len(newline)
    if len(flat):
        for k, nl_id in enumerate(newline):
            prefixed &= flat[np.minimum(starts + k, len(flat) - 1)] == nl_id
    if not prefixed.all():
        bad = int(np.flatnonzero(~prefixed)[0])
        segment = int(np.flatnonzero(np.asarray(is_text))[bad])
        conv = convs[int(np.searchsorted(np.cumsum(seg_counts), segment, side="right")) - 1]
        got = flat[starts[bad]: starts[bad] + len(newline) + 1].tolist()
        raise ValueError(
            f"{_where(conv)}: cannot encode {texts[bad][1:41]!r} without the tokenizer's dummy prefix: "
            f"a leading newline merged with the text ({got} vs {newline.tolist()})"
        )

    # The text segments' ids lie in ``flat`` in segment order: drop each one's newline
    # prefix and scatter them around the special ids' places. Vectorised passes over the
    # batch, no per-token index array.
    n_nl = len(newline)
    text_mask = np.asarray(is_text, dtype=bool)
    seg_len = np.ones(len(text_mask), dtype=np.int64)
    seg_len[text_mask] = lengths - n_nl
    out = np.zeros(len(seg_len) + 1, dtype=np.int64)
    np.cumsum(seg_len, out=out[1:])
    total = int(out[-1])
    keep = np.ones(len(flat), dtype=bool)
    keep[(starts[:, None] + np.arange(n_nl)).ravel()] = False
    at_text = np.ones(total, dtype=bool)
    special_at = out[:-1][~text_mask]
    at_text[special_at] = False
    trained_flags = np.asarray(trained, dtype=np.uint8)
    ids = np.empty(total, dtype=np.int32)
    ids[at_text] = flat[keep]
    ids[special_at] = specials
    mask = np.empty(total, dtype=np.uint8)
    mask[at_text] = np.repeat(trained_flags[text_mask], lengths - n_nl)
    mask[special_at] = trained_flags[~text_mask]
    return EncodedBatch(ids=ids, loss_mask=mask, offsets=out[np.cumsum(seg_counts)])


def encode_conversation(
    conv: Conversation, tokenizer: Tokenizer, template: str = "agentflan"
) -> EncodedConversation:
    """Token ids (starting with BOS) and the loss mask of ``conv`` under ``template``."""
    return encode_conversations([conv], tokenizer, template)[0]
