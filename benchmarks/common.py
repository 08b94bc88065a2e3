"""Benchmark scaffold shared by benchmarks/bench_*.py.

Every benchmark needs CUDA: on a CPU machine it prints "<name>: needs CUDA, skipping
(no numbers)" and exits 0, so running the whole folder anywhere is harmless.

Method (see the project's benchmarking notes): count the floor first (bytes over the
measured copy bandwidth), time with triton.testing.do_bench (median, after warm-up,
on random data), and compare every candidate in the same process on the same card.
"""

from __future__ import annotations

import datetime
import functools
import importlib
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import torch
import triton
import triton.testing


def require_cuda(name: str) -> None:
    """Exit 0 with a message when there is no GPU: a benchmark has nothing to say on CPU."""
    if not torch.cuda.is_available():
        print(f"{name}: needs CUDA, skipping (no numbers)")
        sys.exit(0)


def bench(
    fn: Callable[[], Any], warmup: int = 25, rep: int = 100, grad_to_none: Sequence[torch.Tensor] | None = None
) -> float:
    """Median milliseconds of fn() (warmup and rep are in milliseconds, as do_bench takes them).
    grad_to_none: tensors whose .grad is reset between calls, so backward timings do not
    include gradient accumulation."""
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median"))


@functools.lru_cache(maxsize=None)
def measured_copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


@functools.lru_cache(maxsize=None)
def measured_matmul_flops(dtype: torch.dtype = torch.bfloat16, n: int = 8192) -> float:
    """Dense matmul throughput in flop/s on random n x n operands (8192^3 by default)."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = bench(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3)


def peak_memory(fn: Callable[[], Any]) -> int:
    """Extra bytes allocated at the peak while fn() runs, over what was allocated before
    (what fn returns and keeps alive counts too)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return peak


def try_import(module: str) -> ModuleType | None:
    """The module if importable (e.g. Liger-Kernel, an optional comparison), else None."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def measure(
    label: str,
    fn: Callable[[], Any],
    bytes_moved: int,
    grad_to_none: Sequence[torch.Tensor] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One table row: time, achieved bandwidth, its fraction of the measured copy
    bandwidth, and peak extra memory. bytes_moved is the minimum traffic (every input
    read once, every output written once), so the fraction is against the floor."""
    ms = bench(fn, grad_to_none=grad_to_none)
    bw = bytes_moved / (ms * 1e-3)
    return {
        **extra,
        "impl": label,
        "ms": ms,
        "GB/s": bw / 1e9,
        "% copy bw": 100.0 * bw / measured_copy_bandwidth(),
        "peak MiB": peak_memory(fn) / 2**20,
    }


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def print_table(rows: list[dict[str, Any]]) -> None:
    """Rows as a markdown table; columns in order of first appearance."""
    if not rows:
        print("(no rows)")
        return
    cols: list[str] = []
    for row in rows:
        cols.extend(k for k in row if k not in cols)
    print("| " + " | ".join(cols) + " |")
    print("| " + " | ".join("---" for _ in cols) + " |")
    for row in rows:
        print("| " + " | ".join(_fmt(row.get(c, "")) for c in cols) + " |")


def device_header() -> str:
    """Card, versions, date and measured anchors: the line every results table starts with."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    line = f"{name} | torch {torch.__version__} | triton {triton.__version__} | {when}"
    if torch.cuda.is_available():
        line += f" | copy {measured_copy_bandwidth() / 1e12:.2f} TB/s"
    return line


def fwd_bwd_rows(
    label: str,
    fn: Callable[..., Any],
    inputs: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    bytes_fwd: int,
    bytes_fwd_bwd: int,
    **extra: Any,
) -> list[dict[str, Any]]:
    """Two rows for one implementation: forward alone (under no_grad, so no graph is
    built) and forward + backward against the given output gradients. `inputs` that
    require grad get their .grad reset between timed calls."""

    def forward() -> Any:
        with torch.no_grad():
            return fn(*inputs)

    def forward_backward() -> None:
        out = fn(*inputs)
        torch.autograd.backward(out if isinstance(out, tuple) else (out,), tuple(grads))

    leaves = [t for t in inputs if t.requires_grad]
    return [
        measure(label, forward, bytes_fwd, **extra, **{"pass": "fwd"}),
        measure(label, forward_backward, bytes_fwd_bwd, grad_to_none=leaves, **extra, **{"pass": "fwd+bwd"}),
    ]


def compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """torch.compile of a reference function (compiled once, reused for every shape's
    dynamic=False specialisation)."""
    return torch.compile(fn, dynamic=False)
