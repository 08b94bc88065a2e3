"""One optimizer step over a global batch: micro-batches, loss over the batch's trained tokens,
gradient clipping, and an update only when every rank agrees it is finite.

Two small all-reduces a step decide everything on every rank alike: before the forward, the
batch's token counts, its model FLOPs and the stop flag (a rank that caught a signal); after
the backward, the loss and whether any rank saw a non-finite gradient norm.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from agentflan import distributed
from agentflan.data.packing import IGNORE_INDEX, PackedBatch
from agentflan.distributed import DistInfo
from agentflan.lora import training_flops_per_token
from agentflan.perf import packed_context
from agentflan.trainer.collective import gather_lists
from agentflan.trainer.faults import FaultInjection, nonfinite_gradients
from agentflan.trainer.grad_norm import clip_grad_norm_
from agentflan.trainer.plan import RunPlan


@dataclass
class StepResult:
    stopped: bool = False  # a rank asked to stop before this step: nothing was computed or consumed
    loss: float | None = None  # mean over the global batch's trained tokens; None without any
    grad_norm: float | None = None  # global, before clipping; None when no backward ran
    tokens: int = 0  # global
    trained_tokens: int = 0  # global
    flops: float = 0.0  # global model FLOPs of the step (agentflan.perf convention; LoRA: agentflan.lora's)
    data_wait_s: float = 0.0  # this rank's time getting its batches to the device
    skip_reason: str | None = None  # "nonfinite" | "no_trained_tokens" when the update was not applied
    bad_params: list[str] = field(default_factory=list)  # parameters with non-finite gradients (all ranks)


class Stepper:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, plan: RunPlan, info: DistInfo,
                 faults: FaultInjection) -> None:
        self.model, self.optimizer, self.plan, self.info, self.faults = model, optimizer, plan, info, faults
        self.max_norm = plan.cfg.grad_clip or math.inf  # 0: measure the norm, clip nothing
        # FSDP casts parameters itself; otherwise autocast runs the matmuls in bf16 over fp32 weights.
        self.autocast = torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=plan.bf16 and plan.mode != "fsdp")
        self.last_rank = info.rank == info.world_size - 1
        self.adapter_params = plan.adapter_params  # LoRA: the frozen base does no weight-gradient matmuls

    def _to_device(self, b: PackedBatch) -> dict[str, torch.Tensor | int]:
        device = self.info.device
        return {
            "input_ids": torch.from_numpy(b.input_ids).to(device, torch.long, non_blocking=True),
            "labels": torch.from_numpy(b.labels).to(device, non_blocking=True),
            "cu_seqlens": torch.from_numpy(b.cu_seqlens).to(device, non_blocking=True),
            "position_ids": torch.from_numpy(b.position_ids).to(device, torch.long, non_blocking=True),
            "max_seqlen": b.max_seqlen,
        }

    def run(self, step: int, batches: Iterator[PackedBatch], stop: bool) -> StepResult:
        """Step ``step`` (from 0) over this rank's next grad_accum micro-batches. Collective."""
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(self.plan.cfg.grad_accum)]
        inputs = [self._to_device(b) for b in micro]
        data_wait = time.perf_counter() - t0
        flops = sum(len(b.input_ids) * training_flops_per_token(
            self.plan.model_config, packed_context(np.diff(b.cu_seqlens)), self.adapter_params) for b in micro)
        local = [float((b.labels != IGNORE_INDEX).sum()) for b in micro] + [
            float(sum(len(b.input_ids) for b in micro)), flops, float(stop)]
        counts = distributed.all_reduce_sum(torch.tensor(local, dtype=torch.float64, device=self.info.device)).tolist()
        if counts[-1] > 0:
            return StepResult(stopped=True)
        n_trained = sum(counts[: len(micro)])
        result = StepResult(tokens=int(counts[-3]), trained_tokens=int(n_trained), flops=counts[-2], data_wait_s=data_wait)
        if n_trained == 0:  # every token of the global batch is prompt: nothing to learn, nothing computed
            result.skip_reason, result.flops = "no_trained_tokens", 0.0
            return result

        loss_sum = torch.zeros((), dtype=torch.float64, device=self.info.device)
        for i, b in enumerate(inputs):
            last = i == len(inputs) - 1
            if self.plan.mode == "fsdp":
                self.model.set_requires_gradient_sync(last)
            ctx = self.model.no_sync() if self.plan.mode == "ddp" and not last else nullcontext()
            with ctx, self.autocast:
                loss = self.model(b["input_ids"], b["cu_seqlens"], b["position_ids"], labels=b["labels"],
                                  reduction="sum", max_seqlen=b["max_seqlen"])
                if i == 0 and self.last_rank and self.faults.at("nan_loss", step + 1):
                    loss = loss * float("nan")
                # DDP/FSDP average gradients over ranks; scale back so the sum over ranks is used.
                (loss * self.info.world_size / n_trained).backward()
            loss_sum += loss.detach().double()
        if self.last_rank and self.faults.at("inf_grad", step + 1):
            self.faults.corrupt_gradient(self.model.parameters())
        grad_norm = clip_grad_norm_(self.model.parameters(), self.max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
            grad_norm = grad_norm.full_tensor()
        # (with CPU offload the norm of the host-held gradients is on the host)
        flags = torch.stack([loss_sum, (~torch.isfinite(grad_norm)).double().to(loss_sum.device)])
        loss_total, bad_norm = distributed.all_reduce_sum(flags).tolist()
        result.loss, result.grad_norm = loss_total / n_trained, float(grad_norm)
        if math.isfinite(result.loss) and math.isfinite(result.grad_norm) and bad_norm == 0:
            self.optimizer.step()
        else:
            result.skip_reason = "nonfinite"
            result.bad_params = gather_lists(self.info, nonfinite_gradients(self.model))
        self.optimizer.zero_grad(set_to_none=True)
        return result
