"""Every proof that needs a GPU, in one call: kernel tests on compiled Triton, then every benchmark.

    python benchmarks/run_all.py OUT_DIR [--budget-s 480] [--parts NAME ...]

Meant for a short GPU window (one H100/H200, no network): the whole run stays within --budget-s
(default 8 minutes). Each part has its own time limit, cut to what is left of the budget; a part
that fails or runs out of time is recorded and the rest still run. Parts whose time is gone are
recorded as skipped. If the C++ extension is not built yet, the first part builds it with
`pip install --no-build-isolation --no-deps -e .` (no network needed).

Writes to OUT_DIR (three files):
  results.md    card, date, versions and command, a status line per part, then each part's tables:
                ready to paste into benchmarks/RESULTS.md
  results.json  the same as data (the training-step rows as numbers)
  logs.txt      every part's full output
On a machine without CUDA it says so, skips the GPU parts and runs the CPU benchmarks only.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET_S = 480.0


@dataclass
class Part:
    name: str
    command: list[str]
    timeout_s: float
    needs_cuda: bool = False
    env: dict[str, str] = field(default_factory=dict)
    json_out: str | None = None  # a file the command writes into OUT_DIR, merged into results.json


def _py(*args: str) -> list[str]:
    return [sys.executable, *args]


def default_parts(cuda: bool) -> list[Part]:
    """The parts in run order, with time limits that add up to about the default budget."""
    kernel_benches = ["rms_norm", "swiglu", "rope", "cross_entropy", "fused_linear_cross_entropy", "flash_attention"]
    parts = [
        Part("kernel_tests", _py("-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *sorted(
            str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_kernel_*.py")), "tests/test_model_triton.py"),
            timeout_s=150, needs_cuda=True, env={"TRITON_INTERPRET": "0"}),
        Part("train_step",
             _py("benchmarks/bench_train_step.py", "--preset", "llama2-7b", "--n-layers", "4", "--pack-len", "8192",
                 "--steps", "5", "--warmup", "2", "--json", "{out}/train_step.json") if cuda else
             _py("benchmarks/bench_train_step.py", "--steps", "3", "--warmup", "1", "--json", "{out}/train_step.json"),
             timeout_s=150, json_out="train_step.json"),
        *[Part(f"bench_{k}", _py(f"benchmarks/bench_{k}.py"), timeout_s=60, needs_cuda=True) for k in kernel_benches],
        Part("bench_generate", _py("benchmarks/bench_generate.py", "--reps", "2"), timeout_s=90, needs_cuda=True),
        Part("bench_lora", _py("benchmarks/bench_lora.py", "--preset", "llama2-7b", "--pack-len", "8192", "--steps", "4",
                               "--warmup", "2"), timeout_s=150, needs_cuda=True),
        Part("bench_packing", _py("benchmarks/bench_packing.py", "--docs", "10000", "--repeats", "1", "--only", "synthetic"),
             timeout_s=60),
        Part("bench_hf_export", _py("benchmarks/bench_hf_export.py", "--nproc", "2", "--layers", "4", "--dim", "512"),
             timeout_s=60),
        Part("bench_cpu_memory", _py("benchmarks/bench_cpu_memory.py", "--pack-lens", "1024", "4096", "--max-gb", "12"),
             timeout_s=90),
    ]
    return parts


def _extension_built() -> bool:
    try:
        return importlib.util.find_spec("agentflan._C") is not None
    except ImportError:
        return False


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "triton", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "not installed"
    return out


def _card() -> str:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs)"
    return f"CPU only ({platform.machine()}, {os.cpu_count()} cores): no CUDA device"


def run_part(part: Part, out_dir: Path, time_left: float, cuda: bool) -> dict:
    """Runs one part within min(its limit, time_left); returns its record (never raises)."""
    record = {"name": part.name, "command": " ".join(part.command).replace(sys.executable, "python"), "seconds": 0.0}
    if part.needs_cuda and not cuda:
        return {**record, "status": "skipped (needs CUDA)", "output": ""}
    limit = min(part.timeout_s, time_left)
    if limit < 1:
        return {**record, "status": "skipped (time budget used up)", "output": ""}
    command = [arg.replace("{out}", str(out_dir)) for arg in part.command]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **part.env}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        output = proc.stdout + proc.stderr
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        status = f"timed out after {limit:.0f} s"
    record.update(status=status, seconds=time.perf_counter() - t0, output=output)
    if part.json_out and (out_dir / part.json_out).is_file():
        record["data"] = json.loads((out_dir / part.json_out).read_text())
        (out_dir / part.json_out).unlink()  # merged into results.json
    return record


def _tables(output: str) -> str:
    """The markdown table lines of a part's output, with the line before each table (its heading)."""
    lines = output.splitlines()
    keep = []
    for i, line in enumerate(lines):
        if line.startswith("|"):
            if i > 0 and not lines[i - 1].startswith("|") and lines[i - 1].strip():
                keep.append("")
                keep.append(lines[i - 1])
            elif i > 1 and not lines[i - 1].strip() and not lines[i - 2].startswith("|"):
                keep.append("")
                keep.append(lines[i - 2])
            keep.append(line)
    return "\n".join(keep)


def run(parts: list[Part], out_dir: Path, budget_s: float, command: str) -> dict:
    """Runs the parts in order within budget_s seconds and writes results.md, results.json, logs.txt."""
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    meta = {"card": _card(), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "versions": _versions(), "command": command, "budget_s": budget_s}
    print(f"{meta['card']} | {meta['date']}", flush=True)
    if not cuda:
        print("no CUDA device: running the CPU benchmarks only", flush=True)
    start = time.perf_counter()
    records = []
    if not _extension_built():
        build = Part("build", _py("-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."), 240)
        parts = [build, *parts]
    for part in parts:
        record = run_part(part, out_dir, budget_s - (time.perf_counter() - start), cuda)
        records.append(record)
        print(f"{part.name}: {record['status']} ({record['seconds']:.0f} s)", flush=True)
    total = time.perf_counter() - start

    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    md = [f"### {meta['card']}, {meta['date']}", "", f"{versions}; command: `{command}`; total {total:.0f} s of {budget_s:.0f} s",
          "", "| part | status | seconds |", "| --- | --- | ---: |"]
    md += [f"| {r['name']} | {r['status']} | {r['seconds']:.0f} |" for r in records]
    for r in records:
        tables = _tables(r.get("output", ""))
        if tables:
            md += ["", f"#### {r['name']}", tables]
    (out_dir / "results.md").write_text("\n".join(md) + "\n")
    summary = {"meta": {**meta, "total_s": total},
               "parts": [{k: v for k, v in r.items() if k != "output"} for r in records]}
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2))
    with open(out_dir / "logs.txt", "w") as f:
        for r in records:
            f.write(f"===== {r['name']}: {r['status']} ({r['seconds']:.0f} s)\n$ {r['command']}\n{r.get('output', '')}\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="folder for results.md, results.json and logs.txt")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="total wall-clock budget in seconds")
    parser.add_argument("--parts", nargs="+", default=None, help="run only these parts (default: all)")
    args = parser.parse_args(argv)
    parts = default_parts(torch.cuda.is_available())
    if args.parts:
        unknown = sorted(set(args.parts) - {p.name for p in parts})
        if unknown:
            parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(p.name for p in parts)}")
        parts = [p for p in parts if p.name in args.parts]
    command = " ".join(["python", "benchmarks/run_all.py", *(argv if argv is not None else sys.argv[1:])])
    summary = run(parts, args.out_dir, args.budget_s, command)
    print(f"wrote {args.out_dir / 'results.md'}, results.json and logs.txt")
    return 0 if all(p["status"] == "ok" or p["status"].startswith("skipped") for p in summary["parts"]) else 1


if __name__ == "__main__":
    sys.exit(main())
