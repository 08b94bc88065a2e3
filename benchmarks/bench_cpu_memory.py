"""Peak memory (RSS) of one CPU training step, by pack length: the attention the model
runs without CUDA (reference.varlen_attention) against the formulation it replaced.

    python benchmarks/bench_cpu_memory.py                       # markdown table
    python benchmarks/bench_cpu_memory.py --pack-lens 1024 4096 --max-gb 12

Each case runs in a fresh subprocess (so peak RSS, from getrusage's ru_maxrss, is that
case's alone; "of which the step" is the peak minus the RSS after importing torch and
building the model, optimizer and batch): the tiny preset (agentflan.config.get_preset("tiny"), 5M parameters),
reference kernels, fp32, one pack per step; the step is forward, backward and an AdamW
update (its first, which allocates the optimizer state). Packs:
- one document: a single document fills the pack (attention's worst case);
- agent mix: documents of chat-like lengths (log-normal, median about 450 tokens, mean
  about 700, as in bench_train_step.py) until the pack is full, the last one cut to fit.
Attention:
- per-document SDPA (now): one scaled_dot_product_attention per document on
  (1, heads, L, head_dim) views with enable_gqa, which PyTorch runs with its CPU
  flash-attention kernel (forward and backward blockwise);
- per-document math (before): the same call on 3-D (heads, L, head_dim) tensors with
  repeated K/V heads, which PyTorch runs with its math kernel: it materialises the
  (heads, L, L) scores and probabilities and keeps them for backward.
A subprocess runs under an address-space limit (--max-gb) so a case that would exhaust
the machine fails on its own; the table reports it as over the limit. "step" is the
wall time of the step (one thread by default, --threads).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

ATTENTIONS = ("per-document SDPA (now)", "per-document math (before)")
MIXES = ("one document", "agent mix")


def _math_attention(q, k, v, cu_seqlens, max_seqlen=None, causal=True, softmax_scale=None):
    """The formulation reference.varlen_attention had before: 3-D SDPA inputs (PyTorch's
    math kernel on CPU) with K/V heads repeated for GQA."""
    import torch
    import torch.nn.functional as F

    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qd = q[start:end].transpose(0, 1)  # (n_heads, L, head_dim)
        kd = k[start:end].transpose(0, 1).repeat_interleave(group, dim=0)
        vd = v[start:end].transpose(0, 1).repeat_interleave(group, dim=0)
        od = F.scaled_dot_product_attention(qd, kd, vd, is_causal=causal, scale=softmax_scale)
        out[start:end] = od.transpose(0, 1)
    return out


def document_lengths(pack_len: int, mix: str, seed: int = 0) -> list[int]:
    """Document lengths filling one pack of pack_len tokens."""
    if mix == "one document":
        return [pack_len]
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths, used = [], 0
    while used < pack_len:
        n = int(np.clip(rng.lognormal(mean=6.1, sigma=0.9), 8, pack_len))
        n = min(n, pack_len - used)
        lengths.append(n)
        used += n
    return lengths


def run_case(pack_len: int, mix: str, attention: str, threads: int) -> dict:
    """One training step in this process; returns peak RSS (MB) and seconds."""
    import torch

    from agentflan.config import get_preset
    from agentflan.kernels import reference
    from agentflan.model import Llama

    torch.set_num_threads(threads)
    if attention == ATTENTIONS[1]:
        reference.varlen_attention = _math_attention  # the model looks the op up on the module at each call
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    model = Llama(cfg, kernels="reference")
    model.init_weights(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    lengths = document_lengths(pack_len, mix)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    input_ids = torch.randint(0, cfg.vocab_size, (pack_len,))
    labels = torch.randint(0, cfg.vocab_size, (pack_len,))
    setup_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    loss = model(input_ids, cu_seqlens, labels=labels, max_seqlen=max(lengths))
    loss.backward()
    opt.step()
    seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_mb": peak_mb, "setup_mb": setup_mb, "seconds": seconds, "loss": float(loss)}


def _child(args: argparse.Namespace) -> None:
    limit = int(args.max_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        result = run_case(args.pack_len, args.mix, args.attention, args.threads)
    except (MemoryError, RuntimeError) as exc:  # torch reports a failed allocation as RuntimeError
        if "memory" not in str(exc).lower() and not isinstance(exc, MemoryError):
            raise
        result = {"over_limit": True}
    print(json.dumps(result))


def _spawn(pack_len: int, mix: str, attention: str, threads: int, max_gb: float) -> dict:
    cmd = [sys.executable, __file__, "--child", "--pack-len", str(pack_len), "--mix", mix, "--attention", attention,
           "--threads", str(threads), "--max-gb", str(max_gb)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        if "memory" in proc.stderr.lower() or proc.returncode in (-9, 137):
            return {"over_limit": True}
        raise RuntimeError(f"case {pack_len} {mix} {attention} failed:\n{proc.stderr}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pack-lens", type=int, nargs="+", default=[1024, 4096, 8192], help="tokens per pack")
    parser.add_argument("--mixes", nargs="+", choices=MIXES, default=list(MIXES), help="documents in a pack")
    parser.add_argument("--attentions", nargs="+", choices=ATTENTIONS, default=list(ATTENTIONS),
                        help="attention formulations to measure")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per case (default 1)")
    parser.add_argument("--max-gb", type=float, default=8.0,
                        help="address-space limit per case in GiB; a case needing more is reported as over it")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pack-len", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mix", choices=MIXES, help=argparse.SUPPRESS)
    parser.add_argument("--attention", choices=ATTENTIONS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    import torch

    print(f"{platform.machine()} CPU ({os.cpu_count()} cores), torch {torch.__version__}, python "
          f"{platform.python_version()}, {args.threads} thread(s), address-space limit {args.max_gb:g} GiB per case\n")
    print("| pack | documents | attention | peak RSS (MB) | of which the step (MB) | step (s) | peak vs now |")
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: |")
    for pack_len in args.pack_lens:
        for mix in args.mixes:
            now_mb = None
            for attention in args.attentions:
                r = _spawn(pack_len, mix, attention, args.threads, args.max_gb)
                docs = f"{mix} ({len(document_lengths(pack_len, mix))})"
                if r.get("over_limit"):
                    print(f"| {pack_len} | {docs} | {attention} | > {args.max_gb * 1024:,.0f} (over the limit) | - | - | - |",
                          flush=True)
                    continue
                now_mb = now_mb or (r["peak_mb"] if attention == ATTENTIONS[0] else None)
                ratio = f"{r['peak_mb'] / now_mb:.1f}x" if now_mb else "-"
                step_mb = r["peak_mb"] - r["setup_mb"]
                print(f"| {pack_len} | {docs} | {attention} | {r['peak_mb']:,.0f} | {step_mb:,.0f} | {r['seconds']:.1f} | "
                      f"{ratio} |", flush=True)


if __name__ == "__main__":
    main()
