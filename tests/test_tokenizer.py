"""The C++ BPE tokenizer (agentflan._C.BpeTokenizer, behind agentflan.tokenizer.Tokenizer)
must return exactly what sentencepiece returns: the ids of encode, the text of decode, the
normalized text and the special ids.

sentencepiece is the reference here and nowhere else; agentflan never imports it at run
time. Models compared:
  * mistral:  the Llama-2-like production model from the mistral_common package (BPE, byte
              fallback, 32,000 pieces, identity normalization, "▁▁▁▁" indentation pieces);
  * bundled:  agentflan/assets/tokenizer.model (user-defined pieces, byte fallback);
  * nfkc:     trained here with the nmt_nfkc charsmap and whitespace folding;
  * nfkc_cf:  trained here with nmt_nfkc_cf, no byte fallback (runs of unknown characters
              collapse into one <unk>), whitespace as suffix and user-defined pieces,
              one of them containing a space.
Random inputs use a fresh seed on every run; failures print it.
"""

from __future__ import annotations

import gc
import io
import itertools
import os
import random
import re
import secrets
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

spm = pytest.importorskip("sentencepiece", reason="sentencepiece is the reference implementation these tests compare against")


from reference_models import llama2_tokenizer_path  # noqa: E402
from agentflan._C import BpeTokenizer  # noqa: E402
from agentflan.data.conversation import read_agentflan_jsonl  # noqa: E402
from agentflan.data.defaults import DEFAULT_CORPUS, DEFAULT_TOKENIZER  # noqa: E402
from agentflan.tokenizer import Tokenizer  # noqa: E402

MODELS = ["mistral", "bundled", "nfkc", "nfkc_cf"]

MULTILINGUAL = [
    "Größere Straßen führen über die Brücke nach Zürich.",
    "Ça coûte très cher, n'est-ce pas ? Déjà vu.",
    "東京は日本の首都です。今日は良い天気ですね。",
    "我们今天去公园散步，然后吃晚饭。",
    "Москва — столица России, а Киев — Украины.",
    "한국어 문장도 조금 넣어 둡니다.",
    "ＦＵＬＬＷＩＤＴＨ　ｔｅｘｔ　１２３ and ﬁne ligatures ½ ①",
    "Emoji 🙂👍🏽 and 🇺🇸 flags.",
] * 40

ADVERSARIAL = [
    "", " ", "  ", "a", " a", "a ", "   leading", "trailing   ", "   both   ",
    "\t", "\t\tx", "\n", "\n\n\n", " \n \n ", "\r\n", "x\n\ny", "a  b   c    d", " " * 17 + "x", "x" + " " * 33,
    "    def f(x):\n        return x + 1\n\n\tif y:\n\t\tpass\n",
    "\u2581", "\u2581\u2581x", " \u2581 ", "x\u2581",
    "🙂", "👍🏽", "👨\u200d👩\u200d👧", "🇺🇸🇯🇵", "日本語のテキストです。", "中文 测试", "한국어",
    "e\u0301", "a\u0308\u0304", "\u0301leading combining mark", "Z\u0337\u0322a\u0338l\u0336g\u0334o\u0335",
    "\x00", "a\x00b", "\x01\x02\x1f\x7f", "\x1b[31mred\x1b[0m", "\u200b\u200c\u200d\ufeff", "\u2028\u2029\x85",
    "\U0010ffff", "\ue000", "\U0001f9ec", "\ua66e", "𓀀𓁐", "\ufffd", "\ufffd\ufffd x",
    "ＡＢＣ１２３", "ﬁﬂ", "①②", "㎏㎡", "Ⅻ", "\u3000ideographic space\u3000", "½", "x y", "x  y",
    "1234567890", "3.14159", "<s>", "</s>", "<unk>", "<0x41>", "<tool>", "<tool><tool>x",
    "<|Human|>:", "<|eot|>", "<|System|>: hi<|Assistant|>:ok<|eot|>", "<|eot|><|eot|>",
    "a" * 5000, "ab " * 2000, "\u2581" * 40, " \t" * 50,
]

SPECIAL_SNIPPETS = ["\u2581", "<s>", "</s>", "<unk>", "<tool>", "x y", "<|eot|>", "<|Human|>:", "\ufffd",
                    "\u3000", "ﬁ", "\u200b", "\r\n", "    ", "\t\t"]


def random_text(rng: random.Random) -> str:
    """Mixed scripts, whitespace runs, combining marks, control characters and arbitrary
    code points (surrogates excluded: they cannot be UTF-8 encoded)."""
    parts = []
    for _ in range(rng.randint(0, 40)):
        kind = rng.random()
        if kind < 0.3:
            parts.append(rng.choice("abcdefXYZ0123456789 .,;:!?'\"-_()[]{}\t\n"))
        elif kind < 0.38:
            parts.append(" " * rng.randint(2, 9))
        elif kind < 0.46:
            parts.append(chr(rng.randint(0x300, 0x36F)))
        elif kind < 0.54:
            parts.append(chr(rng.randint(0x4E00, 0x9FFF)))
        elif kind < 0.62:
            parts.append(chr(rng.randint(0x1F300, 0x1FAFF)))
        elif kind < 0.68:
            parts.append(chr(rng.randint(0, 0x1F)))
        elif kind < 0.8:
            parts.append(rng.choice(SPECIAL_SNIPPETS))
        else:
            cp = rng.randint(0x80, 0x10FFFF)
            parts.append(chr(cp - 0x800 if 0xD800 <= cp <= 0xDFFF else cp))
    return "".join(parts)


def fresh_seed() -> int:
    return secrets.randbits(32)


# ---------------------------------------------------------------------------- models


def _train(path: Path, lines: list[str], **options: object) -> Path:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, num_threads=1,
                                   minloglevel=2, **options)
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture(scope="module")
def training_lines() -> list[str]:
    corpus = [line for conv in read_agentflan_jsonl(DEFAULT_CORPUS) for msg in conv.messages
              for line in msg.content.split("\n") if line.strip()]
    return corpus[:15000] + MULTILINGUAL


@pytest.fixture(scope="module")
def mistral_model() -> Path:
    return llama2_tokenizer_path()


@pytest.fixture(scope="module")
def bundled_model() -> Path:
    return DEFAULT_TOKENIZER


@pytest.fixture(scope="module")
def nfkc_model(tmp_path_factory: pytest.TempPathFactory, training_lines: list[str]) -> Path:
    return _train(tmp_path_factory.mktemp("nfkc") / "nfkc.model", training_lines, model_type="bpe",
                  vocab_size=1500, normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=True,
                  byte_fallback=True)


@pytest.fixture(scope="module")
def nfkc_cf_model(tmp_path_factory: pytest.TempPathFactory, training_lines: list[str]) -> Path:
    return _train(tmp_path_factory.mktemp("nfkc_cf") / "nfkc_cf.model", training_lines, model_type="bpe",
                  vocab_size=1500, normalization_rule_name="nmt_nfkc_cf", remove_extra_whitespaces=True,
                  byte_fallback=False, character_coverage=0.999, treat_whitespace_as_suffix=True,
                  user_defined_symbols=["<tool>", "x y"])


@pytest.fixture(scope="module", params=MODELS)
def pair(request: pytest.FixtureRequest) -> tuple[str, spm.SentencePieceProcessor, BpeTokenizer]:
    path = request.getfixturevalue(f"{request.param}_model")
    return request.param, spm.SentencePieceProcessor(model_file=str(path)), BpeTokenizer(str(path))


# ---------------------------------------------------------------------------- helpers


def assert_same(name: str, texts: list[str], ref: Callable[[str], object], ours: Callable[[str], object],
                what: str, note: str = "") -> None:
    bad = [t for t in texts if ref(t) != ours(t)]
    if bad:
        first = bad[0]
        raise AssertionError(
            f"{name}: {what} differs from sentencepiece on {len(bad)} of {len(texts)} inputs{note}; first "
            f"{first[:120]!r}:\n  sentencepiece {str(ref(first))[:300]}\n  ours          {str(ours(first))[:300]}")


def assert_exact(name: str, sp: spm.SentencePieceProcessor, ours: BpeTokenizer, texts: list[str],
                 note: str = "") -> None:
    assert_same(name, texts, sp.normalize, ours.normalize, "normalize", note)
    assert_same(name, texts, sp.encode, ours.encode, "encode", note)
    assert_same(name, texts, lambda t: sp.decode(sp.encode(t)), lambda t: ours.decode(sp.encode(t)),
                "decode(encode)", note)


# ---------------------------------------------------------------------------- exactness


def test_adversarial_strings(pair: tuple[str, spm.SentencePieceProcessor, BpeTokenizer]) -> None:
    name, sp, ours = pair
    assert_exact(name, sp, ours, ADVERSARIAL)


def test_random_unicode_strings(pair: tuple[str, spm.SentencePieceProcessor, BpeTokenizer]) -> None:
    name, sp, ours = pair
    seed = fresh_seed()
    rng = random.Random(seed)
    assert_exact(name, sp, ours, [random_text(rng) for _ in range(3000)], f" (seed {seed})")


def test_sharegpt_sample(pair: tuple[str, spm.SentencePieceProcessor, BpeTokenizer], turns: tuple[str, ...]) -> None:
    name, sp, ours = pair
    seed = fresh_seed()
    sample = random.Random(seed).sample(turns, 1500)
    assert_exact(name, sp, ours, sample, f" (ShareGPT sample, seed {seed})")


@pytest.mark.parametrize("model", ["mistral", "bundled"])
def test_one_megabyte_single_word(model: str, request: pytest.FixtureRequest) -> None:
    path = str(request.getfixturevalue(f"{model}_model"))
    sp, ours = spm.SentencePieceProcessor(model_file=path), BpeTokenizer(path)
    word = ("antidisestablishmentarianism" * 40000)[:1 << 20]
    spaces = " " * (1 << 20)
    for text in (word, spaces, "x" + spaces + "y"):
        assert ours.encode(text) == sp.encode(text), f"{model}: {len(text)}-character text starting {text[:20]!r}"


def test_decode_of_random_ids(pair: tuple[str, spm.SentencePieceProcessor, BpeTokenizer]) -> None:
    """Random id sequences, rich in byte pieces (valid, truncated and stray UTF-8),
    control, unknown and user-defined pieces and pieces with a leading "▁"."""
    name, sp, ours = pair
    seed = fresh_seed()
    rng = random.Random(seed)
    n = sp.get_piece_size()
    byte_ids = [i for i in range(n) if sp.is_byte(i)]
    special_ids = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    special_ids += [sp.piece_to_id(p) for p in ("<tool>", "x y", "<|eot|>", "<|Human|>:", "\u2581", "\u2581\u2581")]
    utf8 = "é中🙂".encode()
    sequences = []
    for _ in range(3000):
        seq = []
        for _ in range(rng.randint(0, 12)):
            r = rng.random()
            if r < 0.25 and byte_ids:
                seq.append(rng.choice(byte_ids))
            elif r < 0.35 and byte_ids:  # a (possibly cut) real UTF-8 character
                start = rng.randrange(len(utf8))
                seq.extend(sp.piece_to_id(f"<0x{b:02X}>") for b in utf8[start:start + rng.randint(1, 4)])
            elif r < 0.5:
                seq.append(rng.choice(special_ids))
            else:
                seq.append(rng.randrange(n))
        sequences.append(seq)
    bad = [s for s in sequences if sp.decode(s) != ours.decode(s)]
    assert not bad, (f"{name}: decode differs on {len(bad)} of {len(sequences)} id sequences (seed {seed}); "
                     f"first {bad[0]}: {sp.decode(bad[0])!r} vs {ours.decode(bad[0])!r}")


def test_special_ids_and_piece_lookup(pair: tuple[str, spm.SentencePieceProcessor, BpeTokenizer]) -> None:
    name, sp, ours = pair
    assert (ours.vocab_size, ours.unk_id, ours.bos_id, ours.eos_id, ours.pad_id) == (
        sp.get_piece_size(), sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()), name
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert [ours.id_to_piece(i) for i in range(ours.vocab_size)] == pieces, name
    probes = pieces + ["", "no such piece", "<pad>", "\u2581\u2581\u2581\u2581\u2581\u2581\u2581\u2581\u2581x"]
    assert [ours.piece_to_id(p) for p in probes] == [sp.piece_to_id(p) for p in probes], name


@pytest.mark.parametrize("model", MODELS)
def test_model_spec_matches_the_file(model: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(f"{model}_model")
    sp, spec = spm.SentencePieceProcessor(model_file=str(path)), Tokenizer(path).model_spec()
    n = sp.get_piece_size()
    assert spec.pieces == [sp.id_to_piece(i) for i in range(n)]
    assert spec.scores == [sp.get_score(i) for i in range(n)]
    assert spec.types == piece_types(path)  # read from the protobuf fields directly
    assert spec.byte_fallback == any(sp.is_byte(i) for i in range(n))
    expected = {"mistral": ("identity", False, False), "bundled": ("identity", False, False),
                "nfkc": ("nmt_nfkc", True, False), "nfkc_cf": ("nmt_nfkc_cf", True, True)}[model]
    assert (spec.normalizer_name, spec.remove_extra_whitespaces, spec.treat_whitespace_as_suffix) == expected
    assert spec.has_charsmap == (model in ("nfkc", "nfkc_cf")) and spec.add_dummy_prefix and spec.escape_whitespaces


def test_production_models_take_the_segmented_fast_path(mistral_model: Path, bundled_model: Path) -> None:
    # Neither has UNUSED pieces, so encoding splits into cached segments.
    assert BpeTokenizer(str(mistral_model)).segmented
    assert BpeTokenizer(str(bundled_model)).segmented


# ---------------------------------------------------------------------------- batch and threads


def test_encode_batch_equals_encode(pair: tuple[str, spm.SentencePieceProcessor, BpeTokenizer]) -> None:
    name, _, ours = pair
    seed = fresh_seed()
    rng = random.Random(seed)
    texts = ADVERSARIAL + [random_text(rng) for _ in range(500)] + ["", "", "x"]
    rng.shuffle(texts)
    expected = [ours.encode(t) for t in texts]
    for threads in (1, 2, 0):
        ids, offsets = ours.encode_batch(texts, num_threads=threads)
        assert ids.dtype == np.int32 and offsets.dtype == np.int64 and offsets.shape == (len(texts) + 1,)
        got = [ids[offsets[i]:offsets[i + 1]].tolist() for i in range(len(texts))]
        assert got == expected, f"{name}: encode_batch with {threads} threads differs from encode (seed {seed})"
    ids, offsets = ours.encode_batch([], num_threads=2)
    assert ids.shape == (0,) and offsets.tolist() == [0]


def test_encode_batch_over_many_work_units(mistral_model: Path, turns: tuple[str, ...]) -> None:
    # Several megabytes, so both threads take many work units and their caches warm up.
    tok = Tokenizer(mistral_model)
    texts = list(turns[:3000])
    ids1, off1 = tok.encode_batch(texts, num_threads=1)
    ids2, off2 = tok.encode_batch(texts, num_threads=2)
    assert np.array_equal(off1, off2) and np.array_equal(ids1, ids2)
    for i in random.Random(0).sample(range(len(texts)), 200):
        assert ids1[off1[i]:off1[i + 1]].tolist() == tok.encode(texts[i])
    # The arrays own their memory: they outlive the tokenizer.
    expected = ids2.copy()
    del tok
    gc.collect()
    assert np.array_equal(ids2, expected)


def test_concurrent_python_threads_share_one_tokenizer(bundled_model: Path) -> None:
    tok = Tokenizer(bundled_model)
    seed = fresh_seed()
    rng = random.Random(seed)
    texts = [random_text(rng) for _ in range(400)]
    expected = [tok.encode(t) for t in texts]
    results: dict[int, list[list[int]]] = {}

    def work(k: int) -> None:
        results[k] = [tok.encode(t) for t in texts] + [tok.encode_batch(texts, 2)[0].tolist()]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [i for ids in expected for i in ids]
    for k in range(4):
        assert results[k][:-1] == expected and results[k][-1] == flat, f"thread {k} (seed {seed})"


def test_batch_input_errors(bundled_model: Path) -> None:
    tok = Tokenizer(bundled_model)
    with pytest.raises(TypeError, match=r"texts\[1\] must be str, got bytes"):
        tok.encode_batch(["ok", b"bytes"])
    with pytest.raises(TypeError, match="sequence of str, not a single string"):
        tok.encode_batch("abc")
    with pytest.raises(ValueError, match="num_threads must be >= 0"):
        tok.encode_batch(["ok"], num_threads=-1)
    with pytest.raises(TypeError, match="text must be str"):
        tok.encode(b"bytes")


# ---------------------------------------------------------------------------- content mode

USER_DEFINED, CONTROL = 4, 3

# Every marker and control string of every chat template, and near misses of them.
MARKERS = ["<s>", "</s>", "<unk>", "<pad>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<|eot|>", "<|Human|>:",
           "<|Assistant|>:", "<|System|>:", "<tool>", "x y", "<|eot|", "<|", "|>:", "<<SYS>", "[INST"]


def with_markers(rng: random.Random, text: str, markers: list[str]) -> str:
    """`text` with 1-6 markers inserted at random character positions."""
    for _ in range(rng.randint(1, 6)):
        at = rng.randint(0, len(text))
        text = text[:at] + rng.choice(markers) + text[at:]
    return text


def content_reference(path: Path, tmp_path: Path) -> spm.SentencePieceProcessor:
    """sentencepiece on `path` with its user-defined pieces retyped as control pieces, which
    it never matches in text: the reference for encode(..., allow_special=False)."""
    out = tmp_path / f"{path.stem}.content.model"
    out.write_bytes(_retyped(path.read_bytes(), lambda i, text, t: CONTROL if t == USER_DEFINED else t))
    return spm.SentencePieceProcessor(model_file=str(out))


def without_dummy_prefix(model: bytes) -> bytes:
    """`model` with normalizer_spec.add_dummy_prefix set to false (ModelProto field 3,
    NormalizerSpec field 3; of a repeated scalar field the last value wins)."""
    out = bytearray()
    for number, raw, body in _fields(model):
        if number == 3:
            body += b"\x18\x00"
            raw = b"\x1a" + _encode_varint(len(body)) + body
        out += raw
    return bytes(out)


@pytest.mark.parametrize("model", MODELS + ["markers"])
def test_encoding_without_dummy_prefix_matches_sentencepiece(
        model: str, request: pytest.FixtureRequest, tmp_path: Path, turns: tuple[str, ...]) -> None:
    """add_dummy_prefix=False is sentencepiece on the model with add_dummy_prefix off, in
    both modes."""
    path = request.getfixturevalue(f"{model}_model")
    ours = BpeTokenizer(str(path))
    plain = tmp_path / "no_prefix.model"
    plain.write_bytes(without_dummy_prefix(path.read_bytes()))
    ref, ref_content = spm.SentencePieceProcessor(model_file=str(plain)), content_reference(plain, tmp_path)
    seed = fresh_seed()
    rng = random.Random(seed)
    texts = ADVERSARIAL + [with_markers(rng, random_text(rng), MARKERS) for _ in range(1000)] + rng.sample(turns, 200)
    note = f" (no dummy prefix, seed {seed})"
    for allow, sp in ((True, ref), (False, ref_content)):
        assert_same(model, texts, sp.normalize, lambda t: ours.normalize(t, allow_special=allow, add_dummy_prefix=False),
                    "normalize", note)
        assert_same(model, texts, sp.encode, lambda t: ours.encode(t, allow_special=allow, add_dummy_prefix=False),
                    "encode", note)
        ids, offsets = ours.encode_batch(texts, 2, allow_special=allow, add_dummy_prefix=False)
        assert [ids[offsets[i]:offsets[i + 1]].tolist() for i in range(len(texts))] == [sp.encode(t) for t in texts]
    # The switch matters: with the prefix, "hello" starts with a "▁" piece.
    assert ours.encode("hello") != ours.encode("hello", add_dummy_prefix=False)


@pytest.fixture(scope="module")
def markers_model(tmp_path_factory: pytest.TempPathFactory, training_lines: list[str]) -> Path:
    """Llama-2 settings with every template marker as a user-defined piece."""
    return _train(tmp_path_factory.mktemp("markers") / "markers.model", training_lines[:6000], model_type="bpe",
                  vocab_size=1200, byte_fallback=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
                  normalization_rule_name="identity",
                  user_defined_symbols=["<|System|>:", "<|Human|>:", "<|Assistant|>:", "<|eot|>", "[INST]",
                                        "[/INST]", "<<SYS>>", "<</SYS>>", "<|"])


def piece_types(path: Path) -> list[int]:
    """The type of every piece of the model at `path` (1 normal, 2 unknown, 3 control,
    4 user-defined, 5 unused, 6 byte)."""
    types: list[int] = []
    _retyped(path.read_bytes(), lambda i, text, t: types.append(t) or t)
    return types


@pytest.mark.parametrize("model", MODELS + ["markers"])
def test_content_mode_matches_sentencepiece_without_user_defined_pieces(
        model: str, request: pytest.FixtureRequest, tmp_path: Path, turns: tuple[str, ...]) -> None:
    """allow_special=False is sentencepiece on the model whose user-defined pieces became
    control pieces: normalize, encode and decode, on text full of markers."""
    path = request.getfixturevalue(f"{model}_model")
    ref, ours = content_reference(path, tmp_path), BpeTokenizer(str(path))
    seed = fresh_seed()
    rng = random.Random(seed)
    texts = ADVERSARIAL + [with_markers(rng, random_text(rng), MARKERS) for _ in range(1500)]
    texts += [with_markers(rng, t, MARKERS) for t in rng.sample(turns, 300)]
    note = f" (content mode, seed {seed})"
    assert_same(model, texts, ref.normalize, lambda t: ours.normalize(t, allow_special=False), "normalize", note)
    assert_same(model, texts, ref.encode, lambda t: ours.encode(t, allow_special=False), "encode", note)
    ids, offsets = ours.encode_batch(texts, 2, allow_special=False)
    assert [ids[offsets[i]:offsets[i + 1]].tolist() for i in range(len(texts))] == [ref.encode(t) for t in texts]


@pytest.mark.parametrize("model", MODELS + ["markers"])
def test_content_mode_never_yields_a_control_or_user_defined_id(
        model: str, request: pytest.FixtureRequest, turns: tuple[str, ...]) -> None:
    path = request.getfixturevalue(f"{model}_model")
    sp, ours = spm.SentencePieceProcessor(model_file=str(path)), BpeTokenizer(str(path))
    types = piece_types(path)
    forbidden = {i for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED)}
    assert {i for i in range(sp.get_piece_size()) if sp.is_control(i)} <= forbidden
    user = [sp.id_to_piece(i) for i, t in enumerate(types) if t == USER_DEFINED]
    markers = MARKERS + user
    seed = fresh_seed()
    rng = random.Random(seed)
    texts = [with_markers(rng, random_text(rng), markers) for _ in range(1500)]
    texts += [with_markers(rng, t, markers) for t in rng.sample(turns, 300)]
    identity = model in ("mistral", "bundled", "markers")
    for text in texts:
        ids = ours.encode(text, allow_special=False)
        assert not forbidden & set(ids), f"{model}: {text[:80]!r} (seed {seed})"
        if identity:  # no normalization: the content comes back exactly (U+2581 reads as a space)
            assert ours.decode(ids) == text.replace("\u2581", " "), f"{model}: {text[:80]!r} (seed {seed})"
    if user:  # the normal mode does match them, so the test above could fail
        assert any(forbidden & set(ours.encode(t)) for t in texts)


def test_both_modes_share_one_tokenizer_and_its_cache(bundled_model: Path) -> None:
    """Calls in either mode, in any order and from threads, give each mode's own answer."""
    seed = fresh_seed()
    rng = random.Random(seed)
    texts = [with_markers(rng, random_text(rng), MARKERS) for _ in range(400)]
    only_special, only_content = BpeTokenizer(str(bundled_model)), BpeTokenizer(str(bundled_model))
    expected = {True: [only_special.encode(t) for t in texts],
                False: [only_content.encode(t, allow_special=False) for t in texts]}
    assert expected[True] != expected[False]
    mixed = BpeTokenizer(str(bundled_model))
    for i in rng.sample(range(len(texts)), len(texts)):
        mode = rng.random() < 0.5
        assert mixed.encode(texts[i], allow_special=mode) == expected[mode][i], f"seed {seed}"
    for mode in (False, True, False):
        ids, offsets = mixed.encode_batch(texts, 2, allow_special=mode)
        assert [ids[offsets[i]:offsets[i + 1]].tolist() for i in range(len(texts))] == expected[mode], f"seed {seed}"


def test_one_character_user_defined_piece_in_content(tmp_path: Path, training_lines: list[str]) -> None:
    path = _train(tmp_path / "section.model", [line + " § 12" for line in training_lines[:3000]], model_type="bpe",
                  vocab_size=600, byte_fallback=True, normalization_rule_name="identity",
                  remove_extra_whitespaces=False, user_defined_symbols=["§", "<|eot|>"])
    sp, ours = spm.SentencePieceProcessor(model_file=str(path)), BpeTokenizer(str(path))
    section, eot = sp.piece_to_id("§"), sp.piece_to_id("<|eot|>")
    texts = ["§", "a§b", " §§ <|eot|>§", "§<|eot|>", "x § y"] + ADVERSARIAL
    assert_exact("one-character user-defined piece", sp, ours, texts)
    assert section in ours.encode("a § b")
    for text in texts:
        ids = ours.encode(text, allow_special=False)
        assert section not in ids and eot not in ids, text
        assert ours.decode(ids) == text.replace("\u2581", " "), text
    # The character falls back to its UTF-8 bytes.
    assert ours.encode("§", allow_special=False)[-2:] == [sp.piece_to_id(f"<0x{b:02X}>") for b in "§".encode()]


# ---------------------------------------------------------------------------- model variants


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _fields(buf: bytes) -> list[tuple[int, bytes, bytes]]:
    """The protobuf fields of `buf`: (field number, raw bytes, payload)."""
    out, i = [], 0
    while i < len(buf):
        key, j = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            k = _varint(buf, j)[1]
            body = buf[j:k]
        elif wire == 2:
            length, j = _varint(buf, j)
            k = j + length
            body = buf[j:k]
        else:
            assert wire in (1, 5), f"unexpected wire type {wire}"
            k = j + (8 if wire == 1 else 4)
            body = buf[j:k]
        out.append((key >> 3, buf[i:k], body))
        i = k
    return out


def _retyped(model: bytes, choose: Callable[[int, bytes, int], int]) -> bytes:
    """`model` with each piece's type replaced by choose(index, piece, type) (protobuf wire
    format edited in place: ModelProto.pieces = 1, SentencePiece.type = 3)."""
    result, index = bytearray(), 0
    for number, raw, body in _fields(model):
        if number != 1:
            result += raw
            continue
        sub = _fields(body)
        old_type = next((_varint(b, 0)[0] for n, _, b in sub if n == 3), 1)
        text = next(b for n, _, b in sub if n == 1)
        piece = b"".join(r for n, r, _ in sub if n != 3) + b"\x18" + _encode_varint(choose(index, text, old_type))
        result += b"\x0a" + _encode_varint(len(piece)) + piece
        index += 1
    return bytes(result)


@pytest.mark.parametrize("model", ["bundled", "nfkc_cf"])
def test_unused_pieces_are_split_back_like_sentencepiece(model: str, request: pytest.FixtureRequest,
                                                         tmp_path: Path) -> None:
    """UNUSED pieces may be merged and are then split back along the pair SentencePiece last
    proposed for them; unmerged ones (single characters) count as unknown. The tokenizer
    falls back to whole-text BPE for such models."""
    base_path = request.getfixturevalue(f"{model}_model")
    seed = fresh_seed()
    rng = random.Random(seed)
    normal, unused = 1, 5
    data = _retyped(base_path.read_bytes(), lambda i, text, t: unused if t == normal and rng.random() < 0.3 else t)
    path = tmp_path / "unused.model"
    path.write_bytes(data)
    sp, ours, base = (spm.SentencePieceProcessor(model_file=str(path)), BpeTokenizer(str(path)),
                      BpeTokenizer(str(base_path)))
    assert not ours.segmented
    texts = [line for conv in itertools.islice(read_agentflan_jsonl(DEFAULT_CORPUS), 150)
             for msg in conv.messages for line in msg.content.split("\n")]
    texts += ADVERSARIAL + [random_text(rng) for _ in range(300)]
    assert_exact(f"{model} with unused pieces", sp, ours, texts, f" (seed {seed})")
    # Content mode on the whole-text path: user-defined pieces retyped as control pieces.
    content_ref = content_reference(path, tmp_path)
    marked = [with_markers(rng, t, MARKERS) for t in texts]
    assert_same(f"{model} with unused pieces", marked, content_ref.encode,
                lambda t: ours.encode(t, allow_special=False), "encode", f" (content mode, seed {seed})")
    # The resegmentation path really ran: unused pieces changed some encodings.
    assert any(ours.encode(t) != base.encode(t) for t in texts)


def test_denormalizer_is_applied_on_decode(tmp_path: Path, training_lines: list[str]) -> None:
    rules = tmp_path / "denormalize.tsv"
    rules.write_text("61\t41\n")  # a -> A
    path = _train(tmp_path / "denorm.model", training_lines[:3000], model_type="bpe", vocab_size=500,
                  denormalization_rule_tsv=str(rules))
    sp, ours = spm.SentencePieceProcessor(model_file=str(path)), BpeTokenizer(str(path))
    texts = ["a banana", "plain text", "ＡＢＣ a"] + training_lines[:200]
    assert_exact("denormalizer", sp, ours, texts)
    assert ours.decode(ours.encode("a banana")) == "A bAnAnA"


# ---------------------------------------------------------------------------- bad models


@pytest.mark.parametrize("model_type", ["unigram", "word", "char"])
def test_non_bpe_models_are_rejected(model_type: str, tmp_path: Path, training_lines: list[str]) -> None:
    path = _train(tmp_path / f"{model_type}.model", training_lines[:3000], model_type=model_type,
                  vocab_size=300, **({"use_all_vocab": True, "hard_vocab_limit": False} if model_type == "word" else {}))
    with pytest.raises(ValueError, match=re.escape(str(path)) + f".*model type is {model_type.upper()}; only BPE"):
        BpeTokenizer(str(path))
    with pytest.raises(ValueError, match=model_type.upper()):
        Tokenizer(path)


def test_corrupt_files_are_rejected(tmp_path: Path, bundled_model: Path) -> None:
    good = bundled_model.read_bytes()
    cases = {
        "empty": (b"", "the file is empty"),
        "garbage": (b"this is not a sentencepiece model", "not a valid SentencePiece model"),
        "cut_mid_piece": (good[:1001], "runs past the end"),
        "bad_wire_type": (b"\x0f\x00", "invalid wire type"),
        "no_pieces": (b"\x12\x02\x18\x02", "has no pieces"),
    }
    # Cut right after a piece: valid protobuf without a trainer_spec.
    first_len = good[1] + 2
    cases["cut_after_piece"] = (good[:first_len], "no trainer_spec.*truncated")
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name}.model"
        path.write_bytes(data)
        with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + message):
            Tokenizer(path)
    with pytest.raises(FileNotFoundError, match="missing.model"):
        Tokenizer(tmp_path / "missing.model")


# ---------------------------------------------------------------------------- the Python wrapper


def test_wrapper_matches_sentencepiece_interface(mistral_model: Path) -> None:
    sp, tok = spm.SentencePieceProcessor(model_file=str(mistral_model)), Tokenizer(mistral_model)
    text = "Hello  world,\n\tthis is 🦜 ü"
    ids = tok.encode(text)
    assert ids == sp.encode(text) and all(type(i) is int for i in ids)
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id, tok.vocab_size) == (1, 2, 0, -1, 32000)
    for form in (ids, tuple(ids), np.asarray(ids, dtype=np.int32), iter(ids)):
        assert tok.decode(form) == sp.decode(ids) == text
    assert tok.decode([]) == ""
    with pytest.raises(IndexError, match="outside the vocabulary"):
        tok.decode([5, 32000])
    with pytest.raises(IndexError, match="outside the vocabulary"):
        tok.decode([-1])
    with pytest.raises(IndexError, match="outside the vocabulary"):
        tok.id_to_piece(-1)


def test_sentencepiece_is_not_imported_at_run_time() -> None:
    code = (
        "import sys\n"
        "sys.modules['sentencepiece'] = None  # any import of it now fails\n"
        "from agentflan.tokenizer import Tokenizer\n"
        "import agentflan.data.dataset, agentflan.data.templates\n"
        "from agentflan.data.defaults import DEFAULT_TOKENIZER\n"
        "tok = Tokenizer(DEFAULT_TOKENIZER)\n"
        "assert tok.decode(tok.encode('hello world')) == 'hello world'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------- whole corpus


@pytest.mark.slow
def test_whole_sharegpt_corpus_on_the_production_model(mistral_model: Path, turns: tuple[str, ...]) -> None:
    sp, tok = spm.SentencePieceProcessor(model_file=str(mistral_model)), Tokenizer(mistral_model)
    ids, offsets = tok.encode_batch(turns)
    ref = sp.encode(list(turns), num_threads=os.cpu_count() or 1)
    lengths = np.fromiter(map(len, ref), dtype=np.int64, count=len(ref))
    same_length = np.diff(offsets) == lengths
    if same_length.all():
        flat = np.fromiter(itertools.chain.from_iterable(ref), dtype=np.int32, count=int(lengths.sum()))
        if np.array_equal(ids, flat):
            return
    bad = [i for i in range(len(turns)) if ids[offsets[i]:offsets[i + 1]].tolist() != ref[i]]
    raise AssertionError(f"{len(bad)} of {len(turns)} ShareGPT turns encode differently; first: {turns[bad[0]][:200]!r}")


# ---------------------------------------------------------------------------- tools/train_tokenizer.py

TRAIN_TOOL = Path(__file__).resolve().parents[1] / "tools" / "train_tokenizer.py"
# Runs the tool as a user without sentencepiece would: any import of it fails.
WITHOUT_SENTENCEPIECE = ("import runpy, sys\nsys.modules['sentencepiece'] = None\nsys.argv = {argv!r}\n"
                         "runpy.run_path({tool!r}, run_name='__main__')\n")


def run_train_tool(args: list[str], block_sentencepiece: bool = False) -> subprocess.CompletedProcess:
    argv = [str(TRAIN_TOOL), *args]
    cmd = ([sys.executable, "-c", WITHOUT_SENTENCEPIECE.format(argv=argv, tool=str(TRAIN_TOOL))]
           if block_sentencepiece else [sys.executable, *argv])
    return subprocess.run(cmd, capture_output=True, text=True)


def test_train_tokenizer_help_and_missing_sentencepiece(tmp_path: Path) -> None:
    help_ = run_train_tool(["--help"], block_sentencepiece=True)
    assert help_.returncode == 0 and "--vocab-size" in help_.stdout and "sentencepiece" in help_.stdout
    out = tmp_path / "t.model"
    missing = run_train_tool(["--out", str(out)], block_sentencepiece=True)
    assert missing.returncode == 1 and not out.exists()
    assert missing.stderr.count("\n") == 1 and missing.stderr.startswith("error: ") and "sentencepiece" in missing.stderr


def test_train_tokenizer_user_mistakes_and_a_real_run(tmp_path: Path) -> None:
    corpus = tmp_path / "small.jsonl"
    corpus.write_text("".join(itertools.islice(open(DEFAULT_CORPUS, encoding="utf-8"), 150)), encoding="utf-8")
    out = tmp_path / "small.model"
    for args, message in [(["--corpus", str(tmp_path / "none.jsonl")], "--corpus .*none.jsonl: no such file"),
                          (["--corpus", str(corpus), "--vocab-size", "100"], "--vocab-size 100: must be at least"),
                          (["--corpus", str(corpus), "--out", str(tmp_path / "no" / "x.model")], "--out .*does not exist"),
                          (["--corpus", str(corpus), "--out", str(corpus), "--overwrite"],
                           "--out .*small.jsonl: is the same file as --corpus"),
                          (["--corpus", str(corpus), "--out", str(tmp_path)], "--out .*: is a folder"),
                          (["--corpus", str(corpus), "--out", str(corpus / "x.model")],
                           "--out .*small.jsonl is a file, not a folder")]:
        result = run_train_tool([*args, "--out", str(out)] if "--out" not in args else args)
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert re.match("error: " + message, result.stderr), result.stderr
    assert not out.exists()
    result = run_train_tool(["--corpus", str(corpus), "--out", str(out), "--vocab-size", "500"])
    assert result.returncode == 0, result.stderr
    first = out.read_bytes()
    again = run_train_tool(["--corpus", str(corpus), "--out", str(out), "--vocab-size", "600"])
    assert again.returncode == 1 and again.stderr.startswith("error: --out ")
    assert "exists (use --overwrite" in again.stderr
    assert out.read_bytes() == first and corpus.read_bytes().startswith(b"{")
    tok = Tokenizer(out)
    assert tok.vocab_size == 500 and (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    for marker in ("<|System|>:", "<|Human|>:", "<|Assistant|>:", "<|eot|>"):
        assert tok.encode(marker, add_dummy_prefix=False) == [tok.piece_to_id(marker)] != [tok.unk_id]
