"""Gradient clipping in the trainer: the global norm is exact to fp32 rounding on the CPU however
large the tensors (torch's CPU 2-norm kernel is not), gradients are scaled as
torch.nn.utils.clip_grad_norm_ scales them, and a non-finite gradient gives a non-finite norm."""

import math

import pytest
import torch
import torch.nn as nn

from agentflan.trainer.grad_norm import clip_grad_norm_, total_grad_norm


def _params(seed: int) -> list[nn.Parameter]:
    """Three parameters with gradients of different sizes and scales; most of the norm is in the
    largest, of 3e6 elements, whose norm torch's CPU kernel gets low by ~5e-5."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for n, scale in ((3_000_000, 1.0), (1_000, 10.0), (17, 100.0)):
        p = nn.Parameter(torch.zeros(n))
        p.grad = torch.randn(n, generator=gen) * scale
        params.append(p)
    return params


def _exact_norm(params: list[nn.Parameter]) -> float:
    return torch.linalg.vector_norm(torch.cat([p.grad.double() for p in params])).item()


def test_cpu_grad_norm_is_exact_to_fp32_rounding(seed):
    params = _params(seed)
    norm = total_grad_norm([p.grad for p in params])
    assert norm.dtype == torch.float32 and norm.dim() == 0
    assert norm.item() == pytest.approx(_exact_norm(params), rel=1e-6)


def test_clipping_scales_to_max_norm_and_returns_the_norm_before(seed):
    params = _params(seed)
    before = _exact_norm(params)
    grads = [p.grad.clone() for p in params]
    max_norm = 0.25 * before
    assert clip_grad_norm_(params, max_norm).item() == pytest.approx(before, rel=1e-6)
    coef = max_norm / (before + 1e-6)  # torch.nn.utils.clip_grad_norm_'s coefficient
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, g * coef, rtol=1e-6, atol=0)
    assert _exact_norm(params) == pytest.approx(max_norm, rel=1e-6)

    unclipped = [p.grad.clone() for p in params]
    assert clip_grad_norm_(params, math.inf).item() == pytest.approx(max_norm, rel=1e-6)  # measures only
    for p, g in zip(params, unclipped):
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_a_nonfinite_gradient_gives_a_nonfinite_norm(seed, bad):
    params = _params(seed)
    params[0].grad[seed % params[0].numel()] = bad
    assert not math.isfinite(clip_grad_norm_(params, 1.0).item())
