"""Chat templates: a Conversation becomes token ids plus an exact per-token loss mask.

A template renders a conversation as a list of segments, each either text or one special
token id, and each either trained or not. Segments are tokenized one by one, so the mask
is exact by construction: a token is a target exactly when it came from a trained segment.
In both templates the trained segments are an assistant turn's content and the single
token that closes that turn; role markers, system, user and tool-observation text never
are. Every message's content is stripped of surrounding whitespace first (formatting
noise in the source corpora, e.g. ToolBench's leading "\\n" before "Thought:"; Meta's
reference strips too), so the trained text of a turn is ``content.strip()``.

``agentflan`` (the default; the paper's InternLM-style Human/Assistant markers)::

    <s><|System|>: {system}\\n<|Human|>: {user}\\n<|Assistant|>: {answer}<|eot|>\\n<|Human|>: {observation}\\n<|Assistant|>: {answer}<|eot|>

  ``<s>`` is the BOS id and comes once, at the start. Turns are separated by one "\\n";
  nothing follows the last turn. Tool observations are user turns in the data and are
  rendered as ``<|Human|>:`` turns. An empty content drops the space after its marker.
  ``<|eot|>`` ends every assistant turn and is its trained closing token when the
  tokenizer has it as a single piece (the bundled tokenizer does); with a tokenizer that
  lacks it (stock Llama-2) the EOS id takes its place, so no vocabulary change is needed.
  Role markers are plain text: single pieces in the bundled tokenizer, several pieces in
  others, never trained either way since generation stops at the closing token.

``llama2-chat`` (Meta's reference format)::

    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer}</s><s>[INST] {observation} [/INST] {answer}</s>

  Each exchange is BOS, one ``[INST] ... [/INST]`` block, the answer and EOS; EOS is the
  trained closing token. The consecutive system/user messages before an assistant turn
  (the usual case being one tool observation) share one block: their system texts go,
  joined by a blank line, into the ``<<SYS>>`` section at its top, their user texts
  follow, joined by a blank line. An assistant turn with no such messages before it gets
  an empty block (``[INST]  [/INST]``). Trailing user turns form a last exchange with no
  answer and no EOS, as in Meta's generation prompt. Meta's reference puts a space
  between the answer and EOS; it is dropped here, because it tokenizes to a lone "▁"
  that would be either a trained non-content token or an untrained hole right before
  the target EOS.

SentencePiece dummy prefix: SentencePiece prepends a space ("▁") to every string it
encodes, which is right at the start of a document but wrong in the middle of one. Every
text segment here is therefore encoded *without* that prefix (see ``_encode_bare``) and
each template writes the spaces it wants literally. For llama2-chat that includes the
leading space of each ``" [INST] ..."`` block, which reproduces the dummy prefix Meta's
reference gets by encoding every exchange as its own string; a trained answer segment is
``" " + answer``, whose space merges into the answer's first piece exactly as it does
when the whole line is encoded at once. Segment boundaries sit at a space, a special id
or a user-defined marker piece, where SentencePiece splits anyway, so the segment-wise
ids equal the ids of the whole rendered text.
"""

from __future__ import annotations

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


def _render_agentflan(conv: Conversation, tokenizer: Tokenizer) -> list[Segment]:
    eot = agentflan_end_of_turn_id(tokenizer)
    markers = {"system": SYSTEM_MARKER, "user": HUMAN_MARKER}
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
            pending += sep + _with_content(markers[msg.role], msg.content)
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
        elif msg.role == "user":
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


TEMPLATES: dict[str, Callable[[Conversation, Tokenizer], list[Segment]]] = {
    "agentflan": _render_agentflan,
    "llama2-chat": _render_llama2_chat,
}


def _encode_bare(tokenizer: Tokenizer, text: str, newline: list[int]) -> list[int]:
    """Encodes ``text`` as it tokenizes in the middle of a document: no dummy prefix.

    SentencePiece offers no per-call switch for the prefix, so the text is encoded behind
    a "\\n" and the ids of a lone "\\n" (``newline``: "▁" + byte <0x0A> for Llama-style
    models) are cut off. A newline is a byte-fallback piece that never merges with its
    neighbours; should a tokenizer merge it anyway, the prefix check below fails loudly
    instead of cutting at the wrong place.
    """
    ids = tokenizer.encode("\n" + text)
    if ids[: len(newline)] != newline:
        raise ValueError(
            f"cannot encode {text[:40]!r} without the tokenizer's dummy prefix: "
            f"a leading newline merged with the text ({ids[:len(newline) + 1]} vs {newline})"
        )
    return ids[len(newline):]


def encode_conversation(
    conv: Conversation, tokenizer: Tokenizer, template: str = "agentflan"
) -> EncodedConversation:
    """Token ids (starting with BOS) and the loss mask of ``conv`` under ``template``."""
    render = TEMPLATES.get(template)
    if render is None:
        raise ValueError(f"unknown chat template {template!r}; known templates: {', '.join(TEMPLATES)}")
    newline = tokenizer.encode("\n")
    ids: list[int] = []
    mask: list[int] = []
    try:
        for piece, trained in render(conv, tokenizer):
            toks = [piece] if isinstance(piece, int) else _encode_bare(tokenizer, piece, newline)
            ids += toks
            mask += [int(trained)] * len(toks)
    except ValueError as err:
        raise ValueError(f"{conv.source}:{conv.line}: conversation {conv.id!r}: {err}") from None
    return EncodedConversation(ids=np.asarray(ids, dtype=np.int32), loss_mask=np.asarray(mask, dtype=np.uint8))
