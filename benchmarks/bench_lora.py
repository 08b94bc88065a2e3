"""LoRA training-step throughput: our Llama with our LoRA layers against peft, in the same run.

    python benchmarks/bench_lora.py                                   # CPU: tiny preset, 1024-token packs
    python benchmarks/bench_lora.py --preset llama2-7b --pack-len 8192    # one 80 GB GPU: the 7B target
    python benchmarks/bench_lora.py --decode                          # generation: adapters merged or not

Backends, on the same base weights, the same adapters (r=16 on all seven projections, B away from
zero) and the same batches of packed ShareGPT-length documents (bench_train_step.make_batches):
  ours       agentflan.lora on our Llama (Triton kernels on CUDA, the PyTorch reference elsewhere)
  peft       peft's LoRA on transformers' LlamaForCausalLM, packed documents given as position_ids
             restarting at 0 (transformers builds the block-diagonal causal mask for SDPA); its loss
             on the first batch is checked against ours
  peft-ours  peft's LoRA injected into our Llama (the alternative design; CPU default only)
Each step is forward + backward + AdamW over the adapters only; the frozen base is held in bf16 under
bf16 autocast on CUDA (fp32 on the CPU), the adapters in fp32. Backends take turns step by step.
MFU counts LoRA's FLOPs (agentflan.lora.training_flops_per_token: 4N for the frozen base, 6 per
adapter parameter, attention as in agentflan.perf) over the device's dense peak.

--decode instead times generation (agentflan.generate, greedy, bench_generate's prompts: batch 1
of 64 tokens and batch 16 of 16..256) with the adapters applied unmerged (LoRA layers in every
projection) against merged into the weights (what agentflan.generate.Generator does with an
adapter), best of --steps runs taken in turns, with the one-off cost of merging.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from agentflan.config import get_preset
from agentflan.distributed import apply_activation_checkpointing
from agentflan.lora import TARGETS, LoraSpec, apply_lora, lora_modules, training_flops_per_token
from agentflan.model import Llama
from agentflan.perf import packed_context, peak_flops
from bench_train_step import check_hf_matches, hf_model, make_batches, run_interleaved, step_fn

BACKENDS = ("ours", "peft", "peft-ours")


def _set_adapters(model: torch.nn.Module, values: dict[str, tuple[torch.Tensor, torch.Tensor]], layout: str) -> None:
    """Copies (A, B) by our module name into our LoRA layers ('ours') or peft's ('peft', 'peft-ours')."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if layout == "ours" and hasattr(module, "lora_A") and not hasattr(module.lora_A, "keys"):
                a, b = values[name]
                module.lora_A.weight.copy_(a)
                module.lora_B.weight.copy_(b)
            elif layout != "ours" and hasattr(module, "lora_A") and hasattr(module.lora_A, "keys"):
                a, b = values[name.removeprefix("base_model.model.").removeprefix("model.")]
                module.lora_A["default"].weight.copy_(a)
                module.lora_B["default"].weight.copy_(b)


def decode(cfg, spec: LoraSpec, device: torch.device, dtype: torch.dtype, reps: int, new_tokens: int = 64) -> None:
    """Generation tokens/s with unmerged LoRA layers against the adapters merged into the weights."""
    import time

    from bench_generate import make_prompts, run_ours, timed_pair

    torch.manual_seed(0)
    with torch.device(device):
        base = Llama(cfg)
    base.init_weights(seed=0, std=0.3)  # peaked logits: greedy outputs vary
    base.to(dtype)
    unmerged = copy.deepcopy(base)
    apply_lora(unmerged, spec, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, m in lora_modules(unmerged):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * 0.01)
    unmerged.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        for name, m in lora_modules(unmerged):
            weight = base.get_submodule(name).weight
            weight.copy_((weight.float() + m.delta()).to(weight.dtype))
    if device.type == "cuda":
        torch.cuda.synchronize()
    merge_ms = (time.perf_counter() - t0) * 1e3
    merged = base.eval()
    print(f"generation, {cfg.n_layers} layers, dim {cfg.dim}, LoRA r={spec.rank} on all 7 projections, {dtype}, greedy, "
          f"{new_tokens} new tokens a prompt; merging took {merge_ms:.0f} ms once\n")
    print("| batch | unmerged tokens/s | merged tokens/s | merged vs unmerged | same tokens |")
    print("| ---: | ---: | ---: | ---: | --- |")
    for batch in (1, 16):
        prompts = make_prompts(batch, cfg.vocab_size, torch.Generator().manual_seed(batch))
        (t_u, out_u), (t_m, out_m) = timed_pair([lambda: run_ours(unmerged, prompts, new_tokens),
                                                 lambda: run_ours(merged, prompts, new_tokens)], reps, device)
        n = batch * new_tokens
        same = sum(a == b for a, b in zip(out_u, out_m))
        print(f"| {batch} | {n / t_u:,.0f} | {n / t_m:,.0f} | {t_u / t_m:.2f}x | {same}/{batch} |")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="default: llama2-7b on CUDA, tiny on the CPU")
    parser.add_argument("--n-layers", type=int, default=None, help="override the preset's depth")
    parser.add_argument("--pack-len", type=int, default=None, help="default: 8192 on CUDA, 1024 on the CPU")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    parser.add_argument("--ac", choices=["none", "full"], default="none",
                        help="activation checkpointing of every block, in every backend (transformers' own)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: agentflan.perf's)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=None,
                        help="default: ours peft on CUDA, ours peft-ours peft on the CPU")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows and run metadata here")
    parser.add_argument("--decode", action="store_true", help="time generation, adapters merged or not (see above)")
    args = parser.parse_args(argv)
    if args.decode:
        cuda = torch.cuda.is_available()
        cfg = get_preset(args.preset or ("llama2-7b" if cuda else "tiny"),
                         **({"n_layers": args.n_layers} if args.n_layers else {}))
        decode(cfg, LoraSpec(args.rank, 2.0 * args.rank), torch.device("cuda" if cuda else "cpu"),
               torch.bfloat16 if cuda else torch.float32, args.steps)
        return []

    from peft import LoraConfig, get_peft_model, inject_adapter_in_model

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    preset = args.preset or ("llama2-7b" if cuda else "tiny")
    pack_len = args.pack_len or (8192 if cuda else 1024)
    backends = args.backends or (["ours", "peft"] if cuda else ["ours", "peft-ours", "peft"])
    cfg = get_preset(preset, **({"n_layers": args.n_layers} if args.n_layers else {}), max_seq_len=max(4096, pack_len))
    spec = LoraSpec(args.rank, 2.0 * args.rank, 0.0, TARGETS)
    base_dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        base = Llama(cfg, kernels="triton" if cuda else "reference")
    base.init_weights(seed=0)
    base.to(base_dtype)
    # Copies of the base before our layers go on it (in place): transformers' model and peft-ours'.
    hf = hf_model(cfg, base, "sdpa").to(base_dtype) if "peft" in backends else None
    plain = copy.deepcopy(base) if "peft-ours" in backends else None
    ours = base
    apply_lora(ours, spec, seed=0)
    gen = torch.Generator().manual_seed(1)
    values = {name: (m.lora_A.weight.detach().clone(),
                     (torch.randn(m.lora_B.weight.shape, generator=gen) * 0.01).to(device))
              for name, m in lora_modules(ours)}
    _set_adapters(ours, values, "ours")
    apply_activation_checkpointing(ours, args.ac)
    peft_config = dict(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0, target_modules=list(TARGETS))

    batches = make_batches(cfg.vocab_size, pack_len, 1, args.warmup + args.steps, seed=0)
    tokens = float(np.mean([len(b["input_ids"]) for b in batches]))
    context = float(np.mean([packed_context(b["cu_seqlens"].diff()) for b in batches]))
    fpt = training_flops_per_token(cfg, context, spec.num_params(cfg))
    peak = peak_flops(device, base_dtype, args.peak_tflops)
    ours_fn = step_fn("triton" if cuda else "reference", ours, device)

    fns: dict[str, tuple] = {}
    for backend in backends:
        if backend == "ours":
            fns[backend] = (ours_fn, [p for p in ours.parameters() if p.requires_grad])
        elif backend == "peft-ours":
            model = inject_adapter_in_model(LoraConfig(**peft_config), plain)
            for name, p in model.named_parameters():
                p.requires_grad_("lora_" in name)
            _set_adapters(model, values, "peft-ours")
            apply_activation_checkpointing(model, args.ac)
            fns[backend] = (step_fn("triton" if cuda else "reference", model, device),
                            [p for p in model.parameters() if p.requires_grad])
        else:
            if args.ac == "full":
                hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            hf = get_peft_model(hf, LoraConfig(**peft_config, task_type="CAUSAL_LM"))
            _set_adapters(hf, values, "peft")
            fn = step_fn("hf", hf, device)
            rel = check_hf_matches(ours_fn, fn, batches[0], device)
            if rel > (2e-2 if cuda else 1e-4):
                raise SystemExit(f"error: peft's loss differs from ours by {rel:.2e} (relative): not the same model?")
            fns[backend] = (fn, [p for p in hf.parameters() if p.requires_grad])
    results = run_interleaved(fns, batches, device, args.steps, args.warmup)

    name = torch.cuda.get_device_name() if cuda else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    import peft
    import transformers

    meta = {
        "device": name, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "command": " ".join(["python", "benchmarks/bench_lora.py", *(argv if argv is not None else sys.argv[1:])]),
        "preset": preset, "n_layers": cfg.n_layers, "pack_len": pack_len, "rank": spec.rank,
        "adapter_params": spec.num_params(cfg), "ac": args.ac, "tokens_per_step": tokens, "attention_context": context,
        "precision": "bf16 base, fp32 adapters, bf16 autocast" if cuda else "fp32",
    }
    print(f"{name} | torch {torch.__version__} | transformers {transformers.__version__} | peft {peft.__version__} | "
          f"{meta['date']}")
    print(f"{preset}, {cfg.n_layers} layers, LoRA r={spec.rank} on all 7 projections ({spec.num_params(cfg) / 1e6:.2f}M "
          f"trainable), one {pack_len}-token pack of ShareGPT conversations a step ({tokens:.0f} tokens, mean document "
          f"context {context:.0f}), {meta['precision']}, activation checkpointing {args.ac}\n")
    rows = []
    for backend, (seconds, mem) in results.items():
        rows.append({"backend": backend, "ms_per_step": seconds * 1e3, "tokens_per_s": tokens / seconds,
                     "mfu": fpt * tokens / seconds / peak if peak else None,
                     "step_peak_gib": mem / 2**30 if mem is not None else None})
    speed = {r["backend"]: r["tokens_per_s"] for r in rows}
    print("| backend | ms/step | tokens/s | MFU (LoRA FLOPs) | step peak above resident | vs peft |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
        mem = "n/a" if r["step_peak_gib"] is None else f"{r['step_peak_gib']:.1f} GiB"
        vs = f"{r['tokens_per_s'] / speed['peft']:.2f}x" if "peft" in speed else "-"
        print(f"| {r['backend']} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | {mfu} | {mem} | {vs} |")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
