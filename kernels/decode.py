"""Wall Attention decoding against a pre-rescaled KV cache (docs/operator.md), flash-decoding style.

Cache layout, `[B, T, heads, dim]` like the training pass, with `P = cumsum(g) / ln 2` (log2 units):

    anchored part, positions [0, n_anchored): chunks of C positions (the last one may be partial), chunk c with
        one anchor r_cache[:, c] = R_c (a K-vector) and keys   k_tilde[j] = k[j] * 2^(R_c - P[j]).
        R_c may be the prefix at ANY position of the chunk, or any other value the keys were scaled with:
        the seed anchors on the chunk's first position (a streaming cache appends without touching old keys),
        build_wall_kv_cache on its last (every exponent <= 0, so |k_tilde| <= |k| for any g <= 0).
    raw part, positions [n_anchored, T) = the last `raw_tail` positions: k_tilde[j] = k[j], with their prefixes
        given as `p_tail` (raw positions before the queries) and `p_curr` (the query rows).

The T_q queries are the last T_q positions T0 .. T-1 of the cache (causal among themselves); every logit is
computed as written:

    anchored key j of chunk c:   (q_i * 2^(P_i - R_c)) . k_tilde_j
    raw key j < T0:              (q_i * 2^(P_i - P_T0)) . (k_j * 2^(P_T0 - P_j)), anchored on the fly at T0
    raw query-row key j >= T0:   q_i . (k_j * 2^(P_i - P_j)) per element, for visible j <= i only

so the result does not depend on where a chunk's anchor lies, and a prefix of a cache (`k_tilde[:, :n]`,
`v[:, :n]`, `r_cache[:, :ceil(n / C)]`) is a valid cache. The query factor is taken 2^EXPONENT_SHIFT (64) larger and the
logit as much smaller: a seed-convention chunk whose keys grew by up to 2^127 inside it still meets a query factor
that is a normal float. What cannot be decoded comes back as NaN in `o` and `lse` of the rows concerned, never as
a plausible number:
- keys that overflowed when the cache was built (inf in k_tilde: a seed-convention chunk that decays by more than
  2^128, ~88 nats, inside itself);
- a query row whose shifted factor q_i * 2^(P_i - R_c + 64) overflows fp32, i.e. one about 64 (log2 units, ~44
  nats) or more of decay before the anchor of a chunk it sees (a prefix cut far before its chunk's end anchor):
  the keys it needs underflowed when they were scaled to that anchor. Below that, keys stored under the normal
  range cost at most 2^-62 of a logit.
Caches built by build_wall_kv_cache over exactly the decoded positions, and kernels.WallKVCache, never hit either,
for any g <= 0.

Differences of a prefix and an anchor are taken in the prefixes' own dtype (float64 when given) before the fp32
exp2, so a 1M-token prefix decodes as precisely as a 1k one.

Work split (flash-decoding): one program per (batch, gate head, split of the cached chunks[, tile of V columns]). A
program serves all query heads that share its gate head (all G query heads of a kv head when the gate is shared, so
each cache byte is read once), keeps an online softmax over its chunks, and writes a partial (output, log-sum-exp);
a combine kernel merges the splits and the attention sink. Head dims and chunk sizes that are not powers of two are
padded to the next one inside the kernel; values wider than MAX_VALUE_TILE columns are split over programs.

`wall_attn_decode_at` is the same kernel for one query row of a streaming cache whose position is a device tensor:
the kernel derives the anchored and raw parts from it and the grid is fixed by the cache's capacity, so one launch,
captured in a CUDA graph, serves every decode step.
"""
import functools

import torch
import triton
import triton.language as tl

from .triton_helpers import (LN2, LOG2E, MAX_HEAD_DIM, MAX_VALUE_DIM, MAX_VALUE_TILE, padded_dim,
                             softmax_merge_step, softmax_step, softmax_step_one_key, softmax_step_two_tiles)

# Anchored chunks: the query factor is 2^(P_i - R_c + EXPONENT_SHIFT), the logit then scaled back by as much. A
# query exponent from -190 to about 63 then gives a normal fp32/bf16 factor, no finite key times it overflows for a
# visible pair (P_i - P_j <= 0), and keys the cache stored below the normal range cost at most 2^-62 of a logit.
# 0 compiles the unshifted kernel, exact only while no key exceeds ~2^100 of its size (chunk-end anchors): kept to
# time what the shift costs (bench/bench_decode.py).
EXPONENT_SHIFT = 64

# ---------------------------------------------------------------------------------------------------------------
# tunables: the kernels' launch shapes and work split, each passed as a constexpr argument or launch option (the
# measurements behind them: bench/results_decode.md; bench/bench_decode.py --sweep times other values)

NUM_WARPS = None  # the split kernel's warps; None: default_num_warps picks them per launch
# The split kernel's pipeline stages: two beat three alongside two chunks per step. 4-byte caches take at most two:
# three stages of 64 x 128 fp32 keys and values would need 300 KB of shared memory.
NUM_STAGES = 2
CHUNKS_PER_STEP = 2  # anchored chunks per loop iteration: two independent logit chains between softmax updates
COMBINE_BLOCK_SPLITS = 16  # partial results the combine kernel merges per loop iteration, a [16, VP] fp32 tile


def default_num_splits(device, programs_per_split, n_blocks, rows_per_program):
    """Enough programs that one long sequence at batch 1 fills the GPU: programs of one query row run best about 4 per
    multiprocessor; programs of several rows (a query group under a shared gate) do that many times the arithmetic
    per cache byte and run best about one per multiprocessor."""
    if device.type != 'cuda':
        return min(n_blocks, 2)  # the CPU interpreter runs programs one by one
    sms = _multiprocessors(device)
    programs = 4 * sms if rows_per_program == 1 else sms
    return max(1, min(n_blocks, _cdiv(programs, programs_per_split)))


def default_num_warps(device, programs_per_split, rows_per_program):
    """4 warps, or 2 for programs of one query row once the batch's gate heads reach a quarter of the multiprocessors
    (at batch 1, where the programs come from splits, two warps lose)."""
    if device.type == 'cuda' and rows_per_program == 1 and 4 * programs_per_split >= _multiprocessors(device):
        return 2
    return 4


# ---------------------------------------------------------------------------------------------------------------
# building and decoding a cache

def build_wall_kv_cache(k, P, chunk_size=64, *, raw_tail=0, out_dtype=None):
    """Pre-rescale keys for decoding.

    k: `[B, T, H, K]` keys; P: `[B, T, HG, K]` prefix `cumsum(g) / ln 2` (float32 or float64), HG = HQ (gate per
    query head) or H (gate shared per kv head). Returns `(k_tilde [B, T, HG, K], r_cache [B, NC, HG, K])`.

    Anchor convention: the first `T - raw_tail` positions form chunks of `chunk_size`, and chunk `c` is anchored on
    its last position `a_c` (its end; the last anchored position for a final partial chunk):
    `r_cache[:, c] = P[a_c]` (dtype of P) and `k_tilde[j] = k[j] * 2^(P[a_c] - P[j])`, so `|k_tilde| <= |k|` for any
    g <= 0. The last `raw_tail` positions keep their raw keys: pass the same `raw_tail` to `wall_attn_decode`.
    Decoding the last T_q positions of this cache keeps every exponent <= 0 when `raw_tail >= T_q - 1` (the default 0
    serves T_q = 1); any prefix of it decodes exactly too, as long as it ends less than about 64 (log2 units, ~44
    nats of decay) before the end anchor of its last chunk (NaN rows otherwise, see the module docstring).
    """
    _check_tensor('k', k, 4)
    _check_tensor('P', P, 4, dtypes=(torch.float32, torch.float64))
    B, T, H, K = k.shape
    if P.shape[:2] != (B, T) or P.shape[3] != K or P.shape[2] % H:
        raise ValueError(f'P must be [B={B}, T={T}, HG, K={K}] with HG a multiple of H={H}, got {list(P.shape)}')
    if P.device != k.device:
        raise ValueError(f'P is on {P.device} but k is on {k.device}')
    if chunk_size < 1 or not 0 <= raw_tail <= T:
        raise ValueError(f'need chunk_size >= 1 and 0 <= raw_tail <= T={T}, got {chunk_size}, {raw_tail}')
    HG, n_anchored = P.shape[2], T - raw_tail
    NC = _cdiv(n_anchored, chunk_size)
    last = torch.clamp(torch.arange(NC, device=k.device) * chunk_size + chunk_size, max=n_anchored) - 1
    r_cache = P[:, last]
    chunk_of = torch.arange(n_anchored, device=k.device) // chunk_size
    exponent = torch.zeros(B, T, HG, K, dtype=torch.float32, device=k.device)
    exponent[:, :n_anchored] = (r_cache[:, chunk_of] - P[:, :n_anchored]).float()
    k_tilde = k.float().repeat_interleave(HG // H, dim=2) * torch.exp2(exponent)
    return k_tilde.to(out_dtype or k.dtype), r_cache


def wall_attn_decode(q, v, p_curr, k_tilde, r_cache, sink_bias=None, scale=None, cache_chunk_size=64, *,
                     raw_tail=None, p_tail=None, g_scalar_cumsum=None, window_size=None, num_splits=None):
    """Attend the last T_q cache positions to the cache. Returns `(o [B, T_q, HQ, V], lse [B, T_q, HQ])`.

    q: `[B, T_q, HQ, K]`; v: `[B, T, H, V]`; k_tilde: `[B, T, HG, K]`; p_curr: `[B, T_q, HG, K]` prefixes
    `cumsum(g) / ln 2` of the query rows; r_cache: `[B, >= ceil(n_anchored / C), HG, K]` one anchor per chunk of
    C = cache_chunk_size positions (see the module docstring: any anchor the chunk's keys were scaled with, e.g. the
    seed's chunk start or build_wall_kv_cache's chunk end; a prefix of a cache is a cache).
    raw_tail: how many of the last positions hold raw keys (k_tilde = k), n_anchored = T - raw_tail; default 0, or
    n_tail + T_q when p_tail is given. p_tail: `[B, raw_tail - T_q, HG, K]` prefixes of the raw positions before the
    queries, needed exactly when raw_tail > T_q. g_scalar_cumsum: `[B, T, HQ]` cumulative FoX scalar log-decay
    (natural log); sink_bias: `[HQ]`; window_size: key j visible from query i iff i - j < window_size.
    Prefixes and anchors may be float32 or float64. `lse` is the natural log of the softmax denominator, sink
    included. Inputs may be strided views. `num_splits` overrides the split count (one split per program).
    K and C any size up to 256 (C >= 1), V up to 512. Rows that cannot be decoded exactly (a cache whose keys
    overflowed when it was built, a prefix cut far before its chunk's anchor) come back NaN, never as plausible values.
    """
    C = cache_chunk_size
    _check_tensor('q', q, 4)
    B, T_q, HQ, K = q.shape
    _check_tensor('v', v, 4, device=q.device)
    _check_tensor('k_tilde', k_tilde, 4, device=q.device)
    T, H, V = v.shape[1], v.shape[2], v.shape[3]
    HG = k_tilde.shape[2]
    if v.shape[0] != B:
        raise ValueError(f'v must be [B={B}, T, H, V], got {list(v.shape)}')
    if k_tilde.shape[:2] != (B, T) or k_tilde.shape[3] != K:
        raise ValueError(f'k_tilde must be [B={B}, T={T} (as v), HG, K={K}], got {list(k_tilde.shape)}')
    if HQ % HG or HG % H:
        raise ValueError(f'need HQ={HQ} a multiple of HG={HG} (k_tilde heads), and HG a multiple of H={H} (v heads)')
    if not 1 <= T_q <= T:
        raise ValueError(f'q has T_q={T_q} rows; need 1 <= T_q <= T={T} (the queries are the last cache positions)')
    for name, size, largest in (('K', K, MAX_HEAD_DIM), ('V', V, MAX_VALUE_DIM), ('cache_chunk_size', C, 256)):
        if not isinstance(size, int) or not 1 <= size <= largest:
            raise ValueError(f'{name} must be an int from 1 to {largest}, got {size!r}')
    prefix_dtypes = (torch.float32, torch.float64)
    _check_tensor('p_curr', p_curr, 4, (B, T_q, HG, K), prefix_dtypes, q.device)
    n_tail = 0
    if p_tail is not None:
        _check_tensor('p_tail', p_tail, 4, dtypes=prefix_dtypes, device=q.device)
        n_tail = p_tail.shape[1]
        _check_tensor('p_tail', p_tail, 4, (B, n_tail, HG, K))
        if n_tail > T - T_q:
            raise ValueError(f'p_tail covers {n_tail} positions but only T - T_q = {T - T_q} precede the queries')
    if raw_tail is None:
        raw_tail = n_tail + T_q if p_tail is not None else 0
    if not isinstance(raw_tail, int) or not 0 <= raw_tail <= T:
        raise ValueError(f'raw_tail must be an int from 0 to T={T}, got {raw_tail!r}')
    if n_tail != max(0, raw_tail - T_q):
        raise ValueError(f'p_tail must hold the prefixes of the {max(0, raw_tail - T_q)} raw positions before the '
                         f'queries (raw_tail={raw_tail}, T_q={T_q}), got {n_tail}')
    n_anchored = T - raw_tail
    _check_tensor('r_cache', r_cache, 4, dtypes=prefix_dtypes, device=q.device)
    n_chunks = _cdiv(n_anchored, C)
    if r_cache.shape[0] != B or r_cache.shape[1] < n_chunks or r_cache.shape[2:] != (HG, K):
        raise ValueError(f'r_cache must be [B={B}, >= {n_chunks} anchors (cover the {n_anchored} anchored positions'
                         f' in chunks of {C}), HG={HG}, K={K}], got {list(r_cache.shape)}')
    if g_scalar_cumsum is not None:
        _check_tensor('g_scalar_cumsum', g_scalar_cumsum, 3, (B, T, HQ), prefix_dtypes, q.device)
    if sink_bias is not None:
        _check_tensor('sink_bias', sink_bias, 1, (HQ,), device=q.device)
    if window_size is not None and (not isinstance(window_size, int) or window_size < 1):
        raise ValueError(f'window_size must be a positive int or None, got {window_size!r}')

    T0 = T - T_q
    key_lo = 0 if window_size is None else max(0, T0 - window_size + 1)
    n_blocks = max(0, _cdiv(max(T0, n_anchored), C) - key_lo // C)
    if num_splits is None:
        num_splits = default_num_splits(q.device, B * HG, n_blocks, T_q * (HQ // HG))
    blocks_per_split = _cdiv(n_blocks, max(1, min(num_splits, n_blocks))) if n_blocks else 0
    num_splits = _cdiv(n_blocks, blocks_per_split) if n_blocks else 1

    return _launch(q, v, p_curr, p_tail, k_tilde, r_cache, g_scalar_cumsum, sink_bias, scale, C, window_size,
                   num_splits, T0, n_anchored, key_lo, blocks_per_split)


def wall_attn_decode_at(q, v, k_tilde, r_cache, raw_prefix, position, num_splits, *, sink_bias=None, scale=None,
                        cache_chunk_size=64, g_scalar_cumsum=None, window_size=None):
    """`wall_attn_decode` of one query row per sequence at a position held in a device tensor, for a streaming cache
    (kernels.WallKVCache) whose buffers may extend past it: nothing in the launch depends on the position, so a CUDA
    graph can replay it at every step. Unchecked: the cache checks its own inputs.

    q: `[B, 1, HQ, K]` at position T0 = `position` (int64 `[1]`); chunks before T0 // C * C are closed
    (`k_tilde`, `r_cache` as in `wall_attn_decode`), `raw_prefix[:, i]` is the prefix of position
    T0 // C * C + i for i <= T0 % C; `num_splits` is fixed by the caller, splits without chunks contribute nothing.
    """
    return _launch(q, v, raw_prefix, raw_prefix, k_tilde, r_cache, g_scalar_cumsum, sink_bias,
                   scale, cache_chunk_size, window_size, num_splits,
                   0, 0, 0, 0, position=position)


def _launch(q, v, p_curr, p_tail, k_tilde, r_cache, g_scalar_cumsum, sink_bias, scale, C, window_size, num_splits,
            T0, n_anchored, key_lo, blocks_per_split, position=None):
    B, T_q, HQ, K = q.shape
    H, V, HG = v.shape[2], v.shape[3], k_tilde.shape[2]
    scale = K ** -0.5 if scale is None else scale
    QPG = HQ // HG
    rows = T_q * QPG
    VP = min(padded_dim(V), MAX_VALUE_TILE)
    v_tiles = _cdiv(V, VP)
    o_part = torch.empty(B * HG, num_splits, rows, V, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(B * HG, num_splits, rows, dtype=torch.float32, device=q.device)
    # Without a scalar gate its loads are compiled out (None, strides 0). Without p_tail, p_curr stands in: the raw-key
    # loop's bounds are runtime values (the device-position launch shares the code), so it is compiled in and runs
    # zero times.
    p_tail_arg = p_curr if p_tail is None else p_tail
    scalar_strides = (0, 0, 0) if g_scalar_cumsum is None else g_scalar_cumsum.stride()
    grid = (B * HG, num_splits) if v_tiles == 1 else (B * HG, num_splits, v_tiles)
    wall_decode_split_kernel[grid](
        q, k_tilde, v, p_curr, p_tail_arg, r_cache, g_scalar_cumsum, o_part, lse_part, position,
        *q.stride(), *k_tilde.stride(), *v.stride(), *p_curr.stride(), *p_tail_arg.stride(), *r_cache.stride(),
        *scalar_strides,
        T0, n_anchored, key_lo, blocks_per_split, num_splits, window_size or 0, scale * LOG2E.value,
        HG=HG, QPG=QPG, GPV=HG // H, T_Q=T_q, M=padded_dim(rows), K=K, KP=padded_dim(K),
        V=V, VP=VP, V_TILES=v_tiles, C=C, CP=padded_dim(C),
        HAS_SCALAR=g_scalar_cumsum is not None, HAS_WINDOW=window_size is not None,
        POSITION_ON_DEVICE=position is not None, CHUNKS=CHUNKS_PER_STEP, DOT_F32=k_tilde.dtype == torch.float16,
        SHIFT=EXPONENT_SHIFT, UNSHIFT=2.0 ** -EXPONENT_SHIFT,
        num_warps=NUM_WARPS or default_num_warps(q.device, B * HG, rows),
        num_stages=1 if not q.is_cuda else NUM_STAGES if k_tilde.element_size() <= 2 else min(NUM_STAGES, 2),
    )
    o = torch.empty(B, T_q, HQ, V, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, T_q, HQ, dtype=torch.float32, device=q.device)
    wall_decode_combine_kernel[(B * HG * rows, v_tiles)](
        o_part, lse_part, sink_bias, o, lse, num_splits,
        HG=HG, QPG=QPG, T_Q=T_q, HQ=HQ, V=V, VP=VP, V_TILES=v_tiles, BLOCK_S=COMBINE_BLOCK_SPLITS,
        HAS_SINK=sink_bias is not None,
    )
    return o, lse


def _cdiv(a, b):
    """Ceiling division in plain Python: triton.cdiv costs microseconds a call, and a decode step is host-bound."""
    return -(-a // b)


def _check_tensor(name, x, ndim, shape=None, dtypes=None, device=None):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f'{name} must be a torch.Tensor, got {type(x).__name__}')
    if not x.is_floating_point():
        raise TypeError(f'{name} must be a floating-point tensor, got {x.dtype}')
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f'{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}')
    if x.dim() != ndim or (shape is not None and tuple(x.shape) != tuple(shape)):
        expected = list(shape) if shape is not None else f'{ndim} dims'
        raise ValueError(f'{name} must have shape {expected}, got {list(x.shape)}')
    if device is not None and x.device != device:
        raise ValueError(f'{name} is on {x.device}, expected {device} (the device of q)')


def _multiprocessors(device):
    return _multiprocessors_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _multiprocessors_of(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# ---------------------------------------------------------------------------------------------------------------
# kernels

@triton.jit
def _padded(mask, cols, N: tl.constexpr, NP: tl.constexpr):
    """mask [R, 1] with the columns past N hidden where a head dim or chunk is padded to NP; unchanged
    (compiled away) when N == NP."""
    if N == NP:
        return mask
    else:
        return mask & (cols[None, :] < N)


@triton.jit
def _padded_vec(cols, N: tl.constexpr, NP: tl.constexpr):
    """Which of the NP columns of a vector are inside N (all of them, compiled away, when N == NP)."""
    if N == NP:
        return tl.full([NP], 1, tl.int1)
    else:
        return cols < N


@triton.jit
def _scalar_gate_bias(scalar, c_rows, key_pos, row_head, visible, sct, sch, UNITS: tl.constexpr):
    """(C_i - C_j) log2(e) / UNITS for the FoX scalar gate, differenced in the prefix dtype."""
    c_keys = tl.load(scalar + key_pos[None, :] * sct + row_head[:, None] * sch, mask=visible, other=0.0)
    return ((c_rows[:, None] - c_keys).to(tl.float32) * (LOG2E / UNITS))


@triton.jit
def _visible_logits(s, key_pos, key_ok, row_ok, row_pos, row_head, c_rows, scalar, sct, sch, window_size,
                    HAS_WINDOW: tl.constexpr, HAS_SCALAR: tl.constexpr, T_Q: tl.constexpr, UNITS: tl.constexpr = 1.0):
    """A chunk's logits (in units of UNITS log2) with the scalar gate added, -inf where a key is not visible (cache
    length, window, and with several query rows causality: anchored keys may be query rows)."""
    visible = row_ok[:, None] & key_ok[None, :]
    if T_Q > 1:
        visible = visible & (key_pos[None, :] <= row_pos[:, None])
    if HAS_WINDOW:
        visible = visible & (key_pos[None, :] > row_pos[:, None] - window_size)
    if HAS_SCALAR:
        s += _scalar_gate_bias(scalar, c_rows, key_pos, row_head, visible, sct, sch, UNITS)
    return tl.where(visible, s, float('-inf'))


@triton.jit
def _fold_chunk(s, values, key_pos, key_ok, row_ok, row_pos, row_head, c_rows, m_i, l_i, acc,
                scalar, sct, sch, window_size, HAS_WINDOW: tl.constexpr, HAS_SCALAR: tl.constexpr,
                T_Q: tl.constexpr):
    """Visibility (cache length, window) and the scalar gate for a chunk's logits, then its online-softmax step."""
    s = _visible_logits(s, key_pos, key_ok, row_ok, row_pos, row_head, c_rows, scalar, sct, sch, window_size,
                        HAS_WINDOW, HAS_SCALAR, T_Q)
    return softmax_step(s, m_i, l_i, acc, values)


@triton.jit
def _anchored_chunk(c, stop, q_rows, p_rows, r_cache, src, srd, k_tilde, skt, skd, v, svt, svd, key_lo,
                    n_anchored, d_k, d_v, offs_c, row_ok, row_pos, row_head, c_rows, scalar, sct, sch, window_size,
                    K: tl.constexpr, KP: tl.constexpr, V: tl.constexpr, VP: tl.constexpr, C: tl.constexpr,
                    CP: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SCALAR: tl.constexpr, T_Q: tl.constexpr,
                    DOT_F32: tl.constexpr, SHIFT: tl.constexpr, UNSHIFT: tl.constexpr):
    """Logits of anchored chunk c, (q_i 2^(P_i - r_c)) . k_tilde_j as written, as _visible_logits leaves them
    (nothing visible when c >= stop) but in units of UNSHIFT = 2^-SHIFT log2 (softmax_step scales them back inside
    its exp2), and its values. Non-finite where the cache cannot be decoded exactly."""
    key_pos = c * C + offs_c
    key_ok = (key_pos >= key_lo) & (key_pos < tl.minimum(n_anchored, stop * C)) & _padded_vec(offs_c, C, CP)
    # a chunk past stop: anchor +inf, so its query factor is 0 (its logits are hidden anyway)
    anchor = tl.load(r_cache + c * src + d_k * srd, mask=((tl.zeros_like(d_k) + c) < stop) & _padded_vec(d_k, K, KP),
                     other=float('inf'))
    # Shifted by 2^SHIFT: a factor that overflows (a query row far before the anchor) gives +-inf or NaN logits, and
    # one that stays finite loses at most 2^-62 to keys stored below the normal range.
    if SHIFT == 0:
        q_c = q_rows * tl.exp2((p_rows - anchor[None, :]).to(tl.float32))
    else:
        q_c = q_rows * tl.exp2((p_rows - (anchor - SHIFT)[None, :]).to(tl.float32))
    keys = tl.load(k_tilde + key_pos[:, None] * skt + d_k[None, :] * skd, mask=_padded(key_ok[:, None], d_k, K, KP),
                   other=0.0)
    values = tl.load(v + key_pos[:, None] * svt + d_v[None, :] * svd, mask=_padded(key_ok[:, None], d_v, V, VP),
                     other=0.0)
    if DOT_F32:  # fp16 caches: its range cannot hold the shifted query factor
        keys = keys.to(tl.float32)
    s = tl.dot(q_c.to(keys.dtype), tl.trans(keys))
    # an overflowed key (inf) gives +-inf or NaN: make -inf (which would hide the key) NaN too
    s = tl.where(s > float('-inf'), s, float('nan'))
    s = _visible_logits(s, key_pos, key_ok, row_ok, row_pos, row_head, c_rows, scalar, sct, sch, window_size,
                        HAS_WINDOW, HAS_SCALAR, T_Q, UNSHIFT)
    return s, values


@triton.jit
def wall_decode_split_kernel(
    q, k_tilde, v, p_curr, p_tail, r_cache, scalar, o_part, lse_part, position,
    sqb, sqt, sqh, sqd, skb, skt, skh, skd, svb, svt, svh, svd, spb, spt, sph, spd,
    stb, stt, sth, std, srb, src, srh, srd, scb, sct, sch,
    T0, n_anchored, key_lo, blocks_per_split, n_splits, window_size, qk_scale,
    HG: tl.constexpr, QPG: tl.constexpr, GPV: tl.constexpr, T_Q: tl.constexpr, M: tl.constexpr,
    K: tl.constexpr, KP: tl.constexpr, V: tl.constexpr, VP: tl.constexpr, V_TILES: tl.constexpr,
    C: tl.constexpr, CP: tl.constexpr, HAS_SCALAR: tl.constexpr, HAS_WINDOW: tl.constexpr,
    POSITION_ON_DEVICE: tl.constexpr, CHUNKS: tl.constexpr, DOT_F32: tl.constexpr, SHIFT: tl.constexpr,
    UNSHIFT: tl.constexpr,
):
    i_bg, i_s = tl.program_id(0), tl.program_id(1)
    if POSITION_ON_DEVICE:
        # One query row at the position a device tensor holds (a CUDA graph replays this launch unchanged): the
        # cache is a streaming one whose closed chunks end at T0 // C * C and whose raw prefixes start there.
        T0 = tl.load(position).to(tl.int32)
        n_anchored = T0 // C * C
        if HAS_WINDOW:
            key_lo = tl.maximum(T0 - window_size + 1, 0)
        blocks_per_split = tl.cdiv(tl.cdiv(T0, C) - key_lo // C, n_splits)
        p_curr = p_tail + (T0 - n_anchored) * stt
    i_b, i_g = i_bg // HG, i_bg % HG
    # Rows are (query row t, query head of this gate head): row m = t * QPG + head offset.
    rows = tl.arange(0, M)
    row_t, row_head = rows // QPG, i_g * QPG + rows % QPG
    row_ok = rows < T_Q * QPG
    row_pos = T0 + row_t
    d_k, offs_c = tl.arange(0, KP), tl.arange(0, CP)
    if V_TILES == 1:
        d_v = tl.arange(0, VP)
    else:  # values wider than one tile: a program per tile of VP columns, each recomputing the logits
        d_v = tl.program_id(2) * VP + tl.arange(0, VP)

    q += i_b * sqb
    k_tilde += i_b * skb + i_g * skh
    v += i_b * svb + (i_g // GPV) * svh
    p_curr += i_b * spb + i_g * sph
    p_tail += i_b * stb + i_g * sth
    r_cache += i_b * srb + i_g * srh
    if HAS_SCALAR:
        scalar += i_b * scb

    q_rows = tl.load(q + row_t[:, None] * sqt + row_head[:, None] * sqh + d_k[None, :] * sqd,
                     mask=_padded(row_ok[:, None], d_k, K, KP), other=0.0).to(tl.float32) * qk_scale
    # Padding rows and channels get prefix -inf: every factor 2^(P_row - x) they produce is 0, never inf * 0.
    p_rows = tl.load(p_curr + row_t[:, None] * spt + d_k[None, :] * spd, mask=_padded(row_ok[:, None], d_k, K, KP),
                     other=float('-inf'))
    c_rows = tl.zeros([M], dtype=tl.float32)
    if HAS_SCALAR:
        c_rows = tl.load(scalar + row_pos * sct + row_head * sch, mask=row_ok, other=0.0)

    m_i = tl.full([M], float('-inf'), dtype=tl.float32)
    l_i = tl.zeros([M], dtype=tl.float32)
    acc = tl.zeros([M, VP], dtype=tl.float32)

    # The splits share the chunks holding keys before the queries and anchored keys (anchored query rows too).
    n_keys = tl.maximum(T0, n_anchored)
    first = key_lo // C + i_s * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(n_keys, C))
    # Anchored chunks: the stored k_tilde against the query side rescaled to the chunk's anchor.
    stop = tl.minimum(last, tl.cdiv(n_anchored, C))
    for c in tl.range(first, stop, CHUNKS):
        s, values = _anchored_chunk(c, stop, q_rows, p_rows, r_cache, src, srd, k_tilde, skt, skd, v, svt,
                                    svd, key_lo, n_anchored, d_k, d_v, offs_c, row_ok, row_pos, row_head, c_rows,
                                    scalar, sct, sch, window_size, K, KP, V, VP, C, CP, HAS_WINDOW, HAS_SCALAR, T_Q,
                                    DOT_F32, SHIFT, UNSHIFT)
        if CHUNKS == 2:
            s2, values2 = _anchored_chunk(c + 1, stop, q_rows, p_rows, r_cache, src, srd, k_tilde, skt, skd,
                                          v, svt, svd, key_lo, n_anchored, d_k, d_v, offs_c, row_ok, row_pos, row_head,
                                          c_rows, scalar, sct, sch, window_size, K, KP, V, VP, C, CP, HAS_WINDOW,
                                          HAS_SCALAR, T_Q, DOT_F32, SHIFT, UNSHIFT)
            m_i, l_i, acc = softmax_step_two_tiles(s, values, s2, values2, m_i, l_i, acc, UNSHIFT)
        else:
            m_i, l_i, acc = softmax_step(s, m_i, l_i, acc, values, UNSHIFT)

    # Raw keys before the queries, [n_anchored, T0): anchored on the fly at the first query row T0.
    p_first = tl.load(p_curr + d_k * spd, mask=_padded_vec(d_k, K, KP), other=0.0)
    q_raw = q_rows * tl.exp2((p_rows - p_first[None, :]).to(tl.float32))
    raw_lo = tl.maximum(first, n_anchored // C)
    raw_hi = tl.where(n_anchored < T0, tl.minimum(last, tl.cdiv(T0, C)), raw_lo)
    for c in tl.range(raw_lo, raw_hi):
        key_pos = c * C + offs_c
        key_ok = (key_pos >= tl.maximum(key_lo, n_anchored)) & (key_pos < T0) & _padded_vec(offs_c, C, CP)
        # Absent keys get prefix +inf: their factor 2^(anchor - inf) is 0.
        p_keys = tl.load(p_tail + (key_pos - n_anchored)[:, None] * stt + d_k[None, :] * std,
                         mask=_padded(key_ok[:, None], d_k, K, KP), other=float('inf'))
        keys = tl.load(k_tilde + key_pos[:, None] * skt + d_k[None, :] * skd,
                       mask=_padded(key_ok[:, None], d_k, K, KP), other=0.0)
        values = tl.load(v + key_pos[:, None] * svt + d_v[None, :] * svd, mask=_padded(key_ok[:, None], d_v, V, VP),
                         other=0.0)
        keys_anchored = (keys.to(tl.float32) * tl.exp2((p_first[None, :] - p_keys).to(tl.float32))).to(keys.dtype)
        s = tl.dot(q_raw.to(keys.dtype), tl.trans(keys_anchored))
        m_i, l_i, acc = _fold_chunk(s, values, key_pos, key_ok, row_ok, row_pos, row_head, c_rows, m_i, l_i, acc,
                                    scalar, sct, sch, window_size, HAS_WINDOW, HAS_SCALAR, T_Q)

    # The query rows' own raw keys (those at or past n_anchored), causal among themselves: exact per-element decay,
    # owned by the last split.
    if i_s == n_splits - 1:
        k_ok = _padded_vec(d_k, K, KP)
        v_ok = _padded_vec(d_v, V, VP)
        for j in tl.static_range(T_Q):
            visible = row_ok & (row_t >= j) & (row_pos - row_t + j >= n_anchored)  # key T0 + j raw
            if HAS_WINDOW:
                visible = visible & (row_t - j < window_size)
            key = tl.load(k_tilde + (T0 + j) * skt + d_k * skd, mask=k_ok, other=0.0).to(tl.float32)
            value = tl.load(v + (T0 + j) * svt + d_v * svd, mask=v_ok, other=0.0).to(tl.float32)
            p_key = tl.load(p_curr + j * spt + d_k * spd, mask=k_ok, other=0.0)
            decay = tl.exp2(tl.where(visible[:, None], (p_rows - p_key[None, :]).to(tl.float32), float('-inf')))
            s = tl.sum(q_rows * key[None, :] * decay, 1)
            if HAS_SCALAR:
                c_key = tl.load(scalar + (T0 + j) * sct + row_head * sch, mask=visible, other=0.0)
                s += (c_rows - c_key).to(tl.float32) * LOG2E
            m_i, l_i, acc = softmax_step_one_key(tl.where(visible, s, float('-inf')), m_i, l_i, acc, value)

    # l_i == 0: no visible key in this split. A NaN sum (a cache that cannot be decoded) must stay NaN.
    has_keys = l_i != 0
    out = tl.where(has_keys[:, None], acc / tl.where(has_keys, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float('-inf'))
    part = (i_bg * n_splits + i_s) * T_Q * QPG
    tl.store(o_part + (part + rows[:, None]) * V + d_v[None, :], out, mask=_padded(row_ok[:, None], d_v, V, VP))
    tl.store(lse_part + part + rows, lse, mask=row_ok)  # value tiles store the same lse


@triton.jit
def wall_decode_combine_kernel(
    o_part, lse_part, sink_bias, o, lse, n_splits,
    HG: tl.constexpr, QPG: tl.constexpr, T_Q: tl.constexpr, HQ: tl.constexpr, V: tl.constexpr, VP: tl.constexpr,
    V_TILES: tl.constexpr, BLOCK_S: tl.constexpr, HAS_SINK: tl.constexpr,
):
    """Merge the splits' partial (output, log2-sum-exp) of one row; the sink adds exp(sink_bias) to the sum only."""
    i_r = tl.program_id(0)
    rows = T_Q * QPG
    i_bg, row = i_r // rows, i_r % rows
    i_b, i_h = i_bg // HG, (i_bg % HG) * QPG + row % QPG
    t = row // QPG
    offs_s = tl.arange(0, BLOCK_S)
    if V_TILES == 1:
        d_v = tl.arange(0, VP)
    else:
        d_v = tl.program_id(1) * VP + tl.arange(0, VP)
    v_ok = _padded_vec(d_v, V, VP)

    m_i = tl.full([], float('-inf'), dtype=tl.float32)
    l_i = tl.full([], 0.0, dtype=tl.float32)
    if HAS_SINK:
        m_i = tl.load(sink_bias + i_h).to(tl.float32) * LOG2E
        l_i = tl.full([], 1.0, dtype=tl.float32)
    acc = tl.zeros([VP], dtype=tl.float32)
    for s0 in tl.range(0, n_splits, BLOCK_S):
        split = s0 + offs_s
        ok = split < n_splits
        base = (i_bg * n_splits + split) * rows + row
        lse_s = tl.load(lse_part + base, mask=ok, other=float('-inf'))
        o_s = tl.load(o_part + base[:, None] * V + d_v[None, :], mask=_padded(ok[:, None], d_v, V, VP), other=0.0)
        m_i, l_i, acc = softmax_merge_step(lse_s, o_s, m_i, l_i, acc)
    out_row = (i_b * T_Q + t) * HQ + i_h
    tl.store(o + out_row * V + d_v, (acc / l_i).to(o.dtype.element_ty), mask=v_ok)
    tl.store(lse + out_row, (m_i + tl.log2(l_i)) * LN2)  # value tiles store the same lse
