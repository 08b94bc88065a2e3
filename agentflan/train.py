"""Training entry point: ``main`` (the command line of tools/train.py) over ``train``.

The trainer's components live in ``agentflan.trainer``; TrainConfig, train and lr_at are
re-exported here for scripts that import them from this module.
"""

from __future__ import annotations

import os
import sys

from agentflan.data.loader import PreparedDatasetError
from agentflan.trainer.config import TrainConfig, parse_args
from agentflan.trainer.dry_run import dry_run
from agentflan.trainer.errors import TrainError
from agentflan.trainer.faults import INTERRUPT_EXIT_CODE
from agentflan.trainer.loop import train
from agentflan.trainer.optim import lr_at

__all__ = ["TrainConfig", "lr_at", "main", "train"]


def main(argv: list[str] | None = None) -> None:
    """Parses the command line and trains (or, with --dry-run, plans). A user mistake (or a
    refused run folder, an abort, a failed write, a dry run that does not fit its card) prints
    one ``error: ...`` line on one rank and exits 1 on every rank. SIGINT (Ctrl-C) exits 130: in the
    training loop after the step in progress and its checkpoint, elsewhere at once with one line."""
    first_rank = os.environ.get("RANK", "0") == "0"
    try:
        cfg = parse_args(argv)
    except TrainError as err:
        _fail(err, prints=first_rank)  # every rank read the same file: rank 0 tells
    try:
        if cfg.dry_run:
            dry_run(cfg)
        elif train(cfg).get("interrupted"):
            raise SystemExit(INTERRUPT_EXIT_CODE)  # the checkpoint is written; an interrupt is not a success
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which finishes its step instead)
        if first_rank:
            print("error: interrupted (SIGINT) outside the training steps: the run folder holds what the last "
                  "checkpoint wrote", file=sys.stderr, flush=True)
        raise SystemExit(INTERRUPT_EXIT_CODE) from None
    except TrainError as err:
        _fail(err, prints=not err.quiet and (first_rank or not cfg.dry_run))
    except PreparedDatasetError as err:  # a shard changed while training read it: named by file and pack
        _fail(err, prints=True)


def _fail(err: Exception, prints: bool) -> None:
    if prints:
        print(f"error: {err}", file=sys.stderr, flush=True)
    raise SystemExit(1) from None
