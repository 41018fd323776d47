"""Fused Wall Attention for training and prefill: forward and backward in Triton.

    logit(i, j) = scale * sum_d q[i,d] k[j,d] 2^(P[i,d] - P[j,d]) + C[i] - C[j],   P = cumsum(g)/ln2, C = cumsum(g_scalar)

How every exponent stays <= 0 (no clamp ever changes a result):
- Sequences are cut into BLOCK-token blocks aligned to document starts. The prefix P is summed in float64;
  inside a block the kernels only see `Pl = P - P[block start]` in float32, so precision does not depend on
  the position (a huge gate at a document start cancels exactly).
- Off-diagonal tiles (key block n entirely before query block m) factor the decay through the key block's
  decaying end A_n: keys are rescaled once, `kt = k * 2^(A_n - P_j)`, queries once per block, `q * 2^(P_i - P_m)`,
  and a tile pair only needs the K-vector `2^(P_m - A_n)`. All three exponents are <= 0.
- The diagonal tile is cut into SUB-token sub-blocks: pairs in different sub-blocks factor the same way
  through the key sub-block's end; pairs inside one sub-block (the "intra" pairs) are computed elementwise,
  exactly, by small kernels of their own (SUB x SUB x K exps per sub-block).

Layout inside: every tensor is flattened to `[total_tokens, heads, dim]`; a batch of B rows is B documents.
"""
import math
import os

import torch
import triton
import triton.language as tl

BLOCK = 64   # query and key block; also the granularity of the decay anchors
SUB = 16     # diagonal sub-block: pairs inside one are computed elementwise
LOG2E = 1.4426950408889634
INTERPRET = os.environ.get('TRITON_INTERPRET') == '1'


def _configs(*warps_stages):
    if INTERPRET:  # the autotuner needs a GPU driver
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w, s in warps_stages]


MAIN_CONFIGS = _configs((4, 2), (4, 3), (8, 2), (8, 3))


@triton.jit
def _load_rows(ptr, rows, row_ok, head, H: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, other=0.0):
    """Rows `rows` of head `head` of a contiguous [tokens, H, D] tensor, padded to DP columns."""
    cols = tl.arange(0, DP)
    offs = (rows.to(tl.int64)[:, None] * H + head) * D + cols[None, :]
    return tl.load(ptr + offs, mask=row_ok[:, None] & (cols[None, :] < D), other=other)


@triton.jit
def _load_row(ptr, row, head, H: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
    cols = tl.arange(0, DP)
    row64 = tl.zeros([DP], dtype=tl.int64) + row  # `row` may be a plain int (loop variable)
    return tl.load(ptr + (row64 * H + head) * D + cols, mask=cols < D, other=0.0)


@triton.jit
def _diag_key_factor(k, Pl, Pl_ptr, rows, i0, last, hg, HG: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                     SUB: tl.constexpr):
    """k * 2^(A - P_j) with A the end of each key's own sub-block (all exponents <= 0)."""
    anchor_rows = tl.minimum(i0 + (rows - i0) // SUB * SUB + SUB - 1, last)
    A = _load_rows(Pl_ptr, anchor_rows, rows <= last, hg, HG, K, KP)
    return k.to(tl.float32) * tl.exp2(tl.minimum(A - Pl, 0.0))


@triton.jit
def _diag_query_factor(Pl, Pl_ptr, i0, last, s: tl.constexpr, hg, HG: tl.constexpr, K: tl.constexpr,
                       KP: tl.constexpr, SUB: tl.constexpr):
    """2^(P_i - A_s) for the end A_s of key sub-block s; rows at or before A_s get garbage that is masked."""
    A = _load_row(Pl_ptr, tl.minimum(i0 + s * SUB + SUB - 1, last), hg, HG, K, KP)
    return tl.exp2(tl.minimum(Pl - A[None, :], 0.0))


@triton.jit
def _diag_logits(q, k, Pl, Pl_ptr, L_ptr, rows, row_ok, i0, last, hq, hg, qk_scale,
                 HQ: tl.constexpr, HG: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                 BLOCK: tl.constexpr, SUB: tl.constexpr):
    """Logits (log2 units, without the scalar gate) of the diagonal tile: queries and keys both `rows`."""
    kb = _diag_key_factor(k, Pl, Pl_ptr, rows, i0, last, hg, HG, K, KP, SUB)
    key_sub = (tl.arange(0, BLOCK) // SUB)[:, None]
    s = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for sb in tl.static_range(BLOCK // SUB):
        qs = (q.to(tl.float32) * _diag_query_factor(Pl, Pl_ptr, i0, last, sb, hg, HG, K, KP, SUB)).to(q.dtype)
        ks = tl.where(key_sub == sb, kb, 0.0).to(q.dtype)
        s += tl.dot(qs, tl.trans(ks))
    s *= qk_scale
    # Pairs inside one sub-block come exact from the intra kernel.
    r = tl.arange(0, BLOCK)
    intra = (r[:, None] // SUB == r[None, :] // SUB) & (r[None, :] <= r[:, None])
    L = tl.load(L_ptr + (rows.to(tl.int64)[:, None] * HQ + hq) * SUB + (r[None, :] % SUB),
                mask=intra & row_ok[:, None], other=0.0)
    return tl.where(intra, L, s), intra


@triton.jit
def _gate_offset(C_ptr, idx, ok, C_ref, hq, HQ: tl.constexpr, HAS_GS: tl.constexpr):
    """(C[idx] - C_ref) in float32: the scalar-gate prefix relative to a nearby anchor (float64 difference)."""
    if HAS_GS:
        C = tl.load(C_ptr + idx.to(tl.int64) * HQ + hq, mask=ok, other=0.0)
        return tl.where(ok, C - C_ref, 0.0).to(tl.float32)
    else:
        return tl.zeros(idx.shape, dtype=tl.float32)


@triton.jit
def _mask_and_gate(s, rows, cols, visible, cq, ck, WINDOW, HAS_WINDOW: tl.constexpr):
    """Adds the scalar-gate difference C[i] - C[j] = cq[i] - ck[j] and applies causal/window/document visibility."""
    s += cq[:, None] - ck[None, :]
    if HAS_WINDOW:
        visible &= (rows[:, None] - cols[None, :]) < WINDOW
    return tl.where(visible, s, float('-inf'))


@triton.jit
def _softmax_step(s, m_i, l_i, acc, v):
    """One online-softmax step over a tile of logits (log2 units); fully masked rows stay at zero."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float('-inf'), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)


@triton.jit
def _gate_ref(C_ptr, idx, hq, HQ: tl.constexpr, HAS_GS: tl.constexpr):
    if HAS_GS:
        return tl.load(C_ptr + idx.to(tl.int64) * HQ + hq)
    else:
        return 0.0


@triton.jit
def _window_start(i0, bos, WINDOW, BLOCK: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """First key block that row i0 can see."""
    if HAS_WINDOW:
        return tl.maximum(bos, bos + (i0 - WINDOW + 1 - bos) // BLOCK * BLOCK)
    else:
        return bos


@triton.autotune(configs=MAIN_CONFIGS, key=['K', 'V', 'HAS_GS', 'HAS_WINDOW'])
@triton.jit
def _fwd_kernel(q_ptr, kt_ptr, k_ptr, v_ptr, Pl_ptr, P_ptr, C_ptr, L_ptr, sink_ptr, o_ptr, lse_ptr, blocks_ptr,
                qk_scale, WINDOW,
                HQ: tl.constexpr, H: tl.constexpr, HG: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                KP: tl.constexpr, VP: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr,
                HAS_GS: tl.constexpr, HAS_SINK: tl.constexpr, HAS_WINDOW: tl.constexpr):
    i0 = tl.load(blocks_ptr + 3 * tl.program_id(0))
    bos = tl.load(blocks_ptr + 3 * tl.program_id(0) + 1)
    eos = tl.load(blocks_ptr + 3 * tl.program_id(0) + 2)
    hq = tl.program_id(1)
    hk = hq // (HQ // H)
    hg = hq // (HQ // HG)
    rows = i0 + tl.arange(0, BLOCK)
    row_ok = rows < eos
    last = tl.minimum(i0 + BLOCK, eos) - 1

    q = _load_rows(q_ptr, rows, row_ok, hq, HQ, K, KP)
    Pl = _load_rows(Pl_ptr, rows, row_ok, hg, HG, K, KP)
    q_hat = (q.to(tl.float32) * tl.exp2(tl.minimum(Pl, 0.0))).to(q.dtype)
    P_m = _load_row(P_ptr, i0, hg, HG, K, KP)
    C_ref = _gate_ref(C_ptr, i0, hq, HQ, HAS_GS)
    cq = _gate_offset(C_ptr, rows, row_ok, C_ref, hq, HQ, HAS_GS)

    if HAS_SINK:
        m_i = tl.zeros([BLOCK], dtype=tl.float32) + tl.load(sink_ptr + hq).to(tl.float32) * 1.4426950408889634
        l_i = tl.full([BLOCK], 1.0, dtype=tl.float32)
    else:
        m_i = tl.full([BLOCK], float('-inf'), dtype=tl.float32)
        l_i = tl.zeros([BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK, VP], dtype=tl.float32)

    for j0 in range(_window_start(i0, bos, WINDOW, BLOCK, HAS_WINDOW), i0, BLOCK):
        cols = j0 + tl.arange(0, BLOCK)
        A = _load_row(P_ptr, j0 + BLOCK - 1, hg, HG, K, KP)
        f = tl.exp2(tl.minimum(P_m - A, 0.0).to(tl.float32))
        kt = _load_rows(kt_ptr, cols, cols < eos, hg, HG, K, KP)
        s = tl.dot((q_hat.to(tl.float32) * f[None, :]).to(q.dtype), tl.trans(kt)) * qk_scale
        ck = _gate_offset(C_ptr, cols, cols < eos, C_ref, hq, HQ, HAS_GS)
        s = _mask_and_gate(s, rows, cols, row_ok[:, None] & (cols[None, :] < eos), cq, ck, WINDOW, HAS_WINDOW)
        v = _load_rows(v_ptr, cols, cols < eos, hk, H, V, VP)
        m_i, l_i, acc = _softmax_step(s, m_i, l_i, acc, v)

    k = _load_rows(k_ptr, rows, row_ok, hk, H, K, KP)
    s, _ = _diag_logits(q, k, Pl, Pl_ptr, L_ptr, rows, row_ok, i0, last, hq, hg, qk_scale, HQ, HG, K, KP, BLOCK, SUB)
    s = _mask_and_gate(s, rows, rows, row_ok[:, None] & (rows[None, :] <= rows[:, None]), cq, cq, WINDOW, HAS_WINDOW)
    v = _load_rows(v_ptr, rows, row_ok, hk, H, V, VP)
    m_i, l_i, acc = _softmax_step(s, m_i, l_i, acc, v)

    o = acc / l_i[:, None]
    cols_v = tl.arange(0, VP)
    tl.store(o_ptr + (rows.to(tl.int64)[:, None] * HQ + hq) * V + cols_v[None, :], o.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (cols_v[None, :] < V))
    tl.store(lse_ptr + rows.to(tl.int64) * HQ + hq, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _intra_fwd_kernel(q_ptr, k_ptr, P_ptr, L_ptr, blocks_ptr, qk_scale,
                      HQ: tl.constexpr, H: tl.constexpr, HG: tl.constexpr, K: tl.constexpr,
                      SUB: tl.constexpr, BLOCK: tl.constexpr, DK: tl.constexpr):
    """Exact logits of the pairs inside each SUB-token sub-block: L[i, hq, j - sub start]."""
    i0 = tl.load(blocks_ptr + 3 * tl.program_id(0))
    eos = tl.load(blocks_ptr + 3 * tl.program_id(0) + 2)
    hq = tl.program_id(1)
    hk = hq // (HQ // H)
    hg = hq // (HQ // HG)
    for r0 in range(i0, tl.minimum(i0 + BLOCK, eos), SUB):
        rows = r0 + tl.arange(0, SUB)
        row_ok = rows < eos
        s = tl.zeros([SUB, SUB], dtype=tl.float32)
        for d0 in range(0, K, DK):
            cols = d0 + tl.arange(0, DK)
            ok = row_ok[:, None] & (cols[None, :] < K)
            base = rows.to(tl.int64)[:, None]
            q = tl.load(q_ptr + (base * HQ + hq) * K + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            k = tl.load(k_ptr + (base * H + hk) * K + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            P = tl.load(P_ptr + (base * HG + hg) * K + cols[None, :], mask=ok, other=0.0)
            decay = tl.exp2(tl.minimum(P[:, None, :] - P[None, :, :], 0.0).to(tl.float32))
            s += tl.sum(q[:, None, :] * k[None, :, :] * decay, 2)
        j = tl.arange(0, SUB)
        tl.store(L_ptr + (rows.to(tl.int64)[:, None] * HQ + hq) * SUB + j[None, :],
                 tl.where(j[None, :] <= tl.arange(0, SUB)[:, None], s * qk_scale, 0.0), mask=row_ok[:, None])


@triton.jit
def _probs_and_dscores(s, lse, delta, do, v):
    """Softmax probabilities and the logit gradient dS = p * (dp - delta) (natural units)."""
    p = tl.exp2(s - lse[:, None])
    dp = tl.dot(do, tl.trans(v))
    return p, p * (dp - delta[:, None])


@triton.autotune(configs=MAIN_CONFIGS, key=['K', 'V', 'HAS_GS', 'HAS_WINDOW'])
@triton.jit
def _bwd_dq_kernel(q_ptr, kt_ptr, k_ptr, v_ptr, Pl_ptr, P_ptr, C_ptr, L_ptr, do_ptr, lse_ptr, delta_ptr,
                   dq_ptr, dcq_ptr, blocks_ptr, qk_scale, scale, WINDOW,
                   HQ: tl.constexpr, H: tl.constexpr, HG: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                   KP: tl.constexpr, VP: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr,
                   HAS_GS: tl.constexpr, HAS_WINDOW: tl.constexpr):
    i0 = tl.load(blocks_ptr + 3 * tl.program_id(0))
    bos = tl.load(blocks_ptr + 3 * tl.program_id(0) + 1)
    eos = tl.load(blocks_ptr + 3 * tl.program_id(0) + 2)
    hq = tl.program_id(1)
    hk = hq // (HQ // H)
    hg = hq // (HQ // HG)
    rows = i0 + tl.arange(0, BLOCK)
    row_ok = rows < eos
    last = tl.minimum(i0 + BLOCK, eos) - 1

    q = _load_rows(q_ptr, rows, row_ok, hq, HQ, K, KP)
    Pl = _load_rows(Pl_ptr, rows, row_ok, hg, HG, K, KP)
    q_hat = (q.to(tl.float32) * tl.exp2(tl.minimum(Pl, 0.0))).to(q.dtype)
    P_m = _load_row(P_ptr, i0, hg, HG, K, KP)
    C_ref = _gate_ref(C_ptr, i0, hq, HQ, HAS_GS)
    cq = _gate_offset(C_ptr, rows, row_ok, C_ref, hq, HQ, HAS_GS)
    do = _load_rows(do_ptr, rows, row_ok, hq, HQ, V, VP)
    lse = tl.load(lse_ptr + rows.to(tl.int64) * HQ + hq, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + rows.to(tl.int64) * HQ + hq, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK, KP], dtype=tl.float32)  # in the frame of q_hat until the loop ends
    dcq = tl.zeros([BLOCK], dtype=tl.float32)
    for j0 in range(_window_start(i0, bos, WINDOW, BLOCK, HAS_WINDOW), i0, BLOCK):
        cols = j0 + tl.arange(0, BLOCK)
        A = _load_row(P_ptr, j0 + BLOCK - 1, hg, HG, K, KP)
        f = tl.exp2(tl.minimum(P_m - A, 0.0).to(tl.float32))
        kt = _load_rows(kt_ptr, cols, cols < eos, hg, HG, K, KP)
        s = tl.dot((q_hat.to(tl.float32) * f[None, :]).to(q.dtype), tl.trans(kt)) * qk_scale
        ck = _gate_offset(C_ptr, cols, cols < eos, C_ref, hq, HQ, HAS_GS)
        s = _mask_and_gate(s, rows, cols, row_ok[:, None] & (cols[None, :] < eos), cq, ck, WINDOW, HAS_WINDOW)
        v = _load_rows(v_ptr, cols, cols < eos, hk, H, V, VP)
        p, ds = _probs_and_dscores(s, lse, delta, do, v)
        dcq += tl.sum(ds, 1)
        dq += tl.dot(ds.to(kt.dtype), kt) * f[None, :]
    dq *= tl.exp2(tl.minimum(Pl, 0.0))

    # Diagonal tile.
    k = _load_rows(k_ptr, rows, row_ok, hk, H, K, KP)
    s, intra = _diag_logits(q, k, Pl, Pl_ptr, L_ptr, rows, row_ok, i0, last, hq, hg, qk_scale,
                            HQ, HG, K, KP, BLOCK, SUB)
    s = _mask_and_gate(s, rows, rows, row_ok[:, None] & (rows[None, :] <= rows[:, None]), cq, cq, WINDOW, HAS_WINDOW)
    v = _load_rows(v_ptr, rows, row_ok, hk, H, V, VP)
    p, ds = _probs_and_dscores(s, lse, delta, do, v)
    dcq += tl.sum(ds, 1)
    ds = tl.where(intra, 0.0, ds)  # intra pairs: added by the intra backward kernel
    kb = _diag_key_factor(k, Pl, Pl_ptr, rows, i0, last, hg, HG, K, KP, SUB).to(k.dtype)
    key_sub = (tl.arange(0, BLOCK) // SUB)[None, :]
    for sb in tl.static_range(BLOCK // SUB):
        part = tl.dot(tl.where(key_sub == sb, ds, 0.0).to(k.dtype), kb)
        dq += part * _diag_query_factor(Pl, Pl_ptr, i0, last, sb, hg, HG, K, KP, SUB)

    cols_k = tl.arange(0, KP)
    tl.store(dq_ptr + (rows.to(tl.int64)[:, None] * HQ + hq) * K + cols_k[None, :], dq * scale,
             mask=row_ok[:, None] & (cols_k[None, :] < K))
    tl.store(dcq_ptr + rows.to(tl.int64) * HQ + hq, dcq, mask=row_ok)


@triton.autotune(configs=MAIN_CONFIGS, key=['K', 'V', 'HAS_GS', 'HAS_WINDOW'])
@triton.jit
def _bwd_dkv_kernel(q_ptr, qh_ptr, kt_ptr, k_ptr, v_ptr, Pl_ptr, P_ptr, C_ptr, L_ptr, do_ptr, lse_ptr, delta_ptr,
                    dk_ptr, dv_ptr, dck_ptr, blocks_ptr, num_blocks, qk_scale, scale, WINDOW,
                    HQ: tl.constexpr, H: tl.constexpr, HG: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                    KP: tl.constexpr, VP: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr,
                    HAS_GS: tl.constexpr, HAS_WINDOW: tl.constexpr):
    # The block table lists the longest query loops first; key loops are longest in reverse order.
    blk = num_blocks - 1 - tl.program_id(0)
    j0 = tl.load(blocks_ptr + 3 * blk)
    eos = tl.load(blocks_ptr + 3 * blk + 2)
    hq = tl.program_id(1)
    hk = hq // (HQ // H)
    hg = hq // (HQ // HG)
    cols = j0 + tl.arange(0, BLOCK)
    col_ok = cols < eos
    last = tl.minimum(j0 + BLOCK, eos) - 1

    kt = _load_rows(kt_ptr, cols, col_ok, hg, HG, K, KP)
    v = _load_rows(v_ptr, cols, col_ok, hk, H, V, VP)
    A = _load_row(P_ptr, last, hg, HG, K, KP)
    C_ref = _gate_ref(C_ptr, j0, hq, HQ, HAS_GS)
    ck = _gate_offset(C_ptr, cols, col_ok, C_ref, hq, HQ, HAS_GS)

    dk = tl.zeros([BLOCK, KP], dtype=tl.float32)  # in the frame of kt until the loop ends
    dv = tl.zeros([BLOCK, VP], dtype=tl.float32)
    dck = tl.zeros([BLOCK], dtype=tl.float32)
    hi = eos
    if HAS_WINDOW:
        hi = tl.minimum(eos, last + WINDOW)
    for i0 in range(j0 + BLOCK, hi, BLOCK):
        rows = i0 + tl.arange(0, BLOCK)
        row_ok = rows < eos
        P_m = _load_row(P_ptr, i0, hg, HG, K, KP)
        f = tl.exp2(tl.minimum(P_m - A, 0.0).to(tl.float32))
        q_hat = _load_rows(qh_ptr, rows, row_ok, hq, HQ, K, KP)
        qf = (q_hat.to(tl.float32) * f[None, :]).to(q_hat.dtype)
        s = tl.dot(qf, tl.trans(kt)) * qk_scale
        cq = _gate_offset(C_ptr, rows, row_ok, C_ref, hq, HQ, HAS_GS)
        s = _mask_and_gate(s, rows, cols, row_ok[:, None] & col_ok[None, :], cq, ck, WINDOW, HAS_WINDOW)
        do = _load_rows(do_ptr, rows, row_ok, hq, HQ, V, VP)
        lse = tl.load(lse_ptr + rows.to(tl.int64) * HQ + hq, mask=row_ok, other=0.0)
        delta = tl.load(delta_ptr + rows.to(tl.int64) * HQ + hq, mask=row_ok, other=0.0)
        p, ds = _probs_and_dscores(s, lse, delta, do, v)
        dv += tl.dot(tl.trans(p).to(do.dtype), do)
        dck += tl.sum(ds, 0)
        dk += tl.dot(tl.trans(ds).to(qf.dtype), qf)
    Pl = _load_rows(Pl_ptr, cols, col_ok, hg, HG, K, KP)
    Pl_end = _load_row(Pl_ptr, last, hg, HG, K, KP)
    dk *= tl.exp2(tl.minimum(Pl_end[None, :] - Pl, 0.0))

    # Diagonal tile: queries are the key rows themselves.
    q = _load_rows(q_ptr, cols, col_ok, hq, HQ, K, KP)
    k = _load_rows(k_ptr, cols, col_ok, hk, H, K, KP)
    s, intra = _diag_logits(q, k, Pl, Pl_ptr, L_ptr, cols, col_ok, j0, last, hq, hg, qk_scale,
                            HQ, HG, K, KP, BLOCK, SUB)
    s = _mask_and_gate(s, cols, cols, col_ok[:, None] & (cols[None, :] <= cols[:, None]), ck, ck, WINDOW, HAS_WINDOW)
    do = _load_rows(do_ptr, cols, col_ok, hq, HQ, V, VP)
    lse = tl.load(lse_ptr + cols.to(tl.int64) * HQ + hq, mask=col_ok, other=0.0)
    delta = tl.load(delta_ptr + cols.to(tl.int64) * HQ + hq, mask=col_ok, other=0.0)
    p, ds = _probs_and_dscores(s, lse, delta, do, v)
    dv += tl.dot(tl.trans(p).to(do.dtype), do)
    dck += tl.sum(ds, 0)
    ds_t = tl.trans(tl.where(intra, 0.0, ds))  # [keys, queries]; intra pairs: the intra backward kernel
    key_sub = (tl.arange(0, BLOCK) // SUB)[:, None]
    dk_diag = tl.zeros([BLOCK, KP], dtype=tl.float32)
    for sb in tl.static_range(BLOCK // SUB):
        qs = (q.to(tl.float32) * _diag_query_factor(Pl, Pl_ptr, j0, last, sb, hg, HG, K, KP, SUB)).to(q.dtype)
        dk_diag += tl.dot(tl.where(key_sub == sb, ds_t, 0.0).to(q.dtype), qs)
    dk += dk_diag * _diag_key_factor(tl.full([BLOCK, KP], 1.0, tl.float32), Pl, Pl_ptr, cols, j0, last, hg,
                                     HG, K, KP, SUB)

    cols_k = tl.arange(0, KP)
    cols_v = tl.arange(0, VP)
    tl.store(dk_ptr + (cols.to(tl.int64)[:, None] * HQ + hq) * K + cols_k[None, :], dk * scale,
             mask=col_ok[:, None] & (cols_k[None, :] < K))
    tl.store(dv_ptr + (cols.to(tl.int64)[:, None] * HQ + hq) * V + cols_v[None, :], dv,
             mask=col_ok[:, None] & (cols_v[None, :] < V))
    tl.store(dck_ptr + cols.to(tl.int64) * HQ + hq, dck, mask=col_ok)


@triton.jit
def _intra_bwd_kernel(q_ptr, k_ptr, v_ptr, P_ptr, C_ptr, L_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr,
                      blocks_ptr, scale, WINDOW,
                      HQ: tl.constexpr, H: tl.constexpr, HG: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                      VP: tl.constexpr, SUB: tl.constexpr, BLOCK: tl.constexpr, DK: tl.constexpr,
                      HAS_GS: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Adds the intra-sub-block pairs' exact contributions to dq and dk (read-modify-write: never autotune)."""
    i0 = tl.load(blocks_ptr + 3 * tl.program_id(0))
    eos = tl.load(blocks_ptr + 3 * tl.program_id(0) + 2)
    hq = tl.program_id(1)
    hk = hq // (HQ // H)
    hg = hq // (HQ // HG)
    j = tl.arange(0, SUB)
    for r0 in range(i0, tl.minimum(i0 + BLOCK, eos), SUB):
        rows = r0 + j
        row_ok = rows < eos
        base = rows.to(tl.int64)[:, None]
        visible = row_ok[:, None] & (j[None, :] <= j[:, None])
        if HAS_WINDOW:
            visible &= (j[:, None] - j[None, :]) < WINDOW
        s = tl.load(L_ptr + (base * HQ + hq) * SUB + j[None, :], mask=visible, other=0.0)
        if HAS_GS:
            C = tl.load(C_ptr + rows.to(tl.int64) * HQ + hq, mask=row_ok, other=0.0)
            s += (C[:, None] - C[None, :]).to(tl.float32)
        lse = tl.load(lse_ptr + rows.to(tl.int64) * HQ + hq, mask=row_ok, other=0.0)
        delta = tl.load(delta_ptr + rows.to(tl.int64) * HQ + hq, mask=row_ok, other=0.0)
        do = _load_rows(do_ptr, rows, row_ok, hq, HQ, V, VP)
        v = _load_rows(v_ptr, rows, row_ok, hk, H, V, VP)
        p, ds = _probs_and_dscores(s, lse, delta, do, v)
        ds = tl.where(visible, ds, 0.0) * scale
        for d0 in range(0, K, DK):
            cols = d0 + tl.arange(0, DK)
            ok = row_ok[:, None] & (cols[None, :] < K)
            q = tl.load(q_ptr + (base * HQ + hq) * K + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            k = tl.load(k_ptr + (base * H + hk) * K + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            P = tl.load(P_ptr + (base * HG + hg) * K + cols[None, :], mask=ok, other=0.0)
            w = ds[:, :, None] * tl.exp2(tl.minimum(P[:, None, :] - P[None, :, :], 0.0).to(tl.float32))
            dq_offs = (base * HQ + hq) * K + cols[None, :]
            tl.store(dq_ptr + dq_offs, tl.load(dq_ptr + dq_offs, mask=ok) + tl.sum(w * k[None, :, :], 1), mask=ok)
            tl.store(dk_ptr + dq_offs, tl.load(dk_ptr + dq_offs, mask=ok) + tl.sum(w * q[:, None, :], 0), mask=ok)


def _block_table(bounds, device):
    """(block start, document start, document end) for every BLOCK-token block, longest query loops first."""
    table = [(s, bos, eos) for bos, eos in zip(bounds[:-1], bounds[1:]) for s in range(bos, eos, BLOCK)]
    table.sort(key=lambda t: t[1] - t[0])
    return torch.tensor(table, dtype=torch.int32, device=device).reshape(-1, 3)


def _prefixes(g, block_start):
    """P = cumsum(g)/ln2 in float64 over the flattened tokens, and Pl = P - P[block start] in float32.

    One running sum across documents is fine: only differences inside a document are ever used, and float64
    keeps them exact to ~1e-11 at any offset.
    """
    P = torch.cumsum(g.double(), dim=0).mul_(LOG2E)
    return P, (P - P[block_start]).float()


def _reverse_cumsum(x, doc_end):
    """sum over s >= t inside t's document, in float64: R[t] - R[document end]."""
    R = torch.cumsum(x.double().flip(0), dim=0).flip(0)
    R = torch.cat([R, R.new_zeros(1, *R.shape[1:])])
    return R[:-1] - R[doc_end]


class _Layout:
    """Everything derived from the document boundaries, shared by forward and backward."""

    def __init__(self, bounds, total, device):
        self.bounds = bounds
        self.blocks = _block_table(bounds, device)
        starts = torch.tensor(bounds[:-1], device=device)
        lengths = torch.tensor(bounds[1:], device=device) - starts
        positions = torch.arange(total, device=device)
        doc_start = torch.repeat_interleave(starts, lengths, output_size=total)
        self.doc_end = torch.repeat_interleave(starts + lengths, lengths, output_size=total)
        self.block_start = doc_start + (positions - doc_start) // BLOCK * BLOCK
        self.block_end = torch.minimum(self.block_start + BLOCK, self.doc_end) - 1


def _grid_args(q, k, v, g_heads):
    HQ, K, H, V = q.shape[1], q.shape[2], k.shape[1], v.shape[2]
    return dict(HQ=HQ, H=H, HG=g_heads, K=K, V=V, KP=max(16, triton.next_power_of_2(K)),
                VP=max(16, triton.next_power_of_2(V)), BLOCK=BLOCK, SUB=SUB)


def _forward(q, k, v, g, g_scalar, sink_bias, scale, window_size, layout):
    """q, k, v, g flattened to [tokens, heads, dim]. Returns o, lse (log2 units) and what backward needs."""
    dims = _grid_args(q, k, v, g.shape[1])
    HQ, HG = dims['HQ'], dims['HG']
    P, Pl = _prefixes(g, layout.block_start)
    # Keys rescaled once to the decaying end of their block: |kt| <= |k|.
    k_heads = k.repeat_interleave(HG // k.shape[1], dim=1)
    kt = (k_heads.float() * torch.exp2(Pl[layout.block_end] - Pl)).to(k.dtype)
    C = None if g_scalar is None else torch.cumsum(g_scalar.double(), dim=0).mul_(LOG2E)
    qk_scale = scale * LOG2E
    L = torch.empty(q.shape[0], HQ, SUB, device=q.device, dtype=torch.float32)
    grid = (layout.blocks.shape[0], HQ)
    _intra_fwd_kernel[grid](q, k, P, L, layout.blocks, qk_scale, HQ=HQ, H=dims['H'], HG=HG, K=dims['K'],
                            SUB=SUB, BLOCK=BLOCK, DK=16, num_warps=4)
    o = torch.empty(*q.shape[:2], v.shape[2], device=q.device, dtype=q.dtype)
    lse = torch.empty(q.shape[0], HQ, device=q.device, dtype=torch.float32)
    _fwd_kernel[grid](q, kt, k, v, Pl, P, P if C is None else C, L, lse if sink_bias is None else sink_bias, o, lse, layout.blocks, qk_scale,
                      window_size or 0, HAS_GS=C is not None, HAS_SINK=sink_bias is not None,
                      HAS_WINDOW=window_size is not None, **dims)
    return o, lse, (P, Pl, kt, C, L)


def _backward(do, q, k, v, g, o, lse, saved, g_scalar, sink_bias, scale, window_size, layout):
    P, Pl, kt, C, L = saved
    dims = _grid_args(q, k, v, g.shape[1])
    HQ, H, HG = dims['HQ'], dims['H'], dims['HG']
    do = do.contiguous()
    delta = (do.float() * o.float()).sum(-1)
    q_hat = (q.float() * torch.exp2(Pl.repeat_interleave(HQ // HG, dim=1))).to(q.dtype)
    dq = torch.empty(q.shape, device=q.device, dtype=torch.float32)
    dk = torch.empty(q.shape, device=q.device, dtype=torch.float32)  # per query head: dg needs it
    dv = torch.empty(*q.shape[:2], v.shape[2], device=q.device, dtype=torch.float32)
    dcq = torch.empty(q.shape[:2], device=q.device, dtype=torch.float32)
    dck = torch.empty(q.shape[:2], device=q.device, dtype=torch.float32)
    qk_scale = scale * LOG2E
    flags = dict(HAS_GS=C is not None, HAS_WINDOW=window_size is not None)
    C_arg = P if C is None else C
    grid = (layout.blocks.shape[0], HQ)
    _bwd_dq_kernel[grid](q, kt, k, v, Pl, P, C_arg, L, do, lse, delta, dq, dcq, layout.blocks, qk_scale, scale,
                         window_size or 0, **flags, **dims)
    _bwd_dkv_kernel[grid](q, q_hat, kt, k, v, Pl, P, C_arg, L, do, lse, delta, dk, dv, dck, layout.blocks,
                          layout.blocks.shape[0], qk_scale, scale, window_size or 0, **flags, **dims)
    _intra_bwd_kernel[grid](q, k, v, P, C_arg, L, do, lse, delta, dq, dk, layout.blocks, scale, window_size or 0,
                            HQ=HQ, H=H, HG=HG, K=dims['K'], V=dims['V'], VP=dims['VP'], SUB=SUB, BLOCK=BLOCK,
                            DK=16, num_warps=4, **flags)

    k_heads = k.float().repeat_interleave(HQ // H, dim=1)
    decay_grad = q.float() * dq - k_heads * dk
    dg = _reverse_cumsum(decay_grad.unflatten(1, (HG, HQ // HG)).sum(2), layout.doc_end).to(g.dtype)
    dg_scalar = None
    if g_scalar is not None:
        dg_scalar = _reverse_cumsum(dcq - dck, layout.doc_end).to(g_scalar.dtype)
    dsink = None
    if sink_bias is not None:
        p_sink = torch.exp2(sink_bias.float()[None, :] * LOG2E - lse)
        dsink = -(p_sink * delta).sum(0).to(sink_bias.dtype)
    dk = dk.unflatten(1, (H, HQ // H)).sum(2).to(k.dtype)
    dv = dv.unflatten(1, (H, HQ // H)).sum(2).to(v.dtype)
    return dq.to(q.dtype), dk, dv, dg, dg_scalar, dsink


class WallAttnFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, g, g_scalar, sink_bias, scale, window_size, bounds):
        layout = _Layout(bounds, q.shape[0], q.device)
        o, lse, saved = _forward(q, k, v, g, g_scalar, sink_bias, scale, window_size, layout)
        P, Pl, kt, C, L = saved
        # P and C are recomputed in backward: the float64 prefix is the largest thing we would keep.
        ctx.save_for_backward(q, k, v, g, g_scalar, sink_bias, o, lse, Pl, kt, L)
        ctx.scale, ctx.window_size, ctx.layout = scale, window_size, layout
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, g, g_scalar, sink_bias, o, lse, Pl, kt, L = ctx.saved_tensors
        layout = ctx.layout
        P = torch.cumsum(g.double(), dim=0).mul_(LOG2E)
        C = None if g_scalar is None else torch.cumsum(g_scalar.double(), dim=0).mul_(LOG2E)
        grads = _backward(do, q, k, v, g, o, lse, (P, Pl, kt, C, L), g_scalar, sink_bias, ctx.scale,
                          ctx.window_size, layout)
        return (*grads, None, None, None)


def _check_inputs(q, k, v, g, scale, g_scalar, sink_bias, window_size, cu_seqlens):
    for name, x in (('q', q), ('k', k), ('v', v), ('g', g)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f'`{name}` must be a torch.Tensor, got {type(x).__name__}')
        if x.dim() != 4:
            raise ValueError(f'`{name}` must be 4-D [batch, time, heads, dim], got shape {tuple(x.shape)}')
    B, T, HQ, K = q.shape
    H, V = k.shape[2], v.shape[3]
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f'`q` must be float16, bfloat16 or float32, got {q.dtype}')
    for name, x in (('k', k), ('v', v)):
        if x.dtype != q.dtype:
            raise TypeError(f'`{name}` must have the dtype of `q` ({q.dtype}), got {x.dtype}')
    if not g.is_floating_point():
        raise TypeError(f'`g` must be a floating-point tensor, got {g.dtype}')
    if k.shape != (B, T, H, K):
        raise ValueError(f'`k` must be [batch, time, kv_heads, dim] = [{B}, {T}, H, {K}] to match `q`, '
                         f'got {tuple(k.shape)}')
    if HQ % H:
        raise ValueError(f'query heads ({HQ}) must be a multiple of kv heads ({H}) in `q` and `k`')
    if v.shape[:3] != (B, T, H):
        raise ValueError(f'`v` must be [{B}, {T}, {H}, V] to match `q` and `k`, got {tuple(v.shape)}')
    if g.shape not in ((B, T, HQ, K), (B, T, H, K)):
        raise ValueError(f'`g` must be [{B}, {T}, {HQ}, {K}] (per query head) or [{B}, {T}, {H}, {K}] '
                         f'(per kv head), got {tuple(g.shape)}')
    if K > 256 or V > 256:
        raise ValueError(f'head dims up to 256 are supported, got K={K} (`q`, `k`) and V={V} (`v`)')
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f'`scale` must be a float, got {type(scale).__name__}')
    if g_scalar is not None:
        if not isinstance(g_scalar, torch.Tensor) or g_scalar.shape != (B, T, HQ):
            raise ValueError(f'`g_scalar` must be a tensor [{B}, {T}, {HQ}], got '
                             f'{tuple(g_scalar.shape) if isinstance(g_scalar, torch.Tensor) else type(g_scalar)}')
        if not g_scalar.is_floating_point():
            raise TypeError(f'`g_scalar` must be floating-point, got {g_scalar.dtype}')
    if sink_bias is not None:
        if not isinstance(sink_bias, torch.Tensor) or sink_bias.shape != (HQ,):
            raise ValueError(f'`sink_bias` must be a tensor [{HQ}] (one logit per query head), got '
                             f'{tuple(sink_bias.shape) if isinstance(sink_bias, torch.Tensor) else type(sink_bias)}')
        if not sink_bias.is_floating_point():
            raise TypeError(f'`sink_bias` must be floating-point, got {sink_bias.dtype}')
    if window_size is not None and (not isinstance(window_size, int) or isinstance(window_size, bool)
                                    or window_size < 1):
        raise ValueError(f'`window_size` must be a positive int or None, got {window_size!r}')
    tensors = [('q', q), ('k', k), ('v', v), ('g', g), ('g_scalar', g_scalar), ('sink_bias', sink_bias),
               ('cu_seqlens', cu_seqlens)]
    for name, x in tensors:
        if isinstance(x, torch.Tensor) and x.device != q.device:
            raise ValueError(f'`{name}` is on {x.device} but `q` is on {q.device}: all inputs must share a device')
    if cu_seqlens is None:
        return list(range(0, B * T + 1, T)) if T else [0, 0]
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError('`cu_seqlens` must be a 1-D tensor [num_docs + 1]')
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f'`cu_seqlens` must be int32 or int64, got {cu_seqlens.dtype}')
    if B != 1:
        raise ValueError(f'`cu_seqlens` needs batch size 1 (documents packed along time), got batch {B}')
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != T:
        raise ValueError(f'`cu_seqlens` must start at 0 and end at T={T}, got {bounds[0]} ... {bounds[-1]}')
    if any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError('`cu_seqlens` must be non-decreasing')
    return bounds


def wall_attn(q, k, v, g, *, scale=None, g_scalar=None, sink_bias=None, window_size=None, cu_seqlens=None):
    """Wall Attention (SPEC section 1), differentiable in q, k, v, g, g_scalar and sink_bias.

    q [B,T,HQ,K], k [B,T,H,K], v [B,T,H,V], g [B,T,HQ,K] or [B,T,H,K] (natural-log decay, <= 0),
    g_scalar [B,T,HQ], sink_bias [HQ], cu_seqlens [N+1] with B == 1. Returns o [B,T,HQ,V] in q's dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None and isinstance(q, torch.Tensor) and q.dim() == 4 else scale
    bounds = _check_inputs(q, k, v, g, scale, g_scalar, sink_bias, window_size, cu_seqlens)
    B, T, HQ, _ = q.shape
    if B * T == 0:
        return q.new_zeros(B, T, HQ, v.shape[-1])
    flat = lambda x: None if x is None else x.reshape(B * T, *x.shape[2:]).contiguous()
    o = WallAttnFunction.apply(flat(q), flat(k), flat(v), flat(g), flat(g_scalar),
                               None if sink_bias is None else sink_bias.contiguous(), float(scale), window_size,
                               bounds)
    return o.reshape(B, T, HQ, -1)
