"""RoPE on q and k: Triton kernel vs PyTorch eager reference vs torch.compile vs
Liger-Kernel.

    python benchmarks/bench_rope.py

Memory bound: forward reads q, k and the cos/sin tables and writes both outputs;
backward reads the two output gradients and the tables and writes dq, dk. Reports ms,
GB/s, % of copy bandwidth and peak extra memory.
"""

from __future__ import annotations

import torch

from common import compiled, device_header, fwd_bwd_rows, print_table, require_cuda, try_import

NAME = "bench_rope"


def liger_rope():
    """Liger-Kernel's rotary embedding, or None when Liger is absent. Liger takes
    (batch, heads, seq, head_dim) and (1, seq, head_dim) tables, so the packed
    (T, heads, head_dim) layout is presented to it as a batch of one; the transposes are
    views and the timing includes whatever copies Liger makes of them. Liger may rotate
    its inputs in place; they stay rotations of random data, so later timings are
    unaffected."""
    ops = try_import("liger_kernel.ops.rope")
    fn = getattr(ops, "LigerRopeFunction", None) if ops else None
    if fn is None:
        return None

    def run(q, k, cos, sin):
        qo, ko = fn.apply(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
        return qo[0].transpose(0, 1), ko[0].transpose(0, 1)

    return run


def main() -> None:
    require_cuda(NAME)
    from agentflan.kernels import reference
    from agentflan.kernels.rope import apply_rope
    from agentflan.model import positions_from_cu_seqlens

    impls = {"triton": apply_rope, "eager": reference.apply_rope, "compile": compiled(reference.apply_rope)}
    liger = liger_rope()
    if liger is not None:
        impls["liger"] = liger
    print(f"# {NAME}: {device_header()}")
    if liger is None:
        print("(Liger-Kernel not importable: no liger rows)")
    rows = []
    tokens = 16384
    # Packed batch: documents of 1000 tokens, positions restarting in each.
    cu = torch.arange(0, tokens + 1, 1000, device="cuda", dtype=torch.int32)
    cu = torch.cat([cu, torch.tensor([tokens], device="cuda", dtype=torch.int32)]) if cu[-1] != tokens else cu
    positions = positions_from_cu_seqlens(cu, tokens)
    # Llama-2 7B (32/32 heads) and 70B (64/8), head_dim 128.
    for n_heads, n_kv in ((32, 32), (64, 8)):
        dtype, head_dim = torch.bfloat16, 128
        cos, sin = reference.rope_cos_sin(positions, head_dim, 10000.0, dtype)
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(tokens, n_heads, head_dim, device="cuda", dtype=dtype, generator=g).requires_grad_()
        k = torch.randn(tokens, n_kv, head_dim, device="cuda", dtype=dtype, generator=g).requires_grad_()
        dq = torch.randn_like(q)
        dk = torch.randn_like(k)
        qk_bytes = (q.numel() + k.numel()) * q.element_size()
        table_bytes = 2 * cos.numel() * cos.element_size()
        fwd = 2 * qk_bytes + table_bytes
        for label, fn in impls.items():
            rows += fwd_bwd_rows(label, fn, [q, k, cos, sin], [dq, dk], fwd, 2 * fwd,
                                 shape=f"T{tokens} H{n_heads}/{n_kv} D{head_dim}", dtype="bfloat16")
    print_table(rows)


if __name__ == "__main__":
    main()
