"""The harness itself: rel_err, assert_close, poisoned_outputs, seeds, and the bf16
interpreter emulation, each shown able to fail.

The bf16 kernels below run wherever the kernel tests run: interpreted (with the
emulation) on CPU, compiled on CUDA. Where torch's bf16 result is correctly rounded
(one arithmetic op, a cast) the comparison is bit-exact; results built from several
roundings (fp32 exp, dot accumulation) are compared with a stated tight bound.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from triton_harness import (
    DEVICE,
    INT_SENTINEL,
    INTERPRETED,
    assert_close,
    bf16_bits_to_f32,
    bf16_emulation_installed,
    f32_to_bf16_bits,
    fresh_seed,
    install_bf16_emulation,
    poisoned_outputs,
    randn,
    rel_err,
    rng,
)

BF16 = torch.bfloat16


def _bf16(n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return randn(n, gen=rng(seed), dtype=BF16, scale=scale)


def _assert_bits_equal(out: torch.Tensor, ref: torch.Tensor, what: str, seed: int) -> None:
    """Bit-for-bit equality (NaN payloads aside: any NaN matches any NaN)."""
    o, r = out.cpu(), ref.cpu()
    both_nan = torch.isnan(o.float()) & torch.isnan(r.float())
    diff = (o.view(torch.int16) != r.view(torch.int16)) & ~both_nan
    if diff.any():
        i = int(torch.nonzero(diff)[0])
        raise AssertionError(
            f"{what}: {int(diff.sum())} of {o.numel()} differ; first at {i}: got {o[i].item()!r} "
            f"want {r[i].item()!r} (seed={seed})"
        )


def _bf16_ulp(v: torch.Tensor) -> torch.Tensor:
    """Spacing of bf16 numbers at |v| (float64), 2**-133 at the bottom of the subnormals."""
    mag = v.double().abs().clamp_min(2.0**-126)
    return torch.exp2(torch.floor(torch.log2(mag)) - 7)


def _assert_correctly_rounded(out: torch.Tensor, exact: torch.Tensor, what: str, seed: int) -> None:
    """out (bf16) is the exact value rounded to nearest: |out - exact| <= half a bf16 ulp."""
    err = (out.cpu().double() - exact.cpu().double()).abs()
    half_ulp = 0.5 * _bf16_ulp(exact.cpu())
    bad = err > half_ulp
    if bad.any():
        i = int(torch.nonzero(bad.reshape(-1))[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} elements not correctly rounded; first at {i}: got {out.reshape(-1)[i].item()!r} "
            f"exact {exact.reshape(-1)[i].item()!r} (seed={seed})"
        )


# ---------------------------------------------------------------------------------
# rel_err / assert_close / seeds
# ---------------------------------------------------------------------------------


def test_rel_err_values():
    ref = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert rel_err(ref, ref) == 0.0
    assert rel_err(ref * 1.001, ref) == pytest.approx(1e-3, rel=1e-9)
    # ||(1,0)|| / ||(3,4)|| = 1/5
    assert rel_err(ref + torch.tensor([1.0, 0.0]), ref) == pytest.approx(0.2, rel=1e-12)
    # ref == 0: the absolute norm of out, so exact zeros pass and anything else is measured
    assert rel_err(torch.zeros(3), torch.zeros(3)) == 0.0
    assert rel_err(torch.tensor([0.0, 3.0, 4.0]), torch.zeros(3)) == pytest.approx(5.0)
    with pytest.raises(AssertionError, match="shape mismatch"):
        rel_err(torch.zeros(3), torch.zeros(4))


def test_rel_err_is_float64():
    # In fp32 the 1e-9 perturbation of 1.0 vanishes; in float64 it is measured.
    ref = torch.ones(1000, dtype=torch.float64)
    out = ref + 1e-9
    assert rel_err(out, ref) == pytest.approx(1e-9, rel=1e-6)
    # Mixed dtypes are compared in float64 too: a bf16 output against an fp32 reference.
    r = torch.tensor([1.0 + 2.0**-8])
    assert rel_err(r.to(BF16), r) == pytest.approx(2.0**-8 / (1.0 + 2.0**-8), rel=1e-12)


def test_assert_close_passes_and_fails_with_message():
    seed = 1234
    ref = torch.linspace(-1, 1, 101)
    assert_close(ref * (1 + 1e-4), ref, tol=2e-4, name="y", seed=seed)
    with pytest.raises(AssertionError, match=r"y: relative error 1\.0\d*e-02 > tol 1\.0e-03 \(seed=1234\)"):
        assert_close(ref * 1.01, ref, tol=1e-3, name="y", seed=seed)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_assert_close_rejects_non_finite(bad):
    ref = torch.ones(10)
    out = ref.clone()
    out[7] = bad
    with pytest.raises(AssertionError, match=r"dx: 1 of 10 elements are NaN/Inf \(first at index \(7,\)"):
        # A huge tolerance: only the finiteness check can fail here.
        assert_close(out, ref, tol=1e30, name="dx", seed=5)


def test_fresh_seed_and_rng():
    seeds = {fresh_seed() for _ in range(8)}
    assert len(seeds) > 1 and all(0 <= s < 2**31 for s in seeds)
    s = fresh_seed()
    assert torch.equal(torch.randn(5, generator=rng(s)), torch.randn(5, generator=rng(s)))


# ---------------------------------------------------------------------------------
# poisoned_outputs
# ---------------------------------------------------------------------------------


def test_poisoned_outputs_poisons_and_restores():
    originals = (torch.empty, torch.empty_like, torch.empty_strided, torch.Tensor.new_empty)
    base = torch.ones(4, 3)
    with poisoned_outputs():
        assert torch.isnan(torch.empty(5, 7)).all()
        assert torch.isnan(torch.empty((2, 3), dtype=BF16)).all()
        assert torch.isnan(torch.empty_like(base)).all()
        assert torch.isnan(torch.empty_strided((2, 3), (1, 2))).all()
        assert torch.isnan(base.new_empty((6,))).all()
        assert (torch.empty(9, dtype=torch.int32) == INT_SENTINEL).all()
        assert (torch.empty_like(base, dtype=torch.int64) == INT_SENTINEL).all()
        # The sentinel does not fit int16: the type's minimum instead.
        assert (torch.empty(3, dtype=torch.int16) == torch.iinfo(torch.int16).min).all()
        # requires_grad leaves are poisoned too (under no_grad) and keep requiring grad.
        leaf = torch.empty(3, requires_grad=True)
        assert leaf.requires_grad and torch.isnan(leaf.detach()).all()
        assert torch.zeros(3).eq(0).all()  # zeros stay zeros
    assert (torch.empty, torch.empty_like, torch.empty_strided, torch.Tensor.new_empty) == originals


def test_poisoned_outputs_restores_after_exception():
    original = torch.empty
    with pytest.raises(RuntimeError, match="boom"):
        with poisoned_outputs():
            raise RuntimeError("boom")
    assert torch.empty is original


@triton.jit
def _copy_all_but_last(X, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N - 1  # the bug: the last element is never written
    tl.store(Y + offs, tl.load(X + offs, mask=mask), mask=mask)


def _buggy_copy(x: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(x)
    _copy_all_but_last[(triton.cdiv(x.numel(), 64),)](x, y, x.numel(), BLOCK=64)
    return y


def test_poisoned_outputs_catch_an_unwritten_element():
    seed = fresh_seed()
    x = randn(100, gen=rng(seed))
    with poisoned_outputs():
        y = _buggy_copy(x)
    with pytest.raises(AssertionError, match=r"1 of 100 elements are NaN/Inf \(first at index \(99,\)"):
        assert_close(y, x, tol=1e-6, name="copy", seed=seed)


# ---------------------------------------------------------------------------------
# bf16 conversions used by the emulation (pure numpy, against torch's rounding)
# ---------------------------------------------------------------------------------


def _tricky_f32() -> torch.Tensor:
    """Ties, near-ties, overflow, subnormals, zeros, infinities, NaN."""
    specials = torch.tensor(
        [0.0, -0.0, 1.0, -1.0, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, -(1.0 + 2.0**-8), 1.0 + 2.0**-8 + 2.0**-20,
         1.0 + 2.0**-8 - 2.0**-20, 3.3895313892515355e38, 3.4e38, -3.4e38, 1e-39, -1e-39, 2.0**-133, 2.0**-134,
         float("inf"), -float("inf"), float("nan")],
        dtype=torch.float32,
    )
    bits = torch.randint(0, 2**31 - 1, (4000,), generator=rng(7), dtype=torch.int64)
    random_f32 = bits.to(torch.int32).view(torch.float32)  # every exponent, both signs below
    return torch.cat([specials, random_f32, -random_f32])


def test_f32_to_bf16_bits_matches_torch_rounding():
    x = _tricky_f32()
    got = torch.from_numpy(f32_to_bf16_bits(x.numpy()).view(np.int16)).view(BF16)
    _assert_bits_equal(got, x.to(BF16), "fp32->bf16 bits", seed=7)
    back = torch.from_numpy(bf16_bits_to_f32(got.view(torch.int16).numpy().view(np.uint16)))
    _assert_bits_equal(back.to(BF16), got, "bf16->fp32->bf16 round trip", seed=7)


def test_f64_to_bf16_bits_is_correctly_rounded():
    # Values just off a bf16 tie by less than fp32 can hold: a float64 -> fp32 -> bf16 path
    # double-rounds them to the wrong side; the emulation must not.
    tie = 1.0 + 2.0**-8
    x = np.array([tie + 2.0**-40, tie - 2.0**-40, -(tie + 2.0**-40), 1e300, -1e300, 3.0e-41], dtype=np.float64)
    got = torch.from_numpy(f32_to_bf16_bits(x).view(np.int16)).view(BF16)
    _assert_correctly_rounded(got[[0, 1, 2, 5]], torch.from_numpy(x[[0, 1, 2, 5]]), "fp64->bf16", seed=0)
    assert got[0].item() == 1.0 + 2.0**-7 and got[1].item() == 1.0 and got[2].item() == -(1.0 + 2.0**-7)
    assert math.isinf(got[3].item()) and got[3].item() > 0 and got[4].item() < 0


def test_f32_to_bf16_round_toward_zero():
    x = torch.tensor([1.0 + 2.0**-7 - 2.0**-20, -(1.0 + 2.0**-7 - 2.0**-20), 3.4e38, float("inf")])
    got = torch.from_numpy(f32_to_bf16_bits(x.numpy(), round_toward_zero=True).view(np.int16)).view(BF16)
    assert got.tolist() == [1.0, -1.0, 3.3895313892515355e38, float("inf")]


# ---------------------------------------------------------------------------------
# bf16 kernels: interpreted with the emulation on CPU, compiled on CUDA
# ---------------------------------------------------------------------------------


def test_emulation_installed_where_interpreted():
    assert bf16_emulation_installed() == INTERPRETED
    assert install_bf16_emulation() == INTERPRETED  # idempotent: a second call changes nothing


@triton.jit
def _arith_kernel(X, Y, Z, ADD, MUL, SUB, DIV, MULADD, SEL, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    m = offs < N
    x = tl.load(X + offs, mask=m, other=1.0)
    y = tl.load(Y + offs, mask=m, other=1.0)
    z = tl.load(Z + offs, mask=m, other=1.0)
    tl.store(ADD + offs, x + y, mask=m)
    tl.store(MUL + offs, x * y, mask=m)
    tl.store(SUB + offs, x - y, mask=m)
    tl.store(DIV + offs, x / y, mask=m)
    tl.store(MULADD + offs, x * y + x, mask=m)
    # comparisons, negation, maximum and select on negative values: wrong on raw bits
    tl.store(SEL + offs, tl.where(x > y, -x, tl.maximum(y, z)), mask=m)


def test_bf16_elementwise_arithmetic_bit_exact():
    seed = fresh_seed()
    n = 1000
    x, y, z = _bf16(n, seed), _bf16(n, seed + 1), _bf16(n, seed + 2, scale=100.0)
    outs = [torch.empty_like(x) for _ in range(6)]
    _arith_kernel[(1,)](x, y, z, *outs, n, BLOCK=1024)
    refs = [x + y, x * y, x - y, x / y, x * y + x, torch.where(x > y, -x, torch.maximum(y, z))]
    for what, out, ref in zip(("add", "mul", "sub", "div", "x*y+x", "where/neg/max"), outs, refs):
        _assert_bits_equal(out, ref, f"bf16 {what}", seed)


@triton.jit
def _scalar_kernel(X, O):
    x = tl.load(X)  # a scalar, not a block
    y = tl.load(X + 1)
    tl.store(O, x * y - 0.75)
    tl.store(O + 1, tl.maximum(-x, y) / x)


def test_bf16_scalar_arithmetic_bit_exact():
    seed = fresh_seed()
    x = _bf16(2, seed)
    out = torch.empty_like(x)
    _scalar_kernel[(1,)](x, out)
    ref = torch.stack([x[0] * x[1] - 0.75, torch.maximum(-x[0], x[1]) / x[0]])
    _assert_bits_equal(out, ref, "bf16 scalar ops", seed)


@triton.jit
def _fma_kernel(X, Y, Z, O, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    m = offs < N
    x = tl.load(X + offs, mask=m)
    y = tl.load(Y + offs, mask=m)
    z = tl.load(Z + offs, mask=m)
    tl.store(O + offs, tl.fma(x, y, z), mask=m)


def test_bf16_fma_correctly_rounded():
    seed = fresh_seed()
    n = 777
    x, y, z = _bf16(n, seed), _bf16(n, seed + 1), _bf16(n, seed + 2)
    out = torch.empty_like(x)
    _fma_kernel[(1,)](x, y, z, out, n, BLOCK=1024)
    # bf16 operands: x*y is exact in float64 and so is adding z (exponents are close here).
    _assert_correctly_rounded(out, x.double() * y.double() + z.double(), "bf16 fma", seed)


@triton.jit
def _exp_kernel(X, O, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    m = offs < N
    x = tl.load(X + offs, mask=m)
    # tl.exp takes fp32/fp64 only (on GPU as well): upcast, exp, round to bf16, then a
    # bf16 multiply on the rounded result.
    e = tl.exp(x.to(tl.float32)).to(tl.bfloat16)
    tl.store(O + offs, e * x, mask=m)


def test_bf16_exp_and_product():
    seed = fresh_seed()
    n = 513
    x = _bf16(n, seed, scale=3.0)
    out = torch.empty_like(x)
    _exp_kernel[(1,)](x, out, n, BLOCK=1024)
    e = torch.exp(x.double()).to(BF16)
    # exp itself goes through fp32 (within an fp32 ulp or two), so rounding e to bf16 may
    # land one bf16 ulp off the exact rounding; the bf16 product then rounds once more.
    err = (out.cpu().double() - (e * x).cpu().double()).abs()
    assert (err <= 2 * _bf16_ulp((e * x).cpu()) + 0.0).all(), f"bf16 exp*x off by more than an ulp (seed={seed})"
    assert rel_err(out, e.double() * x.double()) < 8e-3, f"seed={seed}"


@triton.jit
def _reduce_kernel(X, SUM, MAX, MIN, CUMSUM, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    m = offs < N
    x = tl.load(X + offs, mask=m, other=0.0)
    tl.store(SUM, tl.sum(x, axis=0))
    xm = tl.load(X + offs, mask=m, other=-float("inf"))
    tl.store(MAX, tl.max(xm, axis=0))
    xn = tl.load(X + offs, mask=m, other=float("inf"))
    tl.store(MIN, tl.min(xn, axis=0))
    tl.store(CUMSUM + offs, tl.cumsum(x, axis=0), mask=m)


def test_bf16_reductions():
    seed = fresh_seed()
    n = 1000
    x = _bf16(n, seed)
    s, mx, mn = (torch.empty(1, dtype=BF16, device=DEVICE) for _ in range(3))
    cs = torch.empty_like(x)
    _reduce_kernel[(1,)](x, s, mx, mn, cs, n, BLOCK=1024)
    # max/min select an element: exact, negatives included.
    _assert_bits_equal(mx, x.max().reshape(1), "bf16 max", seed)
    _assert_bits_equal(mn, x.min().reshape(1), "bf16 min", seed)
    exact_sum = x.double().sum().reshape(1)
    exact_cumsum = x.double().cumsum(0)
    if INTERPRETED:
        # The emulation accumulates in float64 and rounds once: correctly rounded.
        _assert_correctly_rounded(s, exact_sum, "bf16 sum", seed)
        _assert_correctly_rounded(cs, exact_cumsum, "bf16 cumsum", seed)
    else:
        # The GPU rounds to bf16 at every step of its reduction tree / scan.
        assert abs(s.double().item() - exact_sum.item()) <= 2.0**-8 * x.double().abs().sum().item(), f"seed={seed}"
        assert rel_err(cs, exact_cumsum) < 2e-2, f"seed={seed}"


@triton.jit
def _dot_kernel(A, B, C, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
    rm, rk, rn = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    a = tl.load(A + rm[:, None] * K + rk[None, :])  # (M, K) bf16
    b = tl.load(B + rk[:, None] * N + rn[None, :])  # (K, N) bf16
    acc = tl.dot(a, b)  # fp32 accumulator
    tl.store(C + rm[:, None] * N + rn[None, :], acc)


def test_bf16_dot_64x32_at_32x64():
    seed = fresh_seed()
    a = randn(64, 32, gen=rng(seed), dtype=BF16)
    b = randn(32, 64, gen=rng(seed + 1), dtype=BF16)
    c = torch.empty(64, 64, dtype=torch.float32, device=DEVICE)
    _dot_kernel[(1,)](a, b, c, M=64, K=32, N=64)
    # bf16 products are exact in fp32; only the fp32 accumulation order differs.
    assert_close(c, a.double() @ b.double(), tol=1e-6, name="bf16 dot", seed=seed)


@triton.jit
def _cast_kernel(F32, BF, I32, F16, TO_F32, TO_F16, TO_I32, F16_TO_BF, I32_TO_BF, RTZ, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    m = offs < N
    f = tl.load(F32 + offs, mask=m)
    b = tl.load(BF + offs, mask=m)
    i = tl.load(I32 + offs, mask=m)
    h = tl.load(F16 + offs, mask=m)
    tl.store(BF + offs, f.to(tl.bfloat16), mask=m)  # fp32 -> bf16, nearest even
    tl.store(TO_F32 + offs, b.to(tl.float32), mask=m)
    tl.store(TO_F16 + offs, b.to(tl.float16), mask=m)
    tl.store(TO_I32 + offs, b.to(tl.int32), mask=m)
    tl.store(F16_TO_BF + offs, h.to(tl.bfloat16), mask=m)
    tl.store(I32_TO_BF + offs, i.to(tl.bfloat16), mask=m)
    tl.store(RTZ + offs, f.to(tl.bfloat16, fp_downcast_rounding="rtz"), mask=m)


def test_bf16_casts():
    seed = fresh_seed()
    f32 = _tricky_f32()
    f32 = f32[torch.isfinite(f32) | torch.isnan(f32)]  # keep NaN; infinities are covered below
    n = f32.numel()
    g = rng(seed)
    bf = (torch.randn(n, generator=g) * 1000).to(BF16)
    i32 = torch.randint(-(2**30), 2**30, (n,), generator=g, dtype=torch.int32)
    # Just past a bf16 tie, by less than an fp32 ulp: fp32 rounds onto the tie, then bf16 rounds
    # to even (torch and compiled Triton both go through fp32), unlike one correct rounding.
    i32[:4] = torch.tensor([2**29 + 2**21 + 1, -(2**29 + 2**21 + 1), 2**30 + 2**22 + 3, 2**31 - 1])
    f16 = (torch.randn(n, generator=g) * 100).to(torch.float16)
    bf_in = bf.clone()
    to_f32, to_f16 = torch.empty(n), torch.empty(n, dtype=torch.float16)
    to_i32 = torch.empty(n, dtype=torch.int32)
    f16_to_bf, i32_to_bf, rtz = (torch.empty(n, dtype=BF16) for _ in range(3))
    args = [t.to(DEVICE) for t in (f32, bf, i32, f16, to_f32, to_f16, to_i32, f16_to_bf, i32_to_bf, rtz)]
    _cast_kernel[(1,)](*args, n, BLOCK=triton.next_power_of_2(n))
    f32_to_bf, to_f32, to_f16, to_i32, f16_to_bf, i32_to_bf, rtz = (t.cpu() for t in args[1:2] + args[4:])
    _assert_bits_equal(to_f32.to(BF16), bf_in, "bf16->fp32 (exact)", seed)
    assert torch.equal(to_f32, bf_in.float()), f"bf16->fp32 not exact (seed={seed})"
    assert torch.equal(to_f16, bf_in.to(torch.float16)), f"bf16->fp16 (seed={seed})"
    assert torch.equal(to_i32, bf_in.to(torch.int32)), f"bf16->int32 truncates toward zero (seed={seed})"
    _assert_bits_equal(f32_to_bf, f32.to(BF16), "fp32->bf16 nearest even", seed)
    _assert_bits_equal(f16_to_bf, f16.to(BF16), "fp16->bf16", seed)
    _assert_bits_equal(i32_to_bf, i32.to(BF16), "int32->bf16", seed)
    truncated = (f32.view(torch.int32) >> 16).to(torch.int16).view(BF16)
    finite = torch.isfinite(f32)
    _assert_bits_equal(rtz[finite], truncated[finite], "fp32->bf16 toward zero", seed)


@triton.jit
def _clamp_kernel(X, O, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    m = offs < N
    x = tl.load(X + offs, mask=m)
    tl.store(O + offs, tl.clamp(x, -0.5, 0.25), mask=m)


def test_bf16_clamp():
    seed = fresh_seed()
    x = _bf16(300, seed)
    out = torch.empty_like(x)
    _clamp_kernel[(1,)](x, out, 300, BLOCK=512)
    _assert_bits_equal(out, x.clamp(-0.5, 0.25), "bf16 clamp", seed)


@triton.jit
def _atomic_add_kernel(X, O, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.atomic_add(O + offs, tl.load(X + offs, mask=offs < N), mask=offs < N)


@pytest.mark.skipif(not INTERPRETED, reason="the refusal is the emulation's; compiled bf16 atomics are the GPU's own")
def test_bf16_atomic_arithmetic_is_refused_not_garbage():
    x = _bf16(10, 3)
    out = torch.zeros_like(x)
    with pytest.raises(Exception, match="bf16 atomic arithmetic is not emulated"):
        _atomic_add_kernel[(1,)](x, out, 10, BLOCK=16)
