"""The Triton RoPE against reference.apply_rope: outputs and q/k gradients in fp32, fp16
and bf16 (and bf16/fp16 activations with fp32 tables, as under autocast), on packed
positions that restart in every document, with GQA head counts, odd head_dims,
strided views, poisoned outputs and fresh inputs every run.

The reference runs in float64 on the same (already rounded) inputs and tables. The
kernel computes in fp32 and rounds each output once; tolerances are a small multiple
of the unit roundoff of the dtype being compared.
"""

from __future__ import annotations

import pytest
import torch

from agentflan.kernels import reference
from agentflan.kernels.rope import apply_rope
from agentflan.model import positions_from_cu_seqlens
from triton_harness import DEVICE, DTYPES, assert_close, fresh_seed, poisoned_outputs, randn, rng

TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 6e-3}


def _tables(cu_seqlens: list[int], head_dim: int, dtype: torch.dtype, theta: float = 10000.0):
    cu = torch.tensor(cu_seqlens, dtype=torch.int32, device=DEVICE)
    pos = positions_from_cu_seqlens(cu, cu_seqlens[-1])
    return reference.rope_cos_sin(pos, head_dim, theta, dtype)


def _check(
    cu_seqlens: list[int], n_heads: int, n_kv: int, head_dim: int, dtype: torch.dtype, table_dtype: torch.dtype,
    seed: int,
) -> None:
    T = cu_seqlens[-1]
    g = rng(seed)
    q = randn(T, n_heads, head_dim, gen=g, dtype=dtype)
    k = randn(T, n_kv, head_dim, gen=g, dtype=dtype)
    cos, sin = _tables(cu_seqlens, head_dim, table_dtype, theta=10000.0 + seed % 1000)
    out_dtype = torch.promote_types(dtype, table_dtype)
    dqo = randn(T, n_heads, head_dim, gen=g, dtype=out_dtype)
    dko = randn(T, n_kv, head_dim, gen=g, dtype=out_dtype)

    qk, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
    with poisoned_outputs():
        qo, ko = apply_rope(qk, kk, cos, sin)
        torch.autograd.backward((qo, ko), (dqo, dko))
    assert qo.dtype == out_dtype and ko.dtype == out_dtype
    assert qk.grad.dtype == dtype and kk.grad.dtype == dtype

    q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
    qo64, ko64 = reference.apply_rope(q64, k64, cos.double(), sin.double())
    torch.autograd.backward((qo64, ko64), (dqo.double(), dko.double()))

    what = f"{dtype} tables {table_dtype} T={T} H={n_heads}/{n_kv} D={head_dim}"
    assert_close(qo, qo64, TOL[out_dtype], f"q_out {what}", seed)
    assert_close(ko, ko64, TOL[out_dtype], f"k_out {what}", seed)
    assert_close(qk.grad, q64.grad, TOL[dtype], f"dq {what}", seed)
    assert_close(kk.grad, k64.grad, TOL[dtype], f"dk {what}", seed)


# (cu_seqlens, n_heads, n_kv_heads, head_dim): packed documents including length-1
# ones; GQA ratios 3 and 5; half head_dims 4, 8, 12 (not a power of two) and 64.
LAYOUTS = [
    ([0, 1, 5, 6, 13], 6, 2, 16),
    ([0, 7], 5, 1, 24),
    ([0, 1], 3, 3, 8),
    ([0, 2, 3], 40, 8, 128),  # 40 heads: more than one head block per token
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda v: f"T{v[0][-1]}-H{v[1]}-KV{v[2]}-D{v[3]}")
def test_rope_matches_reference(layout, dtype):
    cu, h, kv, d = layout
    _check(cu, h, kv, d, dtype, dtype, fresh_seed())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_rope_fp32_tables_promote_like_reference(dtype):
    # Under autocast the tables are fp32 and q/k 16-bit: outputs are fp32, as q * cos is.
    _check([0, 3, 4, 11], 4, 2, 32, dtype, torch.float32, fresh_seed())


def test_rope_packed_equals_per_document():
    seed = fresh_seed()
    cu = [0, 4, 5, 12]
    q = randn(12, 4, 16, gen=rng(seed))
    k = randn(12, 2, 16, gen=rng(seed + 1))
    cos, sin = _tables(cu, 16, torch.float32)
    with poisoned_outputs():
        qo, ko = apply_rope(q, k, cos, sin)
    for start, end in zip(cu[:-1], cu[1:]):
        c, s = _tables([0, end - start], 16, torch.float32)  # one document alone, positions from 0
        qd, kd = apply_rope(q[start:end], k[start:end], c, s)
        assert torch.equal(qo[start:end], qd) and torch.equal(ko[start:end], kd), f"doc {start}:{end} (seed={seed})"


def test_rope_backward_is_rotation_by_negative_angle():
    seed = fresh_seed()
    cu = [0, 6, 9]
    q = randn(9, 4, 16, gen=rng(seed)).requires_grad_()
    k = randn(9, 2, 16, gen=rng(seed + 1)).requires_grad_()
    cos, sin = _tables(cu, 16, torch.float32)
    gq, gk = randn(9, 4, 16, gen=rng(seed + 2)), randn(9, 2, 16, gen=rng(seed + 3))
    qo, ko = apply_rope(q, k, cos, sin)
    torch.autograd.backward((qo, ko), (gq, gk))
    rq, rk = apply_rope(gq, gk, cos, -sin)
    # Same fp32 products and sums in the same order: bit-identical.
    assert torch.equal(q.grad, rq) and torch.equal(k.grad, rk), f"seed={seed}"


def test_rope_strided_views_of_a_fused_projection():
    seed = fresh_seed()
    T, H, KV, D = 11, 4, 2, 16
    qkv = randn(T, (H + 2 * KV) * D, gen=rng(seed), dtype=torch.bfloat16).requires_grad_()
    q = qkv[:, : H * D].view(T, H, D)  # token stride (H + 2 KV) * D, not H * D
    k = qkv[:, H * D : (H + KV) * D].view(T, KV, D)
    cos, sin = _tables([0, 5, 11], D, torch.bfloat16)
    with poisoned_outputs():
        qo, ko = apply_rope(q, k, cos, sin)
        (qo.float().square().sum() + ko.float().sum()).backward()
    qkv64 = qkv.detach().double().requires_grad_()
    qo64, ko64 = reference.apply_rope(
        qkv64[:, : H * D].view(T, H, D), qkv64[:, H * D : (H + KV) * D].view(T, KV, D), cos.double(), sin.double()
    )
    (qo64.square().sum() + ko64.sum()).backward()
    tol = TOL[torch.bfloat16]
    assert_close(qo, qo64, tol, "q_out", seed)
    assert_close(ko, ko64, tol, "k_out", seed)
    assert_close(qkv.grad, qkv64.grad, tol, "d qkv", seed)


def test_rope_head_major_layout():
    # (heads, T, head_dim) storage seen as (T, heads, head_dim): head stride > token stride.
    seed = fresh_seed()
    q = randn(3, 9, 8, gen=rng(seed)).transpose(0, 1)
    k = randn(1, 9, 8, gen=rng(seed + 1)).transpose(0, 1)
    cos, sin = _tables([0, 9], 8, torch.float32)
    with poisoned_outputs():
        qo, ko = apply_rope(q, k, cos, sin)
    rq, rk = reference.apply_rope(q.double(), k.double(), cos.double(), sin.double())
    assert_close(qo, rq, TOL[torch.float32], "q_out", seed)
    assert_close(ko, rk, TOL[torch.float32], "k_out", seed)


def test_rope_only_q_used():
    seed = fresh_seed()
    q = randn(5, 2, 8, gen=rng(seed)).requires_grad_()
    k = randn(5, 1, 8, gen=rng(seed + 1)).requires_grad_()
    cos, sin = _tables([0, 5], 8, torch.float32)
    qo, _ = apply_rope(q, k, cos, sin)
    qo.sum().backward()
    assert torch.equal(k.grad, torch.zeros_like(k)) and torch.isfinite(q.grad).all()


def test_rope_rejects_bad_inputs():
    q = torch.zeros(5, 4, 8, device=DEVICE)
    k = torch.zeros(5, 2, 8, device=DEVICE)
    cos, sin = _tables([0, 5], 8, torch.float32)
    with pytest.raises(ValueError, match=r"k \(4, 2, 8\) does not match q"):
        apply_rope(q, k[:4], cos, sin)
    with pytest.raises(ValueError, match="head_dim must be even"):
        apply_rope(q[..., :7], k[..., :7], cos[:, :7], sin[:, :7])
    with pytest.raises(ValueError, match=r"cos must be \(T, head_dim\) = \(5, 8\)"):
        apply_rope(q, k, cos[:4], sin)
    with pytest.raises(TypeError, match="q and k must share one dtype"):
        apply_rope(q, k.half(), cos, sin)
    with pytest.raises(ValueError, match="cos requires grad"):
        apply_rope(q, k, cos.clone().requires_grad_(), sin)
