import itertools
import random
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from reference_models import llama2_tokenizer_path
from agentflan.data.conversation import Conversation, Message, read_agentflan_jsonl
from agentflan.corpus.default import write_corpus
from agentflan.data.defaults import DEFAULT_CORPUS
from agentflan.data.templates import (
    AGENTFLAN_SPECIAL_PIECES,
    TEMPLATES,
    agentflan_end_of_turn_id,
    encode_conversation,
    encode_conversations,
    encode_generation_prompt,
    encode_generation_prompts,
    stop_strings,
    stop_token_ids,
)
from agentflan.tokenizer import Tokenizer

def make(*turns: tuple) -> Conversation:
    return Conversation("test", [Message(t[0], t[1], t[2] if len(t) > 2 else None) for t in turns], "test.jsonl", 1)


def end_id(tok: Tokenizer, template: str) -> int:
    return agentflan_end_of_turn_id(tok) if template == "agentflan" else tok.eos_id


def mask_runs(mask: np.ndarray) -> list[slice]:
    """Maximal stretches of consecutive 1s."""
    padded = np.concatenate([[0], mask.astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(padded))
    return [slice(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def strip_dummy_prefix(tok: Tokenizer, ids: list[int]) -> list[int]:
    """Drops the lone "▁" SentencePiece puts before a text that starts with a marker piece."""
    assert ids[0] == tok.piece_to_id("▁")
    return ids[1:]


# System, user, a ReAct call (ToolBench-style leading newline), a tool observation coming
# back as a user turn, an in-context assistant turn with loss false, a follow-up, a final answer.
HAND = make(
    ("system", "You can call get_weather(city)."),
    ("user", "Is it raining in Oslo?"),
    ("assistant", "\nThought: I need the weather.\nAction: get_weather\nAction Input: {\"city\": \"Oslo\"}"),
    ("user", "{\"condition\": \"light rain\", \"temperature\": 4}"),
    ("assistant", "Example answer that must not be learned.", False),
    ("user", "And tomorrow?"),
    ("assistant", "Yes, it is raining in Oslo: light rain at 4°C. ", True),
)
HAND_TRAINED = [
    "Thought: I need the weather.\nAction: get_weather\nAction Input: {\"city\": \"Oslo\"}",
    "Yes, it is raining in Oslo: light rain at 4°C.",
]
HAND_UNTRAINED = ["You can call get_weather(city).", "Is it raining in Oslo?",
                  "{\"condition\": \"light rain\", \"temperature\": 4}", "Example answer that must not be learned.",
                  "And tomorrow?"]


def bare(tok: Tokenizer, text: str) -> list[int]:
    """The ids of content ``text`` at the start of a line in running text (no dummy prefix)."""
    newline = tok.encode("\n")
    ids = tok.encode("\n" + text, allow_special=False)
    assert ids[: len(newline)] == newline
    return ids[len(newline):]


def trained_texts(conv: Conversation, template: str, tok: Tokenizer) -> list[tuple[str, list[int]]]:
    """Each trained turn's text and the ids it must have in place: after a space (the
    agentflan and llama2-chat answers, a plain answer with no prompt) or at the start of a
    line (a plain answer after its prompt's blank line)."""
    out = []
    prompt = False
    for m in conv.messages:
        if m.role != "assistant":
            prompt = prompt or bool(m.content.strip())
            continue
        text = m.content.strip()
        if m.trained:
            in_line = template == "plain" and prompt
            out.append((text, bare(tok, text) if in_line else tok.encode(text, allow_special=False)))
        prompt = False
    return out


def check_mask(tok: Tokenizer, conv: Conversation, template: str) -> None:
    """The masked tokens are exactly each trained assistant content plus the turn's closing token."""
    enc = encode_conversation(conv, tok, template)
    assert enc.ids.dtype == np.int32 and enc.loss_mask.dtype == np.uint8
    assert enc.ids.shape == enc.loss_mask.shape and enc.ids.ndim == 1
    assert enc.ids[0] == tok.bos_id
    assert set(np.unique(enc.loss_mask).tolist()) <= {0, 1}
    end = end_id(tok, template)
    trained = trained_texts(conv, template, tok)
    runs = mask_runs(enc.loss_mask)
    assert len(runs) == len(trained), (conv.id, template)
    for run, (text, expected) in zip(runs, trained):
        ids = enc.ids[run].tolist()
        assert ids == expected + [end], (conv.id, template, text)
        assert tok.decode(ids[:-1]) == text
    # Everything left unmasked still carries every system, user and untrained assistant text.
    rest = tok.decode(enc.ids[enc.loss_mask == 0].tolist())
    for msg in conv.messages:
        if not msg.trained:
            assert msg.content.strip() in rest


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_hand_checked_mask_in_every_template(tok: Tokenizer, template: str) -> None:
    check_mask(tok, HAND, template)
    enc = encode_conversation(HAND, tok, template)
    masked = enc.ids[enc.loss_mask == 1].tolist()
    end = end_id(tok, template)
    encode = (lambda t: bare(tok, t)) if template == "plain" else tok.encode  # plain answers start a line
    assert masked == encode(HAND_TRAINED[0]) + [end] + encode(HAND_TRAINED[1]) + [end]
    runs = mask_runs(enc.loss_mask)
    end_text = "<|eot|>" if template == "agentflan" else ""  # EOS is a control id and decodes to nothing
    assert [tok.decode(enc.ids[r].tolist()) for r in runs] == [t + end_text for t in HAND_TRAINED]
    masked_text = tok.decode(masked)
    for text in HAND_UNTRAINED:
        assert text not in masked_text
    # No role marker is a target (the agentflan markers are single pieces in this tokenizer).
    marker_ids = {tok.piece_to_id(p) for p in ("<|System|>:", "<|Human|>:", "<|Assistant|>:")}
    assert not marker_ids & set(masked)


def test_agentflan_hand_checked_ids(tok: Tokenizer) -> None:
    text = ("<|System|>: You can call get_weather(city).\n"
            "<|Human|>: Is it raining in Oslo?\n"
            f"<|Assistant|>: {HAND_TRAINED[0]}<|eot|>\n"
            "<|Human|>: {\"condition\": \"light rain\", \"temperature\": 4}\n"
            "<|Assistant|>: Example answer that must not be learned.<|eot|>\n"
            "<|Human|>: And tomorrow?\n"
            f"<|Assistant|>: {HAND_TRAINED[1]}<|eot|>")
    enc = encode_conversation(HAND, tok, "agentflan")
    # Segment-wise encoding gives the ids of the whole rendered text: no stray dummy prefixes.
    assert enc.ids.tolist() == [tok.bos_id] + strip_dummy_prefix(tok, tok.encode(text))
    assert tok.id_to_piece(int(enc.ids[-1])) == "<|eot|>"


def test_llama2_chat_matches_meta_reference_encoding(tok: Tokenizer) -> None:
    # Meta's reference encodes each exchange as its own string with BOS/EOS ids around it.
    exchanges = [
        f"[INST] <<SYS>>\nYou can call get_weather(city).\n<</SYS>>\n\nIs it raining in Oslo? [/INST] {HAND_TRAINED[0]}",
        "[INST] {\"condition\": \"light rain\", \"temperature\": 4} [/INST] Example answer that must not be learned.",
        f"[INST] And tomorrow? [/INST] {HAND_TRAINED[1]}",
    ]
    expected = [i for ex in exchanges for i in [tok.bos_id] + tok.encode(ex) + [tok.eos_id]]
    assert encode_conversation(HAND, tok, "llama2-chat").ids.tolist() == expected


def test_llama2_chat_merges_consecutive_prompts_and_handles_odd_orders(tok: Tokenizer) -> None:
    conv = make(("user", "first"), ("user", "second"), ("assistant", "one"), ("assistant", "two"),
                ("system", "new rules"), ("user", "third"), ("assistant", "three", False), ("user", "trailing"))
    expected = ([tok.bos_id] + tok.encode("[INST] first\n\nsecond [/INST] one") + [tok.eos_id]
                + [tok.bos_id] + tok.encode("[INST]  [/INST] two") + [tok.eos_id]
                + [tok.bos_id] + tok.encode("[INST] <<SYS>>\nnew rules\n<</SYS>>\n\nthird [/INST] three") + [tok.eos_id]
                + [tok.bos_id] + tok.encode("[INST] trailing [/INST]"))
    enc = encode_conversation(conv, tok, "llama2-chat")
    assert enc.ids.tolist() == expected
    check_mask(tok, conv, "llama2-chat")


def test_agentflan_consecutive_assistants_empty_content_and_trailing_user(tok: Tokenizer) -> None:
    conv = make(("user", "q"), ("assistant", "a"), ("assistant", "   "), ("user", "c"))
    enc = encode_conversation(conv, tok, "agentflan")
    text = "<|Human|>: q\n<|Assistant|>: a<|eot|>\n<|Assistant|>:<|eot|>\n<|Human|>: c"
    assert enc.ids.tolist() == [tok.bos_id] + strip_dummy_prefix(tok, tok.encode(text))
    eot = tok.piece_to_id("<|eot|>")
    # An empty answer still trains its closing token: the model learns to end the turn.
    assert [enc.ids[r].tolist() for r in mask_runs(enc.loss_mask)] == [tok.encode("a") + [eot], [eot]]


def test_random_generated_conversations(tok: Tokenizer, tmp_path: Path) -> None:
    seed = random.SystemRandom().randrange(2**32)
    path = tmp_path / "fresh.jsonl"
    write_corpus(path, n=80, seed=seed)
    convs = list(read_agentflan_jsonl(path))
    assert len(convs) == 80
    for conv in convs:
        for template in TEMPLATES:
            check_mask(tok, conv, template)
        # agentflan: the ids are those of the whole rendered text (segment boundaries are seamless).
        parts = []
        for m in conv.messages:
            marker = {"system": "<|System|>:", "user": "<|Human|>:", "assistant": "<|Assistant|>:"}[m.role]
            body = f"{marker} {m.content.strip()}" if m.content.strip() else marker
            parts.append(body + ("<|eot|>" if m.role == "assistant" else ""))
        enc = encode_conversation(conv, tok, "agentflan")
        assert enc.ids.tolist() == [tok.bos_id] + strip_dummy_prefix(tok, tok.encode("\n".join(parts))), \
            f"seed {seed}, {conv.id}"


def test_tokenizer_without_end_of_turn_piece_closes_agentflan_turns_with_eos(tmp_path: Path) -> None:
    # Like stock Llama-2: no <|eot|> piece and the role markers split into several pieces.
    lines = [f"Thought: step {i}. Action: tool_{i % 7} and more words about weather in Oslo" for i in range(300)]
    model = tmp_path / "plain.model"
    with open(model, "wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=f, model_type="bpe", vocab_size=400, byte_fallback=True,
            add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    plain = Tokenizer(model)
    assert plain.piece_to_id("<|eot|>") == plain.unk_id
    assert agentflan_end_of_turn_id(plain) == plain.eos_id
    assert stop_token_ids(plain, "agentflan") == [plain.eos_id]
    for template in TEMPLATES:
        check_mask(plain, HAND, template)


def test_unknown_template_is_rejected_with_the_known_names(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match=r"unknown chat template 'chatml'.*agentflan.*llama2-chat.*plain"):
        encode_conversation(HAND, tok, "chatml")


def test_plain_hand_checked_ids(tok: Tokenizer) -> None:
    # Each exchange tokenizes as its own string (dummy prefix included) between BOS and EOS.
    exchanges = [
        f"You can call get_weather(city).\n\nIs it raining in Oslo?\n\n{HAND_TRAINED[0]}",
        "{\"condition\": \"light rain\", \"temperature\": 4}\n\nExample answer that must not be learned.",
        f"And tomorrow?\n\n{HAND_TRAINED[1]}",
    ]
    expected = [i for ex in exchanges for i in [tok.bos_id] + tok.encode(ex) + [tok.eos_id]]
    assert encode_conversation(HAND, tok, "plain").ids.tolist() == expected


def test_plain_answer_without_prompt_empty_turns_and_trailing_prompt(tok: Tokenizer) -> None:
    conv = make(("system", "  "), ("assistant", "first"), ("user", ""), ("assistant", "second", True),
                ("user", "q"), ("assistant", " "), ("tool", "obs"), ("user", "tail"))
    expected = ([tok.bos_id] + tok.encode("first") + [tok.eos_id]
                + [tok.bos_id] + tok.encode("second") + [tok.eos_id]
                + [tok.bos_id] + tok.encode("q\n\n") + [tok.eos_id]
                + [tok.bos_id] + tok.encode("obs\n\ntail"))
    enc = encode_conversation(conv, tok, "plain")
    assert enc.ids.tolist() == expected
    check_mask(tok, conv, "plain")
    # The empty answer still trains its EOS.
    assert [enc.ids[r].tolist() for r in mask_runs(enc.loss_mask)] == [
        tok.encode("first") + [tok.eos_id], tok.encode("second") + [tok.eos_id], [tok.eos_id]]


# A ToolBench-style trajectory: tool observations as their own role.
TOOL = make(
    ("system", "You can call get_weather(city)."),
    ("user", "Weather in Oslo?"),
    ("assistant", "\nThought: look it up.\nAction: get_weather\nAction Input: {\"city\": \"Oslo\"}"),
    ("tool", "{\"error\": \"\", \"response\": \"light rain, 4 C\"}", True),
    ("assistant", "It is raining lightly in Oslo, 4 C."),
)


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_tool_observations_render_untrained_in_every_template(tok: Tokenizer, template: str) -> None:
    check_mask(tok, TOOL, template)
    enc = encode_conversation(TOOL, tok, template)
    observation = TOOL.messages[3].content
    assert observation in tok.decode(enc.ids[enc.loss_mask == 0].tolist())
    assert "raining" not in tok.decode(enc.ids[enc.loss_mask == 0].tolist())
    # A tool turn renders exactly like the same text given as a user turn (the Agent-FLAN
    # release writes observations as user turns): the model sees one format for both.
    as_user = make(*[(m.role if m.role != "tool" else "user", m.content, m.loss) for m in TOOL.messages])
    same = encode_conversation(as_user, tok, template)
    assert enc.ids.tolist() == same.ids.tolist() and enc.loss_mask.tolist() == same.loss_mask.tolist()


def test_agentflan_renders_tool_turns_as_human_turns(tok: Tokenizer) -> None:
    text = ("<|System|>: You can call get_weather(city).\n<|Human|>: Weather in Oslo?\n"
            "<|Assistant|>: Thought: look it up.\nAction: get_weather\nAction Input: {\"city\": \"Oslo\"}<|eot|>\n"
            "<|Human|>: {\"error\": \"\", \"response\": \"light rain, 4 C\"}\n"
            "<|Assistant|>: It is raining lightly in Oslo, 4 C.<|eot|>")
    assert encode_conversation(TOOL, tok, "agentflan").ids.tolist() == [tok.bos_id] + strip_dummy_prefix(
        tok, tok.encode(text))


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_batch_encoding_equals_one_by_one(tok: Tokenizer, tmp_path: Path, template: str) -> None:
    seed = random.SystemRandom().randrange(2**32)
    path = tmp_path / "fresh.jsonl"
    write_corpus(path, n=60, seed=seed)
    convs = list(read_agentflan_jsonl(path)) + [HAND, TOOL, make(("user", "only a question"))]
    batch = encode_conversations(convs, tok, template, num_threads=2)
    assert len(batch) == len(convs) and batch.offsets[0] == 0 and batch.offsets[-1] == len(batch.ids)
    for i, conv in enumerate(convs):
        one = encode_conversation(conv, tok, template)
        assert batch[i].ids.tolist() == one.ids.tolist(), f"seed {seed}, {conv.id}"
        assert batch[i].loss_mask.tolist() == one.loss_mask.tolist(), f"seed {seed}, {conv.id}"
    empty = encode_conversations([], tok, template)
    assert len(empty) == 0 and len(empty.ids) == 0


def test_marker_piece_starting_with_a_newline(tmp_path: Path) -> None:
    # A user-defined piece that spans a line break: segments are encoded without a dummy
    # prefix, so nothing needs a newline in front of it, and the ids equal the whole text's.
    lines = ["\nAction: go now\nAction: stop\n" * 3 for _ in range(200)]
    model = tmp_path / "newline_marker.model"
    with open(model, "wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=f, model_type="bpe", vocab_size=280, byte_fallback=True,
            add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
            user_defined_symbols=["\n<|Human|>:"], unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
            minloglevel=2)
    tok = Tokenizer(model)
    marker = tok.piece_to_id("\n<|Human|>:")
    conv = make(("user", "go"), ("assistant", "Action: go"), ("user", "stop \n<|Human|>: now"), ("assistant", "ok"))
    enc = encode_conversation(conv, tok, "agentflan")
    def markup(text: str, allow_special: bool = True) -> list[int]:
        return tok.encode(text, allow_special=allow_special, add_dummy_prefix=False)

    eos = tok.eos_id  # this tokenizer has no <|eot|>
    expected = ([tok.bos_id] + markup("<|Human|>: go\n<|Assistant|>: Action: go") + [eos] + markup("\n<|Human|>:")
                + markup(" stop \n<|Human|>: now", allow_special=False) + markup("\n<|Assistant|>: ok") + [eos])
    assert enc.ids.tolist() == expected
    assert enc.ids.tolist().count(marker) == 1  # the template's, not the one in the content
    check_mask(tok, conv, "agentflan")


# ---------------------------------------------------------------------------- generation prompts


def bundled_sample(seed: int, n: int) -> list[Conversation]:
    convs = list(read_agentflan_jsonl(DEFAULT_CORPUS))
    return random.Random(seed).sample(convs, n)


def answer_points(conv: Conversation) -> list[int]:
    """Indices of the assistant turns that follow a system, user or tool turn."""
    return [k for k, m in enumerate(conv.messages) if m.role == "assistant" and k and conv.messages[k - 1].role != "assistant"]


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_generation_prompt_is_what_training_puts_before_each_answer(tok: Tokenizer, template: str, seed: int) -> None:
    convs = bundled_sample(seed, 25) + [HAND, TOOL]
    stops = stop_token_ids(tok, template)
    checked = 0
    for conv in convs:
        for k in answer_points(conv):
            history = Conversation(conv.id, conv.messages[:k], conv.source, conv.line)
            upto = Conversation(conv.id, conv.messages[: k + 1], conv.source, conv.line)
            prompt = encode_generation_prompt(history, tok, template)
            full = encode_conversation(upto, tok, template).ids
            assert prompt.dtype == np.int32 and prompt.ndim == 1 and prompt[0] == tok.bos_id
            # Training continues the prompt with exactly the answer and its closing id.
            assert full[: len(prompt)].tolist() == prompt.tolist(), (seed, conv.id, k)
            assert int(full[-1]) == stops[0], (seed, conv.id, k)
            assert tok.decode(full[len(prompt):-1].tolist()) == conv.messages[k].content.strip(), (seed, conv.id, k)
            checked += 1
    assert checked >= len(convs)


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_generation_prompts_batch_equals_one_by_one(tok: Tokenizer, template: str, seed: int) -> None:
    histories = []
    for conv in bundled_sample(seed, 20) + [HAND, TOOL]:
        k = random.Random(seed).choice(answer_points(conv))
        histories.append(Conversation(conv.id, conv.messages[:k], conv.source, conv.line))
    ids, offsets = encode_generation_prompts(histories, tok, template, num_threads=2)
    assert ids.dtype == np.int32 and offsets.dtype == np.int64 and len(offsets) == len(histories) + 1
    for i, conv in enumerate(histories):
        assert ids[offsets[i]: offsets[i + 1]].tolist() == encode_generation_prompt(conv, tok, template).tolist()


def test_generation_prompt_hand_checked(tok: Tokenizer) -> None:
    conv = make(("system", "Be brief."), ("user", "Hi?"))
    agentflan = encode_generation_prompt(conv, tok, "agentflan")
    text = "<|System|>: Be brief.\n<|Human|>: Hi?\n<|Assistant|>:"
    assert agentflan.tolist() == [tok.bos_id] + strip_dummy_prefix(tok, tok.encode(text))
    assert encode_generation_prompt(conv, tok, "llama2-chat").tolist() == (
        [tok.bos_id] + tok.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi? [/INST]"))
    assert encode_generation_prompt(conv, tok, "plain").tolist() == [tok.bos_id] + tok.encode("Be brief.\n\nHi?\n\n")
    # Nothing to answer yet but an empty user turn: the answer follows BOS directly.
    assert encode_generation_prompt(make(("user", " ")), tok, "plain").tolist() == [tok.bos_id]


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_generation_prompt_refuses_conversations_without_an_open_turn(tok: Tokenizer, template: str) -> None:
    with pytest.raises(ValueError, match=r"test\.jsonl:1: conversation 'test'.*ends with a system, user or tool turn"):
        encode_generation_prompt(make(("user", "q"), ("assistant", "a")), tok, template)
    with pytest.raises(ValueError, match=r"conversation 'test'.*no turn"):
        encode_generation_prompt(make(), tok, template)
    # A record of a JSON array file is named by its byte offset, as the readers name it.
    in_array = Conversation("c7", make(("user", "q"), ("assistant", "a")).messages, "dump.json", 3, offset=1234)
    with pytest.raises(ValueError, match=r"^dump\.json: byte 1234 \(line 3\): conversation 'c7'"):
        encode_generation_prompt(in_array, tok, template)
    with pytest.raises(ValueError, match="unknown chat template"):
        encode_generation_prompt(make(("user", "q")), tok, template + "-x")


def test_stop_token_ids_and_strings(tok: Tokenizer, tmp_path: Path) -> None:
    eot = tok.piece_to_id("<|eot|>")
    assert eot != tok.unk_id
    assert stop_token_ids(tok, "agentflan") == [eot, tok.eos_id]
    assert stop_token_ids(tok, "llama2-chat") == [tok.eos_id]
    assert stop_token_ids(tok, "plain") == [tok.eos_id]
    assert set(stop_strings("agentflan")) == {"<|eot|>", "<|Human|>:", "<|Assistant|>:", "<|System|>:"}
    assert set(stop_strings("llama2-chat")) == {"[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"}
    assert stop_strings("plain") == ()
    for template in TEMPLATES:
        # The closing id training puts after every answer is the first stop id.
        enc = encode_conversation(HAND, tok, template)
        assert int(enc.ids[-1]) == stop_token_ids(tok, template)[0]
    with pytest.raises(ValueError, match="unknown chat template"):
        stop_token_ids(tok, "chatml")
    with pytest.raises(ValueError, match="unknown chat template"):
        stop_strings("chatml")


# ---------------------------------------------------------------------------- markers in content

# Every marker and control string of every template, near misses, and the same next to
# whitespace (content is stripped, so a marker may end up first or last).
CONTENT_MARKERS = sorted({*stop_strings("agentflan"), *stop_strings("llama2-chat"), "<s>", "</s>", "<unk>", "<pad>",
                          "<|eot|", "<|", "|>:", "[INST", "<<SYS>", "\n<|Human|>:", " <|eot|>\n", "<|eot|><|eot|>",
                          "<s></s>", "[/INST] ", "\n\n<</SYS>>\n\n"})


@pytest.fixture(scope="module")
def llama2_tok() -> Tokenizer:
    """The Llama-2-style production model shipped by mistral_common (32,000 pieces, no user-defined pieces)."""
    return Tokenizer(llama2_tokenizer_path())


@pytest.fixture(scope="module")
def markers_tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """Every template marker a user-defined piece, EOS and BOS included as text pieces' neighbours."""
    lines = [line for conv in itertools.islice(read_agentflan_jsonl(DEFAULT_CORPUS), 400) for m in conv.messages
             for line in m.content.split("\n") if line.strip()]
    model = tmp_path_factory.mktemp("markers") / "markers.model"
    with open(model, "wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=f, model_type="bpe", vocab_size=800, byte_fallback=True,
            add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
            user_defined_symbols=["<|System|>:", "<|Human|>:", "<|Assistant|>:", "<|eot|>", "[INST]", "[/INST]",
                                  "<<SYS>>", "<</SYS>>"],
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    return Tokenizer(model)


def marker_ids(tok: Tokenizer) -> set[int]:
    """Control and user-defined ids: BOS, EOS, unknown and every marker that is one piece."""
    pieces = {*CONTENT_MARKERS, *AGENTFLAN_SPECIAL_PIECES, "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"}
    ids = {tok.piece_to_id(p) for p in pieces} | {tok.bos_id, tok.eos_id, tok.unk_id}
    return ids - {-1}


def inject(rng: random.Random, text: str) -> str:
    for _ in range(rng.randint(1, 4)):
        at = rng.choice([0, len(text), rng.randint(0, len(text))])
        text = text[:at] + rng.choice(CONTENT_MARKERS) + text[at:]
    return text


def injected(conv: Conversation, rng: random.Random) -> Conversation:
    msgs = [Message(m.role, inject(rng, m.content), m.loss) for m in conv.messages]
    return Conversation(conv.id, msgs, conv.source, conv.line)


def scrubbed(conv: Conversation) -> Conversation:
    """The same turns with marker-free content of the same emptiness."""
    msgs = [Message(m.role, "text" if m.content.strip() else "", m.loss) for m in conv.messages]
    return Conversation(conv.id, msgs, conv.source, conv.line)


@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("which", ["bundled", "llama2", "markers"])
def test_content_never_becomes_a_marker_or_control_id(which: str, template: str, request: pytest.FixtureRequest,
                                                      seed: int) -> None:
    tok = request.getfixturevalue({"bundled": "tok", "llama2": "llama2_tok", "markers": "markers_tok"}[which])
    rng = random.Random(seed)
    convs = [injected(c, rng) for c in bundled_sample(seed, 30)] + [injected(HAND, rng), injected(TOOL, rng)]
    convs.append(make(("user", "What does <|eot|> do?"), ("assistant", "It ends a turn: <|eot|>. Then <|Human|>: asks.")))
    special = marker_ids(tok)
    batch = encode_conversations(convs, tok, template, num_threads=2)
    for i, conv in enumerate(convs):
        enc = batch[i]
        # The template alone places marker and control ids: the same ones, in the same
        # order, as for marker-free content.
        skeleton = encode_conversation(scrubbed(conv), tok, template).ids
        got = [int(t) for t in enc.ids if t in special]
        assert got == [int(t) for t in skeleton if t in special], (seed, conv.id)
        # Trained spans: the answer's ids in content mode, its closing id, and its exact text.
        check_mask(tok, conv, template)
        for run in mask_runs(enc.loss_mask):
            assert not special & set(enc.ids[run][:-1].tolist()), (seed, conv.id)
        # Generation prompts follow the same rule.
        k = answer_points(conv)[-1]
        prompt = encode_generation_prompt(Conversation(conv.id, conv.messages[:k], conv.source, conv.line), tok, template)
        assert prompt.tolist() == enc.ids[: len(prompt)].tolist(), (seed, conv.id)


def test_markers_in_content_stay_text(tok: Tokenizer) -> None:
    conv = make(("user", "What does <|eot|> do?"), ("assistant", "<|Human|>: is a turn start."))
    enc = encode_conversation(conv, tok, "agentflan")
    eot, human = tok.piece_to_id("<|eot|>"), tok.piece_to_id("<|Human|>:")
    ids = enc.ids.tolist()
    assert ids.count(eot) == 1 and ids[-1] == eot  # only the template's closing id
    assert ids.count(human) == 1 and ids[1] == human  # only the template's turn marker
    assert tok.decode(ids) == "<|Human|>: What does <|eot|> do?\n<|Assistant|>: <|Human|>: is a turn start.<|eot|>"
    trained = enc.ids[enc.loss_mask == 1].tolist()
    assert trained == tok.encode("<|Human|>: is a turn start.", allow_special=False) + [eot]
