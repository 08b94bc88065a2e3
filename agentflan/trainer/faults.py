"""Faults the loop survives: preemption signals and non-finite steps; and the test-only fault injection.

Preemption and interruption: the first SIGTERM, SIGUSR1 or SIGINT (Ctrl-C) asks the loop to
stop after the step in progress (all ranks agree on that step, see ``agentflan.trainer.step``);
the loop then writes a training checkpoint and exits: 0 after SIGTERM or SIGUSR1 (a scheduler's
preemption, resumed by the same command), 130 after SIGINT (the shell's code for an interrupt:
a script does not take an interrupted run for a finished one). A second signal ends the process
at once, by that signal, with one line on stderr; the same signal again within
``DUPLICATE_WINDOW_S`` is the same request delivered twice (a terminal's Ctrl-C reaches the
workers of torchrun directly and once more forwarded by torchrun) and changes nothing.

Non-finite steps: a step whose loss or global gradient norm is not finite is not applied
(every rank skips the same optimizer update; the step's data is consumed and the LR schedule
moves on) and is counted; ``--max-bad-steps`` such steps in a row abort the run with the
step, the loss and the parameters whose gradients were non-finite.

Test-only fault injection: the environment variable ``AGENTFLAN_TEST_FAULTS`` holds a comma
list of ``kind@step`` (steps counted from 1), for the test suite only:

- ``nan_loss@S``: the loss of step S on the last rank is multiplied by NaN before backward;
- ``inf_grad@S``: after the backward of step S, one gradient element on the last rank is set to inf;
- ``kill_in_checkpoint@S``: rank 0 kills itself (SIGKILL) while writing the checkpoint of
  step S, after every shard is written and before it is committed.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from types import FrameType

import torch
import torch.nn as nn

from agentflan.trainer.errors import TrainError

FAULTS_ENV = "AGENTFLAN_TEST_FAULTS"
FAULT_KINDS = ("nan_loss", "inf_grad", "kill_in_checkpoint")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# torchrun forwards the SIGINT its workers also got from the terminal at once; a person's second
# Ctrl-C comes later than this.
DUPLICATE_WINDOW_S = 1.0
INTERRUPT_EXIT_CODE = 130  # 128 + SIGINT, as shells report an interrupted command


class Preemption:
    """Catches SIGTERM, SIGUSR1 and SIGINT while the loop runs (a context manager; main thread only)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._first_at = 0.0  # time.monotonic() of the first signal
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Preemption:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is None:
            self.signal, self._first_at = signum, time.monotonic()
            return
        if signum == self.signal and time.monotonic() - self._first_at < DUPLICATE_WINDOW_S:
            return  # the first request, delivered again
        # The second request: no more grace. os.write, not print: a handler may run inside a print.
        os.write(2, f"{signal.Signals(signum).name} again: exiting now without a checkpoint of the step in "
                    f"progress\n".encode())
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def interrupted(self) -> bool:
        """Whether the request was SIGINT (a user's Ctrl-C), not a scheduler's preemption."""
        return self.signal == signal.SIGINT

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else "a signal on another rank"


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: the local shard of an FSDP2 DTensor, else the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def clean_name(name: str) -> str:
    """A parameter's name in the model, without the wrappers' parts: DDP's ``module.`` and
    activation checkpointing's ``_checkpoint_wrapped_module.``."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX

    return name.removeprefix("module.").replace(_CHECKPOINT_PREFIX, "")


def nonfinite_gradients(model: nn.Module) -> list[str]:
    """Names of the parameters whose (local shard of the) gradient holds a NaN or inf."""
    return [clean_name(n) for n, p in model.named_parameters()
            if p.grad is not None and not bool(torch.isfinite(local_tensor(p.grad)).all())]


def nonfinite_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of parameters (or their optimizer state) holding a NaN or inf on this rank."""
    bad = []
    for name, p in model.named_parameters():
        tensors = [p.detach(), *(v for v in optimizer.state.get(p, {}).values() if isinstance(v, torch.Tensor))]
        if any(t.is_floating_point() and not bool(torch.isfinite(local_tensor(t)).all()) for t in tensors):
            bad.append(clean_name(name))
    return bad


def name_list(names: list[str], limit: int = 12) -> str:
    """'N parameter(s) in embed_tokens, layers.0, ..., lm_head': the layers (blocks) they belong to,
    in model order; a single parameter is named whole."""
    if len(names) == 1:
        return f"1 parameter: {names[0]}"
    layers: list[str] = []
    for name in names:
        parts = name.split(".")
        layer = ".".join(parts[:2]) if parts[0] == "layers" else parts[0].removesuffix(".weight")
        if layer not in layers:
            layers.append(layer)
    shown = ", ".join(layers[:limit]) + (", ..." if len(layers) > limit else "")
    return f"{len(names)} parameter(s) in {shown}"


class NonFiniteGuard:
    """Counts non-finite steps, and steps without a trained token; raises TrainError after
    ``max_in_a_row`` of either kind in a row."""

    def __init__(self, max_in_a_row: int, in_a_row: int = 0, quiet: bool = False, empty_hint: str = "") -> None:
        self.max_in_a_row = max_in_a_row
        self.in_a_row = in_a_row
        self.quiet = quiet  # every rank raises the same error; one prints it
        self.empty_in_a_row = 0
        self.empty_hint = empty_hint  # what to change when no pack holds a trained token

    def record(self, step: int, finite: bool | None, loss: float | None, grad_norm: float | None,
               params: list[str]) -> None:
        """``step`` counted from 1; ``finite`` None for a step without trained tokens (it neither
        breaks nor extends a run of bad steps); ``params``: those with non-finite gradients (all ranks)."""
        if finite is None:
            self.empty_in_a_row += 1
            if self.empty_in_a_row >= self.max_in_a_row:
                raise TrainError(
                    f"steps {step - self.empty_in_a_row + 1}-{step}: {self.empty_in_a_row} steps in a row whose "
                    f"global batch held no trained token (--max-bad-steps {self.max_in_a_row}): nothing is learned. "
                    f"{self.empty_hint}".rstrip(), quiet=self.quiet)
            return
        self.empty_in_a_row = 0
        if finite:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        if self.in_a_row >= self.max_in_a_row:
            where = f"non-finite gradients in {name_list(params)}" if params else "all gradients finite"
            raise TrainError(
                f"step {step}: {self.in_a_row} steps in a row with a non-finite loss or gradient norm (--max-bad-steps "
                f"{self.max_in_a_row}); last loss {loss}, grad norm {grad_norm}; {where}. The last checkpoint holds "
                f"the weights from before these steps: lower --lr, check the data, or resume with a larger "
                f"--max-bad-steps", quiet=self.quiet)


class FaultInjection:
    """The faults ``AGENTFLAN_TEST_FAULTS`` asks for (test suite only; empty otherwise)."""

    def __init__(self, spec: str | None = None) -> None:
        spec = os.environ.get(FAULTS_ENV, "") if spec is None else spec
        self._faults: set[tuple[str, int]] = set()
        for item in filter(None, (s.strip() for s in spec.split(","))):
            kind, _, step = item.partition("@")
            if kind not in FAULT_KINDS or not step.isdigit():
                raise TrainError(f"{FAULTS_ENV}: {item!r} is not kind@step with kind one of {', '.join(FAULT_KINDS)}")
            self._faults.add((kind, int(step)))

    def at(self, kind: str, step: int) -> bool:
        return (kind, step) in self._faults

    def corrupt_gradient(self, params: Iterable[nn.Parameter]) -> None:
        for p in params:
            if p.grad is not None:
                local_tensor(p.grad).view(-1)[0] = float("inf")
                return


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
