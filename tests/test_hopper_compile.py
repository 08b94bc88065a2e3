"""Every config of every Triton kernel compiles for H100 (sm_90) without a GPU: fits in
227 KB of shared memory, spills no registers, and uses wgmma where it should.

The specs come from each kernel module's hopper_specs(). Compilation needs real
@triton.jit functions, and this test process runs the interpreter on CPU machines, so
tools/hopper_check.py compiles them in a subprocess with TRITON_INTERPRET unset (once
per session; Triton's on-disk cache makes repeat runs fast).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton
import triton.language as tl

from agentflan.kernels import compile_check

ROOT = Path(__file__).resolve().parents[1]
SPECS, MISSING = compile_check.collect_specs()
TOOLCHAIN_PROBLEM = compile_check.toolchain_problem()
needs_toolchain = pytest.mark.skipif(
    TOOLCHAIN_PROBLEM is not None, reason=f"no Hopper toolchain: {TOOLCHAIN_PROBLEM}"
)


def _compile_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "tests"), env.get("PYTHONPATH")]))
    return env


def _run(args: list[str]) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=_compile_env(), capture_output=True, text=True, timeout=900
    )
    if proc.returncode not in (0, 1):  # 1 = some spec has a problem: reported per spec below
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    return {r["name"]: r for r in _run(["tools/hopper_check.py", "--json"])}


def test_specs_exist_and_are_named_uniquely():
    assert SPECS, f"no kernel module exposes hopper_specs() (missing: {MISSING})"
    names = [s.name for s in SPECS]
    assert len(names) == len(set(names))


@needs_toolchain
@pytest.mark.parametrize("name", [s.name for s in SPECS])
def test_spec_compiles_for_hopper(results, name):
    assert name in results, f"{name}: hopper_check.py produced no result for it"
    r = results[name]
    assert r["ok"], f"{name} ({r['config']}): {'; '.join(r['problems'])}"


# ---------------------------------------------------------------------------------
# The checker itself must be able to fail: kernels built to trip each check.
# ---------------------------------------------------------------------------------


@triton.jit
def _matmul_tile(A, B, C, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm, rn, rk = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, 4):
        a = tl.load(A + rm[:, None] * (4 * BK) + (k * BK + rk)[None, :])
        b = tl.load(B + (k * BK + rk)[:, None] * BN + rn[None, :])
        acc += tl.dot(a, b)
    tl.store(C + rm[:, None] * BN + rn[None, :], acc)


@triton.jit
def _elementwise(X, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < N) * 2, mask=offs < N)


def selftest_specs() -> list[compile_check.KernelSpec]:
    mm_sig = {"A": "*bf16", "B": "*bf16", "C": "*fp32", "BM": "constexpr", "BN": "constexpr", "BK": "constexpr"}
    ew_sig = {"X": "*bf16", "Y": "*bf16", "N": "i32", "BLOCK": "constexpr"}
    return [
        # A 128x128x64 bf16 tile: fits, uses wgmma.
        compile_check.KernelSpec("good_matmul", _matmul_tile, mm_sig, {"BM": 128, "BN": 128, "BK": 64}, 8, 3, True),
        # 256x256x128 bf16 tiles, 4 stages deep: (256*128 + 128*256) * 2 B * 4 > 227 KB.
        compile_check.KernelSpec("too_much_shared", _matmul_tile, mm_sig, {"BM": 256, "BN": 256, "BK": 128}, 8, 4),
        # No dot at all, yet wgmma expected.
        compile_check.KernelSpec("no_wgmma", _elementwise, ew_sig, {"BLOCK": 1024}, 4, 1, True),
        # tl.arange needs a power of two: a compile error, reported not raised.
        compile_check.KernelSpec("compile_error", _elementwise, ew_sig, {"BLOCK": 1000}, 4, 1),
    ]


_SELFTEST = (
    "import dataclasses, json, test_hopper_compile as t\n"
    "from agentflan.kernels import compile_check as c\n"
    "for s in t.selftest_specs(): print(json.dumps(dataclasses.asdict(c.check(s))))\n"
)


@needs_toolchain
def test_checker_catches_each_problem():
    got = {r["name"]: r for r in _run(["-c", _SELFTEST])}
    good = got["good_matmul"]
    assert good["ok"] and good["has_wgmma"] and good["spill_bytes"] == 0 and 0 < good["shared_bytes"] <= 232448, good
    assert good["registers"] > 0
    shared = got["too_much_shared"]
    assert not shared["ok"] and any("shared memory" in p for p in shared["problems"]), shared
    assert not got["no_wgmma"]["ok"] and any("wgmma" in p for p in got["no_wgmma"]["problems"]), got["no_wgmma"]
    err = got["compile_error"]
    assert not err["ok"] and err["problems"][0].startswith("compile failed"), err


def test_format_table():
    r = compile_check.CheckResult("k[bf16]", "warps=4", 32, 1024, 0, 0, False, True, [])
    bad = compile_check.CheckResult("k2", "warps=8", 255, 0, 64, 96, False, False, ["register spills: 64 B"])
    table = compile_check.format_table([r, bad]).splitlines()
    assert table[0].startswith("| kernel | config | regs | shared (B) | spill (B) |")
    assert table[2] == "| k[bf16] | warps=4 | 32 | 1024 | 0 | 0 | no | ok |  |"
    assert table[3].endswith("| FAIL | register spills: 64 B |")


def test_help_and_missing_triton(tmp_path):
    """--help works without triton (it is imported after the arguments are parsed); a run
    without it prints one `error:` line and exits 2."""
    blocker = tmp_path / "triton"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('No module named triton (blocked for this test)')\n")
    env = {**_compile_env(), "PYTHONPATH": str(tmp_path)}
    help_run = subprocess.run([sys.executable, "tools/hopper_check.py", "--help"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
    assert help_run.returncode == 0, help_run.stderr
    assert "--json" in help_run.stdout and "sm_90" in help_run.stdout
    run = subprocess.run([sys.executable, "tools/hopper_check.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2
    assert run.stderr.startswith("error: ") and "triton" in run.stderr and len(run.stderr.splitlines()) == 1


@needs_toolchain
def test_only_filter_that_matches_nothing_is_an_error():
    run = subprocess.run([sys.executable, "tools/hopper_check.py", "--only", "no_such_kernel"], cwd=ROOT,
                         env=_compile_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stderr.startswith("error: --only no_such_kernel matches no config")
