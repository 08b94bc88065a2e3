"""SwiGLU: Triton kernel vs PyTorch eager reference vs torch.compile vs Liger-Kernel.

    python benchmarks/bench_swiglu.py

Memory bound: forward reads gate and up and writes y (3 tensors); backward reads dy,
gate and up and writes dgate and dup (5 tensors). Reports ms, GB/s, % of copy
bandwidth and peak extra memory.
"""

from __future__ import annotations

import torch

from common import compiled, device_header, fwd_bwd_rows, print_table, require_cuda, try_import

NAME = "bench_swiglu"


def liger_swiglu():
    """Liger-Kernel's fused silu(a) * b, or None when Liger is absent. (Liger's backward
    writes its gradients into its input buffers, so its peak memory is lower by design.)"""
    ops = try_import("liger_kernel.ops.swiglu")
    fn = getattr(ops, "LigerSiLUMulFunction", None) if ops else None
    return None if fn is None else fn.apply


def main() -> None:
    require_cuda(NAME)
    from agentflan.kernels import reference
    from agentflan.kernels.swiglu import swiglu

    impls = {"triton": swiglu, "eager": reference.swiglu, "compile": compiled(reference.swiglu)}
    liger = liger_swiglu()
    if liger is not None:
        impls["liger"] = liger
    print(f"# {NAME}: {device_header()}")
    if liger is None:
        print("(Liger-Kernel not importable: no liger rows)")
    rows = []
    # 16k tokens; Llama-2 7B (11008) and 70B (28672) MLP widths.
    for dtype, ffn in ((torch.bfloat16, 11008), (torch.bfloat16, 28672), (torch.float32, 11008)):
        tokens = 16384
        g = torch.Generator(device="cuda").manual_seed(0)
        gate = torch.randn(tokens, ffn, device="cuda", dtype=dtype, generator=g).requires_grad_()
        up = torch.randn(tokens, ffn, device="cuda", dtype=dtype, generator=g).requires_grad_()
        dy = torch.randn(tokens, ffn, device="cuda", dtype=dtype, generator=g)
        nbytes = tokens * ffn * gate.element_size()
        for label, fn in impls.items():
            rows += fwd_bwd_rows(label, fn, [gate, up], [dy], 3 * nbytes, 8 * nbytes,
                                 shape=f"{tokens}x{ffn}", dtype=str(dtype).removeprefix("torch."))
    print_table(rows)


if __name__ == "__main__":
    main()
