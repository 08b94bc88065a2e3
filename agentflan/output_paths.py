"""Checks of a command's output paths, made before any work: an output is never one of the
inputs, a file is never written where a folder is (or under a file), and nothing that exists
is replaced unless the caller allows it.

Every check raises ``OutputPathError`` (a ValueError) whose message starts with the flag and
the path (``--output data/x.jsonl: ...``), ready to be printed as one ``error:`` line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable


class OutputPathError(ValueError):
    """An output path that cannot or must not be written."""


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file or folder: the same inode when both exist (hard and
    symbolic links included), else the same resolved path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def file_in_the_way(path: str | os.PathLike) -> Path | None:
    """The nearest existing ancestor of ``path`` that is not a folder (nothing can be created
    under it), or None."""
    for parent in Path(os.path.abspath(path)).parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def check_output_file(path: str | os.PathLike, flag: str, *, overwrite: bool | None = False,
                      inputs: Iterable[tuple[str, str | os.PathLike]] = ()) -> Path:
    """Checks that ``path`` can be written as a file: not a folder, not under a file, not one
    of ``inputs`` ((flag, path) pairs), and absent unless ``overwrite`` (None: an existing
    file may be replaced, no flag offers a choice). Returns it as a Path."""
    out = Path(path)
    for input_flag, input_path in inputs:
        if same_file(out, input_path):
            raise OutputPathError(f"{flag} {out}: is the same file as {input_flag} {input_path}; "
                                  "write the output elsewhere")
    blocker = file_in_the_way(out)
    if blocker is not None:
        raise OutputPathError(f"{flag} {out}: {blocker} is a file, not a folder")
    if out.is_dir():
        raise OutputPathError(f"{flag} {out}: is a folder; give the path of a file")
    if out.exists() and not out.is_file():
        raise OutputPathError(f"{flag} {out}: exists and is not a regular file")
    if out.exists() and overwrite is False:
        raise OutputPathError(f"{flag} {out}: exists (use --overwrite to replace it)")
    return out


def check_output_folder(path: str | os.PathLike, flag: str) -> Path:
    """Checks that ``path`` can be a folder: not a file and not under a file. Returns it as a Path."""
    out = Path(path)
    blocker = file_in_the_way(out)
    if blocker is not None:
        raise OutputPathError(f"{flag} {out}: {blocker} is a file, not a folder")
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"{flag} {out}: is a file, not a folder")
    return out
