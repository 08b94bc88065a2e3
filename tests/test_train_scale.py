"""The scale features in the trainer: --init-from read shard by shard under FSDP (or whole, to grow
the vocabulary) trains as one process does; the final export's dtype, its tokenizer files and
template record, which tools/generate.py reads from a copied folder; activation checkpointing
changed when a run resumes."""

import importlib.util
import io
import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from agentflan import checkpoint
from agentflan.config import get_preset
from agentflan.data.defaults import DEFAULT_TOKENIZER
from agentflan.model import Llama
from agentflan.tokenizer import Tokenizer
from train_helpers import ROOT, assert_trained_alike, losses, micro, run_main, small_corpus, torchrun


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return small_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def finals(tmp_path_factory, corpus, module_seed):
    """One step of the micro model with the llama2-chat template, saved with --save-dtype auto
    (fp32 on the CPU) and bf16: {save_dtype: RUN/final}."""
    from agentflan.train import main

    root = tmp_path_factory.mktemp("finals")
    out = {}
    for save_dtype in ("auto", "bf16"):
        run = root / save_dtype
        try:
            main(micro(corpus, run, module_seed, "--steps", "1", "--template", "llama2-chat", "--save-dtype", save_dtype))
        except SystemExit as stop:
            pytest.fail(f"training exited with {stop.code}")
        out[save_dtype] = run / "final"
    return out


def _stored_dtypes(folder):
    return {entry.dtype for entries in checkpoint.checkpoint_files(folder).values() for entry in entries.values()}


def test_save_dtype_casts_the_exported_weights(finals):
    fp32, bf16 = finals["auto"], finals["bf16"]
    assert _stored_dtypes(fp32) == {torch.float32} and _stored_dtypes(bf16) == {torch.bfloat16}
    assert json.loads((bf16 / "config.json").read_text())["torch_dtype"] == "bfloat16"
    full, half = load_file(fp32 / "model.safetensors"), load_file(bf16 / "model.safetensors")
    assert full.keys() == half.keys()
    for name, tensor in full.items():  # the same trained weights, rounded once
        assert torch.equal(half[name], tensor.to(torch.bfloat16)), name


def _generate_tool():
    spec = importlib.util.spec_from_file_location("generate_tool", ROOT / "tools" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_final_folder_records_its_template_for_generate(finals, tmp_path, capsys, monkeypatch):
    copied = tmp_path / "model"  # away from the run folder and its config.yaml
    shutil.copytree(finals["bf16"], copied)
    assert json.loads((copied / "agentflan.json").read_text()) == {"template": "llama2-chat"}
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (copied / name).is_file(), name
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # the chat ends at once
    assert _generate_tool().main([str(copied), "--chat", "--device", "cpu"]) == 0
    assert "chat with llama2-chat template" in capsys.readouterr().out


def test_activation_checkpointing_may_change_when_a_run_resumes(tmp_path, corpus, seed, capsys):
    common = ["--no-save", "--global-batch", "2"]
    code, _, err = run_main(micro(corpus, tmp_path / "split", seed, *common, "--steps", "2", "--ac", "full"), capsys)
    assert code == 0, err
    code, out, err = run_main(micro(corpus, tmp_path / "split", seed, *common, "--steps", "4", "--ac", "selective",
                                    "--ac-every", "1"), capsys)
    assert code == 0 and "at step 2" in out, err
    code, _, err = run_main(micro(corpus, tmp_path / "plain", seed, *common, "--steps", "4"), capsys)
    assert code == 0, err
    assert losses(tmp_path / "split") == losses(tmp_path / "plain")  # bitwise: the same values recomputed


def _hf_folder(folder, vocab_size, seed):
    """A micro Llama saved as a Hugging Face folder in bf16, with the bundled tokenizer."""
    model = Llama(get_preset("micro", vocab_size=vocab_size))
    model.init_weights(seed=seed)
    checkpoint.save_hf(model, folder, dtype=torch.bfloat16)
    shutil.copyfile(DEFAULT_TOKENIZER, folder / "tokenizer.model")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("vocab_delta, how", [(0, "read shard by shard"), (-8, "read whole on each rank")])
def test_init_from_under_two_fsdp_ranks_trains_as_one_process(tmp_path, corpus, seed, capsys, vocab_delta, how):
    """Two FSDP ranks take --init-from's weights (each rank its shard, or whole to grow the
    vocabulary) and train as one process loading it whole: losses, gradients and weights as close
    as fp32 rounding and AdamW allow (train_helpers.assert_trained_alike); the exported final/ holds
    the trained weights, and transformers computes our logits from it."""
    from transformers import LlamaForCausalLM

    vocab = Tokenizer(DEFAULT_TOKENIZER).vocab_size
    ckpt = _hf_folder(tmp_path / "ckpt", vocab + vocab_delta, seed)
    common = ["--steps", "2", "--global-batch", "4", "--dtype", "fp32", "--init-from", str(ckpt),
              "--allow-vocab-mismatch", "--save-every", "1"]
    two = torchrun(2, micro(corpus, tmp_path / "two", seed, *common, "--parallel", "fsdp"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert f"model: {ckpt} ({how})" in two.stdout
    code, out, err = run_main(micro(corpus, tmp_path / "one", seed, *common), capsys)
    assert code == 0 and f"model: {ckpt} (read whole on each rank)" in out, err
    trained = dict(zip(("one", "two"), assert_trained_alike(tmp_path / "one", tmp_path / "two", steps=2)))

    finals = {run: checkpoint.load_hf(tmp_path / run / "final", dtype=torch.float32) for run in trained}
    for run, model in finals.items():  # final/ holds the trained weights (under FSDP, gathered from the shards)
        params = dict(model.named_parameters())
        assert model.config.vocab_size == vocab and params.keys() == trained[run].keys()
        for name, p in params.items():
            assert torch.equal(p, trained[run][name]), (run, name)
    final, ours = tmp_path / "two" / "final", finals["two"]
    ids = torch.randint(0, vocab, (1, 61), generator=torch.Generator().manual_seed(seed))
    theirs = LlamaForCausalLM.from_pretrained(final).eval()  # stored in fp32
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits[0], ours(ids[0]), rtol=1e-4, atol=1e-4)
