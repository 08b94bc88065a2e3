"""The proving harness every Triton kernel test uses.

On a machine without CUDA the kernels run under Triton's interpreter
(`TRITON_INTERPRET=1`, set by tests/conftest.py before triton is imported); on
CUDA they run compiled. The same tests run in both places.

What is here:
- DEVICE / INTERPRETED: where the kernels run and whether it is the interpreter.
- fresh_seed / rng: fresh random inputs every run, with the seed printed on failure
  so any failure can be replayed.
- rel_err / assert_close: one relative-error metric (float64), and an assertion that
  first demands every element is finite, so a poisoned element a kernel forgot to
  write cannot pass.
- poisoned_outputs: a context under which torch.empty & co. hand back NaN (floats) or
  a sentinel (integers) instead of whatever memory held, so unwritten outputs fail.
- install_bf16_emulation: makes the interpreter compute bfloat16 correctly (see the
  section comment below for why and how).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numpy as np
import torch

DEVICE: str = "cuda" if torch.cuda.is_available() else "cpu"
# Triton reads TRITON_INTERPRET as a boolean knob; mirror its spelling of "true".
INTERPRETED: bool = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Integer outputs come back filled with this under poisoned_outputs(): large, negative
# and odd, so it is neither a plausible index nor a plausible count.
INT_SENTINEL = -0x2B2B2B2B


def fresh_seed() -> int:
    """A seed from the OS entropy pool: every run draws new inputs."""
    return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF


def rng(seed: int) -> torch.Generator:
    """A CPU generator (inputs are drawn on the CPU, then moved to DEVICE, so a seed
    replays the same inputs on any machine)."""
    return torch.Generator(device="cpu").manual_seed(seed)


def randn(
    *shape: int, gen: torch.Generator, dtype: torch.dtype = torch.float32, scale: float = 1.0, device: str = DEVICE
) -> torch.Tensor:
    """Standard-normal values times `scale`, drawn in fp32 on the CPU from `gen`, then cast and moved."""
    return (torch.randn(*shape, generator=gen, dtype=torch.float32) * scale).to(device=device, dtype=dtype)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64.

    Where ref is all zeros the relative error is undefined; the absolute norm ||out||
    is returned instead, so an exact zero passes and anything else is measured.
    """
    if out.shape != ref.shape:
        raise AssertionError(f"shape mismatch: out {tuple(out.shape)} vs ref {tuple(ref.shape)}")
    o = out.detach().to(device="cpu", dtype=torch.float64)
    r = ref.detach().to(device="cpu", dtype=torch.float64)
    ref_norm = torch.linalg.vector_norm(r).item()
    diff_norm = torch.linalg.vector_norm(o - r).item()
    if ref_norm == 0.0:
        return diff_norm
    return diff_norm / ref_norm


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float, name: str, seed: int) -> None:
    """Assert `out` is finite everywhere and within relative error `tol` of `ref`."""
    bad = ~torch.isfinite(out.detach())
    if bad.any():
        first = tuple(int(i) for i in torch.nonzero(bad)[0].tolist())
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {out.numel()} elements are NaN/Inf (first at index {first}: "
            f"{out.detach()[first].item()}); an unwritten output or an overflow (seed={seed})"
        )
    if not torch.isfinite(ref.detach()).all():
        raise AssertionError(f"{name}: the reference itself holds NaN/Inf; the test inputs are wrong (seed={seed})")
    err = rel_err(out, ref)
    if not err <= tol:
        raise AssertionError(f"{name}: relative error {err:.3e} > tol {tol:.1e} (seed={seed})")


# ---------------------------------------------------------------------------------
# Poisoned allocations
# ---------------------------------------------------------------------------------


def _poison(t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if t.is_floating_point() or t.is_complex():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool and t.numel() > 0:
            info = torch.iinfo(t.dtype)
            t.fill_(INT_SENTINEL if info.min <= INT_SENTINEL <= info.max else info.min)
    return t


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Within this context torch.empty, torch.empty_like, torch.empty_strided and
    Tensor.new_empty return tensors filled with NaN (floating point) or INT_SENTINEL
    (integers; the type's minimum where the sentinel does not fit). Kernel wrappers
    allocate their outputs with these, so an element a kernel never writes stays
    poisoned and assert_close reports it. Wrappers must call them through the torch
    module (`torch.empty(...)`), which is looked up at call time, not a name
    imported before the context opened. torch.zeros and friends are left alone:
    a zero-initialised buffer is a deliberate choice, not an unwritten output.
    """
    originals = {
        "empty": torch.empty,
        "empty_like": torch.empty_like,
        "empty_strided": torch.empty_strided,
    }
    original_new_empty = torch.Tensor.new_empty

    def wrap(fn):
        def poisoned(*args, **kwargs):
            return _poison(fn(*args, **kwargs))

        return poisoned

    def poisoned_new_empty(self, *args, **kwargs):
        return _poison(original_new_empty(self, *args, **kwargs))

    for name, fn in originals.items():
        setattr(torch, name, wrap(fn))
    torch.Tensor.new_empty = poisoned_new_empty
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)
        torch.Tensor.new_empty = original_new_empty


# ---------------------------------------------------------------------------------
# bfloat16 under the Triton interpreter
#
# The interpreter keeps bfloat16 values as their raw uint16 bit patterns (numpy has
# no bfloat16) and then applies numpy arithmetic, comparisons, reductions and
# matmul to those integers, so every bf16 computation is garbage; its fp32<->bf16
# casts also truncate instead of rounding to nearest even. fp16 and fp32 are fine.
#
# The emulation keeps the storage format (uint16 bits in memory, loads, stores,
# reshapes, selects and bitcasts are already right) and intercepts the builder
# operations that interpret values: where an operand is bf16 it decodes the bits
# to fp32 (exact), runs the interpreter's own fp32 code, and encodes the result
# back to bf16 rounding to nearest even. Because fp32 carries more than 2*8+2
# significand bits, rounding an fp32 sum/product/quotient of bf16 operands to bf16
# gives the correctly rounded bf16 result, which is what the GPU's bf16 arithmetic
# produces. Reductions (sum) accumulate in float64 and round once; the GPU rounds
# at each step of its reduction tree, so GPU bf16 sums are slightly less accurate
# than the emulation's (kernels should upcast before reducing anyway).
#
# Interception points (present with the same meaning in triton 3.6 and 3.9; checked
# at install time so a future triton fails loudly instead of silently):
#   InterpreterBuilder.binary_op / unary_op / create_fma / create_clampf   arithmetic, compares
#   InterpreterBuilder.cast_impl / create_fp_to_fp                          casts
#   InterpreterBuilder.create_dot                                           tl.dot
#   InterpreterBuilder.create_atomic_rmw                                    bf16 atomics: refused
#   ReduceOps.sum / ReduceOps.min_max / ScanOps.cumsum / ScanOps.cumprod    reductions, scans
# The builder's other methods (select, splat, reshape, load/store...) move bits and
# need nothing.
# ---------------------------------------------------------------------------------

_EMULATION_MARK = "_agentflan_bf16_emulation"


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """uint16 bf16 bit patterns -> float32 values (exact)."""
    widened = np.asarray(np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16))  # 0-d stays an array
    return widened.view(np.float32)


def _f64_to_f32_round_to_odd(x: np.ndarray) -> np.ndarray:
    """float64 -> float32 rounding to odd: an inexact result gets its last bit set.

    Rounding to odd at 24 bits and then to nearest even at 8 bits equals rounding the
    float64 value to nearest even at 8 bits directly (no double-rounding error)."""
    f = x.astype(np.float32)
    bits = f.view(np.uint32).copy()
    inexact = np.isfinite(x) & (f.astype(np.float64) != x) & ((bits & np.uint32(1)) == 0)
    # Step the magnitude one unit toward x: down where f overshot |x|, up where it fell short.
    overshot = np.abs(f.astype(np.float64)) > np.abs(x)
    bits = np.where(inexact & overshot, bits - np.uint32(1), np.where(inexact, bits + np.uint32(1), bits))
    return bits.astype(np.uint32).view(np.float32)


def f32_to_bf16_bits(values: np.ndarray, round_toward_zero: bool = False) -> np.ndarray:
    """float32/float64 values -> uint16 bf16 bits, rounding to nearest even (or toward
    zero). NaN stays NaN (quiet, sign kept); overflow rounds to +-inf (nearest even)
    or to the largest finite value (toward zero)."""
    x = np.asarray(values)
    with np.errstate(over="ignore", invalid="ignore"):  # float64 beyond fp32 range becomes inf: intended
        if x.dtype == np.float64:
            if round_toward_zero:
                f = x.astype(np.float32)
                f = np.where(np.abs(f.astype(np.float64)) > np.abs(x), np.nextafter(f, np.float32(0)), f)
            else:
                f = _f64_to_f32_round_to_odd(x)
        else:
            f = x.astype(np.float32)
    bits = np.array(f, dtype=np.float32, order="C").view(np.uint32)  # keeps 0-d arrays 0-d
    if round_toward_zero:
        rounded = bits >> np.uint32(16)
    else:
        # Add just under half an ulp, plus one when the kept part is odd: ties go to even.
        # NaNs are excluded below, so the sum cannot wrap around 2**32.
        with np.errstate(over="ignore"):
            rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    quiet_nan = (bits >> np.uint32(16)) | np.uint32(0x0040)
    return np.where(np.isnan(f), quiet_nan, rounded).astype(np.uint16)


def _interpreter_parts():
    """The interpreter internals the emulation patches, checked to exist."""
    import triton
    import triton.language as tl
    from triton.runtime import interpreter as interp

    required = {
        interp: ("InterpreterBuilder", "TensorHandle", "ReduceOps", "ScanOps"),
        getattr(interp, "InterpreterBuilder", None): (
            "binary_op", "unary_op", "create_fma", "create_clampf", "cast_impl", "create_fp_to_fp",
            "create_dot", "create_atomic_rmw",
        ),
        getattr(interp, "ReduceOps", None): ("sum", "min_max", "to_tensor"),
        getattr(interp, "ScanOps", None): ("cumsum", "cumprod"),
    }
    for owner, names in required.items():
        for name in names:
            if owner is None or not hasattr(owner, name):
                raise RuntimeError(
                    f"bf16 interpreter emulation: triton {triton.__version__} lacks interpreter member {name!r}; "
                    "the emulation was written against the triton 3.6-3.9 interpreter and must be revisited"
                )
    return tl, interp


def install_bf16_emulation() -> bool:
    """Patch the Triton interpreter to compute bfloat16 correctly. Idempotent; a no-op
    (returning False) when kernels are not interpreted. Returns True once installed."""
    if not INTERPRETED:
        return False
    tl, interp = _interpreter_parts()
    builder_cls, handle_cls = interp.InterpreterBuilder, interp.TensorHandle
    if getattr(builder_cls, _EMULATION_MARK, False):
        return True

    bf16 = tl.bfloat16

    def is_bf16(h) -> bool:
        dtype = getattr(h.dtype, "scalar", h.dtype)
        return dtype == bf16 and h.data.dtype == np.uint16

    def to_f32(h):
        return handle_cls(bf16_bits_to_f32(h.data), tl.float32) if is_bf16(h) else h

    def to_bf16(h):
        """An fp32 result handle -> bf16 (comparison results stay boolean)."""
        if h.data.dtype == np.bool_:
            return handle_cls(h.data, tl.int1)
        return handle_cls(f32_to_bf16_bits(h.data), bf16)

    orig = {name: getattr(builder_cls, name) for name in (
        "binary_op", "unary_op", "create_fma", "create_clampf", "cast_impl", "create_fp_to_fp", "create_dot",
        "create_atomic_rmw")}

    def binary_op(self, lhs, rhs, op):
        if not (is_bf16(lhs) and is_bf16(rhs)):
            return orig["binary_op"](self, lhs, rhs, op)
        with np.errstate(all="ignore"):
            return to_bf16(orig["binary_op"](self, to_f32(lhs), to_f32(rhs), op))

    def unary_op(self, arg, op):
        if not is_bf16(arg):
            return orig["unary_op"](self, arg, op)
        with np.errstate(all="ignore"):
            return to_bf16(orig["unary_op"](self, to_f32(arg), op))

    def create_fma(self, x, y, z):
        if not any(is_bf16(h) for h in (x, y, z)):
            return orig["create_fma"](self, x, y, z)
        with np.errstate(all="ignore"):
            out = orig["create_fma"](self, to_f32(x), to_f32(y), to_f32(z))
        return to_bf16(out) if is_bf16(z) else out

    def create_clampf(self, arg, lo, hi, propagate_nans):
        if not is_bf16(arg):
            return orig["create_clampf"](self, arg, lo, hi, propagate_nans)
        return to_bf16(orig["create_clampf"](self, to_f32(arg), to_f32(lo), to_f32(hi), propagate_nans))

    def cast_impl(self, src, dst_type):
        src_bf16, dst_bf16 = is_bf16(src), dst_type.scalar == bf16
        if not (src_bf16 or dst_bf16):
            return orig["cast_impl"](self, src, dst_type)
        if src_bf16 and dst_bf16:
            return handle_cls(src.data.copy(), bf16)
        if src_bf16:  # bf16 -> anything: exact to fp32, then the interpreter's own cast
            f32 = to_f32(src)
            return f32 if dst_type.scalar == tl.float32 else orig["cast_impl"](self, f32, dst_type)
        # anything -> bf16. Integers go through fp32 first (round to nearest even twice), as
        # compiled Triton lowers sitofp-to-bf16 and as torch casts: a large int32 near a bf16
        # tie can round differently from a single correct rounding. fp16 is exact in fp32.
        values = src.data if src.data.dtype in (np.float32, np.float64) else src.data.astype(np.float32)
        return handle_cls(f32_to_bf16_bits(values), bf16)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        src_bf16, dst_bf16 = is_bf16(src), dst_type.scalar == bf16
        if src_bf16:
            if dst_bf16:
                return handle_cls(src.data.copy(), bf16)
            f32 = to_f32(src)
            return f32 if dst_type.scalar == tl.float32 else orig["create_fp_to_fp"](self, f32, dst_type, rounding_mode)
        if dst_bf16 and src.data.dtype in (np.float16, np.float32, np.float64):
            rtz = rounding_mode == interp._ir.ROUNDING_MODE.RTZ
            values = src.data.astype(np.float32) if src.data.dtype == np.float16 else src.data
            return handle_cls(f32_to_bf16_bits(values, round_toward_zero=rtz), bf16)
        return orig["create_fp_to_fp"](self, src, dst_type, rounding_mode)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if not any(is_bf16(h) for h in (a, b, d)):
            return orig["create_dot"](self, a, b, d, input_precision, max_num_imprecise_acc)
        out = orig["create_dot"](self, to_f32(a), to_f32(b), to_f32(d), input_precision, max_num_imprecise_acc)
        return to_bf16(out) if is_bf16(d) else out

    def create_atomic_rmw(self, rmwOp, ptr, val, mask, sem, scope):
        # The interpreter would add/compare the raw bits. Nothing in this project should
        # accumulate in bf16 (accumulate in fp32), so refuse loudly rather than emulate.
        if is_bf16(val) and rmwOp != interp._ir.ATOMIC_OP.XCHG:
            raise NotImplementedError(
                "bf16 atomic arithmetic is not emulated under the Triton interpreter; accumulate in fp32"
            )
        return orig["create_atomic_rmw"](self, rmwOp, ptr, val, mask, sem, scope)

    reduce_cls, scan_cls = interp.ReduceOps, interp.ScanOps
    orig_sum, orig_min_max = reduce_cls.sum, reduce_cls.min_max
    orig_cumsum, orig_cumprod = scan_cls.cumsum, scan_cls.cumprod

    def reduce_sum(self, input):
        if not is_bf16(input.handle):
            return orig_sum(self, input)
        total = np.sum(bf16_bits_to_f32(input.handle.data).astype(np.float64), axis=self.axis, keepdims=self.keep_dims)
        return self.to_tensor(f32_to_bf16_bits(np.asarray(total, dtype=np.float64)), input.dtype)

    def reduce_min_max(self, input, val_reduce_op, idx_reduce_op=None):
        input = input[0] if isinstance(input, tuple) else input
        if not is_bf16(input.handle):
            return orig_min_max(self, input, val_reduce_op, idx_reduce_op)
        values = bf16_bits_to_f32(input.handle.data)
        val = idx = None
        if val_reduce_op:
            picked = np.asarray(val_reduce_op(values, axis=self.axis, keepdims=self.keep_dims), dtype=np.float32)
            val = self.to_tensor(f32_to_bf16_bits(picked), input.dtype)  # exact: picked values are bf16 already
        if idx_reduce_op:
            idx = self.to_tensor(idx_reduce_op(values, axis=self.axis, keepdims=self.keep_dims), tl.int32)
        if val is not None and idx is not None:
            return val, idx
        return val if val is not None else idx

    def scan_with(np_scan, original):
        def scan(self, input):
            if not is_bf16(input.handle):
                return original(self, input)
            acc = np_scan(bf16_bits_to_f32(input.handle.data).astype(np.float64), axis=self.axis)
            return [self.to_tensor(f32_to_bf16_bits(acc), input.dtype)]

        return scan

    def get_bf16(self, value):
        # A bf16 scalar constant; the triton 3.6 interpreter has no builder for it at all.
        return handle_cls(f32_to_bf16_bits(np.array([value], dtype=np.float32)), bf16)

    for name, fn in (
        ("get_bf16", get_bf16),
        ("binary_op", binary_op), ("unary_op", unary_op), ("create_fma", create_fma),
        ("create_clampf", create_clampf), ("cast_impl", cast_impl), ("create_fp_to_fp", create_fp_to_fp),
        ("create_dot", create_dot), ("create_atomic_rmw", create_atomic_rmw),
    ):
        setattr(builder_cls, name, fn)
    reduce_cls.sum = reduce_sum
    reduce_cls.min_max = reduce_min_max
    scan_cls.cumsum = scan_with(np.cumsum, orig_cumsum)
    scan_cls.cumprod = scan_with(np.cumprod, orig_cumprod)
    setattr(builder_cls, _EMULATION_MARK, True)
    return True


def bf16_emulation_installed() -> bool:
    """Whether install_bf16_emulation() has patched the interpreter in this process."""
    if not INTERPRETED:
        return False
    from triton.runtime import interpreter as interp

    return bool(getattr(interp.InterpreterBuilder, _EMULATION_MARK, False))


__all__ = [
    "DEVICE", "INTERPRETED", "DTYPES", "INT_SENTINEL", "fresh_seed", "rng", "randn", "rel_err", "assert_close",
    "poisoned_outputs", "install_bf16_emulation", "bf16_emulation_installed",
    "bf16_bits_to_f32", "f32_to_bf16_bits",
]
