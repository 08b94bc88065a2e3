"""The run folder: one run at a time (a lock), whether to resume or start over, and writes
that never leave a file half-written.

Layout of RUN (``--out-dir``)::

    .lock              held (fcntl.flock) by rank 0 while a run uses the folder
    config.yaml        the resolved config (``--config RUN/config.yaml`` repeats the run)
    metrics.jsonl      one strict-JSON record a step          (agentflan.trainer.metrics)
    summary.json       written when the run finishes
    checkpoints/       step_N/ training checkpoints            (agentflan.trainer.checkpointing)
    final/             the Hugging Face model, or with LoRA the PEFT adapter (agentflan.trainer.model_io)
    merged/            with LoRA and --merge: the base with the adapter merged in
    tensorboard/       event files
    data/              a --recipe prepared for this run        (agentflan.trainer.data)
    .replaced-TIME/    with --overwrite: the earlier run's files, until this run finishes

Policy (``--resume``, ``--overwrite``): nothing in the folder is removed or rewritten before
the run has passed every check and loaded its data and model; a folder whose run used other
options (the keys that change the trajectory) is refused, naming them; a finished run is
refused unless more ``--steps`` extend it or ``--overwrite`` starts over. Starting over moves
the earlier run's files (one rename each) into ``RUN/.replaced-TIME/``; they are deleted only when
the new run finishes, so a new run that fails or is killed leaves them there to move back.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from agentflan.trainer import checkpointing
from agentflan.trainer.config import TrainConfig, flag, to_yaml
from agentflan.trainer.errors import TrainError

LOCK_FILE = ".lock"
REPLACED_PREFIX = ".replaced-"
CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
# What a run writes (config.json: older versions of the trainer); --overwrite replaces these only.
RUN_FILES = (CONFIG_FILE, "config.json", "metrics.jsonl", SUMMARY_FILE, checkpointing.FOLDER, "final", "merged",
             "tensorboard")
# Options that may change when a run resumes: the length of the run, where, how and how often it
# saves and logs, and how the same computation is spread over devices (activation checkpointing
# recomputes the same values).
FREE_ON_RESUME = frozenset({
    "steps", "epochs", "out_dir", "resume", "overwrite", "save", "save_dtype", "save_every", "keep_checkpoints",
    "parallel", "kernels", "packs_per_step", "ac", "ac_every", "log_every", "peak_tflops", "tensorboard",
    "max_bad_steps", "dry_run", "world_size", "gpu", "merge",
})


def write_atomic(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file renamed over it: a reader (or a
    crash) sees the old file or the new one, never a part. Respects the umask."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove(path: Path) -> None:
    """Removes a file or folder tree; a folder is renamed away first, so a crash never leaves
    a half-deleted folder under its real name."""
    if path.is_dir() and not path.is_symlink():
        doomed = path.with_name(f".deleting-{path.name}-{os.getpid()}")
        os.rename(path, doomed)
        shutil.rmtree(doomed)
    elif path.exists() or path.is_symlink():
        path.unlink()


def config_differences(previous: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """'key: old -> new' for each option that differs from the run recorded in the folder."""
    current = vars(cfg)
    free = set(FREE_ON_RESUME)
    if cfg.warmup_ratio is not None:
        free.add("warmup_steps")  # derived from the step count
    if cfg.init_from is not None:
        free.add("preset")  # only a check of the checkpoint's shape
    return [f"{key}: {previous[key]!r} -> {current[key]!r}" for key in current
            if key not in free and key in previous and previous[key] != current[key]]


@dataclass(frozen=True)
class RunStart:
    """How the run starts: from a checkpoint, or fresh (``clear``: the folder's run files go)."""

    checkpoint: Path | None
    step: int
    clear: bool


class RunFolder:
    """The run folder, locked for this process (rank 0) from ``open`` until ``release``."""

    def __init__(self, path: Path, lock_fd: int, created: bool) -> None:
        self.path, self._lock_fd, self._created = path, lock_fd, created

    @classmethod
    def open(cls, out_dir: str) -> RunFolder:
        """Creates the folder if needed and takes its lock; raises TrainError when another live
        process holds it (the kernel drops the lock of a dead process)."""
        path = Path(out_dir)
        if path.exists() and not path.is_dir():
            raise TrainError(f"--out-dir {path}: exists and is not a folder")
        created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
            fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise TrainError(f"--out-dir {path}: cannot create the run folder ({err.strerror or err})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise TrainError(f"--out-dir {path} is in use by another run ({holder}): wait for it to end, or use "
                             f"another --out-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        return cls(path, fd, created)

    def release(self, started: bool) -> None:
        """Drops the lock; a folder this run created and never started in is removed again."""
        if self._lock_fd < 0:
            return
        os.close(self._lock_fd)
        self._lock_fd = -1
        if self._created and not started:
            (self.path / LOCK_FILE).unlink(missing_ok=True)
            try:
                self.path.rmdir()  # only if empty (a prepared recipe stays as a cache)
            except OSError:
                pass

    def held_run_files(self) -> list[str]:
        return [name for name in RUN_FILES if (self.path / name).exists()]

    def previous_config(self) -> dict[str, Any] | None:
        path = self.path / CONFIG_FILE
        if not path.is_file():
            return None
        try:
            previous = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as err:
            raise TrainError(f"{path}: unreadable ({err}); the folder's run cannot be compared: start over with "
                             f"--overwrite, or use another --out-dir") from None
        return previous if isinstance(previous, dict) else None

    def decide(self, cfg: TrainConfig, warn: Callable[[str], None]) -> RunStart:
        """Resume or start over, by --resume and --overwrite; TrainError when neither is allowed."""
        held = self.held_run_files()
        if cfg.overwrite or cfg.resume == "never":
            if held and not cfg.overwrite:
                raise TrainError(f"{self.path} holds a run ({', '.join(held)}): --resume never starts over there only "
                                 f"with --overwrite; or use another --out-dir")
            return RunStart(None, 0, clear=bool(held))
        previous = self.previous_config()
        differences = config_differences(previous, cfg) if previous else []
        if differences:
            raise TrainError(f"{self.path} holds a run with other options ({'; '.join(differences)}): repeat its "
                             f"options to resume it, pass --resume never --overwrite to start over, or use another "
                             f"--out-dir")
        latest = checkpointing.find_latest(self.path, warn)
        if latest is not None:
            path, state = latest
            check_unfinished(self.path, state.step, cfg.steps)
            return RunStart(path, state.step, clear=False)
        if cfg.resume == "always":
            raise TrainError(f"--resume always: no complete training checkpoint under "
                             f"{self.path / checkpointing.FOLDER}")
        if (self.path / SUMMARY_FILE).exists():
            raise TrainError(f"{self.path} holds a finished run without a training checkpoint: pass --overwrite to "
                             f"start over, or use another --out-dir")
        # A run that stopped before its first checkpoint: the same options start it again.
        return RunStart(None, 0, clear=bool(held))

    def begin(self, cfg: TrainConfig, start: RunStart, say: Callable[[str], None]) -> None:
        """The run is about to train: an old run's files are moved aside (when starting over)
        and the resolved config is recorded."""
        checkpointing.remove_partial(self.path)
        if start.clear:
            held = self.held_run_files()
            if held:
                aside = self.path / f"{REPLACED_PREFIX}{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{os.getpid()}"
                aside.mkdir()
                for name in held:
                    os.rename(self.path / name, aside / name)
                say(f"--overwrite: the earlier run's files ({', '.join(held)}) are kept in {aside} until this run "
                    f"finishes; if it does not, move them back from there")
        write_atomic(self.path / CONFIG_FILE, to_yaml_text(cfg))

    def drop_replaced(self) -> None:
        """The run finished: the earlier runs' files that --overwrite kept aside are deleted."""
        for aside in sorted(self.path.glob(f"{REPLACED_PREFIX}*")):
            remove(aside)


def to_yaml_text(cfg: TrainConfig) -> str:
    return "# written by tools/train.py: the resolved options of this run (--config reads it back)\n" + to_yaml(cfg)


def resume_hint(cfg: TrainConfig) -> str:
    """How to continue a run that a signal stopped: the same command, unless its options
    would not resume (--resume never starts over; --overwrite would replace the run)."""
    if cfg.resume != "never" and not cfg.overwrite:
        return "run the same command to resume"
    drop = " and without --overwrite" if cfg.overwrite else ""
    return f"to resume, run it again with --resume auto{drop}"


def check_unfinished(path: str | Path, done: int, steps: int | None) -> None:
    if steps is not None and done >= steps:
        raise TrainError(f"{path} holds a run finished at step {done}; {flag('steps')} {steps} adds no step: pass "
                         f"{flag('steps')} above {done} to extend it, --overwrite to start over, or use another --out-dir")
