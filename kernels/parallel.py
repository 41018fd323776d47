"""Fused Wall Attention for training and prefill: forward and backward in Triton.

    logit(i, j) = scale * sum_d q[i,d] k[j,d] 2^(P[i,d] - P[j,d]) + C[i] - C[j],   P = cumsum(g)/ln2, C = cumsum(g_scalar)

How every exponent stays in range without a clamp that changes a result:
- Sequences are cut into BLOCK-token blocks aligned to document starts. Inside a block the kernels see
  `Pl = P - P[block start]`, summed in float32 from the block's own gates (a huge gate at a document start
  never enters it); across blocks they use `Pstart`, one float64 prefix per block. Precision therefore does not
  depend on the position.
- Off-diagonal tiles (keys entirely before the queries) factor the decay through an anchor token between them:
  `2^(P_i - P_j) = 2^(P_i - P_m) * 2^(P_m - P_a) * 2^(P_a - P_j)` with P_m the query block's start. All three
  exponents are <= 0, so nothing overflows, and a factor that underflows only drops a term the full product
  would have made smaller still. Any anchor between the two works, so it is chosen to make the rescaling rare:
  keys of an earlier group of blocks (GROUPS) anchor on the group's last token (`kg`, rescaled once in a prep
  pass), and the queries of a tile are rescaled once per such group, not once per key block; only keys of the
  query's own group anchor on their own block's last token (`kt`). The backward's key-block loop does the mirror image:
  query groups after the key's group anchor on their first token (`qg`), and the resident keys are rescaled once
  per group. The gradient accumulators (dq, dk) run in the frame of the current anchor and shrink by the
  decay between consecutive anchors (a factor <= 1) when it moves.
- Diagonal tiles whose decay over the block stays under FAST_RANGE (in log2 units, per channel) factor through
  the block start: `q * 2^(Pl_i)` and `k * 2^(-Pl_j) <= |k| 2^FAST_RANGE`, exact and in range. Steeper blocks are
  cut into SUB-token sub-blocks: pairs in different sub-blocks factor through the key sub-block's end, pairs inside
  one sub-block (the "intra" pairs) are computed elementwise. Their diagonal tiles have kernels of their own
  (`_diag_fwd_kernel`, `_steep_bwd_kernel`, `_intra_bwd_kernel`), which keeps the main kernels' registers for the
  common case.

Layout inside: every tensor is flattened to `[total_tokens, heads, dim]`; a batch of B rows is B documents. Query
tiles rescaled inside a loop pass through a q-sized scratch buffer (`_staged`), so that the tensor cores read them
from shared memory like a loaded tile.

Glossary (names used throughout; P is in log2 units, natural-log inputs are converted once):
- Shapes: HQ query heads, H kv heads, HG gate heads (HQ or H); K, V head dims, KP, VP the powers of two they are
  padded to; hq, hk, hg a program's query, kv and gate head. BLOCK tokens per query/key block, SUB per sub-block
  of a steep diagonal, GROUP (GROUPS) blocks per anchor group, DK channels per elementwise step,
  DKV_QUERY_ROWS queries per dk/dv tile, FAST_RANGE the largest in-block decay the one-dot diagonal takes;
  LAUNCH each kernel's (num_warps, num_stages), PREFIX_COLS / PREFIX_CHUNK the block-prefix scan's tile.
- Block table (`_Blocks.table`, `_block`): one row per block, (i0 first token, bos / eos its document's start and
  end, block id in position order); j0 is a key block's first token, id_m / id_n / id_i block ids, `last` a block's
  last token. Programs of the main kernels are (query block, query head), the dk/dv kernel's (key block, query head).
- Prefixes: Pl = P - P[block start] per token (float32), Pstart = P at each block's first token (float64);
  Cl / Cs the same for the scalar gate C = cumsum(g_scalar) / ln 2, cq / ck a tile's query / key rows of it.
- Rescaled operands: q_hat = q * 2^Pl (queries from their block start); kt, kg = keys rescaled to their block's /
  their key group's last token; qg = queries rescaled from their query group's first token; qf, kf, kx the operands
  of the current tile in the frame of its anchor; kb keys rescaled to their sub-block's end (steep blocks).
- Logits and softmax: s a tile's logits (log2 units), S the diagonal tiles' logits (_diag_fwd_kernel -> forward),
  L the exact intra-sub-block logits of steep blocks; m_i, l_i, acc the online softmax's running max, sum and
  output; lse = log2 of the softmax denominator per row (sink included).
- Backward: do the output gradient, delta = rowsum(do * o), p / ds the probabilities and logit gradients; dq, dk, dv
  per query head in fp32 (summed over GQA groups at the end), dcq / dck the scalar gate's query / key shares,
  dv_part a steep block's dv before its diagonal; lg / lh the log2 frame a gradient accumulator is held in while
  its anchor moves; dg from the block totals (`totals`) and their float64 suffix sums (`suffix`).
- Gentle / steep: a block whose per-channel decay stays under FAST_RANGE (one-dot diagonal) or not (sub-blocks).
- Switches: HAS_GS scalar gate, HAS_SINK attention sink, HAS_WINDOW sliding window (WINDOW its size). An input that
  a launch's switches leave unread is passed as None: Cl, Cs without HAS_GS, the sink without HAS_SINK, and what
  the prep and decay-gradient kernels skip under BACKWARD, FINAL and DK_OUT.
- From triton_helpers.py (shared with decode.py; its docstring defines rows and tiles): load_rows, store_rows,
  load_row, add_to_rows, load_lse_and_delta, softmax_step, LOG2E, the head-dim limits and padded_dim.
"""
import concurrent.futures
import functools
import math
import os

import torch
import triton
import triton.language as tl

from .documents import check_cu_seqlens, layout_of
from .domain import check_gates
from .triton_helpers import (LOG2E, MAX_HEAD_DIM, MAX_VALUE_DIM, MAX_VALUE_TILE, add_to_rows, load_lse_and_delta,
                             load_row, load_rows, padded_dim, softmax_step, store_rows)

INTERPRET = os.environ.get('TRITON_INTERPRET') == '1'

# ---------------------------------------------------------------------------------------------------------------
# tunables, each passed to the kernels as a constexpr argument or launch option (the measurements behind them:
# bench/results_attn.md, tuning notes)

BLOCK = 64           # query and key block; also the granularity of the decay anchors
SUB = 16             # sub-block of the steep-diagonal path: pairs inside one are computed elementwise
DK = 16              # channels per step of those elementwise pairs: one [SUB, SUB, DK] fp32 product at a time
DKV_QUERY_ROWS = 32  # dk/dv's query tiles: half a block leaves the transposed logits' registers to the key block
# Blocks per anchor group, per kernel: off-diagonal operands are rescaled once per group of keys (forward, dq) or
# queries (dk/dv); larger groups rescale less often, but dq's own group, anchored per block, grows with them.
GROUPS = dict(fwd=32, dq=8, dkv=16)
PREFIX_COLS = 32     # _block_prefix_kernel's channels per program: a gate head's K channels over several programs
PREFIX_CHUNK = 64    # _block_prefix_kernel's blocks per scan step: the float64 scan over all blocks, a tile at a time
# (num_warps, num_stages) of each launch, one per kernel: every config compiles for seconds at each new shape, so
# the losers of the sweeps stay out. The prep and decay-gradient kernels launch with Triton's defaults.
LAUNCH = dict(
    fwd=(4, 3),        # 3 stages once both of its loops stage their query operand (_staged)
    dq=(4, 2),         # pipelined since the steep diagonal left it
    dkv=(4, 3),        # with 32-query tiles (DKV_QUERY_ROWS) the third stage pays
    diag_fwd=(4, 3),   # 8 warps measured slower
    steep_bwd=(8, 1),  # the sub-block dots spill far more at 4 warps
    intra_bwd=(4, 3),  # its elementwise pairs ran slower inside steep_bwd's 8 warps than in a 4-warp kernel
)
# Stage counts that fit fp32 tiles of wide heads (KP + VP > 256) in shared memory: at K = 256 with 128 value
# columns (measured before _value_tile went to 64) the forward needs 279 KB at 3 stages and dq 279 KB at 2, over
# the 227 KB of an H100 or H200. Starting there spares each new specialization compiles that would only fail to
# launch (a minute each at these widths).
WIDE_FP32_STAGES = dict(fwd=2, dq=1, dkv=2)
# Largest per-channel decay (log2 units) over a block for the one-dot diagonal: k * 2^FAST_RANGE must not
# overflow the dot's input type (fp16 tops out at 2^16, bf16 and fp32 at 2^128).
FAST_RANGE = {torch.float16: 8.0, torch.bfloat16: 96.0, torch.float32: 96.0}


def _launch_options(kernel):
    num_warps, num_stages = LAUNCH[kernel]
    return dict(num_warps=num_warps, num_stages=num_stages)


def _first_stages(name, dtype, dims):
    """The stage count a main kernel's launch and compile ahead try first: LAUNCH's, or WIDE_FP32_STAGES's."""
    tuned = LAUNCH[name][1]
    return min(tuned, WIDE_FP32_STAGES[name]) if dtype == torch.float32 and dims['KP'] + dims['VP'] > 256 else tuned


_fitting_stages = {}  # (kernel, its launch's specialization) -> the stage count whose shared memory fits


def _launch(name, kernel, grid, *args, **constexprs):
    """kernel[grid](*args) at _first_stages, pipelined less where even those need more shared memory than the GPU
    has (a Triton version or a GPU other than the one WIDE_FP32_STAGES was measured on)."""
    num_warps = LAUNCH[name][0]
    key = (name, args[0].dtype, tuple(sorted(constexprs.items())))
    stages = _fitting_stages.get(key) or _first_stages(name, args[0].dtype, constexprs)
    while True:
        try:
            kernel[grid](*args, num_warps=num_warps, num_stages=stages, **constexprs)
            _fitting_stages[key] = stages
            return
        except triton.runtime.errors.OutOfResources:
            if stages == 1:
                raise
            stages -= 1


# ---------------------------------------------------------------------------------------------------------------
# operand staging

@triton.jit
def _staged(x, buf_ptr, rows, row_ok, head, H: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
    """x written to `buf` (this program's own rows) and read back. A dot operand computed in registers reaches the
    tensor cores from registers, re-read from shared memory at every use; a loaded one is copied to shared memory
    once and the tensor cores read it there. Used where it measured faster: both forward loops, dq's own-group loop
    (bench/results_attn.md, tuning notes)."""
    tl.debug_barrier()  # every thread is done reading the previous tile
    store_rows(buf_ptr, x, rows, row_ok, head, H, D, DP)
    tl.debug_barrier()  # the whole tile is written
    return load_rows(buf_ptr, rows, row_ok, head, H, D, DP)


# ---------------------------------------------------------------------------------------------------------------
# block table and anchors

@triton.jit
def _block(blocks_ptr, index):
    """One row of the block table: (first token, document start, document end, block id in position order)."""
    return (tl.load(blocks_ptr + 4 * index), tl.load(blocks_ptr + 4 * index + 1),
            tl.load(blocks_ptr + 4 * index + 2), tl.load(blocks_ptr + 4 * index + 3))


@triton.jit
def _query_block_program(blocks_ptr, HQ: tl.constexpr, H: tl.constexpr, HG: tl.constexpr, BLOCK: tl.constexpr):
    """What a program of a (query block, query head) grid works on: the block's first token, document start and end,
    block id, the query, key and gate heads, and the block's last token."""
    i0, bos, eos, block_id = _block(blocks_ptr, tl.program_id(0))
    hq = tl.program_id(1)
    return i0, bos, eos, block_id, hq, hq // (HQ // H), hq // (HQ // HG), tl.minimum(i0 + BLOCK, eos) - 1


@triton.jit
def _query_operands(q_ptr, Pl_ptr, Cl_ptr, Cs_ptr, rows, row_ok, id_m, hq, hg, HQ: tl.constexpr, HG: tl.constexpr,
                    K: tl.constexpr, KP: tl.constexpr, HAS_GS: tl.constexpr):
    """A query block's Pl, its q_hat = q * 2^Pl in q's dtype, and its scalar-gate offset cq (forward and dq)."""
    q = load_rows(q_ptr, rows, row_ok, hq, HQ, K, KP)
    Pl = load_rows(Pl_ptr, rows, row_ok, hg, HG, K, KP)
    cq = _gate_offset(Cl_ptr, Cs_ptr, rows, row_ok, id_m, id_m, hq, HQ, HAS_GS)
    return Pl, (q.to(tl.float32) * tl.exp2(Pl)).to(q.dtype), cq


@triton.jit
def _anchor_gap(Pstart_ptr, id_from, id_to, hg, HG: tl.constexpr, K: tl.constexpr, KP: tl.constexpr):
    """P[first token of block id_to] - P[first token of block id_from], in float32 from the float64 anchors."""
    to = load_row(Pstart_ptr, id_to, hg, HG, K, KP)
    return (to - load_row(Pstart_ptr, id_from, hg, HG, K, KP)).to(tl.float32)


@triton.jit
def _fall(Pstart_ptr, Pl_ptr, a, id_a, b, id_b, hg, HG: tl.constexpr, K: tl.constexpr, KP: tl.constexpr):
    """P[a] - P[b] >= 0 for tokens a <= b of blocks id_a, id_b: how far the prefix falls between them (log2)."""
    return (_anchor_gap(Pstart_ptr, id_b, id_a, hg, HG, K, KP) + load_row(Pl_ptr, a, hg, HG, K, KP)
            - load_row(Pl_ptr, b, hg, HG, K, KP))


@triton.jit
def _decay_log2(Pstart_ptr, Pl_ptr, id_a, id_b, b, hg, HG: tl.constexpr, K: tl.constexpr, KP: tl.constexpr):
    """P[first token of block id_a] - P[b] for a token b of an earlier block id_b: the log2 decay between them, <= 0."""
    return tl.minimum(_anchor_gap(Pstart_ptr, id_b, id_a, hg, HG, K, KP) - load_row(Pl_ptr, b, hg, HG, K, KP), 0.0)


@triton.jit
def _rescaled(x, log2_factor):
    """x * 2^log2_factor per column, rounded once to x's dtype."""
    return (x.to(tl.float32) * tl.exp2(log2_factor)[None, :]).to(x.dtype)


@triton.jit
def _is_gentle(Pl_ptr, last, hg, HG: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, FAST_RANGE: tl.constexpr):
    """Whether the block decays by less than FAST_RANGE in every channel (one-dot diagonal)."""
    return tl.max(-load_row(Pl_ptr, last, hg, HG, K, KP)) < FAST_RANGE


@triton.jit
def _is_gentle_group(Pstart_ptr, Pl_ptr, first, id_first, last, id_last, hg, HG: tl.constexpr, K: tl.constexpr,
                     KP: tl.constexpr, FAST_RANGE: tl.constexpr):
    """Whether the prefix falls by less than FAST_RANGE in every channel from token first to token last."""
    return tl.max(_fall(Pstart_ptr, Pl_ptr, first, id_first, last, id_last, hg, HG, K, KP)) < FAST_RANGE


# ---------------------------------------------------------------------------------------------------------------
# steep diagonal: sub-block factors and logits

@triton.jit
def _intra_mask(BLOCK: tl.constexpr, SUB: tl.constexpr):
    r = tl.arange(0, BLOCK)
    return (r[:, None] // SUB == r[None, :] // SUB) & (r[None, :] <= r[:, None])


@triton.jit
def _steep_key_factor(k, Pl, Pl_ptr, rows, i0, last, hg, HG: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                      SUB: tl.constexpr):
    """k * 2^(A - P_j) with A the end of each key's own sub-block (all exponents <= 0)."""
    anchor_rows = tl.minimum(i0 + (rows - i0) // SUB * SUB + SUB - 1, last)
    A = load_rows(Pl_ptr, anchor_rows, rows <= last, hg, HG, K, KP)
    return k.to(tl.float32) * tl.exp2(tl.minimum(A - Pl, 0.0))


@triton.jit
def _steep_query_factor(Pl, Pl_ptr, i0, last, s: tl.constexpr, hg, HG: tl.constexpr, K: tl.constexpr,
                        KP: tl.constexpr, SUB: tl.constexpr):
    """2^(P_i - A_s) for the end A_s of key sub-block s; rows at or before A_s get values that are masked."""
    A = load_row(Pl_ptr, tl.minimum(i0 + s * SUB + SUB - 1, last), hg, HG, K, KP)
    return tl.exp2(tl.minimum(Pl - A[None, :], 0.0))


@triton.jit
def _steep_logits(q, k, Pl, Pl_ptr, L_ptr, rows, row_ok, i0, last, hq, hg, qk_scale,
                  HQ: tl.constexpr, HG: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                  BLOCK: tl.constexpr, SUB: tl.constexpr):
    """Diagonal-tile logits (log2 units, no scalar gate) when the block decays too steeply for one dot."""
    kb = _steep_key_factor(k, Pl, Pl_ptr, rows, i0, last, hg, HG, K, KP, SUB)
    key_sub = (tl.arange(0, BLOCK) // SUB)[:, None]
    s = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for sb in tl.static_range(BLOCK // SUB):
        qs = (q.to(tl.float32) * _steep_query_factor(Pl, Pl_ptr, i0, last, sb, hg, HG, K, KP, SUB)).to(q.dtype)
        s += tl.dot(qs, tl.trans(tl.where(key_sub == sb, kb, 0.0).to(q.dtype)))
    r = tl.arange(0, BLOCK)
    intra = _intra_mask(BLOCK, SUB)
    L = tl.load(L_ptr + (rows.to(tl.int64)[:, None] * HQ + hq) * SUB + (r[None, :] % SUB),
                mask=intra & row_ok[:, None], other=0.0)
    return tl.where(intra, L, s * qk_scale)


# ---------------------------------------------------------------------------------------------------------------
# tiles: scalar gate and masks, off-diagonal tiles, online softmax

@triton.jit
def _gate_offset(Cl_ptr, Cs_ptr, idx, ok, id_block, id_ref, hq, HQ: tl.constexpr, HAS_GS: tl.constexpr):
    """C[idx] - C[start of block id_ref] in float32 for tokens idx of block id_block (scalar-gate prefix, log2
    units): their offsets inside their block plus one float64 difference of the two blocks' anchors."""
    if HAS_GS:
        base = (tl.load(Cs_ptr + id_block * HQ + hq) - tl.load(Cs_ptr + id_ref * HQ + hq)).to(tl.float32)
        return tl.load(Cl_ptr + idx.to(tl.int64) * HQ + hq, mask=ok, other=0.0) + base
    else:
        return tl.zeros(idx.shape, dtype=tl.float32)


@triton.jit
def _gate_and_window(s, rows, cols, cq, ck, WINDOW, HAS_GS: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Adds the scalar-gate difference C[i] - C[j] = cq[i] - ck[j] and hides keys outside the window: all that an
    off-diagonal tile needs (its keys precede its queries in the same document; rows past the end are not stored)."""
    if HAS_GS:
        s += cq[:, None] - ck[None, :]
    if HAS_WINDOW:
        s = tl.where((rows[:, None] - cols[None, :]) < WINDOW, s, float('-inf'))
    return s


@triton.jit
def _mask_and_gate(s, rows, cols, visible, cq, ck, WINDOW, HAS_GS: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """_gate_and_window, plus causal and document visibility (diagonal tiles)."""
    return tl.where(visible, _gate_and_window(s, rows, cols, cq, ck, WINDOW, HAS_GS, HAS_WINDOW), float('-inf'))


@triton.jit
def _window_start(i0, bos, WINDOW, BLOCK: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """First key block that row i0 can see."""
    if HAS_WINDOW:
        return tl.maximum(bos, bos + (i0 - WINDOW + 1 - bos) // BLOCK * BLOCK)
    else:
        return bos


@triton.jit
def _decay_to_block(Pstart_ptr, Pl_ptr, a, i0, id_i, hg, HG: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                    BLOCK: tl.constexpr):
    """log2 decay from token a to the start of the later block i0 (id id_i) of the same document, <= 0."""
    return _decay_log2(Pstart_ptr, Pl_ptr, id_i, id_i - (i0 - a + BLOCK - 1) // BLOCK, a, hg, HG, K, KP)


@triton.jit
def _offdiag_tile(qf, kx_ptr, v_ptr, Cl_ptr, Cs_ptr, j0, rows, cq, i0, id_m, hq, hk, hg, qk_scale, WINDOW,
                  HQ: tl.constexpr, H: tl.constexpr, HG: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                  V: tl.constexpr, VP: tl.constexpr, BLOCK: tl.constexpr, HAS_GS: tl.constexpr,
                  HAS_WINDOW: tl.constexpr):
    """Logits (log2 units) of query rows against the earlier key block j0, with its keys and values: `kx` holds the
    keys rescaled to an anchor, `qf` the queries rescaled from the same anchor."""
    cols = j0 + tl.arange(0, BLOCK)
    kx = load_rows(kx_ptr, cols, cols < i0, hg, HG, K, KP)
    s = tl.dot(qf, tl.trans(kx)) * qk_scale
    ck = _gate_offset(Cl_ptr, Cs_ptr, cols, cols < i0, id_m - (i0 - j0) // BLOCK, id_m, hq, HQ, HAS_GS)
    s = _gate_and_window(s, rows, cols, cq, ck, WINDOW, HAS_GS, HAS_WINDOW)
    return s, kx, load_rows(v_ptr, cols, cols < i0, hk, H, V, VP)


@triton.jit
def _dq_tile(qf, kx_ptr, v_ptr, Cl_ptr, Cs_ptr, j0, rows, cq, do, lse, delta, dq, dcq, i0, id_m, hq, hk, hg, qk_scale,
             WINDOW, HQ: tl.constexpr, H: tl.constexpr, HG: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
             V: tl.constexpr, VP: tl.constexpr, BLOCK: tl.constexpr, HAS_GS: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Adds key block j0's contributions to dq (in the frame that qf and kx share) and dcq."""
    s, kx, v = _offdiag_tile(qf, kx_ptr, v_ptr, Cl_ptr, Cs_ptr, j0, rows, cq, i0, id_m, hq, hk, hg, qk_scale, WINDOW,
                             HQ, H, HG, K, KP, V, VP, BLOCK, HAS_GS, HAS_WINDOW)
    p, ds = _probs_and_dscores(s, lse, delta, do, v)
    return tl.dot(ds.to(kx.dtype), kx, dq), dcq + tl.sum(ds, 1)


@triton.jit
def _move_anchor(acc, lg, x, lg_new):
    """Moves a gradient accumulator held divided by 2^lg to a nearer anchor's 2^lg_new >= 2^lg (it shrinks by their
    ratio, <= 1), and rescales the operand x to the new anchor."""
    return acc * tl.exp2(tl.minimum(lg - lg_new, 0.0))[None, :], lg_new, _rescaled(x, lg_new)


@triton.jit
def _probs_and_dscores(s, lse, delta, do, v):
    """Softmax probabilities and the logit gradient dS = p * (dp - delta) (natural units)."""
    p = tl.exp2(s - lse[:, None])
    return p, p * (tl.dot(do, tl.trans(v)) - delta[:, None])


@triton.jit
def _group_bounds(i0, bos, eos, BLOCK: tl.constexpr, GROUP: tl.constexpr):
    """First and last token of the anchor group holding block i0 (groups of GROUP blocks from the document start)."""
    first = i0 - (i0 - bos) % (GROUP * BLOCK)
    return first, tl.minimum(first + GROUP * BLOCK, eos) - 1


@triton.jit
def _dkv_tile(qf, kf, v, ck, i0, j0, cols, id_n, eos, do_ptr, lse_ptr, delta_ptr, Cl_ptr, Cs_ptr, dk, dv, dck, hq,
              qk_scale, WINDOW, HQ: tl.constexpr, V: tl.constexpr, VP: tl.constexpr, BLOCK: tl.constexpr,
              DKV_QUERY_ROWS: tl.constexpr, HAS_GS: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Adds the contributions of the DKV_QUERY_ROWS queries from i0 on to the key block's dk (in the frame that qf and
    kf share), dv and dck.
    Computed transposed, [keys, queries], so that p and dS are the left operands of the dv and dk dots as they come
    out of the tensor cores, with no transpose through shared memory."""
    rows = i0 + tl.arange(0, DKV_QUERY_ROWS)
    row_ok = rows < eos
    s_t = tl.dot(kf, tl.trans(qf)) * qk_scale
    if HAS_GS:
        cq = _gate_offset(Cl_ptr, Cs_ptr, rows, row_ok, id_n + (i0 - j0) // BLOCK, id_n, hq, HQ, HAS_GS)
        s_t += cq[None, :] - ck[:, None]
    if HAS_WINDOW:
        s_t = tl.where((rows[None, :] - cols[:, None]) < WINDOW, s_t, float('-inf'))
    do = load_rows(do_ptr, rows, row_ok, hq, HQ, V, VP)
    lse, delta = load_lse_and_delta(lse_ptr, delta_ptr, rows, row_ok, hq, HQ)
    p_t = tl.exp2(s_t - lse[None, :])
    ds_t = p_t * (tl.dot(v, tl.trans(do)) - delta[None, :])
    dv = tl.dot(p_t.to(do.dtype), do, dv)
    dk = tl.dot(ds_t.to(qf.dtype), qf, dk)
    return dk, dv, dck + tl.sum(ds_t, 1)


# ---------------------------------------------------------------------------------------------------------------
# prep kernels: prefixes, block anchors, rescaled operands

@triton.jit
def _prefix_kernel(g_ptr, do_ptr, o_ptr, Pl_ptr, delta_ptr, gate_max_ptr, blocks_ptr,
                   HQ: tl.constexpr, HG: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, V: tl.constexpr,
                   VP: tl.constexpr, BLOCK: tl.constexpr, BACKWARD: tl.constexpr):
    """Per block and gate head: the local prefix Pl; for the forward also the block's largest gate (the domain
    check, kernels/domain.py), for the backward delta = rowsum(do * o) of the gate's query heads."""
    i0, _, eos, _ = _block(blocks_ptr, tl.program_id(0))
    hg = tl.program_id(1)
    rows = i0 + tl.arange(0, BLOCK)
    row_ok = rows < eos
    if BACKWARD:
        g = load_rows(g_ptr, rows, row_ok & (rows > i0), hg, HG, K, KP).to(tl.float32) * LOG2E
    else:  # every gate, the block's first too, enters the check; Pl starts at 0 on the first
        g = load_rows(g_ptr, rows, row_ok, hg, HG, K, KP).to(tl.float32)
        tl.store(gate_max_ptr + tl.program_id(0) * HG + hg, tl.max(tl.max(g, 1), 0))
        g = tl.where((rows > i0)[:, None], g, 0.0) * LOG2E
    store_rows(Pl_ptr, tl.cumsum(g, 0), rows, row_ok, hg, HG, K, KP)
    if BACKWARD:
        for h in range(HQ // HG):
            hq = hg * (HQ // HG) + h
            delta = tl.sum(load_rows(do_ptr, rows, row_ok, hq, HQ, V, VP).to(tl.float32)
                           * load_rows(o_ptr, rows, row_ok, hq, HQ, V, VP).to(tl.float32), 1)
            tl.store(delta_ptr + rows.to(tl.int64) * HQ + hq, delta, mask=row_ok)


@triton.jit
def _block_prefix_kernel(Pl_ptr, g_ptr, start_ptr, last_ptr, Pstart_ptr, num_blocks, HG: tl.constexpr,
                         K: tl.constexpr, COLS: tl.constexpr, CHUNK: tl.constexpr):
    """Pstart[b] = P at the first token of block b, float64, one running sum over all blocks: the steps
    Pl[last of b - 1] + g[first of b] scanned CHUNK blocks at a time. One launch where torch took ten small ones."""
    hg = tl.program_id(0)
    cols = tl.program_id(1) * COLS + tl.arange(0, COLS)
    col_ok = cols < K
    log2e = tl.full((), LOG2E, tl.float64)
    carry = tl.zeros([COLS], dtype=tl.float64)
    for c0 in range(0, num_blocks, CHUNK):
        b = c0 + tl.arange(0, CHUNK)
        has_step = (b >= 1) & (b < num_blocks)
        ok = has_step[:, None] & col_ok[None, :]
        prev_last = tl.load(last_ptr + b - 1, mask=has_step, other=0).to(tl.int64)
        start = tl.load(start_ptr + b, mask=has_step, other=0).to(tl.int64)
        step = (tl.load(Pl_ptr + (prev_last[:, None] * HG + hg) * K + cols[None, :], mask=ok, other=0.0)
                .to(tl.float64)
                + tl.load(g_ptr + (start[:, None] * HG + hg) * K + cols[None, :], mask=ok, other=0.0)
                .to(tl.float64) * log2e)
        tl.store(Pstart_ptr + (b.to(tl.int64)[:, None] * HG + hg) * K + cols[None, :], carry[None, :] +
                 tl.cumsum(step, 0), mask=(b < num_blocks)[:, None] & col_ok[None, :])
        carry += tl.sum(step, 0)


@triton.jit
def _rescale_kernel(k_ptr, q_ptr, Pl_ptr, Pstart_ptr, kt_ptr, kg_ptr, qh_ptr, qg_ptr, blocks_ptr,
                    HQ: tl.constexpr, H: tl.constexpr, HG: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                    BLOCK: tl.constexpr, KEY_GROUP: tl.constexpr, QUERY_GROUP: tl.constexpr,
                    BACKWARD: tl.constexpr):
    """Per block and gate head, the operands of off-diagonal tiles: keys rescaled to their block's last token (kt)
    and to their KEY_GROUP-block group's last token (kg); for the backward also the queries rescaled from their
    block's first token (q_hat) and from their QUERY_GROUP-block group's first token (qg). Every exponent is <= 0."""
    i0, bos, eos, id_i = _block(blocks_ptr, tl.program_id(0))
    hg = tl.program_id(1)
    rows = i0 + tl.arange(0, BLOCK)
    row_ok = rows < eos
    Pl = load_rows(Pl_ptr, rows, row_ok, hg, HG, K, KP)
    last = _group_bounds(i0, bos, eos, BLOCK, KEY_GROUP)[1]
    block_end = load_row(Pl_ptr, tl.minimum(i0 + BLOCK, eos) - 1, hg, HG, K, KP)
    group_end = (_anchor_gap(Pstart_ptr, id_i, id_i + (last - i0) // BLOCK, hg, HG, K, KP)
                 + load_row(Pl_ptr, last, hg, HG, K, KP))
    k = load_rows(k_ptr, rows, row_ok, hg // (HG // H), H, K, KP).to(tl.float32)
    store_rows(kt_ptr, k * tl.exp2(tl.minimum(block_end[None, :] - Pl, 0.0)), rows, row_ok, hg, HG, K, KP)
    store_rows(kg_ptr, k * tl.exp2(tl.minimum(group_end[None, :] - Pl, 0.0)), rows, row_ok, hg, HG, K, KP)
    if BACKWARD:
        first = _group_bounds(i0, bos, eos, BLOCK, QUERY_GROUP)[0]
        from_group_start = Pl + _anchor_gap(Pstart_ptr, id_i - (i0 - first) // BLOCK, id_i, hg, HG, K, KP)[None, :]
        for h in range(HQ // HG):
            hq = hg * (HQ // HG) + h
            q = load_rows(q_ptr, rows, row_ok, hq, HQ, K, KP).to(tl.float32)
            store_rows(qh_ptr, q * tl.exp2(Pl), rows, row_ok, hq, HQ, K, KP)
            store_rows(qg_ptr, q * tl.exp2(tl.minimum(from_group_start, 0.0)), rows, row_ok, hq, HQ, K, KP)


# ---------------------------------------------------------------------------------------------------------------
# forward

@triton.jit
def _fwd_kernel(q_ptr, kt_ptr, kg_ptr, v_ptr, Pl_ptr, Pstart_ptr, Cl_ptr, Cs_ptr, S_ptr, sink_ptr, o_ptr,
                lse_ptr, qf_ptr, blocks_ptr, qk_scale, WINDOW,
                HQ: tl.constexpr, H: tl.constexpr, HG: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                KP: tl.constexpr, VP: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr,
                FAST_RANGE: tl.constexpr, HAS_GS: tl.constexpr, HAS_SINK: tl.constexpr, HAS_WINDOW: tl.constexpr):
    i0, bos, eos, id_m, hq, hk, hg, last = _query_block_program(blocks_ptr, HQ, H, HG, BLOCK)
    rows = i0 + tl.arange(0, BLOCK)
    row_ok = rows < eos

    Pl, q_hat, cq = _query_operands(q_ptr, Pl_ptr, Cl_ptr, Cs_ptr, rows, row_ok, id_m, hq, hg, HQ, HG, K, KP, HAS_GS)

    # Diagonal tile first, its logits from _diag_fwd_kernel
    s = _mask_and_gate(load_rows(S_ptr, rows, row_ok, hq, HQ, BLOCK, BLOCK), rows, rows,
                       row_ok[:, None] & (rows[None, :] <= rows[:, None]), cq, cq, WINDOW, HAS_GS, HAS_WINDOW)
    if HAS_SINK:
        m_i = tl.zeros([BLOCK], dtype=tl.float32) + tl.load(sink_ptr + hq).to(tl.float32) * LOG2E
        l_i = tl.full([BLOCK], 1.0, dtype=tl.float32)
    else:
        m_i = tl.full([BLOCK], float('-inf'), dtype=tl.float32)
        l_i = tl.zeros([BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK, VP], dtype=tl.float32)
    m_i, l_i, acc = softmax_step(s, m_i, l_i, acc, load_rows(v_ptr, rows, row_ok, hk, H, V, VP))

    lo = _window_start(i0, bos, WINDOW, BLOCK, HAS_WINDOW)
    own_group, own_last = _group_bounds(i0, bos, eos, BLOCK, GROUP)
    id_own_last = id_m + (own_last - i0) // BLOCK
    # Keys of earlier groups anchor on their group's last token: the queries are rescaled once per group. (q_hat stays
    # live through the loops: reloading it per group measured no faster.) The rescale also applies qk_scale (folded
    # into its exponent: qk_scale >= 0, see wall_attn), so the tiles skip multiplying their logits by it (faster
    # here, slower in dq).
    log2_qk_scale = tl.log2(qk_scale)
    for g0 in range(_group_bounds(lo, bos, eos, BLOCK, GROUP)[0], own_group, GROUP * BLOCK):
        qf = _staged(_rescaled(q_hat, _decay_to_block(Pstart_ptr, Pl_ptr, g0 + GROUP * BLOCK - 1, i0, id_m, hg, HG,
                                                      K, KP, BLOCK) + log2_qk_scale), qf_ptr, rows, row_ok, hq, HQ, K,
                     KP)
        for j0 in range(tl.maximum(g0, lo), g0 + GROUP * BLOCK, BLOCK):
            s, _, v = _offdiag_tile(qf, kg_ptr, v_ptr, Cl_ptr, Cs_ptr, j0, rows, cq, i0, id_m, hq, hk, hg, 1.0,
                                    WINDOW, HQ, H, HG, K, KP, V, VP, BLOCK, HAS_GS, HAS_WINDOW)
            m_i, l_i, acc = softmax_step(s, m_i, l_i, acc, v)
    if _is_gentle_group(Pstart_ptr, Pl_ptr, own_group, id_m - (i0 - own_group) // BLOCK, own_last, id_own_last, hg,
                        HG, K, KP, FAST_RANGE):
        # The own group's keys anchor on its last token too (kg): the query factor 2^(P_m - P_last) >= 1 is below
        # 2^FAST_RANGE, and the keys' factors above 2^-FAST_RANGE.
        qf = _staged(_rescaled(q_hat, _fall(Pstart_ptr, Pl_ptr, i0, id_m, own_last, id_own_last, hg, HG, K, KP)),
                     qf_ptr, rows, row_ok, hq, HQ, K, KP)
        for j0 in range(tl.maximum(lo, own_group), i0, BLOCK):
            s, _, v = _offdiag_tile(qf, kg_ptr, v_ptr, Cl_ptr, Cs_ptr, j0, rows, cq, i0, id_m, hq, hk, hg, qk_scale,
                                    WINDOW, HQ, H, HG, K, KP, V, VP, BLOCK, HAS_GS, HAS_WINDOW)
            m_i, l_i, acc = softmax_step(s, m_i, l_i, acc, v)
    else:
        for j0 in range(tl.maximum(lo, own_group), i0, BLOCK):  # per-block anchors
            qf = _staged(_rescaled(q_hat, _decay_to_block(Pstart_ptr, Pl_ptr, j0 + BLOCK - 1, i0, id_m, hg, HG, K, KP,
                                                          BLOCK) + log2_qk_scale), qf_ptr, rows, row_ok, hq, HQ, K, KP)
            s, _, v = _offdiag_tile(qf, kt_ptr, v_ptr, Cl_ptr, Cs_ptr, j0, rows, cq, i0, id_m, hq, hk, hg, 1.0,
                                    WINDOW, HQ, H, HG, K, KP, V, VP, BLOCK, HAS_GS, HAS_WINDOW)
            m_i, l_i, acc = softmax_step(s, m_i, l_i, acc, v)

    store_rows(o_ptr, acc / l_i[:, None], rows, row_ok, hq, HQ, V, VP)
    tl.store(lse_ptr + rows.to(tl.int64) * HQ + hq, m_i + tl.log2(l_i), mask=row_ok)


# ---------------------------------------------------------------------------------------------------------------
# steep diagonal: forward

@triton.jit
def _intra_channels(q_ptr, k_ptr, Pl_ptr, base, row_ok, d0, hq, hk, hg, HQ: tl.constexpr, H: tl.constexpr,
                    HG: tl.constexpr, K: tl.constexpr, DK: tl.constexpr):
    """Channels d0 .. d0 + DK of a sub-block's rows `base`: q and k in fp32, the decay 2^(P_i - P_j) of every pair
    [SUB, SUB, DK] (clamped at 1 where j > i, pairs the callers mask), the mask and the offsets of those elements."""
    cols = d0 + tl.arange(0, DK)
    ok = row_ok[:, None] & (cols[None, :] < K)
    q = tl.load(q_ptr + (base * HQ + hq) * K + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + (base * H + hk) * K + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    P = tl.load(Pl_ptr + (base * HG + hg) * K + cols[None, :], mask=ok, other=0.0)
    return q, k, tl.exp2(tl.minimum(P[:, None, :] - P[None, :, :], 0.0)), ok, (base * HQ + hq) * K + cols[None, :]


@triton.jit
def _store_intra_logits(q_ptr, k_ptr, Pl_ptr, L_ptr, i0, last, eos, hq, hk, hg, qk_scale, HQ: tl.constexpr,
                        H: tl.constexpr, HG: tl.constexpr, K: tl.constexpr, SUB: tl.constexpr, DK: tl.constexpr):
    """Exact logits of the pairs inside each SUB-token sub-block of a steep block, elementwise:
    L[i, hq, j - sub start]."""
    j = tl.arange(0, SUB)
    for r0 in range(i0, last + 1, SUB):
        rows = r0 + j
        row_ok = rows < eos
        base = rows.to(tl.int64)[:, None]
        s = tl.zeros([SUB, SUB], dtype=tl.float32)
        for d0 in range(0, K, DK):
            q, k, decay, _, _ = _intra_channels(q_ptr, k_ptr, Pl_ptr, base, row_ok, d0, hq, hk, hg, HQ, H, HG, K, DK)
            s += tl.sum(q[:, None, :] * k[None, :, :] * decay, 2)
        tl.store(L_ptr + (base * HQ + hq) * SUB + j[None, :], tl.where(j[None, :] <= j[:, None], s * qk_scale, 0.0),
                 mask=row_ok[:, None])


@triton.jit
def _diag_fwd_kernel(q_ptr, k_ptr, Pl_ptr, L_ptr, S_ptr, blocks_ptr, qk_scale,
                     HQ: tl.constexpr, H: tl.constexpr, HG: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                     SUB: tl.constexpr, BLOCK: tl.constexpr, DK: tl.constexpr, FAST_RANGE: tl.constexpr):
    """Logits of every block's diagonal tile, S[i, hq, j - block start], for the forward kernel to load: computed
    there, they cost it registers and spills. A gentle block's take one dot
    through the block start; a steep block's pairs inside a SUB-token sub-block are exact elementwise logits (L, which
    the backward keeps), its other pairs come from sub-block dots."""
    i0, _, eos, _, hq, hk, hg, last = _query_block_program(blocks_ptr, HQ, H, HG, BLOCK)
    rows = i0 + tl.arange(0, BLOCK)
    row_ok = rows < eos
    q = load_rows(q_ptr, rows, row_ok, hq, HQ, K, KP)
    k = load_rows(k_ptr, rows, row_ok, hk, H, K, KP)
    Pl = load_rows(Pl_ptr, rows, row_ok, hg, HG, K, KP)
    if _is_gentle(Pl_ptr, last, hg, HG, K, KP, FAST_RANGE):
        k_hat = (k.to(tl.float32) * tl.exp2(-Pl)).to(k.dtype)
        s = tl.dot((q.to(tl.float32) * tl.exp2(Pl)).to(q.dtype), tl.trans(k_hat)) * qk_scale
    else:
        _store_intra_logits(q_ptr, k_ptr, Pl_ptr, L_ptr, i0, last, eos, hq, hk, hg, qk_scale, HQ, H, HG, K, SUB, DK)
        tl.debug_barrier()  # other threads read L back
        s = _steep_logits(q, k, Pl, Pl_ptr, L_ptr, rows, row_ok, i0, last, hq, hg, qk_scale, HQ, HG, K, KP, BLOCK,
                          SUB)
    store_rows(S_ptr, s, rows, row_ok, hq, HQ, BLOCK, BLOCK)


# ---------------------------------------------------------------------------------------------------------------
# backward

@triton.jit
def _bwd_dq_kernel(q_ptr, kt_ptr, kg_ptr, k_ptr, v_ptr, Pl_ptr, Pstart_ptr, Cl_ptr, Cs_ptr, do_ptr, lse_ptr,
                   delta_ptr, dq_ptr, dcq_ptr, qf_ptr, blocks_ptr, qk_scale, scale, WINDOW,
                   HQ: tl.constexpr, H: tl.constexpr, HG: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                   KP: tl.constexpr, VP: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr,
                   FAST_RANGE: tl.constexpr, HAS_GS: tl.constexpr, HAS_WINDOW: tl.constexpr):
    i0, bos, eos, id_m, hq, hk, hg, last = _query_block_program(blocks_ptr, HQ, H, HG, BLOCK)
    rows = i0 + tl.arange(0, BLOCK)
    row_ok = rows < eos

    Pl, q_hat, cq = _query_operands(q_ptr, Pl_ptr, Cl_ptr, Cs_ptr, rows, row_ok, id_m, hq, hg, HQ, HG, K, KP, HAS_GS)
    do = load_rows(do_ptr, rows, row_ok, hq, HQ, V, VP)
    lse, delta = load_lse_and_delta(lse_ptr, delta_ptr, rows, row_ok, hq, HQ)

    # dq accumulates divided by 2^lg, the decay from the current anchor to the query block's start, so that each tile
    # adds its dot straight into it; when the anchor moves later, dq shrinks by the decay between the two anchors.
    # After the loops it is brought to the frame of q_hat (true dq = dq * 2^Pl).
    dq = tl.zeros([BLOCK, KP], dtype=tl.float32)
    dcq = tl.zeros([BLOCK], dtype=tl.float32)
    lg = tl.zeros([KP], dtype=tl.float32)
    lo = _window_start(i0, bos, WINDOW, BLOCK, HAS_WINDOW)
    own_group = _group_bounds(i0, bos, eos, BLOCK, GROUP)[0]
    # earlier groups, as in the forward
    for g0 in range(_group_bounds(lo, bos, eos, BLOCK, GROUP)[0], own_group, GROUP * BLOCK):
        dq, lg, qf = _move_anchor(dq, lg, q_hat, _decay_to_block(Pstart_ptr, Pl_ptr, g0 + GROUP * BLOCK - 1, i0, id_m,
                                                                 hg, HG, K, KP, BLOCK))
        for j0 in range(tl.maximum(g0, lo), g0 + GROUP * BLOCK, BLOCK):
            dq, dcq = _dq_tile(qf, kg_ptr, v_ptr, Cl_ptr, Cs_ptr, j0, rows, cq, do, lse, delta, dq, dcq, i0, id_m, hq,
                               hk, hg, qk_scale, WINDOW, HQ, H, HG, K, KP, V, VP, BLOCK, HAS_GS, HAS_WINDOW)
    for j0 in range(tl.maximum(lo, own_group), i0, BLOCK):  # the query block's own group: per-block anchors
        dq, lg, qf = _move_anchor(dq, lg, q_hat, _decay_to_block(Pstart_ptr, Pl_ptr, j0 + BLOCK - 1, i0, id_m, hg, HG,
                                                                 K, KP, BLOCK))
        qf = _staged(qf, qf_ptr, rows, row_ok, hq, HQ, K, KP)
        dq, dcq = _dq_tile(qf, kt_ptr, v_ptr, Cl_ptr, Cs_ptr, j0, rows, cq, do, lse, delta, dq, dcq, i0, id_m, hq, hk,
                           hg, qk_scale, WINDOW, HQ, H, HG, K, KP, V, VP, BLOCK, HAS_GS, HAS_WINDOW)
    dq *= tl.exp2(lg)[None, :]

    if _is_gentle(Pl_ptr, last, hg, HG, K, KP, FAST_RANGE):
        k_hat = (load_rows(k_ptr, rows, row_ok, hk, H, K, KP).to(tl.float32) * tl.exp2(-Pl)).to(q_hat.dtype)
        s = _mask_and_gate(tl.dot(q_hat, tl.trans(k_hat)) * qk_scale, rows, rows,
                           row_ok[:, None] & (rows[None, :] <= rows[:, None]), cq, cq, WINDOW, HAS_GS, HAS_WINDOW)
        p, ds = _probs_and_dscores(s, lse, delta, do, load_rows(v_ptr, rows, row_ok, hk, H, V, VP))
        dcq += tl.sum(ds, 1)
        dq += tl.dot(ds.to(k_hat.dtype), k_hat)
    dq *= tl.exp2(Pl)  # a steep block's diagonal tile: _steep_bwd_kernel adds it afterwards

    store_rows(dq_ptr, dq * scale, rows, row_ok, hq, HQ, K, KP)
    tl.store(dcq_ptr + rows.to(tl.int64) * HQ + hq, dcq, mask=row_ok)


@triton.jit
def _bwd_dkv_kernel(qh_ptr, qg_ptr, kt_ptr, k_ptr, v_ptr, Pl_ptr, Pstart_ptr, Cl_ptr, Cs_ptr, do_ptr,
                    lse_ptr, delta_ptr, dk_ptr, dv_ptr, dck_ptr, dv_part_ptr, blocks_ptr, num_blocks, qk_scale, scale,
                    WINDOW,
                    HQ: tl.constexpr, H: tl.constexpr, HG: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                    KP: tl.constexpr, VP: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr,
                    DKV_QUERY_ROWS: tl.constexpr, FAST_RANGE: tl.constexpr, HAS_GS: tl.constexpr,
                    HAS_WINDOW: tl.constexpr):
    # The block table lists the longest query loops first; key loops are longest in reverse order.
    j0, bos, eos, id_n = _block(blocks_ptr, num_blocks - 1 - tl.program_id(0))
    hq = tl.program_id(1)
    hk = hq // (HQ // H)
    hg = hq // (HQ // HG)
    cols = j0 + tl.arange(0, BLOCK)
    col_ok = cols < eos
    last = tl.minimum(j0 + BLOCK, eos) - 1

    v = load_rows(v_ptr, cols, col_ok, hk, H, V, VP)
    ck = _gate_offset(Cl_ptr, Cs_ptr, cols, col_ok, id_n, id_n, hq, HQ, HAS_GS)

    # dk accumulates in the frame of kt (true dk = dk * 2^(Pl_end - Pl)), while the loop over later groups runs
    # divided by 2^lh, the decay from the key block's last token to the current anchor. That loop runs from the far
    # end back, so the anchor only moves nearer and dk only shrinks.
    dk = tl.zeros([BLOCK, KP], dtype=tl.float32)
    dv = tl.zeros([BLOCK, VP], dtype=tl.float32)
    dck = tl.zeros([BLOCK], dtype=tl.float32)
    hi = eos
    if HAS_WINDOW:
        hi = tl.minimum(eos, last + WINDOW)
    lh = tl.zeros([KP], dtype=tl.float32)
    near_end = _group_bounds(j0, bos, eos, BLOCK, GROUP)[1] + 1
    num_far = (hi - near_end + GROUP * BLOCK - 1) // (GROUP * BLOCK)
    for t in range(0, num_far):  # later groups, last first: anchored on their first query
        first = near_end + (num_far - 1 - t) * (GROUP * BLOCK)
        # kt is reloaded, not kept live through the loop: far fewer registers, much faster
        lh_new = _decay_log2(Pstart_ptr, Pl_ptr, id_n + (first - j0) // BLOCK, id_n, last, hg, HG, K, KP)
        dk, lh, kf = _move_anchor(dk, lh, load_rows(kt_ptr, cols, col_ok, hg, HG, K, KP), lh_new)
        for i0 in range(first, tl.minimum(first + GROUP * BLOCK, hi), DKV_QUERY_ROWS):
            rows = i0 + tl.arange(0, DKV_QUERY_ROWS)
            qg = load_rows(qg_ptr, rows, rows < eos, hq, HQ, K, KP)
            dk, dv, dck = _dkv_tile(qg, kf, v, ck, i0, j0, cols, id_n, eos, do_ptr, lse_ptr, delta_ptr, Cl_ptr, Cs_ptr,
                                    dk, dv, dck, hq, qk_scale, WINDOW, HQ, V, VP, BLOCK, DKV_QUERY_ROWS, HAS_GS,
                                    HAS_WINDOW)
    dk *= tl.exp2(lh)[None, :]
    kt = load_rows(kt_ptr, cols, col_ok, hg, HG, K, KP)
    for i0 in range(j0 + BLOCK, tl.minimum(near_end, hi), DKV_QUERY_ROWS):  # queries of the key block's own group
        rows = i0 + tl.arange(0, DKV_QUERY_ROWS)
        qf = _rescaled(load_rows(qh_ptr, rows, rows < eos, hq, HQ, K, KP),
                       _decay_log2(Pstart_ptr, Pl_ptr, id_n + (i0 - j0) // BLOCK, id_n, last, hg, HG, K, KP))
        dk, dv, dck = _dkv_tile(qf, kt, v, ck, i0, j0, cols, id_n, eos, do_ptr, lse_ptr, delta_ptr, Cl_ptr, Cs_ptr,
                                dk, dv, dck, hq, qk_scale, WINDOW, HQ, V, VP, BLOCK, DKV_QUERY_ROWS, HAS_GS, HAS_WINDOW)

    # Diagonal tile: queries are the key rows themselves.
    Pl = load_rows(Pl_ptr, cols, col_ok, hg, HG, K, KP)
    Pl_end = load_row(Pl_ptr, last, hg, HG, K, KP)
    gentle = _is_gentle(Pl_ptr, last, hg, HG, K, KP, FAST_RANGE)
    if gentle:  # a steep block's diagonal tile: _steep_bwd_kernel adds it afterwards
        q_hat = load_rows(qh_ptr, cols, col_ok, hq, HQ, K, KP)
        k_hat = (load_rows(k_ptr, cols, col_ok, hk, H, K, KP).to(tl.float32) * tl.exp2(-Pl)).to(q_hat.dtype)
        s = _mask_and_gate(tl.dot(q_hat, tl.trans(k_hat)) * qk_scale, cols, cols,
                           col_ok[:, None] & (cols[None, :] <= cols[:, None]), ck, ck, WINDOW, HAS_GS, HAS_WINDOW)
        do = load_rows(do_ptr, cols, col_ok, hq, HQ, V, VP)
        lse, delta = load_lse_and_delta(lse_ptr, delta_ptr, cols, col_ok, hq, HQ)
        p, ds = _probs_and_dscores(s, lse, delta, do, v)
        dv += tl.dot(tl.trans(p).to(do.dtype), do)
        dck += tl.sum(ds, 0)
        # 2^(P_i - P_j) = 2^(Pl_end - Pl_j) * 2^(-Pl_end) * 2^(Pl_i): the middle factor is <= 2^FAST_RANGE.
        dk += tl.dot(tl.trans(ds).to(q_hat.dtype), q_hat) * tl.exp2(-Pl_end)[None, :]
    dk *= tl.exp2(tl.minimum(Pl_end[None, :] - Pl, 0.0))

    store_rows(dk_ptr, dk * scale, cols, col_ok, hq, HQ, K, KP)
    # a steep block's dv is not final yet: it waits in fp32 for its diagonal tile (two masked stores, not a branch,
    # which made the compiler spill more)
    store_rows(dv_ptr, dv, cols, tl.where(gentle, col_ok, False), hq, HQ, V, VP)
    store_rows(dv_part_ptr, dv, cols, tl.where(gentle, False, col_ok), hq, HQ, V, VP)
    tl.store(dck_ptr + cols.to(tl.int64) * HQ + hq, dck, mask=col_ok)


# ---------------------------------------------------------------------------------------------------------------
# steep diagonal: backward

@triton.jit
def _intra_bwd_kernel(q_ptr, k_ptr, v_ptr, Pl_ptr, Cl_ptr, L_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr,
                      blocks_ptr, scale, WINDOW,
                      HQ: tl.constexpr, H: tl.constexpr, HG: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                      V: tl.constexpr, VP: tl.constexpr, SUB: tl.constexpr, BLOCK: tl.constexpr, DK: tl.constexpr,
                      FAST_RANGE: tl.constexpr, HAS_GS: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Adds the exact dq and dk of the pairs inside each SUB-token sub-block of a steep block, elementwise, after
    _steep_bwd_kernel (read-modify-write: never autotune). Its own kernel, at 4 warps: inside _steep_bwd_kernel's 8
    warps and registers it was slower than the two kernels together."""
    i0, _, eos, _, hq, hk, hg, last = _query_block_program(blocks_ptr, HQ, H, HG, BLOCK)
    if not _is_gentle(Pl_ptr, last, hg, HG, K, KP, FAST_RANGE):
        j = tl.arange(0, SUB)
        for r0 in range(i0, last + 1, SUB):
            rows = r0 + j
            row_ok = rows < eos
            base = rows.to(tl.int64)[:, None]
            visible = row_ok[:, None] & (j[None, :] <= j[:, None])
            if HAS_WINDOW:
                visible &= (j[:, None] - j[None, :]) < WINDOW
            s = tl.load(L_ptr + (base * HQ + hq) * SUB + j[None, :], mask=visible, other=0.0)
            if HAS_GS:
                C = tl.load(Cl_ptr + rows.to(tl.int64) * HQ + hq, mask=row_ok, other=0.0)
                s += C[:, None] - C[None, :]
            lse, delta = load_lse_and_delta(lse_ptr, delta_ptr, rows, row_ok, hq, HQ)
            p, ds = _probs_and_dscores(s, lse, delta, load_rows(do_ptr, rows, row_ok, hq, HQ, V, VP),
                                       load_rows(v_ptr, rows, row_ok, hk, H, V, VP))
            ds = tl.where(visible, ds, 0.0) * scale
            for d0 in range(0, K, DK):
                q, k, decay, ok, offs = _intra_channels(q_ptr, k_ptr, Pl_ptr, base, row_ok, d0, hq, hk, hg, HQ, H, HG,
                                                        K, DK)
                w = ds[:, :, None] * decay
                tl.store(dq_ptr + offs, tl.load(dq_ptr + offs, mask=ok) + tl.sum(w * k[None, :, :], 1), mask=ok)
                tl.store(dk_ptr + offs, tl.load(dk_ptr + offs, mask=ok) + tl.sum(w * q[:, None, :], 0), mask=ok)


@triton.jit
def _steep_bwd_kernel(q_ptr, k_ptr, v_ptr, Pl_ptr, Cl_ptr, Cs_ptr, L_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr,
                      dv_part_ptr, dv_ptr, dcq_ptr, dck_ptr, blocks_ptr, qk_scale, scale, WINDOW,
                      HQ: tl.constexpr, H: tl.constexpr, HG: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                      V: tl.constexpr, VP: tl.constexpr, SUB: tl.constexpr, BLOCK: tl.constexpr,
                      FAST_RANGE: tl.constexpr, HAS_GS: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """The diagonal tiles of steep blocks, whole, after the dq and dk/dv kernels, which leave them out so that the
    sub-block path stays out of their registers: adds their shares to dq, dk, dcq and dck, and writes dv from the
    fp32 part the dk/dv kernel left in dv_part. Pairs in different sub-blocks go through sub-block dots; the pairs
    inside one are _intra_bwd_kernel's."""
    i0, _, eos, id_m, hq, hk, hg, last = _query_block_program(blocks_ptr, HQ, H, HG, BLOCK)
    if not _is_gentle(Pl_ptr, last, hg, HG, K, KP, FAST_RANGE):
        rows = i0 + tl.arange(0, BLOCK)
        row_ok = rows < eos
        q = load_rows(q_ptr, rows, row_ok, hq, HQ, K, KP)
        k = load_rows(k_ptr, rows, row_ok, hk, H, K, KP)
        Pl = load_rows(Pl_ptr, rows, row_ok, hg, HG, K, KP)
        cq = _gate_offset(Cl_ptr, Cs_ptr, rows, row_ok, id_m, id_m, hq, HQ, HAS_GS)
        s = _mask_and_gate(_steep_logits(q, k, Pl, Pl_ptr, L_ptr, rows, row_ok, i0, last, hq, hg, qk_scale, HQ, HG,
                                         K, KP, BLOCK, SUB),
                           rows, rows, row_ok[:, None] & (rows[None, :] <= rows[:, None]), cq, cq, WINDOW, HAS_GS,
                           HAS_WINDOW)
        do = load_rows(do_ptr, rows, row_ok, hq, HQ, V, VP)
        lse, delta = load_lse_and_delta(lse_ptr, delta_ptr, rows, row_ok, hq, HQ)
        p, ds = _probs_and_dscores(s, lse, delta, do, load_rows(v_ptr, rows, row_ok, hk, H, V, VP))
        dv = tl.dot(tl.trans(p).to(do.dtype), do, load_rows(dv_part_ptr, rows, row_ok, hq, HQ, V, VP))
        store_rows(dv_ptr, dv, rows, row_ok, hq, HQ, V, VP)
        add_to_rows(dcq_ptr, tl.sum(ds, 1), rows, row_ok, hq, HQ)
        add_to_rows(dck_ptr, tl.sum(ds, 0), rows, row_ok, hq, HQ)
        ds *= scale
        # pairs in different sub-blocks factor through the key sub-block's end
        ds_outer = tl.where(_intra_mask(BLOCK, SUB), 0.0, ds)
        kb = _steep_key_factor(k, Pl, Pl_ptr, rows, i0, last, hg, HG, K, KP, SUB).to(k.dtype)
        key_sub = (tl.arange(0, BLOCK) // SUB)[None, :]
        dq = tl.zeros([BLOCK, KP], dtype=tl.float32)
        dk = tl.zeros([BLOCK, KP], dtype=tl.float32)
        for sb in tl.static_range(BLOCK // SUB):
            ds_sb = tl.where(key_sub == sb, ds_outer, 0.0).to(q.dtype)
            factor = _steep_query_factor(Pl, Pl_ptr, i0, last, sb, hg, HG, K, KP, SUB)
            dq += tl.dot(ds_sb, kb) * factor
            dk += tl.dot(tl.trans(ds_sb), (q.to(tl.float32) * factor).to(q.dtype))
        store_rows(dq_ptr, load_rows(dq_ptr, rows, row_ok, hq, HQ, K, KP) + dq, rows, row_ok, hq, HQ, K, KP)
        dk = _steep_key_factor(dk, Pl, Pl_ptr, rows, i0, last, hg, HG, K, KP, SUB)
        store_rows(dk_ptr, load_rows(dk_ptr, rows, row_ok, hq, HQ, K, KP) + dk, rows, row_ok, hq, HQ, K, KP)


# ---------------------------------------------------------------------------------------------------------------
# backward: the decay gradient

@triton.jit
def _decay_grad_kernel(q_ptr, k_ptr, dq_ptr, dk_ptr, dg_ptr, totals_ptr, suffix_ptr, blocks_ptr, dq_out_ptr,
                       dk_out_ptr, HQ: tl.constexpr, H: tl.constexpr, HG: tl.constexpr, K: tl.constexpr,
                       KP: tl.constexpr, BLOCK: tl.constexpr, FINAL: tl.constexpr, DK_OUT: tl.constexpr):
    """dg[t] = sum over s >= t in t's document of (q*dq - k*dk)[s], summed over the gate's query heads, in two
    passes: the first writes each block's total, the second (FINAL) the sums inside the block plus `suffix`, the
    float64 sum of the totals of the document's later blocks (summed in between by torch). The second pass also
    writes dq, and dk when DK_OUT (no GQA sum to do), in the inputs' dtype: it reads them anyway."""
    i0, _, eos, block_id = _block(blocks_ptr, tl.program_id(0))
    hg = tl.program_id(1)
    rows = i0 + tl.arange(0, BLOCK)
    row_ok = rows < eos
    x = tl.zeros([BLOCK, KP], dtype=tl.float32)
    for h in range(HQ // HG):
        hq = hg * (HQ // HG) + h
        hk = hq // (HQ // H)
        dq = load_rows(dq_ptr, rows, row_ok, hq, HQ, K, KP)
        dk = load_rows(dk_ptr, rows, row_ok, hq, HQ, K, KP)
        x += load_rows(q_ptr, rows, row_ok, hq, HQ, K, KP).to(tl.float32) * dq
        x -= load_rows(k_ptr, rows, row_ok, hk, H, K, KP).to(tl.float32) * dk
        if FINAL:
            store_rows(dq_out_ptr, dq, rows, row_ok, hq, HQ, K, KP)
            if DK_OUT:
                store_rows(dk_out_ptr, dk, rows, row_ok, hq, HQ, K, KP)
    total = tl.sum(x, 0)
    if FINAL:
        inside = (total[None, :] - tl.cumsum(x, 0) + x).to(tl.float64)
        store_rows(dg_ptr, inside + load_row(suffix_ptr, block_id, hg, HG, K, KP)[None, :], rows, row_ok, hg, HG,
                   K, KP)
    else:
        cols = tl.arange(0, KP)
        tl.store(totals_ptr + (block_id * HG + hg) * K + cols, total, mask=cols < K)


# ---------------------------------------------------------------------------------------------------------------
# autograd and launch

class _Blocks:
    """The documents' BLOCK-token blocks and everything derived from them, shared by forward and backward."""

    def __init__(self, bounds, device, block):
        blocks = [(s, bos, eos) for bos, eos in zip(bounds[:-1], bounds[1:]) for s in range(bos, eos, block)]
        self.block_start = torch.tensor([b[0] for b in blocks], device=device)
        self.block_last = torch.tensor([min(s + block, eos) - 1 for s, _, eos in blocks], device=device)
        self.block_doc = torch.tensor([eos for _, _, eos in blocks], device=device)
        # Position-ordered ids; the launch order puts the longest query loops first.
        table = sorted(((s, bos, eos, i) for i, (s, bos, eos) in enumerate(blocks)), key=lambda t: t[1] - t[0])
        self.table = torch.tensor(table, dtype=torch.int32, device=device).reshape(-1, 4)
        lengths = torch.tensor([min(block, eos - s) for s, _, eos in blocks], device=device)
        self.token_block = torch.repeat_interleave(torch.arange(len(blocks), device=device), lengths)
        doc_lengths = torch.tensor(bounds[1:], device=device) - torch.tensor(bounds[:-1], device=device)
        self.doc_end = torch.repeat_interleave(torch.tensor(bounds[1:], device=device), doc_lengths)
        # For each block, the id one past its document's last block (suffix sums stop there).
        self.block_stop = torch.searchsorted(self.block_start, self.block_doc)

    def block_prefix(self, Pl, g):
        num_blocks, (HG, K) = len(self.block_start), Pl.shape[1:]
        Pstart = torch.empty(num_blocks, HG, K, device=Pl.device, dtype=torch.float64)
        _block_prefix_kernel[(HG, triton.cdiv(K, PREFIX_COLS))](Pl, g, self.block_start, self.block_last, Pstart,
                                                                num_blocks, HG=HG, K=K, COLS=PREFIX_COLS,
                                                                CHUNK=PREFIX_CHUNK)
        return Pstart

    def scalar_prefix(self, g_scalar):
        """The scalar gate's prefix C = cumsum(g_scalar) in log2 units as (C - C[own block start] in float32,
        C[block starts] in float64): the kernels read float32 per token and one float64 pair per block."""
        C = _cumsum_rows(g_scalar.double()) * LOG2E.value
        Cs = C[self.block_start]
        return (C - Cs[self.token_block]).float(), Cs

    def suffix_after_block(self, totals):
        """For each block, the sum of `totals` over the later blocks of its document (float64)."""
        R = _suffix_sums(totals)
        return R[1:] - R[self.block_stop]


@functools.lru_cache(maxsize=16)
def _blocks_of(bounds, device, block):
    """Every layer of a model sees the same documents: build their block tables once."""
    return _Blocks(bounds, device, block)


def _cumsum_rows(x):
    """torch.cumsum(x, dim=0), scanned along the last axis: CUDA scans an outer axis with one thread per column,
    sequentially (most of the scalar gate's cost at long T), an inner one in parallel."""
    return x.reshape(x.shape[0], x.shape[1:].numel()).t().contiguous().cumsum(1).t().contiguous().view(x.shape)


def _suffix_sums(x):
    """R[t] = sum of x[t:] along dim 0 in float64, with R[len(x)] = 0 (one row more than x)."""
    R = _cumsum_rows(x.double().flip(0)).flip(0)
    return torch.cat([R, R.new_zeros(1, *R.shape[1:])])


def _reverse_cumsum(x, doc_end):
    """sum over s >= t inside t's document, in float64: R[t] - R[document end]. For the small [T, HQ] gates."""
    R = _suffix_sums(x)
    return R[:-1] - R[doc_end]


def _dims(q, k, v, g):
    return dict(HQ=q.shape[1], H=k.shape[1], HG=g.shape[1], K=q.shape[2], V=v.shape[2],
                KP=padded_dim(q.shape[2]), VP=padded_dim(v.shape[2]),
                BLOCK=BLOCK, FAST_RANGE=FAST_RANGE[q.dtype])


def _feature_flags(g_scalar, window_size):
    """The constexpr switches of the optional features, as every launch and compile ahead passes them."""
    return dict(HAS_GS=g_scalar is not None, HAS_WINDOW=window_size is not None)


def _prep(q, k, g, blocks, dims, do=None, o=None):
    """Pl, Pstart and the rescaled keys kt, kg; given do and o (the backward), also q_hat, qg and delta; without
    them (the forward), the largest gate of each (block, gate head) instead."""
    backward = do is not None
    grid = (blocks.table.shape[0], dims['HG'])
    Pl = torch.empty(g.shape, device=g.device, dtype=torch.float32)
    delta = torch.empty(q.shape[:2], device=q.device, dtype=torch.float32) if backward else None
    gate_max = None if backward else torch.empty(grid, device=g.device, dtype=torch.float32)
    _prefix_kernel[grid](g, do, o, Pl, delta, gate_max, blocks.table,
                         HQ=dims['HQ'], HG=dims['HG'], K=dims['K'], KP=dims['KP'], V=dims['V'], VP=dims['VP'],
                         BLOCK=BLOCK, BACKWARD=backward)
    Pstart = blocks.block_prefix(Pl, g)
    kt, kg = (torch.empty(q.shape[0], dims['HG'], dims['K'], device=q.device, dtype=q.dtype) for _ in range(2))
    q_hat, qg = (torch.empty_like(q), torch.empty_like(q)) if backward else (None, None)
    _rescale_kernel[grid](k, q if backward else None, Pl, Pstart, kt, kg, q_hat, qg, blocks.table,
                          HQ=dims['HQ'], H=dims['H'], HG=dims['HG'], K=dims['K'], KP=dims['KP'], BLOCK=BLOCK,
                          KEY_GROUP=GROUPS['dq' if backward else 'fwd'], QUERY_GROUP=GROUPS['dkv'],
                          BACKWARD=backward)
    return Pl, Pstart, kt, kg, q_hat, qg, delta if backward else gate_max


def _forward(q, k, v, g, g_scalar, sink_bias, scale, window_size, blocks):
    """q, k, v, g flattened to [tokens, heads, dim]. Returns o, lse (log2 units) and what backward needs."""
    dims = _dims(q, k, v, g)
    HQ = dims['HQ']
    Pl, Pstart, kt, kg, _, _, gate_max = _prep(q, k, g, blocks, dims)
    gate_maxima = [('g', gate_max.amax())] + ([] if g_scalar is None else [('g_scalar', g_scalar.amax())])
    check_gates('wall_attn', gate_maxima)
    Cl, Cs = (None, None) if g_scalar is None else blocks.scalar_prefix(g_scalar)
    qk_scale = scale * LOG2E.value
    grid = (blocks.table.shape[0], HQ)
    L = torch.empty(q.shape[0], HQ, SUB, device=q.device, dtype=torch.float32)
    S = torch.empty(q.shape[0], HQ, BLOCK, device=q.device, dtype=torch.float32)
    _diag_fwd_kernel[grid](q, k, Pl, L, S, blocks.table, qk_scale, HQ=HQ, H=dims['H'], HG=dims['HG'], K=dims['K'],
                           KP=dims['KP'], SUB=SUB, BLOCK=BLOCK, DK=DK, FAST_RANGE=dims['FAST_RANGE'],
                           **_launch_options('diag_fwd'))
    o = torch.empty(*q.shape[:2], v.shape[2], device=q.device, dtype=q.dtype)
    lse = torch.empty(q.shape[0], HQ, device=q.device, dtype=torch.float32)
    _launch('fwd', _fwd_kernel, grid, q, kt, kg, v, Pl, Pstart, Cl, Cs, S, sink_bias, o, lse, torch.empty_like(q),
            blocks.table, qk_scale, window_size or 0,
            HAS_SINK=sink_bias is not None, GROUP=GROUPS['fwd'], **_feature_flags(g_scalar, window_size), **dims)
    return o, lse, L


def _dq_and_dkv_launches(t, num_blocks, scale, window_size):
    """The dq and dk/dv kernels, each as (name in LAUNCH, kernel, its arguments taken from t (name -> tensor, or
    name -> dtype to compile it ahead), the constexprs of its own (anchor-group size, dk/dv's query tile))."""
    shared = (t['Pl'], t['Pstart'], t['Cl'], t['Cs'], t['do'], t['lse'], t['delta'])
    scalars = (scale * LOG2E.value, scale, window_size or 0)
    return (('dq', _bwd_dq_kernel, (t['q'], t['kt'], t['kg'], t['k'], t['v'], *shared, t['dq'], t['dcq'], t['qf'],
                              t['table'], *scalars), dict(GROUP=GROUPS['dq'])),
            ('dkv', _bwd_dkv_kernel, (t['q_hat'], t['qg'], t['kt'], t['k'], t['v'], *shared, t['dk'], t['dv'],
                               t['dck'], t['dv_part'], t['table'], num_blocks, *scalars),
             dict(GROUP=GROUPS['dkv'], DKV_QUERY_ROWS=DKV_QUERY_ROWS)))


_compiles_ahead = {}  # what the backward kernels were compiled ahead for -> their Futures
_compile_threads = None


def _compile_backward_ahead(q, k, v, g_scalar, scale, window_size, blocks, dims):
    """At a new specialization's first forward, compile the two largest backward kernels on other threads. Triton
    releases the GIL while it compiles, so they overlap with the forward's own compiles (bench/results_attn.md,
    tuning notes)."""
    global _compile_threads
    flags = _feature_flags(g_scalar, window_size)
    num_blocks = blocks.table.shape[0]
    # what Triton specializes a launch on: dtypes, constexprs, and integers equal to 1 or divisible by 16
    key = (q.device, q.dtype, v.dtype, tuple(dims.items()), tuple(flags.items()), window_size,
           num_blocks == 1, num_blocks % 16 == 0)
    if INTERPRET or key in _compiles_ahead:
        return
    f32, f64 = torch.float32, torch.float64
    HQ, H = dims['HQ'], dims['H']
    dtypes = dict(q=q.dtype, k=k.dtype, v=v.dtype, kt=q.dtype, kg=q.dtype, q_hat=q.dtype, qg=q.dtype, qf=q.dtype,
                  Pl=f32, Pstart=f64, Cl=None if g_scalar is None else f32, Cs=None if g_scalar is None else f64,
                  do=q.dtype, lse=f32, delta=f32, dq=f32, dcq=f32, dk=f32, dv=v.dtype if HQ == H else f32, dck=f32,
                  dv_part=f32, table=torch.int32)

    def compile_ahead(name, kernel, args, constexprs):  # at the first stages: the launch pipelines less if they fail
        with torch.cuda.device(q.device):
            kernel.warmup(*args, grid=(num_blocks, HQ), num_warps=LAUNCH[name][0],
                          num_stages=_first_stages(name, q.dtype, dims), **constexprs, **flags, **dims)

    _compile_threads = _compile_threads or concurrent.futures.ThreadPoolExecutor(max_workers=2)
    _compiles_ahead[key] = [_compile_threads.submit(compile_ahead, *launch)
                            for launch in _dq_and_dkv_launches(dtypes, num_blocks, scale, window_size)]


def _wait_for_compiles_ahead():
    """The backward launches only after every compile ahead has finished: a launch would otherwise compile the same
    kernel a second time, or share its compile cache with a compiling thread. A failed compile ahead is left to the
    launch, which compiles again and raises its error where it belongs."""
    for futures in list(_compiles_ahead.values()):
        concurrent.futures.wait(futures)


def _backward(do, q, k, v, g, o, lse, L, g_scalar, sink_bias, scale, window_size, blocks):
    dims = _dims(q, k, v, g)
    HQ, H, HG = dims['HQ'], dims['H'], dims['HG']
    do = do.contiguous()  # o.sum().backward() passes a stride-0 do: every kernel below reads do as [tokens, HQ, V]
    Pl, Pstart, kt, kg, q_hat, qg, delta = _prep(q, k, g, blocks, dims, do, o)
    Cl, Cs = (None, None) if g_scalar is None else blocks.scalar_prefix(g_scalar)
    _wait_for_compiles_ahead()
    dq = torch.empty(q.shape, device=q.device, dtype=torch.float32)
    dk = torch.empty(q.shape, device=q.device, dtype=torch.float32)  # per query head: dg needs it
    # per query head; without GQA dv is final when the dk/dv kernel writes it
    dv = torch.empty(*q.shape[:2], v.shape[2], device=q.device, dtype=v.dtype if HQ == H else torch.float32)
    dcq = torch.empty(q.shape[:2], device=q.device, dtype=torch.float32)
    dck = torch.empty(q.shape[:2], device=q.device, dtype=torch.float32)
    flags = _feature_flags(g_scalar, window_size)
    num_blocks = blocks.table.shape[0]
    grid = (num_blocks, HQ)
    # a steep block's dv waits in fp32 for its diagonal tile (written for steep blocks only)
    dv_part = dv if dv.dtype == torch.float32 else torch.empty_like(dv, dtype=torch.float32)
    tensors = dict(q=q, k=k, v=v, kt=kt, kg=kg, q_hat=q_hat, qg=qg, qf=torch.empty_like(q), Pl=Pl, Pstart=Pstart,
                   Cl=Cl, Cs=Cs, do=do, lse=lse, delta=delta, dq=dq, dcq=dcq, dk=dk, dv=dv, dck=dck, dv_part=dv_part,
                   table=blocks.table)
    for name, kernel, args, constexprs in _dq_and_dkv_launches(tensors, num_blocks, scale, window_size):
        _launch(name, kernel, grid, *args, **constexprs, **flags, **dims)
    _steep_bwd_kernel[grid](q, k, v, Pl, Cl, Cs, L, do, lse, delta, dq, dk, dv_part, dv, dcq, dck, blocks.table,
                            scale * LOG2E.value, scale, window_size or 0, SUB=SUB, **_launch_options('steep_bwd'),
                            **flags, **dims)
    _intra_bwd_kernel[grid](q, k, v, Pl, Cl, L, do, lse, delta, dq, dk, blocks.table, scale, window_size or 0, SUB=SUB,
                            DK=DK, **_launch_options('intra_bwd'), **flags, **dims)

    dg = torch.empty(g.shape, device=g.device, dtype=g.dtype)
    totals = torch.empty(num_blocks, HG, dims['K'], device=g.device, dtype=torch.float32)
    dq_out = torch.empty_like(q)
    dk_out = torch.empty_like(k) if HQ == H else None  # with GQA, dk is summed over the query heads below
    shape = dict(HQ=HQ, H=H, HG=HG, K=dims['K'], KP=dims['KP'], BLOCK=BLOCK, DK_OUT=HQ == H)
    _decay_grad_kernel[(num_blocks, HG)](q, k, dq, dk, None, totals, None, blocks.table, None, None, FINAL=False,
                                         **shape)
    _decay_grad_kernel[(num_blocks, HG)](q, k, dq, dk, dg, None, blocks.suffix_after_block(totals), blocks.table,
                                         dq_out, dk_out, FINAL=True, **shape)
    dg_scalar = None if g_scalar is None else _reverse_cumsum(dcq - dck, blocks.doc_end).to(g_scalar.dtype)
    dsink = None
    if sink_bias is not None:
        dsink = -(torch.exp2(sink_bias.float()[None, :] * LOG2E.value - lse) * delta).sum(0).to(sink_bias.dtype)
    if HQ != H:
        dk_out = dk.unflatten(1, (H, HQ // H)).sum(2).to(k.dtype)
        dv = dv.unflatten(1, (H, HQ // H)).sum(2).to(v.dtype)
    return dq_out, dk_out, dv, dg, dg_scalar, dsink


# (dtype, K) -> value columns per launch, where a launch at _value_tile's width ran out of shared memory
_narrowed_value_tiles = {}
NARROWEST_VALUE_TILE = 16  # below it a launch's shared memory is the key-side tiles' alone: halving cannot help


def _halves(x):
    half = x.shape[-1] // 2
    return x[..., :half].contiguous(), x[..., half:].contiguous()


def _narrowed(q, v, error):
    """After `error` (OutOfResources even at one stage): remember half of v's columns as (dtype, K)'s value tile
    for the next calls, or raise where the columns are as narrow as halving goes."""
    if v.shape[-1] < 2 * NARROWEST_VALUE_TILE:
        raise error
    key = (q.dtype, q.shape[-1])
    _narrowed_value_tiles[key] = min(_narrowed_value_tiles.get(key, MAX_VALUE_TILE), v.shape[-1] // 2)


def _forward_fitting(q, k, v, g, g_scalar, sink_bias, scale, window_size, blocks):
    """_forward, over halves of v's columns where a launch's tiles overflow shared memory even unpipelined: the
    logits, lse and L do not depend on v."""
    try:
        return _forward(q, k, v, g, g_scalar, sink_bias, scale, window_size, blocks)
    except triton.runtime.errors.OutOfResources as error:
        _narrowed(q, v, error)
    parts = [_forward_fitting(q, k, half, g, g_scalar, sink_bias, scale, window_size, blocks) for half in _halves(v)]
    return torch.cat([o for o, _, _ in parts], dim=-1), parts[0][1], parts[0][2]


def _backward_fitting(do, q, k, v, g, o, lse, L, g_scalar, sink_bias, scale, window_size, blocks):
    """_backward, over halves of the value columns as in _forward_fitting: every gradient but dv is a sum over
    the columns (through do . v and delta = rowsum(do * o)), dv is their concatenation."""
    try:
        return _backward(do, q, k, v, g, o, lse, L, g_scalar, sink_bias, scale, window_size, blocks)
    except triton.runtime.errors.OutOfResources as error:
        _narrowed(q, v, error)
    parts = [_backward_fitting(do_half, q, k, v_half, g, o_half, lse, L, g_scalar, sink_bias, scale, window_size,
                               blocks) for do_half, v_half, o_half in zip(_halves(do), _halves(v), _halves(o))]
    (dq, dk, dv, dg, dg_scalar, dsink), second = parts
    add = lambda x, y: None if x is None else x + y
    return (dq + second[0], dk + second[1], torch.cat([dv, second[2]], dim=-1), dg + second[3],
            add(dg_scalar, second[4]), add(dsink, second[5]))


class WallAttnFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, g, g_scalar, sink_bias, scale, window_size, bounds):
        blocks = _blocks_of(tuple(bounds), q.device, BLOCK)
        if any(ctx.needs_input_grad[:6]):
            _compile_backward_ahead(q, k, v, g_scalar, scale, window_size, blocks, _dims(q, k, v, g))
        o, lse, L = _forward_fitting(q, k, v, g, g_scalar, sink_bias, scale, window_size, blocks)
        ctx.save_for_backward(q, k, v, g, g_scalar, sink_bias, o, lse, L)
        ctx.scale, ctx.window_size, ctx.blocks = scale, window_size, blocks
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, g, g_scalar, sink_bias, o, lse, L = ctx.saved_tensors
        grads = _backward_fitting(do, q, k, v, g, o, lse, L, g_scalar, sink_bias, ctx.scale, ctx.window_size,
                                  ctx.blocks)
        return (*grads, None, None, None)


def _check_inputs(q, k, v, g, scale, g_scalar, sink_bias, window_size, cu_seqlens, layout):
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
    if K > MAX_HEAD_DIM or V > MAX_VALUE_DIM:
        raise ValueError(f'head dims up to {MAX_HEAD_DIM} (K) and {MAX_VALUE_DIM} (V) are supported, got K={K} '
                         f'(`q`, `k`) and V={V} (`v`)')
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f'`scale` must be a float, got {type(scale).__name__}')
    if not math.isfinite(scale):
        raise ValueError(f'`scale` must be finite, got {scale}')
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
        if layout is not None:
            raise ValueError('`layout` describes a `cu_seqlens`: pass it with that cu_seqlens, not without one')
        return list(range(0, B * T + 1, T)) if T else [0, 0]
    check_cu_seqlens(cu_seqlens)
    if B != 1:
        raise ValueError(f'`cu_seqlens` needs batch size 1 (documents packed along time), got batch {B}')
    bounds = layout_of(cu_seqlens, layout).bounds  # without a layout, the device-to-host read of cu_seqlens
    if bounds[0] != 0 or bounds[-1] != T:
        raise ValueError(f'`cu_seqlens` must start at 0 and end at T={T}, got {bounds[0]} ... {bounds[-1]}')
    if any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError('`cu_seqlens` must be non-decreasing')
    return bounds


def _value_tile(q):
    """Value columns per launch: MAX_VALUE_TILE, or in fp32 past K = 64 half of it per doubling of K (128 columns
    to K = 128, 64 beyond): dq's fp32 tiles at K + V = 384 need 256 KB of shared memory even unpipelined, and at
    K + V <= 256 they fit at the tuned stages. Narrower where a launch needed it before."""
    K = q.shape[-1]
    tile = MAX_VALUE_TILE if q.element_size() < 4 or K <= 64 else MAX_VALUE_TILE // (2 if K <= 128 else 4)
    return min(tile, _narrowed_value_tiles.get((q.dtype, K), tile))


def wall_attn(q, k, v, g, *, scale=None, g_scalar=None, sink_bias=None, window_size=None, cu_seqlens=None,
              layout=None):
    """Wall Attention (docs/operator.md), differentiable in q, k, v, g, g_scalar and sink_bias.

    q [B,T,HQ,K], k [B,T,H,K], v [B,T,H,V], g [B,T,HQ,K] or [B,T,H,K] (natural-log decay, <= 0),
    g_scalar [B,T,HQ] (<= 0), sink_bias [HQ], cu_seqlens [N+1] with B == 1. Returns o [B,T,HQ,V] in q's dtype.
    Any K up to 256 and V up to 512 (values wider than 256 columns, 64 in fp32 at K > 128, are attended that many
    columns per launch, each launch computing the logits again; narrower where a launch runs out of shared memory).

    layout: `kernels.document_layout(cu_seqlens)`, to spare each call on the same batch a device-to-host read of
    cu_seqlens (kernels/documents.py); it must be the layout of this cu_seqlens: only its number of boundaries and
    its last one (= T) are checked, its boundaries are used as given.

    A positive `g` or `g_scalar` raises a ValueError naming it and its largest value: at once on CPUs and at the
    first call on a GPU, later GPU calls at the latest at the first call after the next synchronisation;
    `kernels.set_gate_check('sync')` (or WALL_GATE_CHECK=sync) raises at the offending call everywhere, at the cost
    of a synchronisation per call (kernels/domain.py).
    """
    scale = q.shape[-1] ** -0.5 if scale is None and isinstance(q, torch.Tensor) and q.dim() == 4 else scale
    bounds = _check_inputs(q, k, v, g, scale, g_scalar, sink_bias, window_size, cu_seqlens, layout)
    B, T, HQ, _ = q.shape
    if B * T == 0:
        return q.new_zeros(B, T, HQ, v.shape[-1])
    if scale < 0:  # the forward kernel folds log2(qk_scale) into its query operands; -q, -scale: same logits
        q, scale = -q, -scale
    flat = lambda x: None if x is None else x.reshape(B * T, *x.shape[2:]).contiguous()
    args = (flat(q), flat(k), flat(v), flat(g), flat(g_scalar), None if sink_bias is None else sink_bias.contiguous(),
            float(scale), window_size, bounds)
    V, tile = v.shape[-1], _value_tile(q)
    if V <= tile:
        o = WallAttnFunction.apply(*args)
    else:  # the logits do not depend on v: each tile of value columns is an attention of its own
        o = torch.cat([WallAttnFunction.apply(*args[:2], args[2][..., c:c + tile].contiguous(), *args[3:])
                       for c in range(0, V, tile)], dim=-1)
    return o.reshape(B, T, HQ, -1)
