"""Every kernel entry point and every reference op on every tensor layout PyTorch accepts.

For each op and each of its tensor arguments (and the incoming gradient), the argument
is laid out as each of LAYOUTS while the others stay contiguous:
- contiguous;
- transposed: the dimensions stored in reverse order (last-dim stride != 1; a 1-D
  tensor is a column of a row-major matrix, stride 3);
- sliced: a window of wider rows at an odd offset (unit last stride, misaligned start);
- stepped: every other element in every dimension, from an odd offset;
- expanded: stride 0 in the first dimension (every row the same memory);
and for incoming gradients also `sum`, the all-stride-0 gradient `out.sum()` hands back.
Forward outputs and the gradients of every differentiable argument must match the
reference op run on contiguous float64 copies of the same values (with the other
arguments equal), within the dtype's tolerance; outputs the kernels allocate are
poisoned (NaN), so an element left unwritten fails. The reference ops themselves run
on the same layouts against plain float64 formulas written out here.

Sizes are small and odd (the Triton interpreter runs these on CPU); inputs are fresh
every run (seed in each failure message).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

from agentflan.kernels import (
    apply_rope,
    cross_entropy,
    flash_attn_varlen,
    fused_linear_cross_entropy,
    reference,
    rms_norm,
    swiglu,
)
from triton_harness import DEVICE, assert_close, fresh_seed, poisoned_outputs, rng

LAYOUTS = ("contiguous", "transposed", "sliced", "stepped", "expanded")
GRAD_LAYOUTS = (*LAYOUTS, "sum")
IGNORE = -100
EPS = 1e-5


# ---------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------

Draw = Callable[[tuple[int, ...]], torch.Tensor]


def laid_out(
    shape: tuple[int, ...], layout: str, draw: Draw, requires_grad: bool = False, expand_dim: int = 0
) -> torch.Tensor:
    """A tensor of `shape` stored as `layout` (see the module docstring; `expanded` has
    stride 0 in dimension expand_dim), its values from `draw(storage_shape)`. With
    requires_grad the drawn storage is a leaf that requires grad and the result a view
    of it (differentiable, not a leaf)."""
    n = len(shape)
    if layout == "contiguous":
        storage_shape, view = shape, lambda t: t
    elif layout == "transposed" and n == 1:
        storage_shape, view = (shape[0], 3), lambda t: t[:, 1]
    elif layout == "transposed":
        storage_shape, view = tuple(reversed(shape)), lambda t: t.permute(*reversed(range(n)))
    elif layout == "sliced":
        storage_shape, view = (*shape[:-1], shape[-1] + 3), lambda t: t[..., 1 : 1 + shape[-1]]
    elif layout == "stepped":
        storage_shape = tuple(2 * s + 1 for s in shape)
        view = lambda t: t[tuple(slice(1, 2 * s + 1, 2) for s in shape)]  # noqa: E731
    elif layout == "expanded":
        storage_shape, view = tuple(1 if d == expand_dim % n else s for d, s in enumerate(shape)), lambda t: t.expand(shape)
    else:
        raise ValueError(layout)
    storage = draw(storage_shape)
    if requires_grad:
        storage.requires_grad_()
    out = view(storage)
    assert out.shape == shape
    return out


def grad_laid_out(shape: tuple[int, ...], layout: str, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """An incoming gradient of `shape` stored as `layout`; `sum` is what out.sum() hands back."""
    if layout == "sum":
        return torch.ones((), dtype=dtype, device=DEVICE).expand(shape)
    return laid_out(shape, layout, float_draw(gen, dtype))


def float_draw(gen: torch.Generator, dtype: torch.dtype, scale: float = 1.0, shift: float = 0.0) -> Draw:
    def draw(shape: tuple[int, ...]) -> torch.Tensor:
        values = torch.randn(shape, generator=gen, dtype=torch.float32) * scale + shift
        return values.to(device=DEVICE, dtype=dtype)

    return draw


def label_draw(gen: torch.Generator, vocab: int, dtype: torch.dtype) -> Draw:
    """Labels in [0, vocab), about a third of them IGNORE."""

    def draw(shape: tuple[int, ...]) -> torch.Tensor:
        labels = torch.randint(0, vocab, shape, generator=gen)
        labels = labels.masked_fill(torch.rand(shape, generator=gen) < 0.3, IGNORE)
        return labels.to(device=DEVICE, dtype=dtype)

    return draw


def boundary_draw(gen: torch.Generator, total: int, dtype: torch.dtype) -> Draw:
    """Non-decreasing values in [0, total] in storage order, so every view that keeps
    storage order (all layouts here) is a valid cu_seqlens; the first need not be 0 nor
    the last total (tokens outside every document)."""

    def draw(shape: tuple[int, ...]) -> torch.Tensor:
        n = math.prod(shape)
        values = torch.sort(torch.randint(0, total + 1, (n,), generator=gen)).values
        if n >= 3:  # mostly proper documents: start at 0, end at or near total
            values[0] = 0
            values[-1] = max(values[-1].item(), total - 2)
        return values.reshape(shape).to(device=DEVICE, dtype=dtype)

    return draw


# ---------------------------------------------------------------------------------
# Ops: shapes, value draws, kernel call, reference call, float64 formula
# ---------------------------------------------------------------------------------


@dataclass
class Arg:
    shape: tuple[int, ...]
    kind: str  # "float", "weight" (values near 1), "table" (in [-1, 1]), "labels", "labels32", "cu", "cu64"
    grad: bool = False
    # The dimension `expanded` repeats. Not one whose repetition makes a gradient cancel
    # to zero (identical vocabulary rows, keys or values), where relative error means nothing.
    expand_dim: int = 0


@dataclass
class Op:
    name: str
    args: dict[str, Arg]
    kernel: Callable[..., object]
    reference: Callable[..., object]
    formula: Callable[..., object]  # float64 inputs -> float64 outputs
    tol: dict[torch.dtype, float]
    dtypes: tuple[torch.dtype, ...] = (torch.float32,)
    extra: dict = field(default_factory=dict)


def _rms_formula(x, weight):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * weight


def _swiglu_formula(gate, up):
    return gate * torch.sigmoid(gate) * up


def _rope_formula(q, k, cos, sin):
    def rotate(x):
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        c1, c2, s1, s2 = cos[:, None, :half], cos[:, None, half:], sin[:, None, :half], sin[:, None, half:]
        return torch.cat((x1 * c1 - x2 * s1, x2 * c2 + x1 * s2), dim=-1)

    return rotate(q), rotate(k)


def _ce_rows(logits, labels):
    """Per-row -log softmax(logits)[label], 0 on ignored rows."""
    keep = labels != IGNORE
    safe = torch.where(keep, labels, 0).long()
    nll = -torch.log_softmax(logits, dim=-1).gather(1, safe[:, None])[:, 0]
    return torch.where(keep, nll, torch.zeros_like(nll))


def _attention_formula(q, k, v, cu_seqlens, causal=True):
    """Dense masked softmax per document, float64; rows outside every document are 0."""
    total, n_heads, head_dim = q.shape
    group = n_heads // k.shape[1]
    bounds = cu_seqlens.tolist()
    pieces, done = [], 0
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qd = q[start:end].transpose(0, 1)  # (H, L, D)
        kd = k[start:end].transpose(0, 1).repeat_interleave(group, 0)
        vd = v[start:end].transpose(0, 1).repeat_interleave(group, 0)
        scores = qd @ kd.transpose(1, 2) * head_dim**-0.5
        if causal:
            mask = torch.ones(end - start, end - start, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
        pieces += [q.new_zeros(start - done, n_heads, head_dim), (scores.softmax(-1) @ vd).transpose(0, 1)]
        done = end
    return torch.cat([*pieces, q.new_zeros(total - done, n_heads, head_dim)])


T_ATTN = 23
OPS = {
    "rms_norm": Op(
        "rms_norm",
        {"x": Arg((2, 5, 24), "float", True), "weight": Arg((24,), "weight", True)},
        kernel=lambda x, weight: rms_norm(x, weight, EPS),
        reference=lambda x, weight: reference.rms_norm(x, weight, EPS),
        formula=_rms_formula,
        tol={torch.float32: 1e-5},
    ),
    "swiglu": Op(
        "swiglu",
        {"gate": Arg((6, 20), "float", True), "up": Arg((6, 20), "float", True)},
        kernel=swiglu,
        reference=reference.swiglu,
        formula=_swiglu_formula,
        tol={torch.float32: 1e-5},
    ),
    "apply_rope": Op(
        "apply_rope",
        {"q": Arg((5, 4, 8), "float", True), "k": Arg((5, 2, 8), "float", True), "cos": Arg((5, 8), "table"),
         "sin": Arg((5, 8), "table")},
        kernel=apply_rope,
        reference=reference.apply_rope,
        formula=_rope_formula,
        tol={torch.float32: 1e-5},
    ),
    "cross_entropy": Op(
        "cross_entropy",
        {"logits": Arg((9, 70), "float", True), "labels": Arg((9,), "labels"), "labels32": Arg((9,), "labels32")},
        kernel=lambda logits, labels, labels32: cross_entropy(logits, labels, IGNORE, "none")
        + cross_entropy(logits, labels32, IGNORE, "none"),
        reference=lambda logits, labels, labels32: reference.cross_entropy(logits, labels, IGNORE, "none")
        + reference.cross_entropy(logits, labels32, IGNORE, "none"),
        formula=lambda logits, labels, labels32: _ce_rows(logits, labels) + _ce_rows(logits, labels32),
        tol={torch.float32: 1e-5},
    ),
    "fused_linear_cross_entropy": Op(
        "fused_linear_cross_entropy",
        {"hidden": Arg((9, 16), "float", True), "weight": Arg((70, 16), "float", True, expand_dim=1),
         "labels": Arg((9,), "labels"),
         "labels32": Arg((9,), "labels32")},
        kernel=lambda hidden, weight, labels, labels32: fused_linear_cross_entropy(
            hidden, weight, labels, IGNORE, "none", chunk_rows=4)
        + fused_linear_cross_entropy(hidden, weight, labels32, IGNORE, "none", chunk_rows=4),
        reference=lambda hidden, weight, labels, labels32: reference.linear_cross_entropy(
            hidden, weight, labels, IGNORE, "none")
        + reference.linear_cross_entropy(hidden, weight, labels32, IGNORE, "none"),
        formula=lambda hidden, weight, labels, labels32: _ce_rows(hidden @ weight.T, labels)
        + _ce_rows(hidden @ weight.T, labels32),
        # bf16: dweight takes four roundings to bf16 (the chunk's dlogits, each call's dweight,
        # their sum), one more than a single call's 1.2e-2 (test_kernel_fused_linear_cross_entropy),
        # so 4 * 2**-8. Measured on 150 seeds: median 5.0e-3 and max 1.12e-2 (contiguous),
        # 4.9e-3 and 1.24e-2 (weight transposed): the layouts agree; a stride misread is O(1).
        tol={torch.float32: 1e-5, torch.bfloat16: 4 * 2**-8},
        dtypes=(torch.float32, torch.bfloat16),
    ),
    "flash_attn_varlen": Op(
        "flash_attn_varlen",
        {"q": Arg((T_ATTN, 2, 16), "float", True), "k": Arg((T_ATTN, 2, 16), "float", True, expand_dim=1),
         "v": Arg((T_ATTN, 2, 16), "float", True, expand_dim=1), "cu_seqlens": Arg((4,), "cu"),
         "cu64": Arg((3,), "cu64")},
        kernel=lambda q, k, v, cu_seqlens, cu64: flash_attn_varlen(q, k, v, cu_seqlens, None)
        + flash_attn_varlen(q, k, v, cu64, None, causal=False),
        reference=lambda q, k, v, cu_seqlens, cu64: reference.varlen_attention(q, k, v, cu_seqlens)
        + reference.varlen_attention(q, k, v, cu64, causal=False),
        formula=lambda q, k, v, cu_seqlens, cu64: _attention_formula(q, k, v, cu_seqlens)
        + _attention_formula(q, k, v, cu64, causal=False),
        tol={torch.float32: 1e-5, torch.bfloat16: 1.2e-2},
        dtypes=(torch.float32, torch.bfloat16),
    ),
}


def _draw_for(arg: Arg, dtype: torch.dtype, gen: torch.Generator, op: Op) -> Draw:
    if arg.kind == "float":
        return float_draw(gen, dtype)
    if arg.kind == "weight":
        return float_draw(gen, dtype, scale=0.5, shift=1.0)
    if arg.kind == "table":
        return lambda shape: (torch.rand(shape, generator=gen) * 2 - 1).to(device=DEVICE, dtype=dtype)
    if arg.kind in ("labels", "labels32"):
        vocab = next(a.shape[-1] if n == "logits" else a.shape[0] for n, a in op.args.items() if n in ("logits", "weight"))
        return label_draw(gen, vocab, torch.int64 if arg.kind == "labels" else torch.int32)
    if arg.kind in ("cu", "cu64"):
        return boundary_draw(gen, T_ATTN, torch.int64 if arg.kind == "cu64" else torch.int32)
    raise ValueError(arg.kind)


def _inputs(op: Op, dtype: torch.dtype, layouts: dict[str, str], gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        name: laid_out(arg.shape, layouts.get(name, "contiguous"), _draw_for(arg, dtype, gen, op), arg.grad,
                       arg.expand_dim)
        for name, arg in op.args.items()
    }


def _outputs(result) -> tuple[torch.Tensor, ...]:
    return result if isinstance(result, tuple) else (result,)


def _run(fn, inputs: dict[str, torch.Tensor], grads_in: tuple[torch.Tensor, ...] | None, grad_layout: str,
         dtype: torch.dtype, gen: torch.Generator, poisoned: bool):
    """(outputs, incoming gradients, {argument: gradient}) of fn on inputs."""
    diff = [name for name, t in inputs.items() if t.requires_grad]
    with poisoned_outputs() if poisoned else contextlib.nullcontext():
        outs = _outputs(fn(**inputs))
        if grads_in is None:
            grads_in = tuple(grad_laid_out(tuple(o.shape), grad_layout, o.dtype, gen) for o in outs)
        # An input no output depends on (attention with no document at all) has gradient 0.
        grads = torch.autograd.grad(
            [o for o in outs if o.requires_grad], [inputs[n] for n in diff],
            [g for o, g in zip(outs, grads_in) if o.requires_grad], allow_unused=True, materialize_grads=True,
        )
    return tuple(o.detach() for o in outs), grads_in, dict(zip(diff, grads))


def _float64_copies(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous copies of the same values, floats in float64, requiring grad as the originals."""
    copies = {}
    for name, t in inputs.items():
        c = t.detach().contiguous()
        if c.is_floating_point():
            c = c.double().requires_grad_(t.requires_grad)
        copies[name] = c
    return copies


def _compare(got, want, tol: float, what: str, seed: int) -> None:
    outs, _, grads = got
    want_outs, _, want_grads = want
    assert len(outs) == len(want_outs)
    for i, (a, b) in enumerate(zip(outs, want_outs)):
        assert a.shape == b.shape, f"{what}: output {i} shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert_close(a, b, tol, f"{what}: output {i}", seed)
    assert grads.keys() == want_grads.keys()
    for name in grads:
        assert grads[name].shape == want_grads[name].shape, f"{what}: d{name} shape"
        assert_close(grads[name], want_grads[name], tol, f"{what}: d{name}", seed)


def _cases() -> list:
    cases = []
    for op in OPS.values():
        for dtype in op.dtypes:
            cases.append(pytest.param(op.name, dtype, "", "contiguous", id=f"{op.name}-{dtype}-contiguous"))
            targets = [n for n, a in op.args.items() if dtype == torch.float32 or a.kind == "float"] + ["grad"]
            for target in targets:
                for layout in (GRAD_LAYOUTS if target == "grad" else LAYOUTS)[1:]:
                    cases.append(pytest.param(op.name, dtype, target, layout, id=f"{op.name}-{dtype}-{target}-{layout}"))
    return cases


CASES = _cases()


def _setup(op_name: str, dtype: torch.dtype, target: str, layout: str, seed: int):
    gen = rng(seed)
    op = OPS[op_name]
    layouts = {target: layout} if target in op.args else {}
    inputs = _inputs(op, dtype, layouts, gen)
    return op, gen, inputs, layout if target == "grad" else "contiguous"


@pytest.mark.parametrize("op_name,dtype,target,layout", CASES)
def test_kernel_matches_reference_on_layout(op_name, dtype, target, layout):
    """The kernel entry point on `target` laid out as `layout` equals the reference op on
    contiguous float64 copies, outputs and gradients, every element written."""
    seed = fresh_seed()
    op, gen, inputs, grad_layout = _setup(op_name, dtype, target, layout, seed)
    got = _run(op.kernel, inputs, None, grad_layout, dtype, gen, poisoned=True)
    grads_in = tuple(g.detach().double() for g in got[1])
    want = _run(op.reference, _float64_copies(inputs), grads_in, "", torch.float64, gen, poisoned=False)
    _compare(got, want, op.tol[dtype], f"{op_name} {dtype} {target or 'all'} {layout}", seed)


@pytest.mark.parametrize(
    "op_name,dtype,target,layout", [c for c in CASES if c.values[1] == torch.float32]
)
def test_reference_matches_formula_on_layout(op_name, dtype, target, layout):
    """The reference op on `target` laid out as `layout` equals the plain float64 formula."""
    seed = fresh_seed()
    op, gen, inputs, grad_layout = _setup(op_name, dtype, target, layout, seed)
    got = _run(op.reference, inputs, None, grad_layout, dtype, gen, poisoned=False)
    grads_in = tuple(g.detach().double() for g in got[1])
    want = _run(op.formula, _float64_copies(inputs), grads_in, "", torch.float64, gen, poisoned=False)
    _compare(got, want, op.tol[dtype], f"reference {op_name} {target or 'all'} {layout}", seed)


# ---------------------------------------------------------------------------------
# The examples that first showed the fault, with their right values
# ---------------------------------------------------------------------------------


def test_cross_entropy_strided_labels_example():
    """labels [0, 2, 1, 2][::2] = [0, 1]: losses lse - [0, 1] = [2.408, 1.408] (the kernel
    once read labels with unit stride and gave [2.408, 2.408])."""
    logits = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]], device=DEVICE)
    lse = math.log(1 + math.e + math.e**2)
    want = torch.tensor([lse, lse - 1], dtype=torch.float64)
    for dtype in (torch.int64, torch.int32):
        labels = torch.tensor([0, 2, 1, 2], dtype=dtype, device=DEVICE)[::2]
        with poisoned_outputs():
            got = cross_entropy(logits, labels, reduction="none")
        assert torch.allclose(got.double().cpu(), want, atol=1e-6), (dtype, got)
        assert torch.allclose(reference.cross_entropy(logits, labels, reduction="none").double().cpu(), want)


def test_fused_linear_cross_entropy_strided_labels_example():
    """The same logits as hidden @ I: loss [2.408, 1.408], d(hidden) = softmax - onehot,
    d(weight) = d(logits).T @ hidden."""
    hidden = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]], device=DEVICE, requires_grad=True)
    weight = torch.eye(3, device=DEVICE, requires_grad=True)
    labels = torch.tensor([0, 2, 1, 2], device=DEVICE)[::2]
    with poisoned_outputs():
        loss = fused_linear_cross_entropy(hidden, weight, labels, reduction="none")
        d_hidden, d_weight = torch.autograd.grad(loss.sum(), (hidden, weight))
    lse = math.log(1 + math.e + math.e**2)
    assert torch.allclose(loss.double().cpu(), torch.tensor([lse, lse - 1], dtype=torch.float64), atol=1e-6)
    h64 = hidden.detach().double().cpu()
    d_logits = torch.softmax(h64, -1) - F.one_hot(torch.tensor([0, 1]), 3).double()
    assert torch.allclose(d_hidden.double().cpu(), d_logits, atol=1e-6)
    assert torch.allclose(d_weight.double().cpu(), d_logits.T @ h64, atol=1e-6)


def test_rms_norm_strided_weight_example():
    """weight [1, 5, 2, 7][::2] = [1, 2]: y = [3, 4] / rms * [1, 2] = [0.849, 2.263] (the
    kernel once read the weight with unit stride and gave [0.849, 5.657]); dx, dw too."""
    x = torch.tensor([[3.0, 4.0]], device=DEVICE, requires_grad=True)
    storage = torch.tensor([1.0, 5.0, 2.0, 7.0], device=DEVICE, requires_grad=True)
    with poisoned_outputs():
        y = rms_norm(x, storage[::2], 1e-6)
        dx, dstorage = torch.autograd.grad(y.sum(), (x, storage))
    x64, w64 = x.detach().double().cpu().requires_grad_(), torch.tensor([1.0, 2.0], dtype=torch.float64)
    w64.requires_grad_()
    y64 = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * w64
    dx64, dw64 = torch.autograd.grad(y64.sum(), (x64, w64))
    assert torch.allclose(y.double().cpu(), torch.tensor([[3 / 12.5**0.5, 8 / 12.5**0.5]], dtype=torch.float64),
                          atol=1e-5)
    assert torch.allclose(dx.double().cpu(), dx64, atol=1e-6)
    assert torch.allclose(dstorage.double().cpu(), torch.stack([dw64[0], torch.zeros((), dtype=torch.float64),
                                                                dw64[1], torch.zeros((), dtype=torch.float64)]))


# ---------------------------------------------------------------------------------
# ignore_index for every label dtype; refusals
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("ignore_index", [-100, 0, 7], ids=lambda i: f"ignore{i}")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ignore_index_every_label_dtype(label_dtype, ignore_index, reduction):
    """Any ignore_index, also one inside [0, V): rows with that label get no loss and no
    gradient, 'mean' divides by the others; cross_entropy and the fused linear
    cross-entropy equal the reference for int32 and int64 labels."""
    seed = fresh_seed()
    gen = rng(seed)
    n, dim, vocab = 11, 16, 40
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < 0.4] = ignore_index
    labels[0] = ignore_index
    labels = labels.to(device=DEVICE, dtype=label_dtype)
    hidden = float_draw(gen, torch.float32)((n, dim))
    weight = float_draw(gen, torch.float32, scale=0.5)((vocab, dim))
    upstream = float_draw(gen, torch.float32)((n,) if reduction == "none" else ())
    for name, kernel, ref in (
        ("cross_entropy", lambda h, w: cross_entropy(h @ w.T, labels, ignore_index, reduction),
         lambda h, w: reference.cross_entropy(h @ w.T, labels, ignore_index, reduction)),
        ("fused_linear_cross_entropy", lambda h, w: fused_linear_cross_entropy(h, w, labels, ignore_index, reduction),
         lambda h, w: reference.linear_cross_entropy(h, w, labels, ignore_index, reduction)),
    ):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with poisoned_outputs():
            loss = kernel(h, w)
            grads = torch.autograd.grad(loss, (h, w), upstream)
        h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
        want = ref(h64, w64)
        want_grads = torch.autograd.grad(want, (h64, w64), upstream.double())
        tag = f"{name} {label_dtype} ignore_index={ignore_index} {reduction}"
        assert_close(loss, want, 1e-5, tag, seed)
        for g, wg, what in zip(grads, want_grads, ("d(hidden)", "d(weight)")):
            assert_close(g, wg, 1e-5, f"{tag} {what}", seed)
        ignored = labels == ignore_index
        assert torch.count_nonzero(grads[0][ignored]) == 0, f"{tag}: ignored rows got a gradient"


def test_refusals_name_the_problem():
    """Mismatched dtypes, non-integer labels and mixed devices are refused before launch."""
    x = torch.zeros(3, 8, device=DEVICE)
    with pytest.raises(TypeError, match="labels must be int32 or int64"):
        cross_entropy(x, torch.zeros(3, device=DEVICE))
    with pytest.raises(TypeError, match="labels must be int32 or int64"):
        reference.cross_entropy(x, torch.zeros(3, device=DEVICE))
    with pytest.raises(TypeError, match="labels must be int32 or int64"):
        fused_linear_cross_entropy(x, torch.zeros(5, 8, device=DEVICE), torch.zeros(3, dtype=torch.uint8, device=DEVICE))
    with pytest.raises(TypeError, match="must share one of"):
        fused_linear_cross_entropy(x, torch.zeros(5, 8, device=DEVICE, dtype=torch.float16), torch.zeros(3).long())
    with pytest.raises(ValueError, match="one device"):
        rms_norm(x, torch.ones(8, device="meta"), 1e-5)
    with pytest.raises(ValueError, match="one device"):
        cross_entropy(x, torch.zeros(3, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="one device"):
        apply_rope(x.view(3, 1, 8), x.view(3, 1, 8), x, torch.zeros(3, 8, device="meta"))


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the refusal of CPU tensors without the interpreter")
def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.zeros(3, 8)
    for call in (lambda: rms_norm(x, torch.ones(8), 1e-5), lambda: swiglu(x, x),
                 lambda: cross_entropy(x, torch.zeros(3, dtype=torch.long))):
        with pytest.raises(ValueError, match="Triton kernels need CUDA tensors"):
            call()


def test_cross_entropy_inplace_on_rows_sharing_memory():
    """inplace=True cannot write a gradient over logits whose rows share memory (stride 0);
    it then uses a new buffer and the gradient is still the reference's."""
    seed = fresh_seed()
    gen = rng(seed)
    row = float_draw(gen, torch.float32)((1, 70)).requires_grad_()
    logits = row.expand(9, 70)
    labels = label_draw(gen, 70, torch.int64)((9,))
    with poisoned_outputs():
        loss = cross_entropy(logits, labels, IGNORE, "sum", inplace=True)
        (grad,) = torch.autograd.grad(loss, logits)
    x = logits.detach().double().contiguous().requires_grad_()
    (want,) = torch.autograd.grad(reference.cross_entropy(x, labels, IGNORE, "sum"), x)
    assert_close(grad, want, 1e-5, "inplace expanded logits", seed)
