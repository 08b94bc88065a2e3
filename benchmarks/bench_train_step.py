"""Training-step throughput: tokens/s and model FLOPs utilisation, reference vs Triton kernels.

    python benchmarks/bench_train_step.py                                  # tiny preset (CPU or GPU)
    python benchmarks/bench_train_step.py --preset llama2-7b --n-layers 4 --pack-len 8192 --packs 1

Batches are packed documents with chat-like lengths (log-normal, mean about 700 tokens),
so attention cost is per document as in real Agent-FLAN training. Each kernel backend is
timed in the same run on the same batches. MFU counts FLOPs per token as
6*N + 12*L*H*Q*S (N: parameters without the input embedding, S: the token-weighted mean
document length, no causal halving: the torchtitan/nanoGPT convention) over the device's
dense bf16 peak (989 TFLOP/s for H100 SXM; --peak-tflops to change).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from agentflan.config import get_preset
from agentflan.data.packing import build_batch, plan_packs
from agentflan.model import Llama


def make_batches(vocab: int, pack_len: int, packs: int, n_batches: int, seed: int) -> list[dict[str, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=6.1, sigma=0.9, size=packs * n_batches * pack_len // 300), 8, pack_len)
    lengths = lengths.astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = rng.integers(0, vocab, size=int(offsets[-1]), dtype=np.int32)
    mask = np.ones(len(tokens), dtype=np.uint8)
    plan = plan_packs(lengths, pack_len)
    if plan.n_packs < packs * n_batches:
        raise ValueError("not enough packs drawn; raise the document count")
    order = rng.permutation(plan.n_packs)  # first-fit-decreasing puts the longest documents first
    batches = []
    for b in range(n_batches):
        pb = build_batch(plan, order[b * packs : (b + 1) * packs], tokens, offsets, mask)
        batches.append({
            "input_ids": torch.from_numpy(pb.input_ids).long(),
            "labels": torch.from_numpy(pb.labels),
            "cu_seqlens": torch.from_numpy(pb.cu_seqlens),
            "position_ids": torch.from_numpy(pb.position_ids).long(),
            "max_seqlen": pb.max_seqlen,
        })
    return batches


def flops_per_token(model: Llama, batch: dict[str, torch.Tensor]) -> float:
    cfg = model.config
    n = sum(p.numel() for p in model.parameters()) - model.embed_tokens.weight.numel()
    lengths = (batch["cu_seqlens"][1:] - batch["cu_seqlens"][:-1]).double()
    mean_doc = float((lengths**2).sum() / lengths.sum())
    return 6 * n + 12 * cfg.n_layers * cfg.n_heads * cfg.resolved_head_dim * mean_doc


def time_backend(model: Llama, batches: list, kernels: str, device: torch.device, steps: int, warmup: int) -> float:
    """Seconds per optimizer step (forward, backward, AdamW), median over `steps`."""
    model.kernels = kernels
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    times = []
    for i in range(warmup + steps):
        b = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batches[i % len(batches)].items()}
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            loss = model(b["input_ids"], b["cu_seqlens"], b["position_ids"], labels=b["labels"], max_seqlen=b["max_seqlen"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--n-layers", type=int, default=None, help="override the preset's depth (fit big shapes on one GPU)")
    parser.add_argument("--pack-len", type=int, default=1024)
    parser.add_argument("--packs", type=int, default=4, help="packs per step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--backends", nargs="+", default=None, help="default: reference, plus triton on CUDA")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    overrides = {"n_layers": args.n_layers} if args.n_layers else {}
    cfg = get_preset(args.preset, **overrides)
    torch.manual_seed(0)
    with torch.device(device):
        model = Llama(cfg)
    model.init_weights()
    batches = make_batches(cfg.vocab_size, args.pack_len, args.packs, args.warmup + args.steps, seed=0)
    tokens = len(batches[0]["input_ids"])
    fpt = flops_per_token(model, batches[0])
    backends = args.backends or (["reference", "triton"] if device.type == "cuda" else ["reference"])

    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device {name}, torch {torch.__version__}, preset {args.preset} ({cfg.n_layers} layers, "
          f"{cfg.num_params() / 1e6:.1f}M params), {tokens} tokens/step in {len(batches[0]['cu_seqlens']) - 1} docs\n")
    print("| kernels | ms/step | tokens/s | TFLOP/s | MFU | speed-up |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    base = None
    for backend in backends:
        sec = time_backend(model, batches, backend, device, args.steps, args.warmup)
        base = base or sec
        tflops = fpt * tokens / sec / 1e12
        mfu = f"{tflops / args.peak_tflops:.1%}" if device.type == "cuda" else "n/a"
        print(f"| {backend} | {sec * 1e3:.1f} | {tokens / sec:,.0f} | {tflops:.2f} | {mfu} | {base / sec:.2f}x |")


if __name__ == "__main__":
    main()
