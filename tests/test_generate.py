"""Generation: the KV-cache path against full recomputation, batching, sampling, stops,
streaming, chat prompts, and tools/generate.py."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agentflan.checkpoint import save_hf
from agentflan.config import get_preset
from agentflan.data.defaults import DEFAULT_TOKENIZER
from agentflan.data.templates import stop_token_ids
from agentflan.generate import (
    Generator,
    SamplingParams,
    TextStream,
    check_model_folder,
    generate,
    restrict_logits,
    sample,
    trained_template,
)
from agentflan.model import Llama

ROOT = Path(__file__).resolve().parents[1]


def random_model(seed: int, preset: str = "micro", std: float = 0.3, **overrides) -> Llama:
    """A random model whose greedy outputs vary (a larger init than training's makes logits peaked)."""
    model = Llama(get_preset(preset, **overrides))
    model.init_weights(std=std, seed=seed)
    return model.eval()


def random_prompts(gen: torch.Generator, n: int, vocab: int, max_len: int = 40) -> list[list[int]]:
    lengths = torch.randint(1, max_len, (n,), generator=gen).tolist()
    lengths[0] = 1  # a prompt of one token (BOS alone) is always in the mix
    return [[1] + torch.randint(3, vocab, (k - 1,), generator=gen).tolist() for k in lengths]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, module_seed) -> Path:
    """A random micro model saved as our runs save final/: HF weights and the bundled tokenizer."""
    folder = tmp_path_factory.mktemp("model") / "final"
    save_hf(random_model(module_seed), folder)
    shutil.copyfile(DEFAULT_TOKENIZER, folder / "tokenizer.model")
    return folder


# ---------------------------------------------------------------------------------- the KV cache


def cached_logits(model: Llama, prompts: list[list[int]], continuations: list[torch.Tensor]):
    """Prefill logits (total_tokens, vocab) and one (B, vocab) per decode step of the continuations."""
    steps = len(continuations[0])
    with torch.inference_mode():
        cache = model.new_cache(len(prompts), max(map(len, prompts)) + steps)
        cu = torch.tensor([0] + torch.tensor(list(map(len, prompts))).cumsum(0).tolist(), dtype=torch.int32)
        prefill = model.lm_head(model.prefill(torch.tensor([t for p in prompts for t in p]), cu, cache))
        decoded = [model.lm_head(model.decode(torch.stack([c[s] for c in continuations]), cache)) for s in range(steps)]
    return prefill.float(), [d.float() for d in decoded]


def prompts_and_continuations(seed: int, vocab: int, steps: int = 7):
    gen = torch.Generator().manual_seed(seed)
    prompts = random_prompts(gen, 5, vocab)
    return prompts, [torch.randint(0, vocab, (steps,), generator=gen) for _ in prompts]


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_cached_logits_equal_full_forward(seed, n_kv_heads):
    model = random_model(seed, n_kv_heads=n_kv_heads, vocab_size=300)
    prompts, continuations = prompts_and_continuations(seed, 300)
    prefill, decoded = cached_logits(model, prompts, continuations)
    start = 0
    for b, (prompt, cont) in enumerate(zip(prompts, continuations)):
        with torch.inference_mode():
            full = model(torch.cat([torch.tensor(prompt), cont]))  # (len + steps, vocab)
        n = len(prompt)
        scale = full.abs().max().item()
        assert (prefill[start:start + n] - full[:n]).abs().max().item() <= 1e-5 * scale
        start += n
        for s, step in enumerate(decoded):
            err = (step[b] - full[n + s]).abs().max().item()
            assert err <= 1e-5 * scale, f"prompt {b} step {s}: {err:.3e} vs logit scale {scale:.3e} (seed {seed})"


def test_cached_bf16_logits_are_as_accurate_as_the_bf16_forward(seed):
    """bf16 rounds differently on the two paths, so both are held to the fp32 model: the
    cached path may not stray from it much further than training's bf16 forward does.

    The errors are compared by RMS over every decoded logit: the largest single error is
    one draw from a heavy tail (cached/forward ratio of maxima: median 0.98, max 1.88 over
    2,000 seeds), the RMS is not (median 0.98, max 1.25). Bounds: RMS within 1.5x, and no
    logit further off than 3x the forward's largest error (a defect on one position)."""
    fp32 = random_model(seed, vocab_size=300)
    bf16 = random_model(seed, vocab_size=300).to(torch.bfloat16)
    prompts, continuations = prompts_and_continuations(seed, 300)
    _, decoded = cached_logits(bf16, prompts, continuations)
    cached_errs, forward_errs = [], []
    for b, (prompt, cont) in enumerate(zip(prompts, continuations)):
        seq, n = torch.cat([torch.tensor(prompt), cont]), len(prompt)
        with torch.inference_mode():
            truth, full = fp32(seq)[n:], bf16(seq)[n:].float()  # (steps, vocab)
        cached = torch.stack([step[b] for step in decoded])  # (steps, vocab)
        cached_errs.append(cached - truth)
        forward_errs.append(full - truth)
    cached_err, forward_err = torch.cat(cached_errs), torch.cat(forward_errs)
    cached_rms, forward_rms = cached_err.pow(2).mean().sqrt().item(), forward_err.pow(2).mean().sqrt().item()
    assert cached_rms <= 1.5 * forward_rms, f"seed {seed}: RMS cached {cached_rms:.3e}, forward {forward_rms:.3e}"
    cached_max, forward_max = cached_err.abs().max().item(), forward_err.abs().max().item()
    assert cached_max <= 3 * forward_max, f"seed {seed}: max cached {cached_max:.3e}, forward {forward_max:.3e}"


def test_generation_with_cache_equals_recomputation(seed):
    model = random_model(seed, preset="tiny", n_layers=2)
    prompts = random_prompts(torch.Generator().manual_seed(seed), 6, 4096, max_len=60)
    params = SamplingParams(max_new_tokens=24)
    cached = generate(model, prompts, params)
    recomputed = generate(model, prompts, params, use_cache=False)
    for i, (a, b) in enumerate(zip(cached, recomputed)):
        assert a.token_ids == b.token_ids, f"prompt {i} (length {len(prompts[i])}), seed {seed}"
        assert len(a.token_ids) == 24 and a.finish_reason == "length"


def test_batched_equals_one_by_one(seed):
    model = random_model(seed)
    prompts = random_prompts(torch.Generator().manual_seed(seed), 5, 4096)
    params = SamplingParams(max_new_tokens=20)
    batched = generate(model, prompts, params)
    for i, prompt in enumerate(prompts):
        assert batched[i].token_ids == generate(model, [prompt], params)[0].token_ids, f"prompt {i}, seed {seed}"
    in_pairs = generate(model, prompts, params, max_batch=2)  # batches of similar length, results in order
    assert [c.token_ids for c in in_pairs] == [c.token_ids for c in batched]
    assert [c.prompt_ids for c in in_pairs] == prompts


def test_a_stop_id_ends_one_sequence_while_the_others_continue(seed):
    model = random_model(seed)
    prompts = random_prompts(torch.Generator().manual_seed(seed), 6, 4096)
    free = [c.token_ids for c in generate(model, prompts, SamplingParams(max_new_tokens=20))]

    def end(ids: list[int], stop: int) -> int:  # tokens a sequence keeps when `stop` ends it
        return ids.index(stop) + 1 if stop in ids else len(ids)

    # A stop id that ends sequence 0 early while another sequence runs on past that point.
    stop = next((t for t in free[0][:-1] if max(end(ids, t) for ids in free[1:]) > end(free[0], t)), None)
    assert stop is not None, f"seed {seed}: degenerate outputs {free}"
    done = generate(model, prompts, SamplingParams(max_new_tokens=20, stop_token_ids=(stop,)))
    for i, completion in enumerate(done):
        n = end(free[i], stop)
        assert completion.token_ids == free[i][:n], f"sequence {i}, seed {seed}"
        assert (completion.finish_reason, completion.stop) == (("stop", stop) if stop in free[i] else ("length", None))


def test_transformers_generate_gives_the_same_greedy_tokens(tmp_path, seed):
    transformers = pytest.importorskip("transformers", reason="the parity check needs transformers")
    model = random_model(seed, vocab_size=500)
    save_hf(model, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    hf.generation_config.eos_token_id = None
    prompts = random_prompts(torch.Generator().manual_seed(seed), 3, 500)
    ours = generate(model, prompts, SamplingParams(max_new_tokens=12))
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert [c.token_ids for c in ours] == theirs[:, width:].tolist(), f"seed {seed}"


def test_prompts_are_checked_before_any_work():
    model = random_model(0, vocab_size=300)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []])
    with pytest.raises(ValueError, match="prompt 0 holds token id 300, outside the vocabulary of 300"):
        generate(model, [[1, 300]])
    with pytest.raises(ValueError, match="leaves no room in the model's context of 1024"):
        generate(model, [[1] * 1024])
    with pytest.raises(ValueError, match="need a tokenizer"):
        generate(model, [[1]], SamplingParams(stop_strings=("x",)))


def test_the_model_context_ends_a_sequence():
    model = random_model(0, vocab_size=300, max_seq_len=20)
    done = generate(model, [[1] * 15, [1] * 3], SamplingParams(max_new_tokens=100))
    assert [len(c.token_ids) for c in done] == [5, 17]
    assert all(c.finish_reason == "length" for c in done)


# ------------------------------------------------------------------------------------- sampling


def direct_allowed_set(row: torch.Tensor, top_k: int, top_p: float) -> set[int]:
    """The tokens top-k then top-p keep, computed one by one from the definition."""
    order = sorted(range(len(row)), key=lambda i: -row[i].item())
    kept = order[:top_k] if top_k else order
    probs = torch.softmax(row[kept].double(), dim=0).tolist()
    allowed, mass = [], 0.0
    for token, p in zip(kept, probs):
        allowed.append(token)
        mass += p
        if mass >= top_p:
            break
    return set(allowed)


@pytest.mark.parametrize("top_k,top_p", [(0, 0.5), (7, 1.0), (12, 0.8), (1, 0.3), (0, 1.0)])
def test_top_k_top_p_keep_exactly_the_right_set(seed, top_k, top_p):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 50, generator=gen) * 3
    kept = restrict_logits(logits, top_k, top_p)
    for r in range(len(logits)):
        got = set(torch.nonzero(torch.isfinite(kept[r])).flatten().tolist())
        # (A cumulative mass within float rounding of top_p could fall either side; with
        # continuous random logits that has probability about 1e-6.)
        assert got == direct_allowed_set(logits[r], top_k, top_p), (seed, r)
        assert torch.equal(kept[r][sorted(got)], logits[r][sorted(got)])  # kept logits are unchanged


def test_samples_follow_the_restricted_distribution(seed):
    gen = torch.Generator().manual_seed(seed)
    vocab, draws = 12, 20000
    row = torch.randn(vocab, generator=gen) * 1.5
    params = SamplingParams(temperature=0.7, top_k=8, top_p=0.9, seed=seed)
    probs = torch.softmax(restrict_logits(row[None] / 0.7, 8, 0.9), dim=-1)[0].double()
    sampler = torch.Generator().manual_seed(seed)
    tokens = sample(row.expand(draws, vocab).clone(), params, sampler)
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert counts[probs == 0].sum() == 0, "a token outside top-k/top-p was drawn"
    expected = probs * draws
    sigma = (draws * probs * (1 - probs)).sqrt()
    assert ((counts - expected).abs() <= 5 * sigma + 1).all(), (seed, counts.tolist(), expected.tolist())


def test_sampling_is_reproducible_by_seed(seed):
    model = random_model(seed)
    prompts = random_prompts(torch.Generator().manual_seed(seed), 3, 4096)
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=seed)
    first = [c.token_ids for c in generate(model, prompts, params)]
    assert first == [c.token_ids for c in generate(model, prompts, params)]
    other = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=seed + 1)
    assert first != [c.token_ids for c in generate(model, prompts, other)]


def test_greedy_sampling_is_argmax_first_index():
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [5.0, -1.0, 5.0, 5.0]])
    assert sample(logits, SamplingParams(), None).tolist() == [1, 0]


@pytest.mark.parametrize("bad,match", [
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -0.1}, "temperature"),
    ({"temperature": math.inf}, "temperature"), ({"top_k": -1}, "top_k"), ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"stop_strings": ("",)}, "stop_strings"),
])
def test_sampling_params_refuse_bad_values(bad, match):
    with pytest.raises(ValueError, match=f"^{match}"):
        SamplingParams(**bad)


# ------------------------------------------------------------------------- text, stops, streaming


def test_text_stream_equals_decoding_and_holds_back_incomplete_characters(tok, seed):
    rng = torch.Generator().manual_seed(seed)
    words = ["Hello", "wörld", "日本語", "<b>", "naïve", "🙂", "x=1;", "\n"]
    text = " ".join(words[i] for i in torch.randint(0, len(words), (12,), generator=rng))
    prompt = [tok.bos_id] + tok.encode("Say:")
    ids = tok.encode(text)
    stream = TextStream(tok, prompt)
    pieces = []
    for token in ids:
        stream.push(token)
        pieces.append(stream.take())
        assert "\ufffd" not in pieces[-1]  # a character split into byte tokens comes out whole
    stream.finish()
    pieces.append(stream.take(final=True))
    expected = tok.decode(prompt + ids)[len(tok.decode(prompt)):]  # the continuation as it reads after the prompt
    assert expected.startswith(" ") and "".join(pieces) == stream.text == expected


@pytest.mark.parametrize("where", ["inside one token", "across tokens"])
def test_stop_strings_cut_the_text_even_across_tokens(tok, where):
    ids = tok.encode("The answer is forty two. Observation: done")
    text = tok.decode(ids)
    ends = [len(tok.decode(ids[: k + 1])) for k in range(len(ids))]  # where each token's text ends
    if where == "across tokens":
        start = text.index("forty") + 2
        stop = text[start: text.index("two") + 2]  # "rty tw"
        assert any(start < e < start + len(stop) for e in ends)
    else:
        start = text.index("Observation") + 2
        stop = text[start: start + 3]
        assert not any(start < e < start + len(stop) for e in ends), "the stop string should sit in one token"
    stream = TextStream(tok, [tok.bos_id], ("never there", stop))
    streamed = []
    for k, token in enumerate(ids):
        stream.push(token)
        streamed.append(stream.take())
        if stream.stop is not None:
            break
    streamed.append(stream.take(final=True))
    assert stream.stop == stop and stream.text == text[:start]
    assert "".join(streamed) == text[:start]  # no part of the stop string was ever streamed
    assert ends[k] >= start + len(stop) > (ends[k - 1] if k else 0)  # it stopped at the token completing it


def test_stop_strings_and_streaming_in_generation(tok, seed):
    model = random_model(seed)
    prompts = [[tok.bos_id] + tok.encode(t) for t in ["Hello there", "Call a tool to convert 3 km", "x"]]
    free = generate(model, prompts, SamplingParams(max_new_tokens=30), tok)
    text = free[1].text
    if len(text.strip()) < 8:
        pytest.skip(f"seed {seed}: the model's text is too short to cut")
    stop = text[len(text) // 3: len(text) // 3 + 4]
    start = text.index(stop)
    streamed: dict[int, str] = {}
    done = generate(model, prompts, SamplingParams(max_new_tokens=30, stop_strings=(stop,)), tok,
                    on_text=lambda i, t: streamed.__setitem__(i, streamed.get(i, "") + t))
    assert done[1].text == text[:start] and done[1].finish_reason == "stop" and done[1].stop == stop
    for i, completion in enumerate(done):
        assert streamed.get(i, "") == completion.text
        if stop not in free[i].text:
            assert completion.token_ids == free[i].token_ids and completion.text == free[i].text


# ------------------------------------------------------------------------------ folders and chat


def test_generator_chats_with_the_template_and_stops_at_end_of_turn(model_folder, tok):
    gen = Generator.from_folder(model_folder, device="cpu")
    assert gen.template == "agentflan"
    eot = stop_token_ids(tok, "agentflan")[0]
    convs = [[{"role": "user", "content": "What is 2 + 2?"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Convert 3 km to miles."}]]
    replies = gen.chat(convs, SamplingParams(max_new_tokens=12))
    prompts = gen.chat_prompts(convs)
    assert prompts[0][-1] == tok.piece_to_id("<|Assistant|>:")
    raw = generate(gen.model, prompts, SamplingParams(max_new_tokens=12, stop_token_ids=(eot, tok.eos_id)))
    for reply, plain in zip(replies, raw):
        assert reply.token_ids[: len(plain.token_ids)] == plain.token_ids[: len(reply.token_ids)]
        assert reply.text == reply.text.strip() and "<|" not in reply.text


def test_folder_checks_and_trained_template(model_folder, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(model_folder, run / "final")
    assert trained_template(run / "final") is None
    # Runs of older versions: the run's config next to final/ (config.json, then config.yaml).
    (run / "config.json").write_text(json.dumps({"template": "plain", "pack_len": 1024}))
    assert trained_template(run / "final") == "plain"
    (run / "config.yaml").write_text("template: llama2-chat\npack_len: 1024\n")
    assert trained_template(run / "final") == "llama2-chat"
    # The record inside the folder wins, and travels with a copy of it.
    (run / "final" / "agentflan.json").write_text(json.dumps({"template": "agentflan"}))
    assert trained_template(run / "final") == "agentflan"
    shutil.copytree(run / "final", tmp_path / "copied")
    assert trained_template(tmp_path / "copied") == "agentflan"
    (run / "final" / "agentflan.json").write_text("[]")
    with pytest.raises(ValueError, match="agentflan.json"):
        check_model_folder(run / "final")
    (run / "final" / "agentflan.json").unlink()
    assert check_model_folder(run / "final").template == "llama2-chat"
    assert Generator.from_folder(run / "final", device="cpu").template == "llama2-chat"
    assert Generator.from_folder(run / "final", device="cpu", template="plain").template == "plain"
    (run / "final" / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 6]}))
    assert check_model_folder(run / "final").eos_ids == (2, 6)
    (run / "final" / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        check_model_folder(run / "final")


# -------------------------------------------------------------------------------- tools/generate.py


def _load_tool():
    spec = importlib.util.spec_from_file_location("generate_tool", ROOT / "tools" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def broken_weights_folder(model_folder, tmp_path_factory) -> Path:
    """A folder whose config and tokenizer are fine but whose weights cannot be read: every
    error the tool reports for it must come from the checks made before loading weights."""
    folder = tmp_path_factory.mktemp("broken") / "final"
    shutil.copytree(model_folder, folder)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    return folder


@pytest.mark.parametrize("args,message", [
    (["{missing}", "--chat"], "no such model folder"),
    (["{notok}", "--chat"], "tokenizer.model"),
    (["{broken}", "--chat", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["{broken}", "--chat", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["{broken}", "--chat", "--temperature", "-1"], "--temperature must be"),
    (["{broken}", "--chat", "--top-k", "5"], "add --temperature > 0"),
    (["{broken}", "--prompt", "hi", "--system", "x"], "--system applies to --chat only"),
    (["{broken}", "--chat", "--stop", ""], "--stop must be non-empty"),
    (["{broken}", "--chat", "--device", "gpu0"], "unknown device"),
    (["{broken}", "--prompt", "hi", "--max-batch", "0"], "--max-batch must be >= 1"),
    (["{broken}", "--chat", "--max-batch", "2"], "--max-batch applies to --prompt and --messages"),
    (["{broken}", "--messages", "{bad_jsonl}"], "bad.jsonl:2: invalid JSON"),
    (["{broken}", "--messages", "{ends_with_answer}"], "answer.jsonl:1: the conversation ends with two assistant"),
    (["{broken}", "--prompt", "hi", "--template", "llama2-chat"], "--template applies to --chat and --messages"),
    (["{broken}", "--prompt", "hi", "--kernels", "triton", "--device", "cpu"], "Triton kernels, which need CUDA"),
    (["{broken}", "--messages", "{no_role}"], "norole.jsonl:1: message 0: expected"),
    (["{broken}", "--messages", "{tmp}/nothing.jsonl"], "nothing.jsonl: no such file"),
    (["{broken}", "--messages", "{tmp}"], "a folder, not a file"),
])
def test_tool_reports_user_mistakes_in_one_line_before_loading_weights(
    args, message, broken_weights_folder, model_folder, tmp_path, capsys
):
    notok = tmp_path / "notok"
    shutil.copytree(model_folder, notok)
    (notok / "tokenizer.model").unlink()
    (tmp_path / "bad.jsonl").write_text('[{"role": "user", "content": "hi"}]\n{"messages": [\n')
    (tmp_path / "answer.jsonl").write_text(json.dumps({"conversation": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "assistant", "content": "again"}]}) + "\n")
    (tmp_path / "norole.jsonl").write_text(json.dumps([{"content": "hi"}]) + "\n")
    paths = {"missing": tmp_path / "missing", "notok": notok, "broken": broken_weights_folder, "tmp": tmp_path,
             "bad_jsonl": tmp_path / "bad.jsonl", "ends_with_answer": tmp_path / "answer.jsonl",
             "no_role": tmp_path / "norole.jsonl"}
    rc = _load_tool().main([a.format(**{k: str(v) for k, v in paths.items()}) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_tool_warns_up_front_when_max_new_tokens_exceeds_the_context(broken_weights_folder, capsys):
    rc = _load_tool().main([str(broken_weights_folder), "--prompt", "hi", "--max-new-tokens", "100000"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0  # the weights cannot load: the warning came before any of them was read
    assert err[0].startswith("warning: --max-new-tokens 100000") and "context of 1024" in err[0], err
    assert len(err) == 2 and err[1].startswith("error: "), err


def test_raw_prompts_stop_at_the_folders_generation_config_eos_ids(model_folder, tmp_path, capsys, module_seed):
    prompt = f"The code is {module_seed % 1000}"
    params = SamplingParams(max_new_tokens=16)
    free = Generator.from_folder(model_folder, device="cpu").complete([prompt], params)[0]
    assert free.finish_reason == "length"
    stop = free.token_ids[len(free.token_ids) // 2]
    first = free.token_ids.index(stop)
    folder = tmp_path / "final"
    shutil.copytree(model_folder, folder)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [stop, 2]}))
    done = Generator.from_folder(folder, device="cpu").complete([prompt], params)[0]
    assert done.token_ids == free.token_ids[: first + 1] and (done.finish_reason, done.stop) == ("stop", stop)
    assert _load_tool().main([str(folder), "--prompt", prompt, "--max-new-tokens", "16", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == prompt + done.text + "\n"


def test_tool_error_during_a_prompt_stays_off_the_echoed_prompt(model_folder, capsys):
    overlong = " ".join(["word"] * 1100)  # more tokens than the micro model's context of 1024
    assert _load_tool().main([str(model_folder), "--prompt", overlong, "--device", "cpu"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and err.startswith("error: "), (out[:80], err)


def test_tool_regenerates_the_last_assistant_turn_of_agent_flan_records(model_folder, tmp_path, capsys):
    turns = [{"role": "system", "content": "Tools: calc"}, {"role": "user", "content": "What is 6 * 7?"},
             {"role": "assistant", "content": "Thought: use calc", "loss": True},
             {"role": "user", "content": "42"}, {"role": "assistant", "content": "It is 42.", "loss": True}]
    (tmp_path / "agent_flan.jsonl").write_text(json.dumps({"id": "calc_0", "conversation": turns}) + "\n")
    assert _load_tool().main([str(model_folder), "--messages", str(tmp_path / "agent_flan.jsonl"),
                              "--max-new-tokens", "8", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    line = json.loads(out)
    expected = Generator.from_folder(model_folder, device="cpu").chat([turns[:-1]], SamplingParams(max_new_tokens=8))
    assert line["id"] == "calc_0" and line["reply"] == expected[0].text and line["reference"] == "It is 42."
    assert "1 of 1 conversations end with an assistant turn" in err


def test_tool_help_describes_every_option():
    helptext = _load_tool().build_parser().format_help()
    for flag in ["--prompt", "--chat", "--messages", "--system", "--template", "--max-new-tokens", "--temperature",
                 "--top-k", "--top-p", "--seed", "--stop", "--max-batch", "--device", "--dtype", "--kernels", "/reset", "/exit"]:
        assert flag in helptext


def test_tool_messages_batch_writes_the_replies_chat_gives(model_folder, tmp_path, capsys):
    convs = [[{"role": "user", "content": "hi"}],
             {"id": "q2", "conversation": [{"role": "system", "content": "Tools: calc"},
                                           {"role": "user", "content": "What is 6 * 7?"}]}]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(c) for c in convs) + "\n\n")
    assert _load_tool().main([str(model_folder), "--messages", str(tmp_path / "in.jsonl"),
                              "--max-new-tokens", "10", "--device", "cpu", "--max-batch", "1"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = Generator.from_folder(model_folder, device="cpu").chat(
        [convs[0], convs[1]["conversation"]], SamplingParams(max_new_tokens=10))
    assert [line["id"] for line in lines] == ["1", "q2"]
    assert [line["reply"] for line in lines] == [e.text for e in expected]
    assert [line["new_tokens"] for line in lines] == [len(e.token_ids) for e in expected]


@pytest.mark.slow
def test_tool_chat_session_through_stdin(model_folder):
    session = "What is 2 + 2?\n/reste\n/reset\n//km to miles: 3?\nAnd to feet?\n/exit\nnever read\n"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "generate.py"), str(model_folder), "--chat", "--system", "Be brief.",
         "--max-new-tokens", "8", "--device", "cpu"],
        input=session, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.count("assistant> ") == 3 and "(new conversation)" in out and "never read" not in out
    assert out.count("(unknown command /reste: /reset starts over, /exit quits; type //text to send /text)") == 1
    replies = [part.split("\n")[0] for part in out.split("assistant> ")[1:]]
    # The streamed replies are what the library gives for the same conversations.
    gen = Generator.from_folder(model_folder, device="cpu")
    params = SamplingParams(max_new_tokens=8)
    system = {"role": "system", "content": "Be brief."}
    first = gen.chat([[system, {"role": "user", "content": "What is 2 + 2?"}]], params)[0].text
    second_history = [system, {"role": "user", "content": "/km to miles: 3?"}]
    second = gen.chat([second_history], params)[0].text
    third = gen.chat([second_history + [{"role": "assistant", "content": second},
                                        {"role": "user", "content": "And to feet?"}]], params)[0].text
    assert replies == [first, second, third]
