"""LoRA and CPU offload in the trainer: a LoRA run writes a PEFT adapter that peft loads onto
transformers' model and a merged model that equals the adapted one; its checkpoints hold the
adapters and their AdamW state only, and resume bit for bit; tools/generate.py and
tools/merge_lora.py take its adapter; two FSDP or DDP ranks train as one process; option mistakes
are one error line before any work; the dry run plans a 7B LoRA on a 24 GB card and a full 7B
fine-tune offloaded to the host on one 80 GB card."""

import importlib.util
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from agentflan import checkpoint
from agentflan.adapter import merge_into, read_adapter
from agentflan.config import get_preset
from agentflan.data.defaults import DEFAULT_TOKENIZER
from agentflan.lora import LoraSpec, apply_lora, lora_modules
from agentflan.model import Llama
from agentflan.tokenizer import Tokenizer
from train_helpers import ROOT, assert_trained_alike, error_lines, losses, micro, run_main, small_corpus, torchrun

LORA = ["--lora-rank", "4", "--lora-alpha", "16", "--lr", "2e-2", "--min-lr", "2e-3"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return small_corpus(tmp_path_factory.mktemp("corpus"))


def _base(folder, seed, vocab_delta: int = 0):
    """A micro Llama saved as a Hugging Face folder (fp32), with the bundled tokenizer."""
    model = Llama(get_preset("micro", vocab_size=Tokenizer(DEFAULT_TOKENIZER).vocab_size + vocab_delta))
    model.init_weights(seed=seed, std=0.1)
    checkpoint.save_hf(model, folder)
    shutil.copyfile(DEFAULT_TOKENIZER, folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, corpus, module_seed):
    """Three LoRA steps on a micro base with dropout, the llama2-chat template and --merge."""
    from agentflan.train import main

    root = tmp_path_factory.mktemp("lora")
    base = _base(root / "base", module_seed)
    run = root / "run"
    try:
        main(micro(corpus, run, module_seed, "--steps", "3", "--init-from", str(base), "--template", "llama2-chat",
                   "--merge", "--lora-dropout", "0.1", *LORA))
    except SystemExit as stop:
        pytest.fail(f"training exited with {stop.code}")
    return base, run


def _adapted(base, adapter_folder):
    """Our Llama with the adapter's LoRA layers (unmerged), from the base folder."""
    adapter = read_adapter(adapter_folder)
    model = checkpoint.load_hf(base, dtype=torch.float32)
    apply_lora(model, adapter.spec)
    with torch.no_grad():
        for name, module in lora_modules(model):
            module.lora_A.weight.copy_(adapter.tensors[f"{name}.lora_A.weight"])
            module.lora_B.weight.copy_(adapter.tensors[f"{name}.lora_B.weight"])
    return model.eval()


def test_a_lora_run_writes_a_peft_adapter_and_a_merged_model(lora_run, module_seed):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base, run = lora_run
    final, merged = run / "final", run / "merged"
    assert {p.name for p in final.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "agentflan.json",
                                                 "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                                                 "special_tokens_map.json", "generation_config.json"}
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base) and config["r"] == 4 and config["lora_alpha"] == 16
    assert config["lora_dropout"] == 0.1 and len(config["target_modules"]) == 7
    assert json.loads((merged / "agentflan.json").read_text()) == {"template": "llama2-chat"}

    ours = _adapted(base, final)
    assert any(m.lora_B.weight.abs().max() > 0 for _, m in lora_modules(ours))  # trained away from step 0
    ids = torch.randint(0, ours.config.vocab_size, (1, 57), generator=torch.Generator().manual_seed(module_seed))
    with torch.no_grad():
        want = ours(ids[0])
        peft = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), final).eval()
        torch.testing.assert_close(peft(ids).logits[0], want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(checkpoint.load_hf(merged)(ids[0]), want, rtol=1e-5, atol=1e-5)  # fp32
        theirs = LlamaForCausalLM.from_pretrained(merged).eval()
        torch.testing.assert_close(theirs(ids).logits[0], want, rtol=1e-4, atol=1e-5)


def test_lora_checkpoints_hold_only_adapters_and_their_optimizer_state(lora_run):
    from torch.distributed.checkpoint import FileSystemReader

    _, run = lora_run
    metadata = FileSystemReader(str(run / "checkpoints" / "step_3")).read_metadata().state_dict_metadata
    model_keys = [k for k in metadata if k.startswith("model.")]
    optim_state = {k: v for k, v in metadata.items() if k.startswith("optim.state.")}
    adapters = read_adapter(run / "final").tensors
    assert sorted(model_keys) == sorted(f"model.{name}" for name in adapters)
    moments = [v for k, v in optim_state.items() if k.endswith((".exp_avg", ".exp_avg_sq"))]
    assert len(moments) == 2 * len(adapters)
    n_adapter = sum(t.numel() for t in adapters.values())
    assert sum(m.size.numel() for m in moments) == 2 * n_adapter  # two moments per adapter parameter, nothing else


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"{name}_tool", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generate_and_merge_tools_take_the_adapter(lora_run, tmp_path, capsys):
    base, run = lora_run
    adapter = tmp_path / "adapter"
    shutil.copytree(run / "final", adapter)  # away from its run folder
    merge = _tool("merge_lora")
    assert merge.main([str(base), str(adapter), str(tmp_path / "merged")]) == 0
    for name, tensor in load_file(run / "merged" / "model.safetensors").items():  # the run's own --merge, bitwise
        assert torch.equal(load_file(tmp_path / "merged" / "model.safetensors")[name], tensor), name
    assert merge.main([str(base), str(adapter), str(base)]) == 1
    assert "the output folder is an input folder" in capsys.readouterr().err

    generate = _tool("generate")
    prompt = ["--prompt", "The tool returned", "--max-new-tokens", "12", "--device", "cpu"]
    capsys.readouterr()
    assert generate.main([str(base), "--adapter", str(adapter), *prompt]) == 0
    with_adapter = capsys.readouterr().out
    assert generate.main([str(tmp_path / "merged"), *prompt]) == 0
    assert capsys.readouterr().out == with_adapter
    assert generate.main([str(adapter), *prompt]) == 2
    assert "a LoRA adapter, not a model" in capsys.readouterr().err
    assert generate.main([str(base), "--adapter", str(base), "--chat"]) == 2
    assert "adapter_config.json: missing" in capsys.readouterr().err


def test_lora_resume_is_exact(tmp_path, corpus, seed, capsys):
    """Dropout and gradient accumulation on: a run stopped after 2 steps and extended to 4 logs the
    losses of an uninterrupted run, bit for bit (adapters, AdamW state and RNG come back)."""
    common = ["--no-save", "--grad-accum", "2", "--lora-dropout", "0.2", *LORA]
    code, _, err = run_main(micro(corpus, tmp_path / "split", seed, *common, "--steps", "2"), capsys)
    assert code == 0, err
    code, out, err = run_main(micro(corpus, tmp_path / "split", seed, *common, "--steps", "4"), capsys)
    assert code == 0 and "at step 2" in out, err
    code, _, err = run_main(micro(corpus, tmp_path / "whole", seed, *common, "--steps", "4"), capsys)
    assert code == 0, err
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")


@pytest.mark.slow
@pytest.mark.parametrize("parallel, extra", [("fsdp", ("--ac", "full", "--grad-accum", "2")), ("ddp", ())])
def test_lora_under_two_ranks_trains_as_one_process(tmp_path, corpus, seed, capsys, parallel, extra):
    """Losses, gradients and adapters as close as fp32 rounding and AdamW allow
    (train_helpers.assert_trained_alike); each run's final adapter is its trained one and its
    merged model the base with that adapter merged."""
    base = _base(tmp_path / "base", seed)
    common = ["--steps", "3", "--global-batch", "4", "--init-from", str(base), "--merge", *LORA,
              "--save-every", "1", "--keep-checkpoints", "3"]
    two = torchrun(2, micro(corpus, tmp_path / "two", seed, *common, "--parallel", parallel, *extra))
    assert two.returncode == 0, two.stderr[-3000:]
    code, _, err = run_main(micro(corpus, tmp_path / "one", seed, *common), capsys)
    assert code == 0, err
    trained = dict(zip(("one", "two"), assert_trained_alike(tmp_path / "one", tmp_path / "two", steps=3)))
    for run, adapters in trained.items():  # the checkpoints hold the adapters only
        final = read_adapter(tmp_path / run / "final")
        assert final.tensors.keys() == adapters.keys()
        for name, tensor in adapters.items():
            assert torch.equal(final.tensors[name], tensor), (run, name)
        want = checkpoint.load_hf(tmp_path / "base", dtype=torch.float32)
        merge_into(want, final)
        merged = checkpoint.load_hf(tmp_path / run / "merged", dtype=torch.float32)
        for (name, p), q in zip(want.named_parameters(), merged.parameters()):
            # the same fp32 sums W + s * B @ A, over each rank's rows under FSDP
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=f"{run}: {name}")


OPTION_ERRORS = [
    (["--lora-alpha", "8"], "--lora-alpha applies to LoRA only: add --lora-rank R (e.g. 16)"),
    (["--merge"], "--merge applies to LoRA only: add --lora-rank R (e.g. 16)"),
    (["--lora-rslora"], "--lora-rslora applies to LoRA only: add --lora-rank R (e.g. 16)"),
    (["--lora-rank", "-1"], "--lora-rank must be at least 0 (0: no LoRA), got -1"),
    (["--lora-rank", "4", "--lora-dropout", "1"], "--lora-dropout must be in [0, 1), got 1.0"),
    (["--lora-rank", "4", "--lora-alpha", "0"], "--lora-alpha must be a positive number, got 0.0"),
    (["--lora-rank", "4", "--lora-targets", "q", "lm_head"], "--lora-targets: unknown LoRA target 'lm_head'; choose "
                                                             "from q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                                                             "down_proj (or q, k, v, o, gate, up, down; all, "
                                                             "attention, mlp)"),
    (["--lora-rank", "4", "--merge", "--no-save"], "--merge writes RUN/merged beside the final adapter; it "
                                                   "contradicts --no-save"),
    (["--cpu-offload", "--parallel", "ddp"], "--cpu-offload runs through FSDP2's CPUOffloadPolicy: it needs "
                                             "--parallel fsdp (or auto), not ddp"),
]


@pytest.mark.parametrize("extra, message", OPTION_ERRORS)
def test_lora_option_mistakes_are_one_error_line(extra, message, tmp_path, corpus, seed, capsys):
    code, _, err = run_main(micro(corpus, tmp_path / "run", seed, *extra), capsys)
    assert code == 1 and error_lines(err) == [f"error: {message}"], err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_cpu_offload_without_a_gpu_is_refused_before_any_work(tmp_path, corpus, seed, capsys):
    code, _, err = run_main(micro(corpus, tmp_path / "run", seed, "--cpu-offload"), capsys)
    assert code == 1 and error_lines(err) == ["error: --cpu-offload needs a CUDA GPU and none is visible: it keeps "
                                              "FSDP's shards, gradients and optimizer state in pinned host memory and "
                                              "computes on the GPU"], err
    assert not (tmp_path / "run").exists()


def test_lora_refuses_a_grown_vocabulary_and_takes_targets_from_yaml(tmp_path, corpus, seed, capsys):
    base = _base(tmp_path / "base", seed, vocab_delta=-8)
    code, _, err = run_main(micro(corpus, tmp_path / "run", seed, "--init-from", str(base), "--allow-vocab-mismatch",
                                  "--lora-rank", "4"), capsys)
    vocab = Tokenizer(DEFAULT_TOKENIZER).vocab_size
    assert code == 1 and error_lines(err) == [
        f"error: --lora-rank with a tokenizer of {vocab} pieces and --init-from {base}'s vocabulary of {vocab - 8}: a "
        f"LoRA adapter cannot carry new embedding rows; train with the checkpoint's own tokenizer, or without LoRA"]
    config = tmp_path / "lora.yaml"
    config.write_text("lora_rank: 2\nlora_targets: 7\n")
    code, _, err = run_main(["--config", str(config)], capsys)
    assert code == 1 and error_lines(err) == [f"error: {config}: key 'lora_targets' must be a name or a list of "
                                              f"names, got 7"]
    config.write_text("lora_rank: 2\nlora_targets: [mlp, o]\n")
    code, out, err = run_main(["--config", str(config), *micro(corpus, tmp_path / "run", seed, "--steps", "1",
                                                                "--no-save")], capsys)
    assert code == 0, err
    assert "lora_targets:\n- o_proj\n- gate_proj\n- up_proj\n- down_proj\n" in out  # resolved, in model order
    assert f"LoRA r=2 alpha=4 dropout 0 on o_proj,gate_proj,up_proj,down_proj: " \
           f"{LoraSpec(2, 4.0, 0.0, ('o_proj', 'gate_proj', 'up_proj', 'down_proj')).num_params(get_preset('micro')):,}" \
           f" trainable" in out


def test_dry_runs_of_one_gpu_plans(tmp_path, capsys):
    out_dir = ["--out-dir", str(tmp_path / "run")]
    code, out, err = run_main(["--config", str(ROOT / "configs" / "llama2-7b-agentflan-lora.yaml"), "--dry-run",
                               "--gpu", "RTX 4090", *out_dir], capsys)
    assert code == 0 and "verdict: fits on RTX 4090" in out, err
    assert "(39.98M trainable)" in out and "LoRA r=16 alpha=32 dropout 0.1 on q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj: " \
        "39,976,960 trainable, base frozen in bf16" in out
    assert "final LoRA adapter (PEFT format) in float32" in out
    full = ["--config", str(ROOT / "configs" / "llama2-7b-agentflan.yaml"), "--dry-run", "--world-size", "1", "--gpu",
            "H100", "--ac", "full", "--grad-accum", "32", *out_dir]
    code, out, err = run_main(full, capsys)
    assert code == 1 and "does NOT fit" in out
    code, out, err = run_main([*full, "--cpu-offload"], capsys)
    assert code == 0 and "parallel fsdp over 1 rank(s) with CPU offload" in out and "optimizer (host)" in out, err
    assert not (tmp_path / "run").exists()


def test_one_process_gets_a_process_group_of_its_own_for_fsdp(seed):
    """What --cpu-offload runs on one GPU without torchrun: FSDP over a group of this one process."""
    import torch.distributed as dist

    from agentflan import distributed
    from agentflan.builder import build_model
    from agentflan.distributed import DistInfo

    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    distributed.init_single_process(info)
    try:
        assert dist.get_world_size() == 1 and dist.get_rank() == 0
        distributed.init_single_process(info)  # a second call keeps the group
        model = build_model("micro", info, mode="fsdp", seed=seed, lora=LoraSpec(2, 4.0))
        plain = build_model("micro", DistInfo(0, 1, 0, torch.device("cpu")), seed=seed, lora=LoraSpec(2, 4.0))
        ids = torch.randint(0, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            assert torch.equal(model(ids), plain(ids))
    finally:
        distributed.shutdown()
    assert not dist.is_initialized()
