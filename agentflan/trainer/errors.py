"""The error the trainer reports as one ``error: ...`` line (a user mistake or an environment fault)."""

from __future__ import annotations


class TrainError(Exception):
    """A mistake in the options, the files they name or the run folder, or a fault of the
    machine (disk full, permissions), found by the trainer. The message names the flag,
    file or folder and the reason; ``tools/train.py`` prints it as ``error: <message>``
    and exits 1, with no traceback.

    ``quiet``: this rank does not print the message (another rank prints it).
    """

    def __init__(self, message: str, quiet: bool = False) -> None:
        super().__init__(message)
        self.quiet = quiet
