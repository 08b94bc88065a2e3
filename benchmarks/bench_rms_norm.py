"""RMSNorm: Triton kernel vs PyTorch eager reference vs torch.compile vs Liger-Kernel.

    python benchmarks/bench_rms_norm.py

Memory bound: the floor is the bytes moved (forward reads x, writes y; backward reads
dy and x, writes dx; the weight, rstd and dw partials are negligible) over the
measured copy bandwidth. Reports ms, GB/s, % of copy bandwidth and peak extra memory.
"""

from __future__ import annotations

import torch

from common import compiled, device_header, fwd_bwd_rows, print_table, require_cuda, try_import

NAME = "bench_rms_norm"
EPS = 1e-5


def liger_rms_norm():
    """Liger-Kernel's RMSNorm in Llama casting mode, not in place (positional arguments:
    x, weight, eps, offset, casting_mode, in_place), or None when Liger is absent."""
    ops = try_import("liger_kernel.ops.rms_norm")
    fn = getattr(ops, "LigerRMSNormFunction", None) if ops else None
    if fn is None:
        return None
    return lambda x, w: fn.apply(x, w, EPS, 0.0, "llama", False)


def main() -> None:
    require_cuda(NAME)
    from agentflan.kernels import reference
    from agentflan.kernels.rms_norm import rms_norm

    impls = {
        "triton": lambda x, w: rms_norm(x, w, EPS),
        "eager": lambda x, w: reference.rms_norm(x, w, EPS),
        "compile": compiled(lambda x, w: reference.rms_norm(x, w, EPS)),
    }
    liger = liger_rms_norm()
    if liger is not None:
        impls["liger"] = liger
    print(f"# {NAME}: {device_header()}")
    if liger is None:
        print("(Liger-Kernel not importable: no liger rows)")
    rows = []
    # 16k tokens; Llama-2 7B (4096) and 70B (8192) widths, plus 16384; fp32 is the
    # autocast residual stream, bf16 the FSDP one.
    for dtype, hidden in ((torch.bfloat16, 4096), (torch.bfloat16, 8192), (torch.bfloat16, 16384),
                          (torch.float32, 4096)):
        tokens = 16384
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(tokens, hidden, device="cuda", dtype=dtype, generator=g).requires_grad_()
        w = (1 + 0.1 * torch.randn(hidden, device="cuda", generator=g)).to(dtype).requires_grad_()
        dy = torch.randn(tokens, hidden, device="cuda", dtype=dtype, generator=g)
        nbytes = tokens * hidden * x.element_size()
        for label, fn in impls.items():
            rows += fwd_bwd_rows(label, fn, [x, w], [dy], 2 * nbytes, 5 * nbytes,
                                 shape=f"{tokens}x{hidden}", dtype=str(dtype).removeprefix("torch."))
    print_table(rows)


if __name__ == "__main__":
    main()
