"""Final Hugging Face export of an FSDP2-sharded model: agentflan's streamed export against DCP's
HuggingFaceStorageWriter with consolidation, same run, same model (runs on CPUs with gloo or on GPUs).

    python benchmarks/bench_hf_export.py [--nproc 2] [--layers 16] [--dim 768]

Launches itself under torchrun. Every rank loads the same random Llama (fp32 master weights) from a
bf16 Hugging Face folder, sharded with FSDP2, then exports it twice:
  agentflan   agentflan.sharded_checkpoint.export_hf: each tensor all-gathered in turn, rank 0 streams
              it into pre-laid-out safetensors files (one pass over the data, nothing else on disk)
  dcp         torch.distributed.checkpoint.save with HuggingFaceStorageWriter(save_distributed=True,
              enable_consolidation=True): every rank writes its shards, then rank 0 reads them back
              and writes the consolidated files (the intermediate 'sharded' folder is counted, then removed)
Reported per method: wall seconds, the largest per-rank peak RSS above the loaded model's, and the
bytes written to disk. Both outputs are checked to hold the same tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def worker(src: str, out: str, max_shard_bytes: int) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    from agentflan import distributed
    from agentflan.builder import build_model
    from agentflan.checkpoint import PlannedTensor, hf_name, plan_shards
    from agentflan.sharded_checkpoint import export_hf

    torch.set_num_threads(1)
    info = distributed.init_distributed()
    model = build_model(src, info, mode="fsdp", kernels="reference")
    state = model.state_dict()
    results = {}
    for method in ("agentflan", "dcp"):
        target = Path(out) / method
        dist.barrier()
        Path("/proc/self/clear_refs").write_text("5")
        base = _rss("VmRSS")
        t0 = time.perf_counter()
        if method == "agentflan":
            export_hf(model, target, max_shard_bytes=max_shard_bytes)
            written = _folder_bytes(target) if info.is_main else 0
        else:
            plan = [PlannedTensor(hf_name(n), tuple(t.shape), t.dtype) for n, t in state.items()]
            mapping = {t.name: i for i, shard in enumerate(plan_shards(plan, max_shard_bytes), start=1) for t in shard}
            writer = HuggingFaceStorageWriter(str(target), fqn_to_index_mapping=mapping, save_distributed=True,
                                              enable_consolidation=True)
            dcp.save({hf_name(n): t for n, t in state.items()}, storage_writer=writer)
            dist.barrier()
            written = _folder_bytes(target) if info.is_main else 0
            if info.is_main:
                shutil.rmtree(target / "sharded")
                (target / "config.json").write_text(json.dumps({**model.config.to_hf_dict(), "torch_dtype": "float32"}))
        dist.barrier()
        results[method] = {"seconds": time.perf_counter() - t0, "peak_rss": _rss("VmHWM") - base, "written": written}
    Path(out, f"rank{info.rank}.json").write_text(json.dumps(results))
    del model, state  # before the process group goes (distributed.shutdown says why)
    distributed.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--max-shard-mb", type=int, default=64)
    parser.add_argument("--worker", nargs=2, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(*args.worker, args.max_shard_mb << 20)
        return

    from agentflan.checkpoint import load_hf, save_hf
    from agentflan.config import ModelConfig
    from agentflan.model import Llama

    cfg = ModelConfig(vocab_size=4096, dim=args.dim, n_layers=args.layers, n_heads=args.dim // 64,
                      n_kv_heads=max(1, args.dim // 256), ffn_dim=8 * args.dim // 3 // 64 * 64, max_seq_len=256)
    with tempfile.TemporaryDirectory() as tmp:
        model = Llama(cfg)
        model.init_weights(seed=0)
        save_hf(model, Path(tmp) / "src", dtype=torch.bfloat16)
        del model
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", "--standalone",
               __file__, "--max-shard-mb", str(args.max_shard_mb), "--worker", str(Path(tmp) / "src"), tmp]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
        subprocess.run(cmd, check=True, env=env)
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(args.nproc)]
        ours, theirs = load_hf(Path(tmp) / "agentflan").state_dict(), load_hf(Path(tmp) / "dcp").state_dict()
        same = ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    model_mb = cfg.num_params() * 4 / 2**20
    print(f"\n{cfg.num_params() / 1e6:.0f}M parameters ({model_mb:.0f} MiB fp32) on {args.nproc} ranks, "
          f"torch {torch.__version__}, outputs identical: {same}\n")
    print("| export | seconds | max peak RSS per rank | written to disk |")
    print("| --- | ---: | ---: | ---: |")
    for method in ("agentflan", "dcp"):
        seconds = max(r[method]["seconds"] for r in ranks)
        peak = max(r[method]["peak_rss"] for r in ranks) / 2**20
        written = sum(r[method]["written"] for r in ranks) / 2**20
        print(f"| {method} | {seconds:.1f} | {peak:.0f} MiB | {written:.0f} MiB |")
    if not same:
        raise SystemExit("error: the two exports differ")


if __name__ == "__main__":
    main()
