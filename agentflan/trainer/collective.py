"""Agreement of all ranks: on whether a stage failed, on a flag, on a value rank 0 decided.

A user mistake found on one rank must stop every rank (or the others wait in the next
collective until its timeout), and its message should be printed once, not once a rank.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from agentflan.data.conversation import DataFormatError
from agentflan.data.loader import PreparedDatasetError
from agentflan.data.recipe import RecipeError
from agentflan.distributed import DistInfo
from agentflan.trainer.errors import TrainError

T = TypeVar("T")

# Exceptions that report a mistake in the inputs (their messages name the file and reason);
# anything else is a defect and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (TrainError, RecipeError, DataFormatError, PreparedDatasetError)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def agree(info: DistInfo, stage: Callable[[], T], also: tuple[type[BaseException], ...] = ()) -> T:
    """Runs ``stage`` on this rank; if it raised a user error (USER_ERRORS or ``also``) on any
    rank, every rank raises TrainError, and only the lowest failing rank prints it (the
    others' errors are quiet). Collective: every rank must call it."""
    error: BaseException | None = None
    result: Any = None
    try:
        result = stage()
    except USER_ERRORS + also as err:
        error = err
    if not _distributed():
        if error is not None:
            raise _as_train_error(error, quiet=False) from None
        return result
    first = torch.tensor([info.rank if error is not None else info.world_size], dtype=torch.int64, device=info.device)
    dist.all_reduce(first, op=dist.ReduceOp.MIN)
    failed = int(first.item())
    if failed < info.world_size:
        if error is not None:
            raise _as_train_error(error, quiet=info.rank != failed) from None
        raise TrainError(f"rank {failed} stopped the run", quiet=True)
    return result


def _as_train_error(error: BaseException, quiet: bool) -> TrainError:
    if isinstance(error, TrainError):
        error.quiet = error.quiet or quiet
        return error
    return TrainError(str(error), quiet=quiet)


def any_rank(info: DistInfo, flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank. Collective."""
    if not _distributed():
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int64, device=info.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def from_main(info: DistInfo, value: T) -> T:
    """Rank 0's ``value`` on every rank (a picklable object). Collective."""
    if not _distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=info.device if info.device.type == "cuda" else None)
    return box[0]


def gather_lists(info: DistInfo, items: list[str]) -> list[str]:
    """The concatenation of every rank's ``items`` in rank order, on every rank. Collective."""
    if not _distributed():
        return items
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def barrier(info: DistInfo) -> None:
    if _distributed():
        dist.barrier(device_ids=[info.local_rank] if info.device.type == "cuda" else None)
