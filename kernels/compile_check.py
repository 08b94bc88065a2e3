"""Ahead-of-time compilation of every kernel config for Hopper (sm_90), without a GPU.

Each kernel module exposes `hopper_specs() -> list[KernelSpec]`, one spec per config
its wrapper can pick at run time. `check(spec)` compiles it with Triton for
GPUTarget("cuda", 90, 32) and reads what the compiler produced:
- shared memory (Triton's dynamic shared memory) must fit one block: 227 KB;
- register spills: ptxas -v on the PTX (the same ptxas Triton used) reports "bytes
  spill stores"; cuobjdump -res-usage on the cubin reports registers, STACK and LOCAL.
  Spilled registers live in the stack frame, so STACK > 0 with LOCAL == 0 can still
  be spills: the ptxas count is the one that decides (LOCAL > 0 is flagged too);
- the PTX must hold `wgmma` where the spec expects Hopper tensor cores.
Compiling a spec is pure host work (LLVM + ptxas from the triton wheel).

The kernels must be real @triton.jit functions, not the interpreter's wrappers: run
this with TRITON_INTERPRET unset (tools/hopper_check.py does; the test runs it in a
subprocess for that reason).
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any

import triton

# 227 KB: the most shared memory one block may use on H100 (228 KB per SM, 1 KB reserved).
MAX_SHARED_BYTES = 232448
KERNEL_MODULES = ("rms_norm", "swiglu", "rope", "cross_entropy", "fused_linear_cross_entropy", "flash_attention")


@dataclass
class KernelSpec:
    """One compiled variant: the jit function, its full signature (every parameter,
    constexprs marked "constexpr"), the constexpr values and the launch options."""

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    expect_wgmma: bool = False

    def config(self) -> str:
        ptrs = ",".join(f"{k}:{v}" for k, v in self.signature.items() if v.startswith("*"))
        consts = ",".join(f"{k}={v}" for k, v in self.constexprs.items())
        return f"warps={self.num_warps} stages={self.num_stages} {consts} [{ptrs}]"


@dataclass
class CheckResult:
    name: str
    config: str
    registers: int
    shared_bytes: int
    spill_bytes: int  # ptxas "bytes spill stores" (register spills to the stack frame / local memory)
    stack_bytes: int
    has_wgmma: bool
    ok: bool
    problems: list[str] = field(default_factory=list)


def _tool_paths() -> dict[str, str]:
    """The ptxas Triton itself uses for sm_90 (triton 3.9 picks its newer bundled ptxas
    for sm_90 and up, 3.6 the regular one) and the bundled cuobjdump."""
    from triton import knobs
    from triton.backends.nvidia.compiler import get_ptxas

    return {"ptxas": get_ptxas(90).path, "cuobjdump": knobs.nvidia.cuobjdump.path}


def toolchain_problem() -> str | None:
    """Why Hopper AOT compilation cannot run here (None when it can)."""
    try:
        paths = _tool_paths()
    except Exception as exc:  # no NVIDIA backend in this triton build
        return f"triton's NVIDIA backend is unavailable: {type(exc).__name__}: {exc}"
    for tool, path in paths.items():
        if not path or not os.access(path, os.X_OK):
            return f"{tool} not found at {path} (the triton wheel ships it; this install lacks it)"
    return None


def _jit_function(fn: Any) -> Any:
    from triton.runtime.jit import JITFunction

    if not isinstance(fn, JITFunction):
        raise TypeError(
            f"{getattr(fn, '__name__', fn)!r} is a {type(fn).__name__}, not a triton JITFunction; "
            "run the compile check with TRITON_INTERPRET unset"
        )
    return fn


def _res_usage(cubin: bytes) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of the (single) kernel in a cubin, via cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [_tool_paths()["cuobjdump"], "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    usage = {key: int(val) for key, val in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}
    if "REG" not in usage:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line:\n{out}")
    return usage


def _spill_store_bytes(ptx: str, arch: str) -> int:
    """Bytes of register spill stores ptxas reports for the PTX (0 when none)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        # The flags Triton passes that matter for register allocation.
        log = subprocess.run(
            [_tool_paths()["ptxas"], "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", src,
             "-o", os.path.join(tmp, "kernel.o")],
            capture_output=True, text=True, check=True,
        ).stderr
    found = re.findall(r"(\d+) bytes spill stores", log)
    if not found:
        raise RuntimeError(f"ptxas -v printed no spill line:\n{log}")
    return sum(int(n) for n in found)


_CACHE: dict[tuple, CheckResult] = {}


def _cache_key(spec: KernelSpec) -> tuple:
    return (
        spec.fn.__module__, spec.fn.__name__, tuple(spec.signature.items()),
        tuple(sorted((k, repr(v)) for k, v in spec.constexprs.items())), spec.num_warps, spec.num_stages,
        spec.expect_wgmma,
    )


def check(spec: KernelSpec) -> CheckResult:
    """Compile `spec` for sm_90 and check shared memory, spills and (if expected) wgmma.
    Each distinct spec compiles once per process."""
    key = _cache_key(spec)
    if key in _CACHE:
        cached = _CACHE[key]
        return CheckResult(**{**cached.__dict__, "name": spec.name, "problems": list(cached.problems)})
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    problems: list[str] = []
    fn = _jit_function(spec.fn)
    try:
        src = ASTSource(fn=fn, signature=dict(spec.signature), constexprs=dict(spec.constexprs))
        compiled = triton.compile(
            src,
            target=GPUTarget("cuda", 90, 32),
            # fp fusion (fma contraction) is Triton's default; naming it keeps 3.9 from warning.
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages, "enable_fp_fusion": True},
        )
    except Exception as exc:  # a compile failure is a finding, reported like the others
        result = CheckResult(spec.name, spec.config(), 0, 0, 0, 0, False, False,
                             [f"compile failed: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"])
        _CACHE[key] = result
        return result
    shared = int(compiled.metadata.shared)
    usage = _res_usage(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    target = re.search(r"^\.target\s+(sm_\w+)", ptx, re.MULTILINE)
    spills = _spill_store_bytes(ptx, target.group(1) if target else "sm_90a")
    has_wgmma = "wgmma" in ptx
    if shared > MAX_SHARED_BYTES:
        problems.append(f"shared memory {shared} B > {MAX_SHARED_BYTES} B")
    if spills > 0:
        problems.append(f"register spills: {spills} B spill stores (stack frame {usage.get('STACK', 0)} B)")
    if usage.get("LOCAL", 0) > 0:
        problems.append(f"local memory: {usage['LOCAL']} B per thread")
    if spec.expect_wgmma and not has_wgmma:
        problems.append("expected wgmma (Hopper tensor cores) in the PTX, found none")
    result = CheckResult(
        name=spec.name, config=spec.config(), registers=usage["REG"], shared_bytes=shared,
        spill_bytes=spills, stack_bytes=usage.get("STACK", 0), has_wgmma=has_wgmma,
        ok=not problems, problems=problems,
    )
    _CACHE[key] = result
    return result


def collect_specs(modules: tuple[str, ...] = KERNEL_MODULES) -> tuple[list[KernelSpec], list[str]]:
    """(specs of every kernel module present, names of the modules not written yet)."""
    specs: list[KernelSpec] = []
    missing: list[str] = []
    for mod_name in modules:
        full = f"agentflan.kernels.{mod_name}"
        try:
            module = importlib.import_module(full)
        except ModuleNotFoundError as exc:
            if exc.name != full:  # the module exists but one of its imports is missing: a real error
                raise
            missing.append(mod_name)
            continue
        specs.extend(module.hopper_specs())
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"kernel spec names must be unique; repeated: {duplicates}")
    return specs, missing


def all_specs() -> list[KernelSpec]:
    """Every spec of every kernel module present; modules not written yet are named in
    a warning (collect_specs returns them)."""
    specs, missing = collect_specs()
    if missing:
        warnings.warn(f"kernel modules not present, no specs from them: {', '.join(missing)}", stacklevel=2)
    return specs


def format_table(results: list[CheckResult]) -> str:
    """A markdown table of check results."""
    lines = [
        "| kernel | config | regs | shared (B) | spill (B) | stack (B) | wgmma | ok | problems |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.config} | {r.registers} | {r.shared_bytes} | {r.spill_bytes} | {r.stack_bytes} | "
            f"{'yes' if r.has_wgmma else 'no'} | {'ok' if r.ok else 'FAIL'} | {'; '.join(r.problems)} |"
        )
    return "\n".join(lines)
