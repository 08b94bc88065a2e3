"""Run under torchrun by the distributed tests: builds a model with agentflan.builder and reports.

    python -m torch.distributed.run --nproc_per_node=2 tests/dist_worker.py load_save SRC OUT
    python -m torch.distributed.run --nproc_per_node=2 tests/dist_worker.py train OUT PARALLEL AC SEED

load_save: loads the Hugging Face folder SRC under FSDP, measures each rank's peak resident memory
(RSS) for the load and for two exports (fp32 and bf16) to OUT/fp32 and OUT/bf16, and writes the
logits of a fixed input and the figures to OUT/rank{r}.json.
train: three AdamW steps from scratch (micro shape) with the given parallel mode and activation
checkpointing; the global batch (two packs) is split over the ranks; losses go to OUT/losses.json
and the trained model to OUT/final (export_hf).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from agentflan import distributed  # noqa: E402
from agentflan.builder import build_model  # noqa: E402
from agentflan.model import Llama  # noqa: E402
from agentflan.sharded_checkpoint import export_hf  # noqa: E402

# Imported up front so that their code is part of the baseline, not of the measured peaks.
import safetensors  # noqa: E402,F401
import torch.distributed.checkpoint  # noqa: E402,F401
import torch.distributed.fsdp  # noqa: E402,F401


def rss_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> int:
    """Resets the peak-RSS counter (Linux clear_refs 5) and returns the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")
    return rss_bytes("VmRSS")


def warm_up(out: Path, info: distributed.DistInfo) -> None:
    """One load and export of a micro model, so that the code pages and library state these touch
    on first use are part of the baseline rather than of the measured peaks."""
    from agentflan.checkpoint import save_hf
    from agentflan.config import get_preset

    if info.is_main:
        tiny = Llama(get_preset("micro"))
        tiny.init_weights(seed=0)
        save_hf(tiny, out / "warm_src", dtype=torch.bfloat16)
    torch.distributed.barrier()
    model = build_model(out / "warm_src", info, mode="fsdp", kernels="reference")
    export_hf(model, out / "warm_out")


def load_save(src: str, out: str) -> None:
    info = distributed.init_distributed()
    warm_up(Path(out), info)
    torch.distributed.barrier()
    figures = {}
    base = reset_peak()  # before the model exists: every peak below counts the shard too
    model = build_model(src, info, mode="fsdp", kernels="reference")
    figures["load_peak_rss"] = rss_bytes("VmHWM") - base
    figures["loaded_rss"] = rss_bytes("VmRSS") - base
    ids = torch.arange(97) * 31 % model.config.vocab_size
    with torch.no_grad():
        logits = model(ids).tolist()
    for dtype in ("fp32", "bf16"):
        torch.distributed.barrier()
        reset_peak()
        export_hf(model, Path(out) / dtype, dtype=torch.bfloat16 if dtype == "bf16" else None, max_shard_bytes=64 << 20)
        figures[f"export_{dtype}_peak_rss"] = rss_bytes("VmHWM") - base
    Path(out, f"rank{info.rank}.json").write_text(json.dumps({**figures, "logits": logits if info.rank == 0 else None}))
    del model  # before the process group goes (distributed.shutdown says why)
    distributed.shutdown()


def train(out: str, parallel: str, ac: str, seed: int) -> None:
    info = distributed.init_distributed()
    model = build_model("micro", info, mode=parallel, vocab_size=512, seed=seed, kernels="reference", ac=ac)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(3):
        packs = [torch.randint(0, 512, (int(n),), generator=gen) for n in torch.randint(40, 90, (2,), generator=gen)]
        n_tokens = sum(len(p) for p in packs)
        mine = packs[info.rank :: info.world_size]
        total = torch.zeros((), dtype=torch.float64)
        for i, ids in enumerate(mine):
            cu = torch.tensor([0, len(ids) // 3, len(ids)], dtype=torch.int32)
            loss = model(ids, cu, labels=ids, reduction="sum")
            # DDP and FSDP average gradients over ranks: scale so that the sum is what counts.
            (loss * info.world_size / n_tokens).backward()
            total += loss.detach().double()
        distributed.all_reduce_sum(total)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total.item() / n_tokens)
    export_hf(model, Path(out) / "final")  # collective in every layout
    if info.is_main:
        Path(out, "losses.json").write_text(json.dumps(losses))
    del model, optimizer  # before the process group goes (distributed.shutdown says why)
    distributed.shutdown()


if __name__ == "__main__":
    if sys.argv[1] == "load_save":
        load_save(sys.argv[2], sys.argv[3])
    else:
        train(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
