"""Varlen (packed-document) flash attention in Triton: forward and backward, causal or
not, grouped-query attention (GQA).

Layout, the flash-attn varlen convention: q (T, n_heads, D); k, v (T, n_kv_heads, D);
cu_seqlens (n_docs+1,), usually from 0 to T. Query head h reads KV head h // group,
group = n_heads / n_kv_heads. A token attends only to keys of its own document; tokens
outside every document (before cu_seqlens[0], from cu_seqlens[-1] on) get zeros.

Work schedule (no host sync): the rows are cut into segments, the documents plus the
rows before the first and after the last (`Schedule`, `segment_bounds`). Each segment
is cut into blocks of B rows counted from its start, and every block gets one program
slot: slot_seg[s] is the segment of slot s, slot_start[g] the first slot of segment g
(both int32, built with a few torch ops on the device from cu_seqlens). The slot count
is the bound T // B + n_docs + 2, known on the host from shapes alone; the few spare
slots at the end exit at once, the slots of the two outer segments write zeros. A
program's key range comes from its document's bounds, so the work per document is
proportional to its own length squared, and max_seqlen is not needed for correctness
(it only buckets the autotuning key).

Forward (one program per (query block of BLOCK_M rows, head)): q is loaded once and
stays on chip; keys are walked in BLOCK_N blocks with an online softmax in fp32, exp2 with log2(e)
folded into the scale (one FMA per score). The key walk is split in two loops: blocks
entirely below the query block's first row (causal) or entirely inside the document
(non-causal) need no mask and no load predicate; only the diagonal block(s) and the
document's last partial block are masked. The program saves the per-row log-sum-exp
(natural log, fp32, layout (n_heads, T)).

Backward (nothing quadratic is stored: each kernel recomputes its probability tiles
from q, k and the saved log-sum-exp):
- delta = rowsum(dO * O) in fp32 (a small preprocess kernel);
- dK/dV: one program per (key block of BLOCK_N rows, KV head). It keeps its k and v
  tiles and the fp32 dk/dv accumulators on chip and walks the query blocks of every
  query head of its group in turn, so GQA gradients are summed in registers: no
  atomics, deterministic. Causal: the query blocks crossing the diagonal are masked,
  the ones below it are not. Query rows past the document's end load a log-sum-exp of
  +inf, so their probabilities are exactly 0 without a mask;
- dQ: one program per (query block, head), walking key blocks like the forward.
The backward thus runs 7 matmuls per (query block, key block) pair, 4 for dK/dV and 3
for dQ, where accumulating dQ with atomics would need 5: the price of determinism.

Load balance: causal query blocks near a document's end do the most work, so forward
and dQ programs run in reverse slot order; dK/dV programs, whose early key blocks do
the most work, run in slot order. Heads vary fastest, so the query heads sharing a KV
head run side by side and read the same K/V tiles from L2.

Configs: on CUDA each kernel is autotuned over a short list (`gpu_configs`) whose
members all share the block that defines the schedule; under the Triton interpreter
one small fixed config is used (so tests still see several blocks per document, and
autotuning there would only time numpy). fp16/bf16 dots run on tensor cores (wgmma)
with fp32 accumulation; fp32 inputs use tf32x3 products (fp32 accuracy, not tf32's),
so fp32 stays a true fp32 path for tests and fp32 models.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from agentflan.kernels.compile_check import KernelSpec
from agentflan.kernels.validate import check_runnable, interpreted

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HEAD_DIMS = (16, 32, 64, 128)  # powers of two: the kernels tile the head dimension whole
_TL_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# Module constants a @triton.jit function may read must be tl.constexpr instances.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# Rows of O / dO per program of the delta preprocess (memory bound).
DELTA_BLOCK, DELTA_WARPS = 32, 8


# ---------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------


@triton.jit
def _stride8(stride):
    """A stride the wrapper guarantees to be a multiple of 8 elements (16-byte rows),
    written so the compiler can see it."""
    return stride // 8 * 8


@triton.jit
def _row_tile(base, row0, stride_t, rows, cols):
    """Pointers to the tile of token rows row0 + rows (row0 int64) and columns cols of
    one head (base points at the head's column 0 of token 0). Every row starts 16-byte
    aligned (aligned base, strides of 8 elements), stated with multiple_of so the
    compiler issues 16-byte vector and cp.async accesses it can pipeline; on a GPU the
    JIT would infer it from the arguments, ahead-of-time compilation cannot."""
    return tl.multiple_of(base + row0 * stride_t + rows[:, None] * stride_t + cols[None, :], [1, 16])


@triton.jit
def _fwd_key_loop(
    acc, l_i, m_i, q, k_tile, v_tile, stride_kt, stride_vt, lo, hi, doc_end, row_limit, qk_scale,
    MASKED: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online softmax over key blocks [lo, hi) (absolute token rows, steps of BLOCK_N).

    acc (BLOCK_M, D) fp32, l_i / m_i (BLOCK_M,) fp32 (m_i in log2 units, scaled);
    k_tile / v_tile: (BLOCK_N, D) pointer tiles of this KV head at token row 0 (the
    row offset is added per step: int64, as start * stride may pass 2**31; pointers
    carried through the loop instead would hide their alignment). MASKED: keys past
    doc_end are not loaded and keys past row_limit[row] get probability 0."""
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        k_ptrs = tl.multiple_of(k_tile + tl.cast(start, tl.int64) * stride_kt, [1, 16])
        v_ptrs = tl.multiple_of(v_tile + tl.cast(start, tl.int64) * stride_vt, [1, 16])
        if MASKED:
            k_idx = start + offs_n
            in_doc = (k_idx < doc_end)[:, None]
            k = tl.load(k_ptrs, mask=in_doc, other=0.0)
            v = tl.load(v_ptrs, mask=in_doc, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N) fp32
        if MASKED:
            s = tl.where(k_idx[None, :] <= row_limit[:, None], s, float("-inf"))
        # Every row has seen a visible key before or in this block (its own diagonal or
        # its document's first key), so m_new is finite and exp2 never sees inf - inf.
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, OUT, LSE,  # Q, OUT (T, n_heads, D); K, V (T, n_kv_heads, D); LSE (n_heads, T) fp32
    BOUNDS, SLOT_SEG, SLOT_START,  # (n_segments+1,), (n_slots,), (n_segments+1,) int32 (see Schedule)
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    total, n_heads, group, n_segments, n_slots, causal, qk_scale,
    seq_bucket,  # autotuning key only
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    head = pid % n_heads
    slot = n_slots - 1 - pid // n_heads  # last (heaviest, under causal) blocks first
    seg = tl.load(SLOT_SEG + slot)
    if seg >= n_segments:  # a spare slot
        return
    doc_start = tl.load(BOUNDS + seg)
    doc_end = tl.load(BOUNDS + seg + 1)
    q_start = doc_start + (slot - tl.load(SLOT_START + seg)) * BLOCK_M
    stride_qt = _stride8(stride_qt)
    stride_qh = _stride8(stride_qh)
    stride_kt = _stride8(stride_kt)
    stride_kh = _stride8(stride_kh)
    stride_vt = _stride8(stride_vt)
    stride_vh = _stride8(stride_vh)
    stride_ot = _stride8(stride_ot)
    stride_oh = _stride8(stride_oh)
    kv_head = head // group

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_idx = q_start + offs_m
    q_in = (q_idx < doc_end)[:, None]
    q_row0 = q_start.to(tl.int64)
    if (seg == 0) | (seg == n_segments - 1):  # rows outside every document: zeros, log-sum-exp of no key
        tl.store(_row_tile(OUT + head * stride_oh, q_row0, stride_ot, offs_m, offs_d),
                 tl.zeros((BLOCK_M, HEAD_DIM), dtype=OUT.dtype.element_ty), mask=q_in)
        tl.store(LSE + head.to(tl.int64) * total + q_idx, tl.full((BLOCK_M,), float("-inf"), tl.float32),
                 mask=q_idx < doc_end)
        return
    q = tl.load(_row_tile(Q + head * stride_qh, q_row0, stride_qt, offs_m, offs_d), mask=q_in, other=0.0)  # (M, D)

    if causal:
        full_hi = q_start  # keys below the block's first row: visible to every row
        masked_hi = tl.minimum(q_start + BLOCK_M, doc_end)
        row_limit = q_idx
    else:
        full_hi = doc_start + (doc_end - doc_start) // BLOCK_N * BLOCK_N
        masked_hi = doc_end
        row_limit = tl.zeros((BLOCK_M,), dtype=tl.int32) + (doc_end - 1)

    offs_n = tl.arange(0, BLOCK_N)
    zero = tl.zeros((), dtype=tl.int64)
    k_tile = _row_tile(K + kv_head * stride_kh, zero, stride_kt, offs_n, offs_d)  # (BLOCK_N, D) at token 0
    v_tile = _row_tile(V + kv_head * stride_vh, zero, stride_vt, offs_n, offs_d)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_i = tl.zeros((BLOCK_M,), dtype=tl.float32) - float("inf")
    acc, l_i, m_i = _fwd_key_loop(
        acc, l_i, m_i, q, k_tile, v_tile,
        stride_kt, stride_vt, doc_start, full_hi, doc_end, row_limit, qk_scale,
        MASKED=False, BLOCK_N=BLOCK_N, DOT_PRECISION=DOT_PRECISION,
    )
    acc, l_i, m_i = _fwd_key_loop(
        acc, l_i, m_i, q, k_tile, v_tile,
        stride_kt, stride_vt, full_hi, masked_hi, doc_end, row_limit, qk_scale,
        MASKED=True, BLOCK_N=BLOCK_N, DOT_PRECISION=DOT_PRECISION,
    )
    out = acc / l_i[:, None]
    tl.store(_row_tile(OUT + head * stride_oh, q_row0, stride_ot, offs_m, offs_d), out.to(OUT.dtype.element_ty),
             mask=q_in)
    lse = (m_i + tl.math.log2(l_i)) * LN2  # natural-log log-sum-exp of the scaled scores
    tl.store(LSE + head.to(tl.int64) * total + q_idx, lse, mask=q_idx < doc_end)


@triton.jit
def _bwd_delta_kernel(
    OUT, DO, DELTA,  # OUT, DO (T, n_heads, D); DELTA (n_heads, T) fp32
    stride_ot, stride_oh, stride_dot, stride_doh, total,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """delta[h, t] = sum_d dO[t, h, d] * O[t, h, d], in fp32."""
    head = tl.program_id(1)
    stride_ot = _stride8(stride_ot)
    stride_oh = _stride8(stride_oh)
    stride_dot = _stride8(stride_dot)
    stride_doh = _stride8(stride_doh)
    first = tl.program_id(0) * BLOCK_T
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_DIM)
    in_rows = first + offs_t < total
    row0 = first.to(tl.int64)
    o = tl.load(_row_tile(OUT + head * stride_oh, row0, stride_ot, offs_t, offs_d), mask=in_rows[:, None], other=0.0)
    do = tl.load(_row_tile(DO + head * stride_doh, row0, stride_dot, offs_t, offs_d), mask=in_rows[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + head.to(tl.int64) * total + first + offs_t, delta, mask=in_rows)


@triton.jit
def _dkdv_query_loop(
    dk, dv, k, v, Q_g, DO_g, LSE_g, DELTA_g, stride_qt, stride_qh, stride_dot, stride_doh, total, group,
    k_idx, lo, hi, doc_end, qk_scale,
    MASKED: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Accumulate into dk, dv (BLOCK_N, D) fp32 the query blocks [lo, hi) (steps of
    BLOCK_M) of every query head of the group, in the transposed form (key rows, query
    columns).

    Q_g / DO_g point at the group's first query head (token row 0), LSE_g / DELTA_g at
    its row of LSE / DELTA. The (head, query block) pairs are walked as one flat loop:
    a nested head loop would keep more values live, and the dK/dV kernel sits at the
    edge of the register file. MASKED applies the causal mask (query >= key)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    n_blocks = tl.cdiv(hi - lo, BLOCK_M)
    for it in range(0, group * n_blocks):
        g = it // n_blocks
        start = lo + (it - g * n_blocks) * BLOCK_M
        q_idx = start + offs_m
        q_in = q_idx < doc_end
        row0 = tl.cast(start, tl.int64)
        q = tl.load(_row_tile(Q_g + g * stride_qh, row0, stride_qt, offs_m, offs_d), mask=q_in[:, None], other=0.0)
        do = tl.load(_row_tile(DO_g + g * stride_doh, row0, stride_dot, offs_m, offs_d), mask=q_in[:, None], other=0.0)
        # +inf for rows past the document: their probabilities come out exactly 0.
        lse2 = tl.load(LSE_g + g * total + q_idx, mask=q_in, other=float("inf")) * LOG2E
        delta = tl.load(DELTA_g + g * total + q_idx, mask=q_in, other=0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        p_t = tl.math.exp2(s_t * qk_scale - lse2[None, :])
        if MASKED:
            p_t = tl.where(q_idx[None, :] >= k_idx[:, None], p_t, 0.0)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dk = tl.dot(ds_t, q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,  # Q, DO (T, n_heads, D); K, V, DK, DV (T, n_kv_heads, D); LSE, DELTA (n_heads, T)
    BOUNDS, SLOT_SEG, SLOT_START,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    total, n_kv_heads, group, n_segments, n_slots, causal, qk_scale, sm_scale,
    seq_bucket,  # autotuning key only
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    kv_head = pid % n_kv_heads
    slot = pid // n_kv_heads  # first (heaviest, under causal) key blocks first
    seg = tl.load(SLOT_SEG + slot)
    if seg >= n_segments:  # a spare slot
        return
    doc_start = tl.load(BOUNDS + seg)
    doc_end = tl.load(BOUNDS + seg + 1)
    k_start = doc_start + (slot - tl.load(SLOT_START + seg)) * BLOCK_N
    stride_qt = _stride8(stride_qt)
    stride_qh = _stride8(stride_qh)
    stride_kt = _stride8(stride_kt)
    stride_kh = _stride8(stride_kh)
    stride_vt = _stride8(stride_vt)
    stride_vh = _stride8(stride_vh)
    stride_dot = _stride8(stride_dot)
    stride_doh = _stride8(stride_doh)
    stride_dkt = _stride8(stride_dkt)
    stride_dkh = _stride8(stride_dkh)
    stride_dvt = _stride8(stride_dvt)
    stride_dvh = _stride8(stride_dvh)

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k_idx = k_start + offs_n
    k_in = (k_idx < doc_end)[:, None]
    k_row0 = k_start.to(tl.int64)
    if (seg == 0) | (seg == n_segments - 1):  # keys outside every document: no query sees them
        tl.store(_row_tile(DK + kv_head * stride_dkh, k_row0, stride_dkt, offs_n, offs_d),
                 tl.zeros((BLOCK_N, HEAD_DIM), dtype=DK.dtype.element_ty), mask=k_in)
        tl.store(_row_tile(DV + kv_head * stride_dvh, k_row0, stride_dvt, offs_n, offs_d),
                 tl.zeros((BLOCK_N, HEAD_DIM), dtype=DV.dtype.element_ty), mask=k_in)
        return
    k = tl.load(_row_tile(K + kv_head * stride_kh, k_row0, stride_kt, offs_n, offs_d), mask=k_in, other=0.0)  # (N, D)
    v = tl.load(_row_tile(V + kv_head * stride_vh, k_row0, stride_vt, offs_n, offs_d), mask=k_in, other=0.0)

    if causal:
        diag_hi = tl.minimum(k_start + BLOCK_N, doc_end)  # query blocks crossing the diagonal
        full_lo = k_start + BLOCK_N  # query blocks wholly below it
    else:
        diag_hi = k_start  # no masked part
        full_lo = doc_start
    dk = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    first_head = kv_head * group
    Q_g = Q + first_head * stride_qh
    DO_g = DO + first_head * stride_doh
    LSE_g = LSE + first_head.to(tl.int64) * total
    DELTA_g = DELTA + first_head.to(tl.int64) * total
    dk, dv = _dkdv_query_loop(
        dk, dv, k, v, Q_g, DO_g, LSE_g, DELTA_g, stride_qt, stride_qh, stride_dot, stride_doh, total, group,
        k_idx, k_start, diag_hi, doc_end, qk_scale,
        MASKED=True, BLOCK_M=BLOCK_M, HEAD_DIM=HEAD_DIM, DOT_PRECISION=DOT_PRECISION,
    )
    dk, dv = _dkdv_query_loop(
        dk, dv, k, v, Q_g, DO_g, LSE_g, DELTA_g, stride_qt, stride_qh, stride_dot, stride_doh, total, group,
        k_idx, full_lo, doc_end, doc_end, qk_scale,
        MASKED=False, BLOCK_M=BLOCK_M, HEAD_DIM=HEAD_DIM, DOT_PRECISION=DOT_PRECISION,
    )
    dk = dk * sm_scale  # s = sm_scale * q.k, so dk = sm_scale * sum(ds * q)
    # Store pointers are formed here, not before the loops: held across them they cost registers.
    tl.store(_row_tile(DK + kv_head * stride_dkh, k_row0, stride_dkt, offs_n, offs_d), dk.to(DK.dtype.element_ty),
             mask=k_in)
    tl.store(_row_tile(DV + kv_head * stride_dvh, k_row0, stride_dvt, offs_n, offs_d), dv.to(DV.dtype.element_ty),
             mask=k_in)


@triton.jit
def _dq_key_loop(
    dq, q, do, lse2, delta, k_tile, v_tile, stride_kt, stride_vt, lo, hi, doc_end, row_limit, qk_scale,
    MASKED: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Accumulate dq (BLOCK_M, D) fp32 over key blocks [lo, hi); masking as in _fwd_key_loop."""
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        k_ptrs = tl.multiple_of(k_tile + tl.cast(start, tl.int64) * stride_kt, [1, 16])
        v_ptrs = tl.multiple_of(v_tile + tl.cast(start, tl.int64) * stride_vt, [1, 16])
        if MASKED:
            k_idx = start + offs_n
            in_doc = (k_idx < doc_end)[:, None]
            k = tl.load(k_ptrs, mask=in_doc, other=0.0)
            v = tl.load(v_ptrs, mask=in_doc, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
        if MASKED:
            p = tl.where(k_idx[None, :] <= row_limit[:, None], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,  # Q, DO, DQ (T, n_heads, D); K, V (T, n_kv_heads, D); LSE, DELTA (n_heads, T)
    BOUNDS, SLOT_SEG, SLOT_START,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    total, n_heads, group, n_segments, n_slots, causal, qk_scale, sm_scale,
    seq_bucket,  # autotuning key only
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    head = pid % n_heads
    slot = n_slots - 1 - pid // n_heads
    seg = tl.load(SLOT_SEG + slot)
    if seg >= n_segments:  # a spare slot
        return
    doc_start = tl.load(BOUNDS + seg)
    doc_end = tl.load(BOUNDS + seg + 1)
    q_start = doc_start + (slot - tl.load(SLOT_START + seg)) * BLOCK_M
    stride_qt = _stride8(stride_qt)
    stride_qh = _stride8(stride_qh)
    stride_kt = _stride8(stride_kt)
    stride_kh = _stride8(stride_kh)
    stride_vt = _stride8(stride_vt)
    stride_vh = _stride8(stride_vh)
    stride_dot = _stride8(stride_dot)
    stride_doh = _stride8(stride_doh)
    stride_dqt = _stride8(stride_dqt)
    stride_dqh = _stride8(stride_dqh)
    kv_head = head // group

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_idx = q_start + offs_m
    q_in = q_idx < doc_end
    q_row0 = q_start.to(tl.int64)
    if (seg == 0) | (seg == n_segments - 1):  # rows outside every document: their output is a constant 0
        tl.store(_row_tile(DQ + head * stride_dqh, q_row0, stride_dqt, offs_m, offs_d),
                 tl.zeros((BLOCK_M, HEAD_DIM), dtype=DQ.dtype.element_ty), mask=q_in[:, None])
        return
    q = tl.load(_row_tile(Q + head * stride_qh, q_row0, stride_qt, offs_m, offs_d), mask=q_in[:, None], other=0.0)
    do = tl.load(_row_tile(DO + head * stride_doh, q_row0, stride_dot, offs_m, offs_d), mask=q_in[:, None], other=0.0)
    lse2 = tl.load(LSE + head.to(tl.int64) * total + q_idx, mask=q_in, other=float("inf")) * LOG2E
    delta = tl.load(DELTA + head.to(tl.int64) * total + q_idx, mask=q_in, other=0.0)

    if causal:
        full_hi = q_start
        masked_hi = tl.minimum(q_start + BLOCK_M, doc_end)
        row_limit = q_idx
    else:
        full_hi = doc_start + (doc_end - doc_start) // BLOCK_N * BLOCK_N
        masked_hi = doc_end
        row_limit = tl.zeros((BLOCK_M,), dtype=tl.int32) + (doc_end - 1)

    offs_n = tl.arange(0, BLOCK_N)
    zero = tl.zeros((), dtype=tl.int64)
    k_tile = _row_tile(K + kv_head * stride_kh, zero, stride_kt, offs_n, offs_d)  # (BLOCK_N, D) at token 0
    v_tile = _row_tile(V + kv_head * stride_vh, zero, stride_vt, offs_n, offs_d)
    dq = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    dq = _dq_key_loop(
        dq, q, do, lse2, delta, k_tile, v_tile,
        stride_kt, stride_vt, doc_start, full_hi, doc_end, row_limit, qk_scale,
        MASKED=False, BLOCK_N=BLOCK_N, DOT_PRECISION=DOT_PRECISION,
    )
    dq = _dq_key_loop(
        dq, q, do, lse2, delta, k_tile, v_tile,
        stride_kt, stride_vt, full_hi, masked_hi, doc_end, row_limit, qk_scale,
        MASKED=True, BLOCK_N=BLOCK_N, DOT_PRECISION=DOT_PRECISION,
    )
    dq = dq * sm_scale
    tl.store(_row_tile(DQ + head * stride_dqh, q_row0, stride_dqt, offs_m, offs_d), dq.to(DQ.dtype.element_ty),
             mask=q_in[:, None])


# ---------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------


class Config(NamedTuple):
    outer: int  # rows a program owns: query rows (forward, dQ) or key rows (dK/dV); the schedule block
    inner: int  # rows per step of the program's loop: key rows (forward, dQ) or query rows (dK/dV)
    num_warps: int
    num_stages: int


KINDS = ("fwd", "dq", "dkdv")
# Each kernel's constexpr names for (outer, inner).
_BLOCK_ARGS = {"fwd": ("BLOCK_M", "BLOCK_N"), "dq": ("BLOCK_M", "BLOCK_N"), "dkdv": ("BLOCK_N", "BLOCK_M")}

# fp16/bf16 with head dims 64 and 128: 128-row program tiles over 8 warps (two
# warpgroups, each issuing 64-row wgmma), the tiles the Hopper flash-attention kernels
# use; the autotuner picks the inner block and pipeline depth. Every candidate compiles
# for sm_90 without register spills (tools/hopper_check.py), checked under both triton
# 3.6 and 3.9, whose register allocations differ by a few registers. The dK/dV kernel
# holds two (128, D) fp32 accumulators and sits at the edge of the register file: at
# D = 128 a 32-row inner block compiles clean under 3.6 but spills under 3.9 (24 B once
# the JIT specialises group = 1), so it steps 16 query rows; 4-warp tiles spill too.
# Head dims 16 and 32 (toy models) take one cheap config per kernel.
# fp32 computes its dots as tf32x3 (three tf32 tensor-core products, fp32 accuracy):
# its hi/lo operand splits cost registers, so its tiles are small, tiny at D = 128.
_TC = "fp16/bf16"
_FP32 = "fp32"
_CONFIGS: dict[tuple[str, int], dict[str, tuple[Config, ...]]] = {
    (_TC, 128): {
        "fwd": (Config(128, 64, 8, 3), Config(128, 64, 8, 4), Config(128, 32, 8, 4)),
        "dq": (Config(128, 64, 8, 3), Config(128, 32, 8, 4)),
        "dkdv": (Config(128, 16, 8, 2), Config(128, 16, 8, 3), Config(128, 16, 8, 4)),
    },
    (_TC, 64): {
        "fwd": (Config(128, 64, 8, 3), Config(128, 64, 8, 4), Config(128, 128, 8, 2)),
        "dq": (Config(128, 64, 8, 3), Config(128, 32, 8, 4)),
        "dkdv": (Config(128, 64, 8, 2), Config(128, 32, 8, 3), Config(128, 32, 8, 4)),
    },
    **{(_TC, d): {"fwd": (Config(128, 64, 4, 3),), "dq": (Config(128, 64, 4, 3),), "dkdv": (Config(128, 32, 8, 3),)}
       for d in (16, 32)},
    (_FP32, 128): {"fwd": (Config(16, 16, 4, 2),), "dq": (Config(16, 16, 4, 2),), "dkdv": (Config(16, 16, 8, 2),)},
    **{(_FP32, d): {"fwd": (Config(128, 32, 8, 2),), "dq": (Config(128, 32, 8, 2),), "dkdv": (Config(128, 16, 8, 2),)}
       for d in (16, 32, 64)},
}
# Under the interpreter: small blocks, so short test documents still span several.
INTERPRETER_CONFIG = Config(32, 16, 4, 1)


def gpu_configs(kind: str, dtype: torch.dtype, head_dim: int) -> tuple[Config, ...]:
    """The configs the CUDA launcher autotunes over for one kernel kind, dtype and head dim."""
    return _CONFIGS[(_FP32 if dtype == torch.float32 else _TC, head_dim)][kind]


def _configs(kind: str, dtype: torch.dtype, head_dim: int) -> tuple[Config, ...]:
    return (INTERPRETER_CONFIG,) if interpreted() else gpu_configs(kind, dtype, head_dim)


_KERNELS = {"fwd": _fwd_kernel, "dq": _bwd_dq_kernel, "dkdv": _bwd_dkdv_kernel}


@functools.lru_cache(maxsize=None)
def _autotuned(kind: str, configs: tuple[Config, ...]):
    """One autotuner per (kernel, config list). The key holds the head dim, causality,
    the GQA group and the bucketed max_seqlen (Triton adds the dtypes)."""
    outer, inner = _BLOCK_ARGS[kind]
    return triton.autotune(
        configs=[triton.Config({outer: c.outer, inner: c.inner}, num_warps=c.num_warps, num_stages=c.num_stages)
                 for c in configs],
        key=["HEAD_DIM", "causal", "group", "seq_bucket"],
    )(_KERNELS[kind])


def _launch(kind: str, configs: tuple[Config, ...], grid: tuple[int], *args, **constexprs) -> None:
    if len(configs) == 1:
        c = configs[0]
        outer, inner = _BLOCK_ARGS[kind]
        _KERNELS[kind][grid](*args, **constexprs, **{outer: c.outer, inner: c.inner}, num_warps=c.num_warps,
                             num_stages=c.num_stages)
    else:
        _autotuned(kind, configs)[grid](*args, **constexprs)


def _outer_block(configs: tuple[Config, ...]) -> int:
    blocks = {c.outer for c in configs}
    if len(blocks) != 1:  # the schedule is built before the autotuner picks: all must agree
        raise AssertionError(f"configs of one kernel must share their outer block, got {sorted(blocks)}")
    return blocks.pop()


def _seq_bucket(max_seqlen: int | None, total: int) -> int:
    """max_seqlen rounded up to a power of two in [512, 16384]: the autotuning key, so
    packed batches whose longest document varies do not retune every step."""
    n = total if max_seqlen is None else max_seqlen
    return min(max(triton.next_power_of_2(max(n, 1)), 512), 16384)


# ---------------------------------------------------------------------------------
# Schedule and wrappers
# ---------------------------------------------------------------------------------


class Schedule(NamedTuple):
    """Program slots over the segments of the token rows. Segment 0 is the rows before the
    first document, segments 1..n_docs are the documents, segment n_docs+1 the rows after
    the last one; the kernels write zeros for the two outer segments."""

    bounds: torch.Tensor  # (n_docs+3,) int32: segment s is rows [bounds[s], bounds[s+1])
    slot_seg: torch.Tensor  # (n_slots,) int32: segment of each program slot (n_docs+2 for a spare slot)
    slot_start: torch.Tensor  # (n_docs+3,) int32: first slot of each segment
    n_slots: int


def segment_bounds(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[0, *cu_seqlens, total] as int32 on cu_seqlens' device, with every boundary clamped
    into [0, total] and then raised to the running maximum (no host sync). For valid
    cu_seqlens (non-decreasing, within [0, total]) the documents are exactly cu_seqlens';
    otherwise the result is the nearest segmentation the kernels can run safely: a
    document reaching past `total` ends there, a boundary below its predecessor leaves
    an empty document."""
    cu = torch.cummax(cu_seqlens.clamp(0, total), 0).values.to(torch.int32)
    return torch.cat([cu.new_zeros(1), cu, cu.new_full((1,), total)])


def build_schedule(cu_seqlens: torch.Tensor, total: int, block: int) -> Schedule:
    """One slot per `block`-row block of every segment (see Schedule), on cu_seqlens'
    device, without a host sync: n_slots = total // block + n_docs + 2 bounds
    sum(ceil(len / block)) over the n_docs + 2 segments."""
    bounds = segment_bounds(cu_seqlens, total)
    n_segments = bounds.shape[0] - 1
    lengths = bounds[1:] - bounds[:-1]  # (n_segments,) >= 0
    blocks = torch.div(lengths + (block - 1), block, rounding_mode="floor")
    slot_end = torch.cumsum(blocks, 0, dtype=torch.int32)  # (n_segments,) one past each segment's last slot
    slot_start = torch.cat([slot_end.new_zeros(1), slot_end])
    n_slots = total // block + n_segments
    slots = torch.arange(n_slots, dtype=torch.int32, device=cu_seqlens.device)
    slot_seg = torch.searchsorted(slot_end, slots, right=True, out_int32=True)
    return Schedule(bounds, slot_seg, slot_start, n_slots)


# Head offsets (head * head stride) are 32-bit in the kernels; token offsets are 64-bit.
_MAX_HEAD_SPAN = 2**31


def _rows_aligned(t: torch.Tensor) -> torch.Tensor:
    """t (T, heads, D) with unit last stride, 16-byte aligned base, token/head strides
    that are multiples of 8 elements and heads * head stride below 2**31, as the kernels
    assume; copies only when needed."""
    ok = (
        t.stride(2) == 1 and t.stride(0) % 8 == 0 and t.stride(1) % 8 == 0 and t.data_ptr() % 16 == 0
        and t.shape[1] * t.stride(1) < _MAX_HEAD_SPAN
    )
    return t if ok else t.clone(memory_format=torch.contiguous_format)


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"flash_attn_varlen: q, k, v must be (tokens, heads, head_dim), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"flash_attn_varlen: k and v must be (tokens, n_kv_heads, head_dim) matching q "
                         f"{tuple(q.shape)}, got {tuple(k.shape)} and {tuple(v.shape)}")
    n_heads, n_kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
    if n_kv_heads == 0 or n_heads % n_kv_heads != 0:
        raise ValueError(f"flash_attn_varlen: n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"flash_attn_varlen: head_dim must be one of {HEAD_DIMS}, got {head_dim}")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"flash_attn_varlen: q, k, v must share one of fp32/fp16/bf16, got {q.dtype}, {k.dtype}, "
                        f"{v.dtype}")
    validate_cu_seqlens(cu_seqlens)
    if q.shape[0] >= 2**31:
        raise ValueError(f"flash_attn_varlen: at most 2**31 - 1 tokens (int32 cu_seqlens), got {q.shape[0]}")
    check_runnable("flash_attn_varlen", q, k, v, cu_seqlens)


def validate_cu_seqlens(cu_seqlens: torch.Tensor) -> None:
    """Raise unless cu_seqlens is a 1-D int32/int64 tensor of at least one boundary (shapes and
    dtypes only: checking its values would take a host sync)."""
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"flash_attn_varlen: cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"flash_attn_varlen: cu_seqlens must be 1-D (n_docs+1,) with at least one boundary, got "
                         f"shape {tuple(cu_seqlens.shape)}")


def _schedule_for(cache: dict[int, Schedule], cu_seqlens: torch.Tensor, total: int, block: int) -> Schedule:
    if block not in cache:
        cache[block] = build_schedule(cu_seqlens, total, block)
    return cache[block]


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 stays fp32-accurate (the GPU would default to plain tf32); 16-bit operands ignore the setting.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, seq_bucket: int, causal: bool,
    sm_scale: float, schedules: dict[int, Schedule],
) -> tuple[torch.Tensor, torch.Tensor]:
    total, n_heads, head_dim = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((n_heads, total), dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return out, lse
    configs = _configs("fwd", q.dtype, head_dim)
    sched = _schedule_for(schedules, cu_seqlens, total, _outer_block(configs))
    _launch(
        "fwd", configs, (sched.n_slots * n_heads,),
        q, k, v, out, lse, sched.bounds, sched.slot_seg, sched.slot_start,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        total, n_heads, n_heads // k.shape[1], sched.bounds.shape[0] - 1, sched.n_slots, int(causal),
        sm_scale * math.log2(math.e), seq_bucket,
        HEAD_DIM=head_dim, DOT_PRECISION=_dot_precision(q.dtype),
    )
    return out, lse


def _backward(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    cu_seqlens: torch.Tensor, seq_bucket: int, causal: bool, sm_scale: float, schedules: dict[int, Schedule],
    need_dq: bool, need_dkdv: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    total, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if need_dq else None
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if need_dkdv else None
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if need_dkdv else None
    if total == 0 or n_heads == 0:  # no query attends to anything
        return dq, *((torch.zeros_like(dk), torch.zeros_like(dv)) if need_dkdv else (None, None))
    delta = torch.empty((n_heads, total), dtype=torch.float32, device=q.device)
    _bwd_delta_kernel[(triton.cdiv(total, DELTA_BLOCK), n_heads)](
        out, do, delta, out.stride(0), out.stride(1), do.stride(0), do.stride(1), total,
        HEAD_DIM=head_dim, BLOCK_T=DELTA_BLOCK, num_warps=DELTA_WARPS,
    )
    group = n_heads // n_kv_heads
    qk_scale = sm_scale * math.log2(math.e)
    precision = _dot_precision(q.dtype)
    if need_dkdv:
        configs = _configs("dkdv", q.dtype, head_dim)
        sched = _schedule_for(schedules, cu_seqlens, total, _outer_block(configs))
        _launch(
            "dkdv", configs, (sched.n_slots * n_kv_heads,),
            q, k, v, do, lse, delta, dk, dv, sched.bounds, sched.slot_seg, sched.slot_start,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            total, n_kv_heads, group, sched.bounds.shape[0] - 1, sched.n_slots, int(causal), qk_scale, sm_scale, seq_bucket,
            HEAD_DIM=head_dim, DOT_PRECISION=precision,
        )
    if need_dq:
        configs = _configs("dq", q.dtype, head_dim)
        sched = _schedule_for(schedules, cu_seqlens, total, _outer_block(configs))
        _launch(
            "dq", configs, (sched.n_slots * n_heads,),
            q, k, v, do, lse, delta, dq, sched.bounds, sched.slot_seg, sched.slot_start,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
            dq.stride(0), dq.stride(1),
            total, n_heads, group, sched.bounds.shape[0] - 1, sched.n_slots, int(causal), qk_scale, sm_scale, seq_bucket,
            HEAD_DIM=head_dim, DOT_PRECISION=precision,
        )
    return dq, dk, dv


class FlashAttnVarlenFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale):
        q, k, v = _rows_aligned(q), _rows_aligned(k), _rows_aligned(v)
        seq_bucket = _seq_bucket(max_seqlen, q.shape[0])
        schedules: dict[int, Schedule] = {}
        out, lse = _forward(q, k, v, cu_seqlens, seq_bucket, causal, softmax_scale, schedules)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        # The schedule tensors are small, derived from cu_seqlens; the backward reuses the
        # forward's where its outer block is the same.
        ctx.schedules = schedules
        ctx.seq_bucket, ctx.causal, ctx.softmax_scale = seq_bucket, causal, softmax_scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        need_dq = ctx.needs_input_grad[0]
        need_dkdv = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        dq, dk, dv = _backward(
            _rows_aligned(dout), q, k, v, out, lse, cu_seqlens, ctx.seq_bucket, ctx.causal, ctx.softmax_scale,
            ctx.schedules, need_dq, need_dkdv,
        )
        return (dq, dk if ctx.needs_input_grad[1] else None, dv if ctx.needs_input_grad[2] else None,
                None, None, None, None)


def flash_attn_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None,
    causal: bool = True,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Attention within each packed document: reference.varlen_attention's answer.

    q (T, n_heads, D); k, v (T, n_kv_heads, D), n_heads a multiple of n_kv_heads, one
    dtype of fp16, bf16 and fp32 (tf32x3 dots on a GPU: fp32 accuracy); D one of
    HEAD_DIMS. cu_seqlens (n_docs+1,) int32 or int64: document d is the token rows
    [cu_seqlens[d], cu_seqlens[d+1]); empty documents are allowed. Returns (T, n_heads, D)
    in q's dtype, a new contiguous tensor. softmax_scale defaults to D**-0.5. max_seqlen
    (the longest document) only selects the autotuning bucket, i.e. which config runs on
    a GPU; correctness does not depend on it, and None is allowed.

    Tokens outside every document (rows before cu_seqlens[0] or from cu_seqlens[-1] on,
    e.g. padding after the last document) attend to nothing: their output rows are 0,
    their gradients (dq, dk, dv) are 0, and no document's query sees them as keys.

    cu_seqlens is used without a host sync, so its values are not checked. Invalid ones
    (decreasing, negative or past T; reference.varlen_attention raises on them) never
    make the kernels read or write out of bounds or leave an output unwritten: each
    boundary is clamped into [0, T] and raised to the running maximum first
    (segment_bounds), and the result is the attention over those documents.

    Layouts: token and head strides of q, k, v and the incoming gradient are passed to
    the kernels. A tensor whose head_dim is not contiguous, whose strides are not
    multiples of 8 elements, whose start is not 16-byte aligned or whose head span
    reaches 2**31 elements is copied once (the kernels load 16-byte aligned rows).
    Raises ValueError for bad shapes, head dims or devices, TypeError for dtypes.
    """
    _validate(q, k, v, cu_seqlens)
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[2] ** -0.5
    return FlashAttnVarlenFunction.apply(q, k, v, cu_seqlens, max_seqlen, bool(causal), scale)


# ---------------------------------------------------------------------------------
# Hopper compile specs
# ---------------------------------------------------------------------------------

_POINTERS = {
    "fwd": {"Q": "q", "K": "q", "V": "q", "OUT": "q", "LSE": "f"},
    "dq": {"Q": "q", "K": "q", "V": "q", "DO": "q", "LSE": "f", "DELTA": "f", "DQ": "q"},
    "dkdv": {"Q": "q", "K": "q", "V": "q", "DO": "q", "LSE": "f", "DELTA": "f", "DK": "q", "DV": "q"},
}


def _signature(fn, pointers: dict[str, str], t: str) -> dict[str, str]:
    """Every parameter of `fn`: data pointers (`q`: the input dtype, `f`: fp32), int32
    schedule pointers, fp32 scales, constexprs, and i32 for the rest."""
    sig = {}
    for name in fn.arg_names:
        if name in pointers:
            sig[name] = f"*{t}" if pointers[name] == "q" else "*fp32"
        elif name in ("BOUNDS", "SLOT_SEG", "SLOT_START"):
            sig[name] = "*i32"
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        elif name.isupper():
            sig[name] = "constexpr"
        else:
            sig[name] = "i32"
    return sig


# The JIT specialises integer arguments equal to 1 into constants, so on a GPU the
# production calls (causal; Llama-2 7B/13B without GQA) compile variants of their own:
# (name suffix, arguments fixed to 1), checked at the head dims with autotuned configs.
_SPECIALISED = (("causal", ("causal",)), ("causal,group=1", ("causal", "group")))
_SPECIALISED_HEAD_DIMS = (64, 128)


def hopper_specs() -> list[KernelSpec]:
    """Every config the CUDA launchers can pick: each kernel's autotuning candidates for
    each dtype and supported head dim (generic arguments, plus the JIT's causal and
    group-of-one specialisations for 16-bit at head dims 64 and 128), and the delta
    preprocess."""
    specs: list[KernelSpec] = []
    for dtype in SUPPORTED_DTYPES:
        t = _TL_NAME[dtype]
        for head_dim in HEAD_DIMS:
            variants = [("", ())]
            if dtype != torch.float32 and head_dim in _SPECIALISED_HEAD_DIMS:
                variants += list(_SPECIALISED)
            for kind in KINDS:
                fn = _KERNELS[kind]
                outer, inner = _BLOCK_ARGS[kind]
                for c, (suffix, ones) in itertools.product(gpu_configs(kind, dtype, head_dim), variants):
                    signature = _signature(fn, _POINTERS[kind], t)
                    signature.update({name: "constexpr" for name in ones})
                    specs.append(KernelSpec(
                        name=f"flash_attn_{kind}[{t},d={head_dim},{outer}={c.outer},{inner}={c.inner},"
                             f"w={c.num_warps},s={c.num_stages}{',' + suffix if suffix else ''}]",
                        fn=fn,
                        signature=signature,
                        constexprs={"HEAD_DIM": head_dim, outer: c.outer, inner: c.inner,
                                    "DOT_PRECISION": _dot_precision(dtype), **{name: 1 for name in ones}},
                        num_warps=c.num_warps,
                        num_stages=c.num_stages,
                        expect_wgmma=c.outer >= 64,  # wgmma tiles are 64 rows per warpgroup
                    ))
            specs.append(KernelSpec(
                name=f"flash_attn_bwd_delta[{t},d={head_dim}]",
                fn=_bwd_delta_kernel,
                signature={"OUT": f"*{t}", "DO": f"*{t}", "DELTA": "*fp32", "stride_ot": "i32", "stride_oh": "i32",
                           "stride_dot": "i32", "stride_doh": "i32", "total": "i32", "HEAD_DIM": "constexpr",
                           "BLOCK_T": "constexpr"},
                constexprs={"HEAD_DIM": head_dim, "BLOCK_T": DELTA_BLOCK},
                num_warps=DELTA_WARPS,
                num_stages=1,
            ))
    return specs
