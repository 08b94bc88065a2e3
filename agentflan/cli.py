"""The command-line parser of every tool: a user's mistake is one line.

argparse prints its whole usage block before the error (30 lines for tools/train.py), which
buries the one line that matters. ``ArgumentParser`` prints only ``error: <what argparse
found> (see --help)`` and exits 2, as argparse does; --help is unchanged.
"""

from __future__ import annotations

import argparse
import os
import sys
import typing


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors are one line on stderr (exit status 2)."""

    def error(self, message: str) -> typing.NoReturn:
        # Under torchrun every rank parses the same flags: rank 0 prints.
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)
