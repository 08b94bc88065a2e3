"""Resumable training checkpoints: sharded model and optimizer state (torch.distributed.checkpoint),
every rank's RNG state, and the loop's position, written atomically. Only trainable parameters
are saved: with LoRA, the adapters and their AdamW state (the frozen base is rebuilt at resume).

``RUN/checkpoints/step_N/`` holds DCP's ``.metadata`` and shard files, ``rng-rank{r}.pt`` and
``train_state.json``. A checkpoint is written into ``.tmp-step_N/`` and renamed to ``step_N``
only when every rank has written its part, so a folder named ``step_N`` is always complete;
a write cut off (crash, SIGKILL, full disk) leaves only a ``.tmp-`` folder, removed at the
next start. The newest ``--keep-checkpoints`` are kept. A ``step_N`` whose train_state.json
is unreadable (a damaged file system) is passed over, with a warning, for the one before.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from agentflan.distributed import DistInfo
from agentflan.trainer.collective import agree
from agentflan.trainer.errors import TrainError

FOLDER = "checkpoints"
PREFIX = "step_"
TMP_PREFIX = ".tmp-"
STATE_FILE = "train_state.json"
DCP_METADATA = ".metadata"  # written by torch.distributed.checkpoint when every rank's shards are saved
_LOW_DISK = 256 << 20  # bytes free under which a failed write is blamed on a full disk


def _state_dict_options():
    """Checkpoints hold trainable parameters only: a frozen base (LoRA) is rebuilt from --init-from
    or the seed. dcp.load fails for any trainable tensor the checkpoint lacks, so the model's load
    need not be strict about the frozen ones it leaves out."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False)


@dataclass
class TrainState:
    """Where the loop is: restored on resume so the run continues as if never stopped."""

    step: int = 0  # optimizer steps done; the data position and the LR schedule follow from it
    tokens: int = 0  # tokens trained on so far (all ranks)
    elapsed_s: float = 0.0  # training time so far, over every part of the run
    skipped_steps: int = 0  # steps whose optimizer update was skipped (non-finite or no trained token)
    bad_in_a_row: int = 0  # non-finite steps ending at ``step``


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns at every single-process save and load that it assumes one process: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _step_of(path: Path) -> int | None:
    digits = path.name.removeprefix(PREFIX)
    return int(digits) if path.name.startswith(PREFIX) and digits.isdigit() else None


def read_state(folder: Path) -> TrainState:
    """The train_state.json of a checkpoint; ValueError naming the file if it is not usable."""
    path = folder / STATE_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        state = TrainState(**raw)
    except FileNotFoundError:
        raise ValueError(f"{path}: missing") from None
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"{path}: unreadable ({type(err).__name__}: {err})") from None
    if state.step != _step_of(folder):
        raise ValueError(f"{path}: records step {state.step}, the folder is {folder.name}")
    if not (folder / DCP_METADATA).is_file():
        raise ValueError(f"{folder / DCP_METADATA}: missing")
    return state


def find_latest(run_dir: str | os.PathLike, warn: Callable[[str], None]) -> tuple[Path, TrainState] | None:
    """The newest usable checkpoint under RUN/checkpoints and its state; each unusable newer one
    is named in a warning."""
    root = Path(run_dir) / FOLDER
    if not root.is_dir():
        return None
    found = sorted((p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None), key=_step_of, reverse=True)
    for folder in found:
        try:
            return folder, read_state(folder)
        except ValueError as err:
            warn(f"warning: {err}; using the checkpoint before it")
    return None


def remove_partial(run_dir: str | os.PathLike) -> None:
    """Removes what interrupted writes and deletions left (``.tmp-*``, ``.deleting-*``). Rank 0, under the lock."""
    root = Path(run_dir) / FOLDER
    if root.is_dir():
        for leftover in root.iterdir():
            if leftover.name.startswith((TMP_PREFIX, ".deleting-")):
                shutil.rmtree(leftover, ignore_errors=True)


def describe_failure(err: BaseException, folder: Path) -> str:
    """The cause of a failed write, in words: the OS error if one is in the chain (also inside
    a DCP CheckpointException), else the exception, plus the free space when the disk is nearly full."""
    cause = _os_error(err)
    text = f"{cause.strerror} (errno {errno.errorcode.get(cause.errno, cause.errno)})" if cause else \
        (str(err).strip().splitlines() or [type(err).__name__])[0]
    probe = folder if folder.exists() else folder.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return text
    if free < _LOW_DISK:
        text += f"; the disk holding it has {free / 2**20:.1f} MiB free"
    return text


def _os_error(err: BaseException | None, depth: int = 0) -> OSError | None:
    if err is None or depth > 8:
        return None
    if isinstance(err, OSError) and err.strerror:
        return err
    failures = getattr(err, "failures", None)  # torch.distributed.checkpoint.api.CheckpointException
    if isinstance(failures, dict):
        for wrapped in failures.values():
            found = _os_error(wrapped[0] if isinstance(wrapped, tuple) else wrapped, depth + 1)
            if found:
                return found
    return _os_error(err.__cause__ or err.__context__, depth + 1)


def _write_failure(what: str, folder: Path) -> Callable[[BaseException], TrainError]:
    return lambda err: TrainError(f"cannot write {what} {folder}: {describe_failure(err, folder)}")


def _rng_state() -> dict:
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [py_version, list(py_state), py_gauss],
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))


def _guarded(stage: Callable[[], None], on_error: Callable[[BaseException], TrainError]) -> Callable[[], None]:
    from torch.distributed.checkpoint.api import CheckpointException

    def run() -> None:
        try:
            stage()
        except (OSError, RuntimeError, CheckpointException) as err:
            raise on_error(err) from None

    return run


def save(run_dir: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState,
         info: DistInfo, keep: int, before_commit: Callable[[], None] = lambda: None) -> Path:
    """Writes the checkpoint of ``state.step``, then keeps the newest ``keep``. Collective.

    ``before_commit`` runs on rank 0 once every shard is written, before the rename (tests
    use it to cut a write off). Raises TrainError naming the folder and the cause (disk full,
    permission) on every rank; the checkpoints written before stay as they were.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = Path(run_dir) / FOLDER
    final = root / f"{PREFIX}{state.step}"
    tmp = root / f"{TMP_PREFIX}{final.name}"
    failure = _write_failure("the training checkpoint", final)

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()

    def shards() -> None:
        torch.save(_rng_state(), tmp / f"rng-rank{info.rank}.pt")
        had_state = bool(optimizer.state)
        model_state, optim_state = get_state_dict(model, optimizer, options=_state_dict_options())
        with _single_process_quiet():
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp), no_dist=not _distributed())
        if not had_state:
            # get_state_dict materialises an empty optimizer's state by an lr-0 step, which counts
            # in AdamW's bias correction: a run that saved before its first update would then
            # update differently from one that did not. The state is dropped again (and on load).
            optimizer.state.clear()

    def commit() -> None:
        before_commit()
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as f:
            json.dump(asdict(state), f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # an unreadable checkpoint of the same step, passed over at resume
            os.rename(final, root / f".deleting-{final.name}")
            shutil.rmtree(root / f".deleting-{final.name}")
        os.rename(tmp, final)
        _fsync_dir(root)
        _prune(root, keep)

    try:
        agree(info, _guarded(prepare, failure) if info.is_main else lambda: None)
        agree(info, _guarded(shards, failure))
        agree(info, _guarded(commit, failure) if info.is_main else lambda: None)
    except TrainError:
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(root: Path, keep: int) -> None:
    steps = sorted((p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None), key=_step_of)
    for old in steps[:-keep]:
        doomed = root / f".deleting-{old.name}"
        os.rename(old, doomed)
        shutil.rmtree(doomed)


def load(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo) -> TrainState:
    """Restores a checkpoint into an identically built model and optimizer and this rank's RNG
    (when the checkpoint has this rank); returns its TrainState. Raises TrainError naming the folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    try:
        state = read_state(folder)
        model_state, optim_state = get_state_dict(model, optimizer, options=_state_dict_options())
        loaded = {"model": model_state, "optim": optim_state}
        with _single_process_quiet():
            dcp.load(loaded, checkpoint_id=str(folder), no_dist=not _distributed())
        set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"],
                       options=_state_dict_options())
        if state.step == state.skipped_steps:  # no update applied yet: the saved state is the lr-0 placeholder
            optimizer.state.clear()
        rng = folder / f"rng-rank{info.rank}.pt"
        if rng.is_file():
            _set_rng_state(torch.load(rng, weights_only=True))
    except (OSError, ValueError, RuntimeError, KeyError, CheckpointException) as err:
        raise TrainError(f"cannot resume from {folder}: {describe_failure(err, folder)}") from None
    return state
