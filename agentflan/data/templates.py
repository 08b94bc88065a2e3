"""Chat templates: a Conversation becomes token ids plus an exact per-token loss mask.

A template renders a conversation as a list of segments, each trained or not and each one
of: a special token id (BOS, EOS, ``<|eot|>``), *markup* (the template's own text: role
markers, ``[INST]``, separators) or *content* (a message's text). Segments are tokenized
one by one, so the mask is exact by construction: a token is a target exactly when it came
from a trained segment. Markup is encoded as SentencePiece encodes it, so a marker that
the tokenizer holds as a user-defined piece becomes that piece; content is encoded with
``allow_special=False``, so text in a message never becomes a marker or control id (a user
asking "what does <|eot|> do?" gets the characters, not the end of turn), and control
pieces such as "</s>" are never matched in text by any SentencePiece model. Only the
template inserts marker and control ids. (With a tokenizer whose markers are several
ordinary pieces, as stock Llama-2's, marker text in content has the same ids as the
template's marker text; ``stop_strings`` catches a model that writes one.)

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
  Role markers are markup: single pieces in the bundled tokenizer, several pieces in
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
text segment here is therefore encoded *without* that prefix (``add_dummy_prefix=False``)
and each template writes the spaces it wants literally. For llama2-chat that includes the
leading space of each ``" [INST] ..."`` block, which reproduces the dummy prefix Meta's
reference gets by encoding every exchange as its own string; a trained answer segment is
``" " + answer``, whose space merges into the answer's first piece exactly as it does
when the whole line is encoded at once. Segment boundaries sit before a space, at a special
id, a user-defined marker piece or a newline (a byte-fallback piece), where SentencePiece
splits anyway, so for content without markers the segment-wise ids equal the ids of the
whole rendered text. (Content that ends in a literal "▁" (U+2581) before a template space
is the exception: the two would merge into "▁▁" in the whole text.)

Generation: ``encode_generation_prompt`` renders a conversation that ends with a system,
user or tool turn, followed by what the template puts before an assistant answer
(agentflan: ``"\\n<|Assistant|>:"``; llama2-chat: the open exchange up to ``" [/INST]"``;
plain: the prompt and its blank line), so that a model trained on ``encode_conversation``
continues with exactly the ids the trained answer has there (the answer's leading space
included). ``stop_token_ids`` are the ids that end an assistant turn and ``stop_strings``
the marker texts a decoded answer must not contain (a model with markers split into
several pieces can write them as text).

Many conversations are encoded at once by ``encode_conversations``: all content segments
of the batch go through one ``Tokenizer.encode_batch`` call (C++, threads, no GIL), the few
distinct markup texts through another, and the ids and mask are assembled with a few
vectorised passes. ``encode_conversation`` is the same code on a batch of one.
``agentflan.hf_tokenizer`` writes each template as a Jinja chat template for transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import numpy as np

from agentflan.data.conversation import Conversation, place
from agentflan.tokenizer import Tokenizer

SYSTEM_MARKER = "<|System|>:"
HUMAN_MARKER = "<|Human|>:"
ASSISTANT_MARKER = "<|Assistant|>:"
END_OF_TURN = "<|eot|>"
# The bundled tokenizer holds these as user-defined (single, never split) pieces.
AGENTFLAN_SPECIAL_PIECES = (SYSTEM_MARKER, HUMAN_MARKER, ASSISTANT_MARKER, END_OF_TURN)

# Segment kinds: a special token id, template markup (markers allowed) or message content.
SPECIAL, MARKUP, CONTENT = 0, 1, 2
# (kind, token id or text, trained). Text is encoded without the dummy prefix.
Segment = tuple[int, int | str, bool]


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


# The renderers run once per conversation of a corpus, so they append segment tuples
# directly; ``markup`` holds template text not yet appended, so that adjacent markup
# becomes one segment.

_AGENTFLAN_MARKERS = {"system": SYSTEM_MARKER, "user": HUMAN_MARKER, "tool": HUMAN_MARKER, "assistant": ASSISTANT_MARKER}


def _render_agentflan(conv: Conversation, tokenizer: Tokenizer, generation_prompt: bool = False) -> list[Segment]:
    eot = agentflan_end_of_turn_id(tokenizer)
    segments: list[Segment] = [(SPECIAL, _bos(tokenizer), False)]
    markup = ""
    for msg in conv.messages:
        markup += _AGENTFLAN_MARKERS[msg.role]
        text = msg.content.strip()
        if text:  # an empty content drops the space after its marker
            segments += [(MARKUP, markup, False), (CONTENT, " " + text, msg.trained)]
            markup = ""
        if msg.role == "assistant":
            if markup:
                segments.append((MARKUP, markup, False))
            segments.append((SPECIAL, eot, msg.trained))
            markup = ""
        markup += "\n"
    if generation_prompt:
        markup += ASSISTANT_MARKER
    if markup[:-1] or generation_prompt:
        segments.append((MARKUP, markup if generation_prompt else markup[:-1], False))
    return segments


def _llama2_block(segments: list[Segment], system: list[str], user: list[str]) -> None:
    """Appends `` [INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST]``, the texts of
    one kind joined by a blank line; no system section without system texts."""
    markup = " [INST]"
    if system:
        markup += " <<SYS>>\n"
        for text in system:
            if text:
                segments += [(MARKUP, markup, False), (CONTENT, text, False)]
                markup = ""
            markup += "\n\n"
        markup = markup[:-2] + "\n<</SYS>>\n\n"
    elif not user or not user[0]:
        markup += " "  # the space after [INST] that an empty first text leaves behind
    for j, text in enumerate(user):
        if text:
            segments += [(MARKUP, markup, False), (CONTENT, " " + text if j == 0 and not system else text, False)]
            markup = ""
        markup += "\n\n"
    if user:
        markup = markup[:-2]
    segments.append((MARKUP, markup + " [/INST]", False))


def _render_llama2_chat(conv: Conversation, tokenizer: Tokenizer, generation_prompt: bool = False) -> list[Segment]:
    bos, eos = (SPECIAL, _bos(tokenizer), False), _eos(tokenizer)
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
            segments.append(bos)
            _llama2_block(segments, system, user)
            if text:
                segments.append((CONTENT, " " + text, msg.trained))
            segments.append((SPECIAL, eos, msg.trained))
            system, user = [], []
    if system or user:  # a last exchange with no answer: also the generation prompt
        segments.append(bos)
        _llama2_block(segments, system, user)
    return segments


def _plain_prompt(segments: list[Segment], prompt: list[str]) -> None:
    """Appends `` {text}\\n\\n{text}``: the leading space is the exchange's dummy prefix."""
    segments.append((CONTENT, " " + prompt[0], False))
    for text in prompt[1:]:
        segments += [(MARKUP, "\n\n", False), (CONTENT, text, False)]


def _render_plain(conv: Conversation, tokenizer: Tokenizer, generation_prompt: bool = False) -> list[Segment]:
    bos, eos = (SPECIAL, _bos(tokenizer), False), _eos(tokenizer)
    segments: list[Segment] = []
    prompt: list[str] = []
    for msg in conv.messages:
        text = msg.content.strip()
        if msg.role != "assistant":
            if text:
                prompt.append(text)
            continue
        segments.append(bos)
        if prompt:
            _plain_prompt(segments, prompt)
            segments.append((MARKUP, "\n\n", False))
            if text:
                segments.append((CONTENT, text, msg.trained))
        elif text:
            segments.append((CONTENT, " " + text, msg.trained))
        segments.append((SPECIAL, eos, msg.trained))
        prompt = []
    if prompt or generation_prompt:  # a last exchange with no answer; the generation prompt adds
        segments.append(bos)         # its blank line (none without prompt text: the answer follows BOS)
        if prompt:
            _plain_prompt(segments, prompt)
            if generation_prompt:
                segments.append((MARKUP, "\n\n", False))
    return segments


# A renderer: (conversation, tokenizer, generation_prompt) -> segments.
Renderer = Callable[[Conversation, Tokenizer, bool], list[Segment]]

TEMPLATES: dict[str, Renderer] = {
    "agentflan": _render_agentflan,
    "llama2-chat": _render_llama2_chat,
    "plain": _render_plain,
}


def _renderer(template: str) -> Renderer:
    render = TEMPLATES.get(template)
    if render is None:
        raise ValueError(f"unknown chat template {template!r}; known templates: {', '.join(TEMPLATES)}")
    return render


def _where(conv: Conversation) -> str:
    return f"{place(conv.source, conv.line, conv.offset)}: conversation {conv.id!r}"


def _encode(
    convs: Sequence[Conversation], tokenizer: Tokenizer, render: Renderer, generation_prompt: bool, num_threads: int
) -> EncodedBatch:
    """Renders every conversation and tokenizes all its segments: content in one batch
    (``allow_special=False``), the distinct markup texts in another."""
    every: list[Segment] = []
    seg_counts = [0] * (len(convs) + 1)
    for c, conv in enumerate(convs):
        try:
            segments = render(conv, tokenizer, generation_prompt)
        except ValueError as err:
            raise ValueError(f"{_where(conv)}: {err}") from None
        seg_counts[c + 1] = len(segments)
        every += segments
    kind = np.asarray([seg[0] for seg in every], dtype=np.int8)
    values = [seg[1] for seg in every]
    trained = np.asarray([seg[2] for seg in every], dtype=np.uint8)

    # Every segment's ids lie in ``source``: content ids, then the distinct markup texts'
    # ids, then the special ids; ``src`` is where each segment's ids start there.
    content_at = np.flatnonzero(kind == CONTENT)
    markup_at = np.flatnonzero(kind == MARKUP)
    special_at = np.flatnonzero(kind == SPECIAL)
    content_ids, content_offsets = tokenizer.encode_batch(
        [values[i] for i in content_at], num_threads, allow_special=False, add_dummy_prefix=False)
    markup_texts = [values[i] for i in markup_at]
    markup_index = {text: i for i, text in enumerate(dict.fromkeys(markup_texts))}
    markup_of = np.asarray([markup_index[text] for text in markup_texts], dtype=np.int64)
    markup_ids, markup_offsets = tokenizer.encode_batch(list(markup_index), 1, add_dummy_prefix=False)
    source = np.concatenate([content_ids, markup_ids, np.asarray([values[i] for i in special_at], dtype=np.int32)])

    seg_len = np.ones(len(kind), dtype=np.int64)
    src = np.empty(len(kind), dtype=np.int64)
    seg_len[content_at] = np.diff(content_offsets)
    src[content_at] = content_offsets[:-1]
    seg_len[markup_at] = np.diff(markup_offsets)[markup_of]
    src[markup_at] = len(content_ids) + markup_offsets[:-1][markup_of]
    src[special_at] = len(content_ids) + len(markup_ids) + np.arange(len(special_at))

    out = np.zeros(len(kind) + 1, dtype=np.int64)
    np.cumsum(seg_len, out=out[1:])
    total = int(out[-1])
    ids = source[np.arange(total, dtype=np.int64) + np.repeat(src - out[:-1], seg_len)]
    mask = np.repeat(trained, seg_len)
    return EncodedBatch(ids=ids, loss_mask=mask, offsets=out[np.cumsum(seg_counts)])


def encode_conversations(
    convs: Sequence[Conversation], tokenizer: Tokenizer, template: str = "agentflan", num_threads: int = 1
) -> EncodedBatch:
    """Token ids and loss masks of many conversations under ``template``, tokenized on
    ``num_threads`` threads (0 = all cores); identical to ``encode_conversation`` on each.

    Raises ValueError for an unknown template, or naming the conversation (source, line,
    id) when the tokenizer lacks BOS or EOS.
    """
    return _encode(convs, tokenizer, _renderer(template), False, num_threads)


def encode_conversation(
    conv: Conversation, tokenizer: Tokenizer, template: str = "agentflan"
) -> EncodedConversation:
    """Token ids (starting with BOS) and the loss mask of ``conv`` under ``template``."""
    return encode_conversations([conv], tokenizer, template)[0]


def encode_generation_prompts(
    convs: Sequence[Conversation], tokenizer: Tokenizer, template: str = "agentflan", num_threads: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Generation prompts of many conversations (see ``encode_generation_prompt``), tokenized
    on ``num_threads`` threads (0 = all cores).

    Returns ``(ids, offsets)``: flat int32 ids and int64 offsets of length ``len(convs) + 1``;
    prompt ``i`` is ``ids[offsets[i]:offsets[i + 1]]``. Raises ValueError naming the first
    conversation that is empty or ends with an assistant turn, and as ``encode_conversations``.
    """
    render = _renderer(template)
    for conv in convs:
        if not conv.messages or conv.messages[-1].role == "assistant":
            last = "no turn" if not conv.messages else "an assistant turn"
            raise ValueError(
                f"{_where(conv)}: a generation prompt needs a conversation that ends with a system, "
                f"user or tool turn; this one has {last} last"
            )
    batch = _encode(convs, tokenizer, render, True, num_threads)
    return batch.ids, batch.offsets


def encode_generation_prompt(conv: Conversation, tokenizer: Tokenizer, template: str = "agentflan") -> np.ndarray:
    """The int32 ids (starting with BOS) a model reads before writing the next assistant turn
    of ``conv``: the conversation as ``encode_conversation`` renders it, then what
    ``template`` puts before an answer. For any conversation ``conv + [answer]``,
    ``encode_conversation`` gives these ids, then the answer's ids, then one of
    ``stop_token_ids``. Raises ValueError (naming the conversation) when ``conv`` is empty
    or its last turn is an assistant turn, and as ``encode_conversations``.
    """
    ids, _ = encode_generation_prompts([conv], tokenizer, template)
    return ids


# Text that opens or closes a turn in each template: a decoded answer never contains it
# (a tokenizer without single-piece markers lets a model spell them out).
_STOP_STRINGS: dict[str, tuple[str, ...]] = {
    "agentflan": (END_OF_TURN, HUMAN_MARKER, ASSISTANT_MARKER, SYSTEM_MARKER),
    "llama2-chat": ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"),
    "plain": (),
}


def stop_token_ids(tokenizer: Tokenizer, template: str = "agentflan") -> list[int]:
    """The ids that end an assistant turn under ``template``, the template's own closing id
    first: agentflan ``[<|eot|>, EOS]`` (just ``[EOS]`` for a tokenizer without ``<|eot|>``),
    llama2-chat and plain ``[EOS]``. EOS always ends generation. Raises ValueError for an
    unknown template or a tokenizer without EOS."""
    _renderer(template)
    eos = _eos(tokenizer)
    closing = agentflan_end_of_turn_id(tokenizer) if template == "agentflan" else eos
    return [closing] if closing == eos else [closing, eos]


def stop_strings(template: str = "agentflan") -> tuple[str, ...]:
    """Marker texts that a decoded assistant answer must not contain under ``template``:
    its role markers and end of turn (agentflan ``<|eot|>``, ``<|Human|>:``,
    ``<|Assistant|>:``, ``<|System|>:``; llama2-chat ``[INST]``, ``[/INST]``, ``<<SYS>>``,
    ``<</SYS>>``; plain none). A generation loop cuts the answer before the first one.
    Raises ValueError for an unknown template."""
    _renderer(template)
    return _STOP_STRINGS[template]
