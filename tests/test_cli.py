"""Every tool's command line: --help works, and a mistake argparse finds (an unknown flag, a
value outside the choices, a missing argument) is one `error:` line with exit status 2."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = sorted(p.name for p in (ROOT / "tools").glob("*.py"))


def _run(tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / tool), *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("tool", TOOLS)
def test_an_unknown_flag_is_one_error_line_and_help_works(tool, seed):
    flag = "--no-such-flag-" + "".join(random.Random(seed).choices("abcdefgh", k=6))
    proc = _run(tool, flag)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: "), proc.stderr
    # argparse names the unknown flag, or first the arguments that are missing
    assert flag in proc.stderr or "the following arguments are required" in proc.stderr, proc.stderr
    assert "usage:" not in proc.stderr and "--help" in proc.stderr
    helped = _run(tool, "--help")
    assert helped.returncode == 0 and helped.stdout.startswith("usage: "), helped.stderr


def test_a_bad_choice_names_the_flag_and_the_choices(capsys):
    from agentflan.trainer.config import build_parser

    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["--preset", "llama2-8b"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: argument --preset: invalid choice: 'llama2-8b' (choose from ") and "'tiny'" in err
