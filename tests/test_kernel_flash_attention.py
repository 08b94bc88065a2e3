"""The Triton varlen flash attention against per-document PyTorch attention in float64:
output, the saved log-sum-exp and all three gradients (random upstream gradient), in
fp32, fp16 and bf16, fresh inputs every run, poisoned outputs.

The reference (reference.varlen_attention: one scaled_dot_product_attention per
document) runs in float64 on the same, already rounded, inputs, so the measured error
is the kernel's own. Tolerances per dtype, from where the algorithm rounds: fp32 stays
within a few fp32 roundoffs (exact fp32 dots under the interpreter, tf32x3 on a GPU).
fp16/bf16 round P before P @ V and every output once, about one unit roundoff u
(fp16 2**-11, bf16 2**-8) of relative error: the output and dv get 2u. dq and dk come
from dS = P * (dP - delta), a difference that cancels where a row's probability
concentrates on few keys, with delta = rowsum(dO * O) taken from the rounded output and
dS itself rounded before its matmuls (as every flash-attention backward does); a float64
emulation of exactly those roundings measures up to ~1.5u on the peaky rows of the
custom-scale test, so they get 3u.

Under the interpreter the kernels run with 32-row program blocks and 16-row steps, so
the documents here (up to ~200 tokens) span several blocks, with lengths that are not
multiples of either.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from agentflan.kernels import flash_attn_varlen, reference
from agentflan.kernels.flash_attention import build_schedule, segment_bounds
from triton_harness import DEVICE, DTYPES, assert_close, fresh_seed, poisoned_outputs, randn, rng

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}  # out, dv (and the lse)
TOL_DQ_DK = {torch.float32: 1e-5, torch.float16: 1.5e-3, torch.bfloat16: 1.2e-2}


def _cu_seqlens(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=DEVICE)


def _random_lengths(gen: torch.Generator, n_docs: int, low: int, high: int) -> list[int]:
    return [int(x) for x in torch.randint(low, high + 1, (n_docs,), generator=gen)]


def _inputs(lengths: list[int], n_heads: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int):
    """q, k, v, the upstream gradient and cu_seqlens for documents of `lengths`."""
    g = rng(seed)
    total = sum(lengths)
    q = randn(total, n_heads, head_dim, gen=g, dtype=dtype)
    k = randn(total, n_kv_heads, head_dim, gen=g, dtype=dtype)
    v = randn(total, n_kv_heads, head_dim, gen=g, dtype=dtype)
    dout = randn(total, n_heads, head_dim, gen=g, dtype=dtype)
    return q, k, v, dout, _cu_seqlens(lengths)


def _kernel(q, k, v, dout, cu, max_seqlen, causal=True, scale=None):
    """(out, dq, dk, dv) from the kernel, every buffer it allocates poisoned."""
    qk, kk, vk = (t.clone().requires_grad_() for t in (q, k, v))
    with poisoned_outputs():
        out = flash_attn_varlen(qk, kk, vk, cu, max_seqlen, causal=causal, softmax_scale=scale)
        out.backward(dout)
    return out.detach(), qk.grad, kk.grad, vk.grad


def _reference(q, k, v, dout, cu, causal=True, scale=None):
    """(out, dq, dk, dv) in float64."""
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    out = reference.varlen_attention(q64, k64, v64, cu, causal=causal, softmax_scale=scale)
    out.backward(dout.double())
    return out.detach(), q64.grad, k64.grad, v64.grad


def _check(
    lengths: list[int], n_heads: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int,
    causal: bool = True, scale: float | None = None, max_seqlen: int | None = -1,
) -> None:
    """Kernel vs float64 reference; max_seqlen -1 means the longest document's length."""
    q, k, v, dout, cu = _inputs(lengths, n_heads, n_kv_heads, head_dim, dtype, seed)
    if max_seqlen == -1:
        max_seqlen = max(lengths)
    got = _kernel(q, k, v, dout, cu, max_seqlen, causal, scale)
    want = _reference(q, k, v, dout, cu, causal, scale)
    assert got[0].dtype == dtype and got[0].shape == q.shape
    assert got[2].shape == k.shape and got[3].shape == v.shape
    tag = f"{dtype} H={n_heads} KV={n_kv_heads} D={head_dim} causal={causal} lengths={lengths}"
    for name, a, b, tol in zip(("out", "dq", "dk", "dv"), got, want, (TOL, TOL_DQ_DK, TOL_DQ_DK, TOL)):
        assert_close(a, b, tol[dtype], f"{name} {tag}", seed)


# ---------------------------------------------------------------------------------
# Numerics against the reference
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_single_document(dtype):
    # 150 rows: 5 query blocks of 32, the last partial; GQA ratio 1.
    _check([150], 2, 2, 64, dtype, fresh_seed())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_many_documents_gqa4_head_dim_128(dtype):
    # Random lengths, a zero-length document and a length-1 one among them.
    seed = fresh_seed()
    lengths = _random_lengths(rng(seed + 1), 6, 2, 45) + [0, 1, 33]
    _check(lengths, 4, 1, 128, dtype, seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gqa8(dtype):
    seed = fresh_seed()
    _check(_random_lengths(rng(seed + 1), 3, 20, 50), 8, 1, 64, dtype, seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_length_one_and_two_documents(dtype):
    # Blocks that hold a single token: the diagonal block is the whole key range.
    _check([1] * 12 + [2, 1, 2, 1, 3], 2, 2, 128, dtype, fresh_seed())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_custom_softmax_scale(dtype):
    # A large scale makes the rows peaky (scores of std ~4), so the running max moves
    # a lot between key blocks and the online rescaling is exercised.
    seed = fresh_seed()
    _check([70, 41], 4, 2, 64, dtype, seed, scale=0.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_causal(dtype):
    seed = fresh_seed()
    _check([57, 1, 64, 30], 4, 2, 64, dtype, seed, causal=False)


@pytest.mark.parametrize("max_seqlen", [None, 4096], ids=["none", "overestimate"])
def test_result_does_not_depend_on_max_seqlen(max_seqlen):
    # max_seqlen only picks the autotuning bucket; the tests above pass the exact value.
    _check([40, 17], 2, 1, 64, torch.float16, fresh_seed(), max_seqlen=max_seqlen)


@pytest.mark.slow
def test_long_document_bf16():
    # 550 rows: 18 query blocks of 32 (the last partial) over 35 key blocks of 16, GQA 2,
    # head dim 128.
    _check([550], 2, 1, 128, torch.bfloat16, fresh_seed())


@pytest.mark.slow
def test_packed_batch_gqa8_fp16():
    seed = fresh_seed()
    _check(_random_lengths(rng(seed + 1), 7, 1, 60) + [97], 8, 1, 128, torch.float16, seed)


# ---------------------------------------------------------------------------------
# Structure
# ---------------------------------------------------------------------------------


def test_documents_do_not_see_each_other():
    """Changing every token of one document changes nothing (bit for bit) in any other
    document's output or gradients, while its own output does change. The two runs are
    separate launches, so this also shows the kernels are deterministic."""
    seed = fresh_seed()
    lengths = [23, 40, 1, 35, 18]
    q, k, v, dout, cu = _inputs(lengths, 4, 2, 64, torch.bfloat16, seed)
    base = _kernel(q, k, v, dout, cu, max(lengths))
    start, end = 23, 64  # documents 1 ([23, 63)) and 2 (the length-1 document at row 63)
    g = rng(seed + 1)
    for t in (q, k, v, dout):
        t[start:end] = randn(end - start, *t.shape[1:], gen=g, dtype=t.dtype)
    changed = _kernel(q, k, v, dout, cu, max(lengths))
    others = torch.ones(q.shape[0], dtype=torch.bool, device=DEVICE)
    others[start:end] = False
    for name, a, b in zip(("out", "dq", "dk", "dv"), base, changed):
        assert torch.equal(a[others], b[others]), f"{name} of untouched documents changed (seed={seed})"
    own_changed = not torch.equal(base[0][start:end], changed[0][start:end])
    assert own_changed, f"the changed documents' output stayed the same (seed={seed})"


def test_saves_inputs_output_and_fp32_lse_only():
    """The forward keeps q, k, v, the output, the fp32 log-sum-exp (n_heads, T) and
    cu_seqlens: nothing of size T x T. The log-sum-exp is that of the scaled scores."""
    seed = fresh_seed()
    lengths = [37, 1, 50]
    scale = 0.2
    q, k, v, _, cu = _inputs(lengths, 4, 2, 64, torch.float32, seed)
    out = flash_attn_varlen(q.requires_grad_(), k, v, cu, max(lengths), softmax_scale=scale)
    saved = out.grad_fn.saved_tensors
    assert len(saved) == 6
    assert saved[0].data_ptr() == q.data_ptr() and saved[1].data_ptr() == k.data_ptr()
    assert saved[3].data_ptr() == out.data_ptr()
    lse = saved[4]
    assert lse.dtype == torch.float32 and lse.shape == (4, sum(lengths))
    assert max(t.numel() for t in saved) == q.numel()
    want = torch.empty(4, sum(lengths), dtype=torch.float64)
    for s, e in zip(cu.tolist()[:-1], cu.tolist()[1:]):
        qd = q[s:e].detach().double().transpose(0, 1)  # (H, L, D)
        kd = k[s:e].double().transpose(0, 1).repeat_interleave(2, dim=0)
        scores = scale * qd @ kd.transpose(1, 2)
        scores = scores.masked_fill(torch.ones(e - s, e - s, dtype=torch.bool).triu(1).to(DEVICE), float("-inf"))
        want[:, s:e] = torch.logsumexp(scores, dim=-1).cpu()
    assert_close(lse, want, TOL[torch.float32], "lse", seed)


def test_strided_inputs_and_grad_for_q_only():
    """q, k, v as slices of one fused (T, 3, H, D) projection, read in place (token
    stride 3 * H * D), and only q requiring grad: dq lands in the fused gradient's q
    slice and matches; k and v get none."""
    seed = fresh_seed()
    lengths = [45, 20]
    g = rng(seed)
    qkv = randn(sum(lengths), 3, 2, 64, gen=g, dtype=torch.float16).requires_grad_()
    q, k, v = qkv[:, 0], qkv[:, 1].detach(), qkv[:, 2].detach()
    dout = randn(sum(lengths), 2, 64, gen=g, dtype=torch.float16)
    cu = _cu_seqlens(lengths)
    with poisoned_outputs():
        out = flash_attn_varlen(q, k, v, cu, max(lengths))
        out.backward(dout)
    want = _reference(q.detach(), k, v, dout, cu)
    assert_close(out, want[0], TOL[torch.float16], "out strided", seed)
    assert_close(qkv.grad[:, 0], want[1], TOL_DQ_DK[torch.float16], "dq strided", seed)
    assert torch.count_nonzero(qkv.grad[:, 1:]) == 0


def test_schedule_covers_every_block_once():
    """Program slots map one to one onto the blocks of the segments (the rows before the
    first document, the documents, the rows after the last; empty ones get none), and the
    spare slots at the end name no segment."""
    seed = fresh_seed()
    gen = rng(seed)
    lengths = _random_lengths(gen, 40, 0, 300)
    head, tail = (int(x) for x in torch.randint(0, 70, (2,), generator=gen))
    cu = _cu_seqlens(lengths) + head
    total, block = head + sum(lengths) + tail, 32
    sched = build_schedule(cu, total, block)
    segments = [head, *lengths, tail]
    assert sched.bounds.tolist() == [0, *cu.tolist(), total]
    slot_seg, slot_start = sched.slot_seg.cpu().tolist(), sched.slot_start.cpu().tolist()
    assert sched.n_slots == total // block + len(segments) and len(slot_seg) == sched.n_slots
    expected = [(g, b) for g, n in enumerate(segments) for b in range(math.ceil(n / block))]
    got = [(g, s - slot_start[g]) for s, g in enumerate(slot_seg) if g < len(segments)]
    assert got == expected, f"seed={seed}"
    assert all(g == len(segments) for g in slot_seg[len(expected):]), f"seed={seed}"


def test_segment_bounds_make_any_cu_seqlens_safe():
    """Boundaries are clamped into [0, T] and raised to the running maximum, so the
    segments tile [0, T) whatever cu_seqlens holds."""
    cu = torch.tensor([3, 9, 5, 40, -2, 12], dtype=torch.int64, device=DEVICE)
    assert segment_bounds(cu, 20).tolist() == [0, 3, 9, 9, 20, 20, 20, 20]
    assert segment_bounds(torch.tensor([0, 7], device=DEVICE), 7).dtype == torch.int32


@pytest.mark.parametrize(
    "dtype,causal", [(torch.float32, True), (torch.float32, False), (torch.float16, True), (torch.bfloat16, True)],
    ids=str,
)
def test_tokens_outside_every_document_are_zero(dtype, causal):
    """Rows before cu_seqlens[0] and from cu_seqlens[-1] on (padding) give output 0 and
    gradients 0, are seen by no document, and the kernel equals the reference op, which
    defines the same. 40 leading and 37 trailing rows span more than one 32-row block."""
    seed = fresh_seed()
    g = rng(seed)
    head, lengths, tail = 40, [23, 1, 20], 37
    total = head + sum(lengths) + tail
    q = randn(total, 4, 32, gen=g, dtype=dtype)
    k = randn(total, 2, 32, gen=g, dtype=dtype)
    v = randn(total, 2, 32, gen=g, dtype=dtype)
    dout = randn(total, 4, 32, gen=g, dtype=dtype)
    cu = _cu_seqlens(lengths) + head
    got = _kernel(q, k, v, dout, cu, max(lengths), causal)
    want = _reference(q, k, v, dout, cu, causal)
    inside = slice(head, head + sum(lengths))
    tag = f"{dtype} causal={causal}"
    for name, a, b, tol in zip(("out", "dq", "dk", "dv"), got, want, (TOL, TOL_DQ_DK, TOL_DQ_DK, TOL)):
        assert torch.count_nonzero(a[:head]) == 0 and torch.count_nonzero(a[-tail:]) == 0, f"{name} {tag} seed={seed}"
        assert torch.count_nonzero(b[:head]) == 0 and torch.count_nonzero(b[-tail:]) == 0, f"{name} ref {tag}"
        assert_close(a[inside], b[inside], tol[dtype], f"{name} {tag}", seed)
    # The same documents without the padding rows give the same values.
    alone = _kernel(*(t[inside] for t in (q, k, v, dout)), cu - head, max(lengths), causal)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, alone):
        assert torch.equal(a[inside], b), f"{name}: padding rows changed the documents' values (seed={seed})"


def test_issue_example_one_row_past_the_only_document():
    """q, k, v (2, 1, 16), cu_seqlens [0, 1]: row 0 attends to itself (output v[0], dv
    dout[0], dq and dk 0 up to roundoff), row 1 belongs to no document (output and all
    gradients exactly 0); the reference op gives the same."""
    seed = fresh_seed()
    g = rng(seed)
    q, k, v, dout = (randn(2, 1, 16, gen=g) for _ in range(4))
    cu = torch.tensor([0, 1], dtype=torch.int32, device=DEVICE)
    got = _kernel(q, k, v, dout, cu, 1)
    for name, t in zip(("out", "dq", "dk", "dv"), got):
        assert torch.equal(t[1], torch.zeros_like(t[1])), f"{name} row 1 (seed={seed})"
    out, dq, dk, dv = got
    assert torch.equal(out[0], v[0]) and torch.equal(dv[0], dout[0])
    assert dq.abs().max() < 1e-5 and dk.abs().max() < 1e-5, f"seed={seed}"
    ref = _reference(q, k, v, dout, cu)
    for name, a, b in zip(("out", "dv"), (out, dv), (ref[0], ref[3])):
        assert_close(a, b, TOL[torch.float32], name, seed)
    assert torch.equal(ref[0][1], torch.zeros_like(ref[0][1])) and ref[1].abs().max() < 1e-12


def test_no_document_at_all_gives_zeros():
    seed = fresh_seed()
    g = rng(seed)
    q, k, v, dout = (randn(9, 2, 16, gen=g) for _ in range(4))
    for cu in ([0], [4, 4, 4]):
        got = _kernel(q, k, v, dout, torch.tensor(cu, dtype=torch.int32, device=DEVICE), 0)
        want = _reference(q, k, v, dout, torch.tensor(cu, device=DEVICE))
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
            assert torch.count_nonzero(a) == 0 and torch.count_nonzero(b) == 0, f"{name} cu={cu}"


def test_int64_cu_seqlens():
    seed = fresh_seed()
    lengths = [30, 2, 17]
    q, k, v, dout, cu = _inputs(lengths, 2, 1, 64, torch.float32, seed)
    got = _kernel(q, k, v, dout, cu.long(), max(lengths))
    want = _kernel(q, k, v, dout, cu, max(lengths))
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.equal(a, b), name


def test_invalid_cu_seqlens_stay_in_bounds():
    """Decreasing or out-of-range boundaries: the reference raises; the kernels (which do
    not sync to check) write every element, exactly the attention over the normalised
    boundaries (segment_bounds), and touch no memory outside the tensors."""
    seed = fresh_seed()
    g = rng(seed)
    total = 60
    q, k, v, dout = (randn(total, 2, 16, gen=g) for _ in range(4))
    for bad in ([0, 30, 20, 50], [10, 45, 90], [-5, 25]):
        cu = torch.tensor(bad, dtype=torch.int32, device=DEVICE)
        with pytest.raises(ValueError, match="cu_seqlens must"):
            reference.varlen_attention(q, k, v, cu)
        got = _kernel(q, k, v, dout, cu, None)
        fixed = segment_bounds(cu, total)[1:-1]
        want = _reference(q, k, v, dout, fixed)
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
            assert_close(a, b, TOL[torch.float32], f"{name} cu={bad}", seed)


def test_empty_batch():
    q = torch.empty(0, 2, 64, device=DEVICE, requires_grad=True)
    k = torch.empty(0, 1, 64, device=DEVICE, requires_grad=True)
    out = flash_attn_varlen(q, k, k, torch.zeros(1, dtype=torch.int32, device=DEVICE), 0)
    out.sum().backward()
    assert out.shape == (0, 2, 64) and q.grad.shape == (0, 2, 64)


def test_rejects_bad_inputs():
    q = torch.zeros(5, 4, 64, device=DEVICE)
    kv = torch.zeros(5, 2, 64, device=DEVICE)
    cu = _cu_seqlens([5])
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        flash_attn_varlen(q, torch.zeros(5, 3, 64, device=DEVICE), torch.zeros(5, 3, 64, device=DEVICE), cu, 5)
    with pytest.raises(ValueError, match="head_dim must be one of"):
        flash_attn_varlen(q[..., :48], kv[..., :48], kv[..., :48], cu, 5)
    with pytest.raises(TypeError, match="must share one of"):
        flash_attn_varlen(q.half(), kv, kv, cu, 5)
    with pytest.raises(TypeError, match="cu_seqlens must be int32 or int64"):
        flash_attn_varlen(q, kv, kv, cu.float(), 5)
    with pytest.raises(ValueError, match=r"cu_seqlens must be 1-D"):
        flash_attn_varlen(q, kv, kv, cu[None], 5)
    with pytest.raises(ValueError, match=r"cu_seqlens must be 1-D"):
        flash_attn_varlen(q, kv, kv, cu[:0], 5)
    with pytest.raises(ValueError, match="k and v must be"):
        flash_attn_varlen(q, kv[:4], kv[:4], cu, 5)
