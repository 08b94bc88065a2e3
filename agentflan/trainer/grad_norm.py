"""Gradient clipping by the global 2-norm, with a norm as accurate on the CPU as on the GPU.

torch's CPU kernel for the fp32 2-norm accumulates each SIMD lane in one fp32 register
(pytorch/pytorch#169237), so the norm of a large gradient comes out low: by ~5e-5 of its value at
3e6 elements, ~4e-3 at 5e7 (torch 2.13). The clipping coefficient and the logged grad_norm would
be off by that much, and by different amounts for a tensor whole and split into shards over ranks.
torch.sum sums by cascade (pytorch/pytorch#39516): its error stays near fp32 rounding, so on the
CPU the norm is taken as the square root of summed squares. CUDA's tree reductions are accurate,
so GPU gradients keep torch's fused norm (and its lack of temporaries).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def total_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm over every element of ``grads`` (plain tensors or FSDP2's sharded DTensors: the
    result is then a replicated DTensor), a 0-dim fp32 tensor; inf or NaN when any element is.
    On the CPU each tensor's sum of squares takes a temporary the size of its local shard."""
    if not grads:
        return torch.zeros(())
    if grads[0].device.type != "cpu":
        return torch.nn.utils.get_total_norm(grads)
    squares = torch.stack([g.float().square().sum() for g in grads])  # (n_tensors,)
    return squares.sum().sqrt()


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scales the parameters' gradients in place by min(1, max_norm / (norm + 1e-6)), as
    torch.nn.utils.clip_grad_norm_ does (max_norm inf: measures only), and returns the norm
    before clipping (``total_grad_norm``)."""
    params = [p for p in parameters if p.grad is not None]
    norm = total_grad_norm([p.grad for p in params])
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm
