"""LoRA on the Llama (agentflan.lora) and its PEFT adapter folders (agentflan.adapter): step 0 is the
base model exactly, only adapters train and hold optimizer state, merging equals the adapted model,
peft and transformers read what we write (and we read what peft writes), the sharded build and
export agree with one process, recomputation redraws the same dropout masks, and the memory and
FLOP formulas match what autograd saves and the matmuls compute."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

from agentflan.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    export_merged,
    merge_folders,
    merge_into,
    peft_name,
    read_adapter,
    save_adapter,
)
from agentflan.builder import build_model
from agentflan.checkpoint import load_hf, save_hf
from agentflan.config import ModelConfig
from agentflan.distributed import DistInfo, apply_activation_checkpointing
from agentflan.lora import (
    TARGETS,
    LoraSpec,
    LoRALinear,
    apply_lora,
    clean_name,
    lora_modules,
    parse_targets,
    training_flops_per_token,
)
from agentflan.memory import estimate_memory, saved_activation_bytes
from agentflan.model import Llama
from agentflan.trainer.config import TrainConfig
from agentflan.trainer.optim import build_optimizer


def _draw(gen: torch.Generator):
    return lambda lo, hi: int(torch.randint(lo, hi, (), generator=gen))


def _config(draw) -> ModelConfig:
    """A small random shape transformers also builds (head_dim 16, so dim = 16 * n_heads)."""
    n_kv = draw(1, 3)
    n_heads = n_kv * draw(1, 4)
    return ModelConfig(vocab_size=draw(50, 300), dim=16 * n_heads, n_layers=draw(1, 4), n_heads=n_heads,
                       n_kv_heads=n_kv, ffn_dim=draw(40, 160), max_seq_len=512)


def _spec(draw, dropout: float | None = None) -> LoraSpec:
    targets = tuple(t for t in TARGETS if draw(0, 2)) or (TARGETS[draw(0, len(TARGETS))],)
    return LoraSpec(draw(1, 9), float(draw(1, 33)), (0.0, 0.2)[draw(0, 2)] if dropout is None else dropout, targets,
                    rslora=bool(draw(0, 2)))


def _batch(draw, gen, cfg):
    T = draw(20, 90)
    cu = torch.tensor([0, *sorted(torch.randperm(T - 1, generator=gen)[: draw(0, 3)].add(1).tolist()), T],
                      dtype=torch.int32)
    return torch.randint(0, cfg.vocab_size, (T,), generator=gen), cu


def _randomise_adapters(model, seed: int, std: float = 0.05) -> None:
    """Trained-looking adapters: B away from zero."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in lora_modules(model):
            weight = module.lora_B.weight
            value = torch.randn(weight.shape, generator=gen) * std
            if isinstance(weight, DTensor):  # a sharded model gets its rows of the same draw
                value = distribute_tensor(value, weight.device_mesh, weight.placements)
            weight.copy_(value)


def _adapted(seed: int, dropout: float | None = 0.0):
    gen = torch.Generator().manual_seed(seed)
    draw = _draw(gen)
    cfg, spec = _config(draw), _spec(draw, dropout)
    base = Llama(cfg, kernels="reference")
    base.init_weights(seed=seed, std=0.1)
    model = copy.deepcopy(base)
    apply_lora(model, spec, seed)
    return base, model, spec, draw, gen


def test_targets_parse_in_model_order():
    assert parse_targets(["down,q", "v_proj"]) == ("q_proj", "v_proj", "down_proj")
    assert parse_targets(["all"]) == TARGETS and parse_targets(["mlp"]) == ("gate_proj", "up_proj", "down_proj")
    for bad, match in ((["lm_head"], "unknown LoRA target"), (["q", "q_proj"], "named twice"), ([""], "no LoRA")):
        with pytest.raises(ValueError, match=match):
            parse_targets(bad)


def test_step0_equals_the_base_model_exactly(seed):
    base, model, spec, draw, gen = _adapted(seed, dropout=0.3)  # dropout active: B = 0 still adds nothing
    ids, cu = _batch(draw, gen, base.config)
    model.train()
    with torch.no_grad():
        assert torch.equal(model(ids, cu), base(ids, cu))
        assert torch.equal(model.bfloat16()(ids, cu), base.bfloat16()(ids, cu))


def test_the_adapted_layer_computes_its_formula(seed):
    gen = torch.Generator().manual_seed(seed)
    draw = _draw(gen)
    base = torch.nn.Linear(draw(4, 40), draw(4, 40), bias=False)
    spec = LoraSpec(draw(1, 9), float(draw(1, 33)), rslora=bool(draw(0, 2)))
    layer = LoRALinear(base, spec)
    assert layer.weight is base.weight and not layer.weight.requires_grad
    a, b = layer.lora_A.weight, layer.lora_B.weight
    assert a.dtype == b.dtype == torch.float32 and torch.equal(b, torch.zeros_like(b))
    bound = 1 / base.in_features ** 0.5  # kaiming-uniform with a = sqrt(5), as nn.Linear and peft
    assert 0 < a.abs().max() <= bound
    with torch.no_grad():
        b.normal_(generator=gen)
    x = torch.randn(3, draw(1, 9), base.in_features, generator=gen)
    scale = spec.alpha / (spec.rank ** 0.5 if spec.rslora else spec.rank)
    want = x @ base.weight.T + scale * (x @ a.T) @ b.T
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.delta(), scale * b @ a)


def test_only_adapters_train_and_hold_optimizer_state(seed):
    base, model, spec, draw, gen = _adapted(seed)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert set(frozen) == {n for n, _ in base.named_parameters()}  # the base keeps its names, all frozen
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in adapters.values()) == spec.num_params(base.config)
    assert all(".lora_A." in n or ".lora_B." in n for n in adapters)
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"), fsdp=False)
    for _ in range(3):
        ids, cu = _batch(draw, gen, base.config)
        model(ids, cu, labels=ids).backward()
        assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
        optimizer.step()
        optimizer.zero_grad()
    state = optimizer.state_dict()["state"]
    assert len(state) == len(adapters)  # one entry per adapter matrix: exp_avg and exp_avg_sq of its size
    assert sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in state.values()) == 2 * spec.num_params(
        base.config)
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name  # bitwise: weight decay never reaches the base
    assert any(not torch.equal(p, adapters[n]) for n, p in model.named_parameters() if n in adapters)


def test_merging_equals_the_adapted_model(seed):
    base, model, spec, draw, gen = _adapted(seed)
    _randomise_adapters(model, seed)
    ids, cu = _batch(draw, gen, base.config)
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for name, module in lora_modules(model):
            merged.get_submodule(name).weight += module.delta()
        torch.testing.assert_close(merged(ids, cu), model(ids, cu), rtol=1e-5, atol=1e-5)


def _adapter_folder(tmp_path, seed, **spec_fields):
    """A base Hugging Face folder and a trained-looking adapter for it: (base, adapter, model, spec)."""
    base, model, spec, draw, gen = _adapted(seed)
    if spec_fields:
        spec = LoraSpec(**{**spec.__dict__, **spec_fields})
        model = copy.deepcopy(base)
        apply_lora(model, spec, seed)
    _randomise_adapters(model, seed)
    save_hf(base, tmp_path / "base")
    save_adapter(model, tmp_path / "adapter", spec, str(tmp_path / "base"))
    return tmp_path / "base", tmp_path / "adapter", model.eval(), spec


def test_peft_and_transformers_read_what_we_write(tmp_path, seed):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base, folder, model, spec = _adapter_folder(tmp_path, seed)
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == spec.rank and config["target_modules"] == list(spec.targets)
    ids = torch.randint(0, model.config.vocab_size, (1, 37), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ours = model(ids[0])
        theirs = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), folder).eval()(ids).logits[0]
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)

        merge_folders(base, folder, tmp_path / "merged")  # streamed, then read by transformers
        merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(merged(ids).logits[0], ours, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(load_hf(tmp_path / "merged")(ids[0]), ours, rtol=1e-5, atol=1e-5)

    adapter = read_adapter(folder)
    assert adapter.spec == spec and adapter.base_model == str(base)
    loaded = load_hf(base)
    merge_into(loaded, adapter)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids[0]), ours, rtol=1e-5, atol=1e-5)


def test_we_read_what_peft_writes(tmp_path, seed):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base_model, _, _, draw, gen = _adapted(seed)
    save_hf(base_model, tmp_path / "base")
    spec = _spec(draw)
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base"), LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.targets), use_rslora=spec.rslora,
        task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=gen)
    peft_model.save_pretrained(tmp_path / "peft")
    ids = torch.randint(0, base_model.config.vocab_size, (1, 29), generator=gen)
    loaded = load_hf(tmp_path / "base")
    merge_into(loaded, read_adapter(tmp_path / "peft"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids[0]), peft_model.eval()(ids).logits[0], rtol=1e-4, atol=1e-5)


def test_bad_adapters_are_named(tmp_path, seed):
    base, folder, model, spec = _adapter_folder(tmp_path, seed)
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    for key, value, match in (("use_dora", True, "not supported"),
                              ("target_modules", ["q_proj", "lm_head"], "adapts lm_head"),
                              ("target_modules", ".*proj", "a regular expression is not supported"),
                              ("modules_to_save", ["embed_tokens"], "not supported"),
                              ("r", 0, "positive integer"), ("peft_type", "IA3", "not a LoRA adapter")):
        (folder / ADAPTER_CONFIG).write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError, match=f"{re.escape(str(folder / ADAPTER_CONFIG))}: {key} .*{match}"):
            read_adapter(folder)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config))

    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / ADAPTER_WEIGHTS)
    first = peft_name(f"layers.0.{'self_attn' if spec.targets[0][0] in 'qkvo' else 'mlp'}.{spec.targets[0]}"
                      f".lora_A.weight")
    for broken, match in (({k: v for k, v in tensors.items() if k != first}, "lacks"),
                          ({**tensors, first: tensors[first] * float("nan")}, "not a finite float tensor"),
                          ({**tensors, "base_model.model.lm_head.weight": torch.zeros(2, 2)}, "unexpected tensor")):
        save_file(broken, folder / ADAPTER_WEIGHTS)
        with pytest.raises(ValueError, match=match):
            read_adapter(folder)
    save_file({**tensors, first: torch.zeros(spec.rank, 3)}, folder / ADAPTER_WEIGHTS)
    with pytest.raises(ValueError, match=f"has shape \\({spec.rank}, 3\\), the base {base} needs"):
        merge_folders(base, folder, tmp_path / "out")
    save_file(tensors, folder / ADAPTER_WEIGHTS)
    with pytest.raises(ValueError, match="the output folder is an input folder"):
        merge_folders(base, folder, base)
    with pytest.raises(FileNotFoundError, match="adapter_config.json: missing"):
        read_adapter(tmp_path / "base")
    assert not (tmp_path / "out").exists()


def _merge_tool():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "merge_lora.py"
    spec = importlib.util.spec_from_file_location("merge_lora_tool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_merge_tool_replaces_only_an_earlier_model_folder(tmp_path, seed, capsys):
    base, adapter, _, _ = _adapter_folder(tmp_path, seed)
    merge = _merge_tool()

    def refused(out, *flags, words):
        capsys.readouterr()
        assert merge([str(base), str(adapter), str(out), *flags]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and words in err, err

    user = tmp_path / "mine"
    user.mkdir()
    (user / "keep.txt").write_text(str(seed))
    refused(user, words="exists (use --overwrite")
    refused(user, "--overwrite", words="not a model folder (no config.json)")
    assert [p.name for p in user.iterdir()] == ["keep.txt"] and (user / "keep.txt").read_text() == str(seed)
    for flags in ((), ("--overwrite",)):
        refused(user / "keep.txt", *flags, words="is a file, not a folder")
        refused(user / "keep.txt" / "out", *flags, words="keep.txt is a file, not a folder")
    assert sorted(p.name for p in user.iterdir()) == ["keep.txt"] and (user / "keep.txt").read_text() == str(seed)
    refused(tmp_path, "--overwrite", words="the output folder is an input folder")  # holds BASE
    capsys.readouterr()
    assert merge([str(tmp_path / "nope"), str(adapter), str(tmp_path / "m")]) == 1
    assert "nope: no such folder" in capsys.readouterr().err

    out = tmp_path / "merged"
    assert merge([str(base), str(adapter), str(out)]) == 0
    first = (out / "model.safetensors").read_bytes()
    refused(out, words="exists (use --overwrite")
    (out / "model.safetensors").write_bytes(b"")
    assert merge([str(base), str(adapter), str(out), "--overwrite"]) == 0
    assert (out / "model.safetensors").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_merging_onto_another_base_than_the_recorded_one_warns(tmp_path, seed, capsys):
    import shutil

    base, adapter, _, _ = _adapter_folder(tmp_path, seed)
    merge = _merge_tool()
    assert merge([str(base), str(adapter), str(tmp_path / "m1")]) == 0
    assert capsys.readouterr().err == ""  # the recorded base: nothing to say
    other = tmp_path / "other_base"
    shutil.copytree(base, other)  # same shapes, another model as far as anyone can tell
    assert merge([str(other), str(adapter), str(tmp_path / "m2")]) == 0
    assert capsys.readouterr().err == (f"warning: {adapter} was trained on {base} (its adapter_config.json says), "
                                       f"not on {other}; applying it to {other} anyway\n")


@pytest.fixture
def one_rank_group(tmp_path):
    """A one-process gloo group: FSDP2's DTensor code paths run in this process."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    dist.destroy_process_group()


def test_sharded_build_and_exports_agree_with_one_process(tmp_path, seed, one_rank_group):
    """--init-from under FSDP: the base loads shard by shard with the adapters on the meta device,
    then the adapters are drawn as one process draws them; the adapter and merged exports gather
    DTensors to what one process writes."""
    base, _, spec, draw, gen = _adapted(seed)
    save_hf(base, tmp_path / "base", dtype=torch.bfloat16)
    local = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    whole = build_model(tmp_path / "base", local, mode="none", kernels="reference", seed=seed, lora=spec)
    sharded = build_model(tmp_path / "base", one_rank_group, mode="fsdp", kernels="reference", seed=seed, lora=spec,
                          ac="full")
    want = whole.state_dict()
    assert sharded.state_dict().keys() == want.keys()
    for name, tensor in sharded.state_dict().items():
        assert torch.equal(tensor.full_tensor(), want[name]), name
    trainable = {clean_name(n) for n, p in sharded.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in whole.named_parameters() if p.requires_grad} == {n for n in want if ".lora_" in n}
    for model in (whole, sharded):
        _randomise_adapters(model, seed)
    ids, cu = _batch(draw, gen, base.config)
    with torch.no_grad():
        torch.testing.assert_close(sharded(ids, cu), whole(ids, cu), rtol=1e-6, atol=1e-6)
    for name, model in (("whole", whole), ("sharded", sharded)):
        save_adapter(model, tmp_path / name / "adapter", spec, None)
        export_merged(model, tmp_path / name / "merged", torch.float32)
    a, b = (read_adapter(tmp_path / name / "adapter").tensors for name in ("whole", "sharded"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    merged = load_hf(tmp_path / "sharded" / "merged")
    assert all(torch.equal(p, q) for p, q in zip(merged.parameters(), load_hf(tmp_path / "whole" / "merged").parameters()))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids, cu), whole(ids, cu), rtol=1e-5, atol=1e-5)


def test_recomputation_redraws_the_same_dropout_masks(seed):
    _, model, _, draw, gen = _adapted(seed, dropout=0.5)
    _randomise_adapters(model, seed)
    checkpointed = copy.deepcopy(model)
    apply_activation_checkpointing(checkpointed, "full")
    ids, cu = _batch(draw, gen, model.config)
    results = []
    for m in (model, checkpointed):
        torch.manual_seed(seed)
        loss = m(ids, cu, labels=ids)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in m.parameters() if p.requires_grad], torch.rand(3)))
    (loss_a, grads_a, after_a), (loss_b, grads_b, after_b) = results
    assert torch.equal(loss_a, loss_b) and torch.equal(after_a, after_b)  # the RNG stream is left as without
    assert all(torch.equal(x, y) for x, y in zip(grads_a, grads_b))


def _saved_bytes(model, ids, cu) -> int:
    """Bytes of the distinct storages autograd saves in one forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, cu, labels=ids, reduction="sum")
    return sum(saved.values())


@pytest.mark.parametrize("kernels", ["triton", "reference"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_lora_activation_formula_equals_what_autograd_saves(kernels, precision, seed):
    gen = torch.Generator().manual_seed(seed)
    draw = _draw(gen)
    n_kv = draw(1, 3)  # (the reference formula counts the CPU's math attention, run on GQA-expanded k and v)
    cfg = ModelConfig(vocab_size=draw(50, 300), dim=8 * draw(4, 10), n_layers=draw(1, 4), n_heads=n_kv * draw(2, 4),
                      n_kv_heads=n_kv, head_dim=(16, 32)[draw(0, 2)], ffn_dim=draw(40, 160), max_seq_len=512)
    spec = _spec(draw)
    ids, cu = _batch(draw, gen, cfg)
    model = Llama(cfg, kernels=kernels)
    model.init_weights(seed=seed)
    model.to(torch.bfloat16 if precision == "bf16" else torch.float32)
    apply_lora(model, spec, seed)
    if precision == "bf16":  # what FSDP gathers the fp32 adapters in
        for _, module in lora_modules(model):
            module.to(torch.bfloat16)
    measured = _saved_bytes(model, ids, cu)
    expected = saved_activation_bytes(cfg, len(ids), kernels, precision, n_docs=len(cu) - 1, lora=spec)
    assert measured == expected, (cfg, spec)


def test_lora_flops_count_the_matmuls_a_frozen_base_runs(seed):
    """Forward + backward matmul FLOPs of a LoRA model are 4N + 6 * adapters per token (the formula),
    less the input-gradient matmuls of layer 0 that autograd skips before the first adapter."""
    base, model, spec, draw, gen = _adapted(seed)
    cfg = base.config
    ids, cu = _batch(draw, gen, cfg)
    with FlopCounterMode(display=False) as counter:
        model(ids, cu, labels=ids, reduction="sum").backward()
    counts = counter.get_flop_counts()["Global"]
    measured = sum(v for op, v in counts.items() if str(op).split(".")[1] in ("mm", "addmm"))
    T = len(ids)
    # attention_context 0: no attention term (its matmuls are bmm, not counted here); the convention's
    # N also counts the norm weights, which run no matmul
    norms = 2 * cfg.dim * cfg.n_layers + cfg.dim
    formula = T * (training_flops_per_token(cfg, 0.0, spec.num_params(cfg)) - 4 * norms)
    # layer 0: nothing upstream needs its input's gradient until an adapter or the attention does
    shapes = spec.shapes(cfg)
    q_k_v = {"q_proj": (cfg.dim, cfg.n_heads * 16), "k_proj": (cfg.dim, cfg.n_kv_heads * 16),
             "v_proj": (cfg.dim, cfg.n_kv_heads * 16)}
    skipped = sum(2 * T * i * o for name, (i, o) in q_k_v.items())  # their base input gradients
    skipped += sum(2 * T * spec.rank * i for name, (i, _) in shapes.items() if name in q_k_v)  # their A's
    attn_grad = any(t in spec.targets for t in q_k_v)
    if not attn_grad:  # neither does o_proj's input, nor (without o_proj's adapter) gate's and up's
        o_in = cfg.n_heads * 16
        skipped += 2 * T * o_in * cfg.dim + (2 * T * spec.rank * o_in if "o_proj" in shapes else 0)
        if "o_proj" not in spec.targets:
            for name in ("gate_proj", "up_proj"):
                skipped += 2 * T * cfg.dim * cfg.ffn_dim + (2 * T * spec.rank * cfg.dim if name in shapes else 0)
            if not {"gate_proj", "up_proj"} & set(spec.targets):
                skipped += 2 * T * cfg.ffn_dim * cfg.dim + (2 * T * spec.rank * cfg.ffn_dim if "down_proj" in shapes
                                                            else 0)
    assert measured == formula - skipped


def test_dry_run_estimate_of_a_7b_lora():
    from agentflan.config import get_preset

    cfg = get_preset("llama2-7b")
    spec = LoraSpec(16, 32.0)
    assert spec.num_params(cfg) == 32 * 16 * (4 * 2 * 4096 + 3 * (4096 + 11008))  # 39,976,960
    est = estimate_memory(cfg, world_size=1, mode="none", pack_len=4096, ac="full", lora=spec)
    assert est.trainable_params == spec.num_params(cfg)
    assert est.components["weights"] == 2 * cfg.num_params() + 4 * spec.num_params(cfg)  # bf16 base, fp32 adapters
    assert est.components["optimizer"] == 8 * spec.num_params(cfg)
    assert est.components["loss head"] == 4096 * 2 * cfg.dim  # no LM-head gradient
    n = cfg.num_params(include_embeddings=False) + cfg.vocab_size * cfg.dim
    assert est.flops_per_token == 4 * n + 6 * spec.num_params(cfg) + 12 * 32 * 32 * 128 * 4096
    assert est.device_total < 24 * 2**30
    with pytest.raises(ValueError, match="frozen base in bf16"):
        estimate_memory(cfg, mode="none", lora=spec, frozen_dtype=torch.float32)


def test_a_preset_model_with_lora_builds_the_same_adapters_on_any_device_order(seed):
    """The adapters are drawn from --seed on the CPU whole, independent of the base's init stream."""
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    spec = LoraSpec(4, 8.0)
    a = build_model("micro", info, seed=seed, lora=spec)
    b = build_model("micro", info, seed=seed, lora=spec, ac="full")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    plain = build_model("micro", info, seed=seed)
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in a.state_dict().items() if ".lora_" not in k)
