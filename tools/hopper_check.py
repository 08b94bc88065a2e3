"""Compile every kernel config for H100 (sm_90) on this machine, no GPU needed.

    python tools/hopper_check.py           # markdown table; exit 1 on any problem
    python tools/hopper_check.py --json    # one JSON object per line (used by the tests)
    python tools/hopper_check.py --only flash_attn_dkdv --only rms_norm   # configs whose name holds either

Prints registers, shared memory, spills, stack and wgmma use per config. Needs triton
(with its bundled ptxas and cuobjdump); exits 2 when it cannot compile here.
"""

import argparse
import dataclasses
import json
import os
import sys

from agentflan.cli import ArgumentParser


def main() -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON result per line instead of a table")
    parser.add_argument("--only", action="append", metavar="TEXT",
                        help="check only the configs whose name contains TEXT (repeatable; default: all)")
    args = parser.parse_args()
    # The specs need real @triton.jit functions: drop interpreter mode before triton loads.
    os.environ.pop("TRITON_INTERPRET", None)
    try:
        from agentflan.kernels import compile_check
    except ImportError as exc:
        print(f"error: hopper_check needs triton to compile kernels ({exc}); install it with `pip install triton`",
              file=sys.stderr)
        return 2
    reason = compile_check.toolchain_problem()
    if reason:
        print(f"error: cannot compile for sm_90: {reason}", file=sys.stderr)
        return 2
    specs, missing = compile_check.collect_specs()
    if args.only:
        specs = [s for s in specs if any(text in s.name for text in args.only)]
        if not specs:
            print(f"error: --only {' '.join(args.only)} matches no config name", file=sys.stderr)
            return 2
    results = [compile_check.check(spec) for spec in specs]
    if args.json:
        for r in results:
            print(json.dumps(dataclasses.asdict(r)))
        if missing:
            print(f"kernel modules not present (skipped): {', '.join(missing)}", file=sys.stderr)
    else:
        print(compile_check.format_table(results))
        if missing:
            print(f"\nkernel modules not present (skipped): {', '.join(missing)}")
        failed = [r.name for r in results if not r.ok]
        print(f"\n{len(results) - len(failed)}/{len(results)} configs ok" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if any(not r.ok for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
