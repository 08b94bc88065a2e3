"""Sharded Hugging Face load and export under FSDP2: no rank ever holds the whole model, the export
loads in transformers with the same logits, and bad files are named before anything is allocated."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from agentflan.builder import build_model
from agentflan.checkpoint import CheckpointError, load_hf, save_hf
from agentflan.config import ModelConfig
from agentflan.distributed import DistInfo
from agentflan.model import Llama
from agentflan.sharded_checkpoint import export_hf, load_hf_sharded

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"
# About 400 MB of fp32 weights in tensors of at most 13 MB: large enough for RSS to measure it.
BIG = ModelConfig(vocab_size=4096, dim=768, n_layers=16, n_heads=12, n_kv_heads=4, ffn_dim=2048, max_seq_len=256)
SMALL = ModelConfig(vocab_size=101, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=80, max_seq_len=64)


def _torchrun(nproc: int, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone", str(WORKER), *args]
    # A fixed mmap threshold makes glibc return every freed tensor to the system, so RSS
    # follows the live tensors instead of what the allocator keeps cached.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.mark.slow
def test_two_ranks_load_and_export_without_a_full_copy(tmp_path, seed):
    transformers = pytest.importorskip("transformers", reason="needs transformers (pip install -e .[test])")
    src, out = tmp_path / "src", tmp_path / "out"
    model = Llama(BIG)
    model.init_weights(seed=seed, std=0.05)
    save_hf(model, src, max_shard_bytes=64 << 20, dtype=torch.bfloat16)  # released as bf16, like Llama-2
    full_bytes = BIG.num_params() * 4  # the fp32 weights a rank trains
    del model

    _torchrun(2, "load_save", str(src), str(out))
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r, figures in enumerate(ranks):
        print(f"rank {r}: " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in figures.items() if k != "logits")
              + f" (full fp32 model {full_bytes / 2**20:.0f} MiB)")
        for key in ("load_peak_rss", "export_fp32_peak_rss", "export_bf16_peak_rss"):
            assert figures[key] < 0.7 * full_bytes, (r, key, figures[key], full_bytes)
        assert figures["loaded_rss"] < 0.6 * full_bytes, (r, figures["loaded_rss"], full_bytes)

    ids = torch.arange(97) * 31 % BIG.vocab_size
    reference = transformers.LlamaForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    exported = transformers.LlamaForCausalLM.from_pretrained(out / "fp32", dtype=torch.float32).eval()
    with torch.no_grad():
        want = reference(ids[None]).logits[0]
        got = exported(ids[None]).logits[0]
    scale = want.abs().max().item()
    assert (torch.tensor(ranks[0]["logits"]) - want).abs().max().item() <= 1e-5 * scale
    assert torch.equal(got, want), "the fp32 export must hold exactly the loaded weights"
    source = reference.state_dict()
    for folder, dtype in ((out / "fp32", torch.float32), (out / "bf16", torch.bfloat16)):
        back = load_hf(folder)
        assert json.loads((folder / "config.json").read_text())["torch_dtype"] == str(dtype).removeprefix("torch.")
        for name, tensor in back.state_dict().items():
            hf = "lm_head.weight" if name == "lm_head.weight" else f"model.{name}"
            assert tensor.dtype == dtype and torch.equal(tensor, source[hf].to(dtype)), (folder, name)


@pytest.fixture
def one_rank_group(tmp_path):
    """A one-process gloo group: FSDP2 and DCP run their real code paths in this process."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    dist.destroy_process_group()


def _saved(tmp_path: Path, seed: int, **kw) -> tuple[Llama, Path]:
    model = Llama(SMALL)
    model.init_weights(seed=seed, std=0.3)
    save_hf(model, tmp_path / "src", **kw)
    return model, tmp_path / "src"


def test_sharded_load_matches_the_single_process_load(tmp_path, seed, one_rank_group):
    model, src = _saved(tmp_path, seed, max_shard_bytes=8_000, dtype=torch.bfloat16)
    sharded = build_model(src, one_rank_group, mode="fsdp", kernels="reference", ac="full")
    want = load_hf(src, dtype=torch.float32).state_dict()
    for name, tensor in sharded.state_dict().items():
        assert torch.equal(tensor.full_tensor(), want[name]), name
    ids = torch.randint(0, SMALL.vocab_size, (33,))
    with torch.no_grad():
        assert torch.equal(sharded(ids), Llama.forward(load_hf(src, dtype=torch.float32), ids))

    export_hf(sharded, tmp_path / "out", dtype=torch.bfloat16)
    assert all(torch.equal(t, want[n].bfloat16()) for n, t in load_hf(tmp_path / "out").state_dict().items())


def test_bad_files_are_named_before_any_allocation(tmp_path, seed, one_rank_group):
    _, src = _saved(tmp_path, seed)
    raw = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(raw[: len(raw) - 1 - seed % 100])
    with pytest.raises(CheckpointError, match=f"{src / 'model.safetensors'}: truncated"):
        build_model(src, one_rank_group, mode="fsdp")

    (src / "model.safetensors").write_bytes(raw)
    model = build_model(src, one_rank_group, mode="fsdp")
    save_hf(Llama(SMALL), tmp_path / "other", max_shard_bytes=8_000)
    stray = next((tmp_path / "other").glob("model-*.safetensors"))
    os.rename(stray, src / stray.name)  # the storage reader would read it too: refused
    with pytest.raises(CheckpointError, match=f"{src / stray.name}: not listed"):
        load_hf_sharded(model, src)
    (src / stray.name).unlink()
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(CheckpointError, match="lacks"):  # the index decides, and it omits the weights
        load_hf_sharded(model, src)


def test_failed_export_is_raised_and_keeps_the_previous_folder(tmp_path, seed, one_rank_group):
    _, src = _saved(tmp_path, seed)
    model = build_model(src, one_rank_group, mode="fsdp")
    export_hf(model, tmp_path / "final")
    before = {p.name: p.read_bytes() for p in (tmp_path / "final").iterdir()}

    def fail(folder):
        raise OSError(28, "No space left on device", str(folder / "tokenizer.model"))

    with pytest.raises(CheckpointError, match="No space left on device"):
        export_hf(model, tmp_path / "final", dtype=torch.bfloat16, write_extra=fail)
    assert {p.name: p.read_bytes() for p in (tmp_path / "final").iterdir()} == before

    weight = model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        weight.to_local()[seed % weight.to_local().shape[0], 0] = float("inf")
    with pytest.raises(CheckpointError, match=r"NaN or inf, e.g. \['model.layers.1.mlp.down_proj.weight'\]"):
        export_hf(model, tmp_path / "final")
    assert {p.name: p.read_bytes() for p in (tmp_path / "final").iterdir()} == before


def test_builder_refuses_a_vocabulary_smaller_than_the_tokenizer(tmp_path, seed):
    _, src = _saved(tmp_path, seed)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=f"{src}: checkpoint vocabulary {SMALL.vocab_size} is smaller"):
        build_model(src, info, vocab_size=SMALL.vocab_size + 1)
    model = build_model(src, info, vocab_size=SMALL.vocab_size, ac="selective", ac_every=2)
    want = load_hf(src, dtype=torch.float32).state_dict()
    assert all(torch.equal(t, want[n]) for n, t in model.state_dict().items())


def test_cpu_offload_is_refused_where_it_cannot_run(one_rank_group):
    with pytest.raises(ValueError, match="cpu_offload needs parallel mode 'fsdp'"):
        build_model("micro", one_rank_group, mode="ddp", cpu_offload=True)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cpu_offload needs a CUDA device"):
            build_model("micro", one_rank_group, mode="fsdp", cpu_offload=True)
