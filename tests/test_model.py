"""The from-scratch Llama against Hugging Face transformers, and packed vs per-document forward."""

import json

import pytest
import torch

from agentflan.checkpoint import load_hf, save_hf
from agentflan.config import ModelConfig, get_preset
from agentflan.model import Llama, positions_from_cu_seqlens

transformers = pytest.importorskip("transformers", reason="HF parity needs transformers (pip install -e .[test])")


def _tiny_hf(n_kv_heads: int, seed: int):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=311, hidden_size=96, intermediate_size=200, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=n_kv_heads, max_position_embeddings=512,
        rms_norm_eps=1e-5, rope_theta=10000.0 + seed % 1000, tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    # HF initialises norms to 1; randomise them so a norm-weight mix-up cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _assert_close_to_scale(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    err = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rel * scale, f"max abs diff {err:.3e} exceeds {rel} x logit scale {scale:.3e}"


@pytest.mark.parametrize("n_kv_heads", [6, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("shard", [False, True], ids=["single", "sharded"])
def test_hf_parity_load_and_export(tmp_path, n_kv_heads, shard):
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    hf = _tiny_hf(n_kv_heads, seed)
    src = tmp_path / "hf"
    hf.save_pretrained(src, max_shard_size="100KB" if shard else "5GB")
    assert (src / ("model.safetensors.index.json" if shard else "model.safetensors")).is_file()

    ours = load_hf(src)
    assert ours.config.n_kv_heads == n_kv_heads
    ids = torch.randint(0, 311, (67,))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
        _assert_close_to_scale(ours(ids), ref)

    out = tmp_path / "export"
    save_hf(ours, out, max_shard_bytes=100_000 if shard else 5 * 1024**3)
    if shard:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1, "export should have been sharded"
    back = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        _assert_close_to_scale(back(ids[None]).logits[0], ref)


def test_load_respects_dtype_and_rejects_bad_checkpoints(tmp_path):
    hf = _tiny_hf(2, int(torch.randint(0, 1000, ()).item()))
    hf.save_pretrained(tmp_path / "ok")
    model = load_hf(tmp_path / "ok", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert not any(p.is_meta for p in model.parameters())

    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rope scaling"):
        load_hf(bad)

    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    cfg["hidden_size"] = 48  # shapes no longer match the stored tensors
    cfg["head_dim"] = 8
    (tmp_path / "ok" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="has shape"):
        load_hf(tmp_path / "ok")


@pytest.mark.parametrize("preset", ["micro", "tiny"])
def test_packed_forward_equals_per_document(preset):
    cfg = get_preset(preset, vocab_size=503)
    model = Llama(cfg)
    model.init_weights(std=0.1)
    lengths = torch.randint(1, 90, (int(torch.randint(2, 8, ()).item()),))
    lengths[0] = 1  # a length-1 document is always in the mix
    docs = [torch.randint(0, 503, (int(n),)) for n in lengths]
    cu = torch.zeros(len(docs) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    with torch.no_grad():
        packed = model(torch.cat(docs), cu_seqlens=cu)
        alone = torch.cat([model(d) for d in docs])
    _assert_close_to_scale(packed, alone)


def test_positions_restart_per_document():
    lengths = torch.randint(1, 20, (9,))
    cu = torch.zeros(10, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    pos = positions_from_cu_seqlens(cu, int(cu[-1]))
    expected = torch.cat([torch.arange(int(n)) for n in lengths])
    assert torch.equal(pos, expected)


def test_tokens_outside_every_document_get_position_zero_and_leave_documents_alone(seed):
    """cu_seqlens need not cover the whole stream: tokens before its first and from its last
    boundary are outside every document (position 0, attention zeros), and the documents'
    logits are those of the documents alone."""
    gen = torch.Generator().manual_seed(seed)
    lead, tail = (int(torch.randint(0, 6, (), generator=gen)) for _ in range(2))
    lengths = torch.randint(1, 20, (int(torch.randint(1, 5, (), generator=gen)),), generator=gen)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).add(lead).int()
    total = int(cu[-1]) + tail
    pos = positions_from_cu_seqlens(cu, total)
    expected = torch.cat([torch.zeros(lead, dtype=torch.long), *[torch.arange(int(n)) for n in lengths],
                          torch.zeros(tail, dtype=torch.long)])
    assert torch.equal(pos, expected)

    model = Llama(get_preset("micro", vocab_size=97))
    model.init_weights(seed=seed)
    ids = torch.randint(0, 97, (total,), generator=gen)
    with torch.no_grad():
        packed = model(ids, cu_seqlens=cu)
        inside = model(ids[lead:int(cu[-1])], cu_seqlens=cu - lead)
    assert packed.isfinite().all()
    _assert_close_to_scale(packed[lead:int(cu[-1])], inside)


def test_explicit_positions_match_derived_ones():
    model = Llama(get_preset("micro", vocab_size=97))
    model.init_weights(std=0.1)
    cu = torch.tensor([0, 5, 12, 30], dtype=torch.int32)
    ids = torch.randint(0, 97, (30,))
    with torch.no_grad():
        derived = model(ids, cu_seqlens=cu)
        explicit = model(ids, cu_seqlens=cu, position_ids=positions_from_cu_seqlens(cu, 30))
    assert torch.equal(derived, explicit)


def test_presets_match_llama2_sizes():
    # Llama-2 parameter counts as published (6.74B, 13.0B, 69.0B).
    assert abs(get_preset("llama2-7b").num_params() / 6.738e9 - 1) < 0.01
    assert abs(get_preset("llama2-13b").num_params() / 13.016e9 - 1) < 0.01
    assert abs(get_preset("llama2-70b").num_params() / 68.977e9 - 1) < 0.01
    assert get_preset("llama2-70b").n_kv_heads == 8


def test_config_rejects_inconsistent_heads():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        ModelConfig(dim=64, n_heads=6, n_kv_heads=4)
