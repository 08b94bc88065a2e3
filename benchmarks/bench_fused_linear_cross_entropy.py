"""LM head + cross-entropy: fused (Triton) vs eager vs torch.compile vs Liger's fused version.

    python benchmarks/bench_fused_linear_cross_entropy.py

N=16384 tokens, D=4096 (Llama-2 7B), V=32000 (Llama-2) and 128256 (Llama-3), bf16,
30% of labels ignored, reduction "mean". "fwd" is the loss alone under no_grad (one
(N x D) @ (D x V) matmul, 2NDV FLOPs); "fwd+bwd" is loss and both gradients (three
matmuls, 6NDV; the fused kernel's "none" reduction would add a fourth). "% mm" is
against the measured dense bf16 matmul rate on this card.

Memory: "peak extra" is the peak over the inputs during forward+backward, minus the
gradients every implementation returns (hidden and weight, bf16); the fused kernel's
fp32 weight-gradient accumulator (4VD bytes) stays in it and is shown separately.
"% fp32 logits" compares it with the (N, V) fp32 logits an unfused loss would hold.
"""

from __future__ import annotations

import torch

from agentflan.kernels import reference
from agentflan.kernels.fused_linear_cross_entropy import default_chunk_rows, fused_linear_cross_entropy
from common import bench, device_header, measured_matmul_flops, peak_memory, print_table, require_cuda, try_import

N_TOKENS, DIM = 16384, 4096
VOCABS = (32000, 128256)
DTYPE = torch.bfloat16
IGNORE = -100


def _liger():
    module = try_import("liger_kernel.transformers")
    if module is None:
        return None
    loss = module.LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="mean")
    return lambda h, w, y: loss(w, h, y)  # Liger takes the weight first


def main() -> None:
    require_cuda("bench_fused_linear_cross_entropy")
    print(device_header())
    mm_rate = measured_matmul_flops(DTYPE)
    print(f"measured bf16 matmul: {mm_rate / 1e12:.0f} TFLOP/s")
    compiled = torch.compile(reference.linear_cross_entropy)
    impls = {
        "triton fused": fused_linear_cross_entropy,
        "eager": reference.linear_cross_entropy,
        "torch.compile": compiled,
    }
    liger = _liger()
    if liger is not None:
        impls["liger fused"] = liger
    else:
        print("liger_kernel not importable: no Liger rows")
    rows = []
    for vocab in VOCABS:
        gen = torch.Generator(device="cuda").manual_seed(0)
        hidden = torch.randn(N_TOKENS, DIM, device="cuda", dtype=DTYPE, generator=gen)
        weight = (torch.randn(vocab, DIM, device="cuda", generator=gen) * DIM**-0.5).to(DTYPE)
        labels = torch.randint(0, vocab, (N_TOKENS,), device="cuda", generator=gen)
        labels[torch.rand(N_TOKENS, device="cuda", generator=gen) < 0.3] = IGNORE
        h, w = hidden.requires_grad_(), weight.requires_grad_()
        with torch.no_grad():
            print(
                f"check V={vocab}: fused {fused_linear_cross_entropy(h, w, labels).item():.6f} vs "
                f"torch.compile {compiled(h, w, labels).item():.6f}; chunk {default_chunk_rows(N_TOKENS, 2)} rows"
            )
        flops = 2 * N_TOKENS * DIM * vocab
        fp32_logits = N_TOKENS * vocab * 4
        grads = (h.numel() + w.numel()) * h.element_size()
        for name, fn in impls.items():
            # The fused kernel's fp32 weight-gradient accumulator (more than one chunk here).
            accumulator = w.numel() * 4 if name == "triton fused" else 0
            with torch.no_grad():  # the loss alone: with grads on, the fused forward also computes them
                fwd_ms = bench(lambda fn=fn, h=h, w=w: fn(h, w, labels))
            step = lambda fn=fn, h=h, w=w: fn(h, w, labels).backward()  # noqa: E731
            step_ms = bench(step, grad_to_none=[h, w])
            h.grad = w.grad = None
            extra = peak_memory(step) - grads
            h.grad = w.grad = None
            fwd_rate, step_rate = flops / (fwd_ms * 1e-3), 3 * flops / (step_ms * 1e-3)
            rows.append({
                "V": vocab, "impl": name,
                "fwd ms": fwd_ms, "fwd TFLOP/s": fwd_rate / 1e12, "fwd % mm": 100 * fwd_rate / mm_rate,
                "fwd+bwd ms": step_ms, "fwd+bwd TFLOP/s": step_rate / 1e12, "fwd+bwd % mm": 100 * step_rate / mm_rate,
                "peak extra MiB": extra / 2**20, "% fp32 logits": 100 * extra / fp32_logits,
                "% fp32 logits w/o fp32 acc": 100 * (extra - accumulator) / fp32_logits,
            })
        del hidden, weight, h, w
        torch.cuda.empty_cache()
    print_table(rows)


if __name__ == "__main__":
    main()
