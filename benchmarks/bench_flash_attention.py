"""Varlen causal flash attention: Triton kernel vs FlexAttention vs SDPA per document.

    python benchmarks/bench_flash_attention.py

bf16, head dim 128, causal. Two workloads:
- single documents of 2k/4k/8k/16k tokens, 32 heads (Llama-2 7B);
- packed batches of chat-like documents (log-normal lengths as in bench_train_step.py,
  median ~450 tokens) packed at 4096 and 8192 tokens with plan_packs/build_batch, 32768
  tokens per batch, with 32/32 heads (Llama-2 7B) and 64/8 (Llama-2 70B, GQA 8).

Implementations, timed in the same run on the same inputs:
- "triton": agentflan.kernels.flash_attn_varlen;
- "flex": torch.nn.attention.flex_attention (torch.compile'd) with a document-causal
  block mask, built once per batch outside the timing (a trainer builds it once per step
  and shares it across layers);
- "sdpa/doc": reference.varlen_attention, one scaled_dot_product_attention per document
  (a host loop; on H100 SDPA picks its flash backend).

FLOPs count only unmasked work: forward 4 * s^2 * h * d per document of s tokens, halved
for causal; backward 2.5x forward, so forward+backward is 3.5x. "% mm" is the achieved
rate over the measured dense bf16 matmul rate of this card (8192^3). Speed-ups are the
other implementation's time over the Triton kernel's.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from common import bench, device_header, measured_matmul_flops, print_table, require_cuda

NAME = "bench_flash_attention"
HEAD_DIM = 128
DTYPE = torch.bfloat16
SINGLE_LENGTHS = (2048, 4096, 8192, 16384)
SINGLE_HEADS = (32, 32)
PACKED = ((4096, (32, 32)), (8192, (32, 32)), (8192, (64, 8)))  # (pack capacity, (heads, kv heads))
PACKED_TOKENS = 32768


def packed_cu_seqlens(capacity: int, n_tokens: int, seed: int = 0) -> tuple[torch.Tensor, int]:
    """cu_seqlens and max_seqlen of n_tokens / capacity packs of log-normal documents."""
    from agentflan.data.packing import build_batch, plan_packs

    rng = np.random.default_rng(seed)
    n_packs = n_tokens // capacity
    lengths = np.clip(rng.lognormal(mean=6.1, sigma=0.9, size=4 * n_tokens // 300), 8, capacity).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = np.zeros(int(offsets[-1]), dtype=np.int32)  # attention needs only the boundaries
    mask = np.ones(len(tokens), dtype=np.uint8)
    plan = plan_packs(lengths, capacity)
    if plan.n_packs < n_packs:
        raise ValueError("not enough documents drawn to fill the packs")
    batch = build_batch(plan, rng.permutation(plan.n_packs)[:n_packs], tokens, offsets, mask)
    return torch.from_numpy(batch.cu_seqlens).cuda(), int(batch.max_seqlen)


def causal_flops(cu_seqlens: torch.Tensor, n_heads: int) -> float:
    """Forward FLOPs of causal attention over the documents: sum of 2 * s^2 * h * d."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).double()
    return float(2.0 * (lengths**2).sum() * n_heads * HEAD_DIM)


def flex_impl(cu_seqlens: torch.Tensor, total: int, n_heads: int, n_kv_heads: int) -> Callable | None:
    """FlexAttention with a document-causal block mask, in the kernel's (T, H, D) layout;
    None when this torch has no FlexAttention."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    tokens = torch.arange(total, dtype=cu_seqlens.dtype, device="cuda")
    doc = torch.searchsorted(cu_seqlens[1:], tokens, right=True)  # (T,) document of each token

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    block_mask = create_block_mask(document_causal, B=None, H=None, Q_LEN=total, KV_LEN=total, device="cuda")
    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v, cu, max_seqlen):
        out = compiled(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                       block_mask=block_mask, enable_gqa=n_heads != n_kv_heads)
        return out[0].transpose(0, 1)

    return run


def time_impl(fn: Callable, q, k, v, dout, cu, max_seqlen) -> tuple[float, float]:
    """(forward ms, forward+backward ms), medians."""
    def forward():
        with torch.no_grad():
            return fn(q, k, v, cu, max_seqlen)

    def forward_backward():
        fn(q, k, v, cu, max_seqlen).backward(dout)

    return bench(forward), bench(forward_backward, grad_to_none=[q, k, v])


def run_case(
    label: str, cu: torch.Tensor, max_seqlen: int, n_heads: int, n_kv_heads: int, mm_rate: float
) -> list[dict]:
    """Rows for one batch: every implementation, forward and forward+backward."""
    from agentflan.kernels import flash_attn_varlen, reference

    total = int(cu[-1])
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(total, n_heads, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen).requires_grad_()
    k = torch.randn(total, n_kv_heads, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen).requires_grad_()
    v = torch.randn(total, n_kv_heads, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen).requires_grad_()
    dout = torch.randn(total, n_heads, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
    impls: dict[str, Callable] = {"triton": flash_attn_varlen}
    flex = flex_impl(cu, total, n_heads, n_kv_heads)
    if flex is not None:
        impls["flex"] = flex
    impls["sdpa/doc"] = reference.varlen_attention
    with torch.no_grad():  # a sanity line: the kernel agrees with the per-document reference
        ours, ref = flash_attn_varlen(q, k, v, cu, max_seqlen), reference.varlen_attention(q, k, v, cu)
        err = float((ours.float() - ref.float()).norm() / ref.float().norm())
    fwd_flops = causal_flops(cu, n_heads)
    n_docs = cu.shape[0] - 1
    rows, times = [], {}
    for name, fn in impls.items():
        times[name] = time_impl(fn, q, k, v, dout, cu, max_seqlen)
    for name, (fwd_ms, fb_ms) in times.items():
        for pass_name, ms, flops, ours_ms in (("fwd", fwd_ms, fwd_flops, times["triton"][0]),
                                              ("fwd+bwd", fb_ms, 3.5 * fwd_flops, times["triton"][1])):
            rate = flops / (ms * 1e-3)
            rows.append({
                "case": label, "heads": f"{n_heads}/{n_kv_heads}", "docs": n_docs, "impl": name, "pass": pass_name,
                "ms": ms, "TFLOP/s": rate / 1e12, "% mm": 100.0 * rate / mm_rate,
                "triton speed-up": ms / ours_ms, "rel err vs ref": err if name == "triton" else "",
            })
    return rows


def main() -> None:
    require_cuda(NAME)
    print(f"# {NAME}: {device_header()}")
    mm_rate = measured_matmul_flops(DTYPE)
    print(f"measured bf16 matmul: {mm_rate / 1e12:.0f} TFLOP/s; bf16, head dim {HEAD_DIM}, causal\n")
    rows = []
    for s in SINGLE_LENGTHS:
        cu = torch.tensor([0, s], dtype=torch.int32, device="cuda")
        rows += run_case(f"1 doc x {s}", cu, s, *SINGLE_HEADS, mm_rate)
    print("## single documents\n")
    print_table(rows)
    rows = []
    for capacity, (n_heads, n_kv_heads) in PACKED:
        cu, max_seqlen = packed_cu_seqlens(capacity, PACKED_TOKENS)
        rows += run_case(f"packed {PACKED_TOKENS // capacity} x {capacity} (max doc {max_seqlen})", cu, max_seqlen,
                         n_heads, n_kv_heads, mm_rate)
    print("\n## packed batches (log-normal chat documents)\n")
    print_table(rows)


if __name__ == "__main__":
    main()
