"""Triton building blocks of the Wall Attention kernels (parallel.py, decode.py): constants, the operator's size
limits, row loads and stores, and the online softmax. Nothing here knows about the decay.

Vocabulary:
- A row is one token's vector of one head. The training kernels hold tensors contiguous as `[tokens, heads, dim]`
  (`H` heads of `D` channels); `rows` is a vector of token indices, `row_ok` says which of them exist, `head` picks
  the head. A tile is the `[len(rows), DP]` block of those rows, with `D` padded to the power of two `DP`
  (`padded_dim`): padding columns and missing rows load as 0 and are never stored.
- Logits are in log2 units (natural logits times LOG2E), so every exponential is an exp2. Of a softmax over keys:
  `m_i` the running row maximum, `l_i` the running sum of 2^(s - shift), `acc` the running output (unnormalised),
  `lse` = log2 of the final sum (per row), `delta` = rowsum(do * o), the backward's per-row correction.
- An online-softmax step folds one tile of logits (and its values) into (m_i, l_i, acc). `UNITS`: the logits are
  given in units of UNITS log2 (the decode kernel's exponent-shifted logits); 1.0 compiles no scaling.
"""
import math

import triton
import triton.language as tl

LOG2E = tl.constexpr(math.log2(math.e))  # natural logits to log2 units; host code reads LOG2E.value
LN2 = tl.constexpr(math.log(2))          # log2 units back to natural ones
# The operator's size limits (docs/operator.md, "Head dims"), the same for training and decode
MAX_HEAD_DIM, MAX_VALUE_DIM = 256, 512
MAX_VALUE_TILE = 256  # widest value tile one program holds; wider values take several tiles


def padded_dim(n):
    """The power of two >= n (and >= 16, tl.dot's smallest) that a dim is padded to inside the kernels."""
    return max(16, 1 << (n - 1).bit_length())


# ---------------------------------------------------------------------------------------------------------------
# rows of a contiguous [tokens, heads, dim] tensor

@triton.jit
def load_rows(ptr, rows, row_ok, head, H: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
    """Rows `rows` of head `head` of a contiguous [tokens, H, D] tensor, padded to DP columns with zeros."""
    cols = tl.arange(0, DP)
    offs = (rows.to(tl.int64)[:, None] * H + head) * D + cols[None, :]
    return tl.load(ptr + offs, mask=row_ok[:, None] & (cols[None, :] < D), other=0.0)


@triton.jit
def store_rows(ptr, x, rows, row_ok, head, H: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
    cols = tl.arange(0, DP)
    offs = (rows.to(tl.int64)[:, None] * H + head) * D + cols[None, :]
    tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < D))


@triton.jit
def add_to_rows(ptr, x, rows, row_ok, head, H: tl.constexpr):
    """Adds x to rows `rows` of head `head` of a contiguous [tokens, H] tensor."""
    offs = rows.to(tl.int64) * H + head
    tl.store(ptr + offs, tl.load(ptr + offs, mask=row_ok) + x, mask=row_ok)


@triton.jit
def load_row(ptr, row, head, H: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
    cols = tl.arange(0, DP)
    row64 = tl.zeros([DP], dtype=tl.int64) + row  # `row` may be a plain int (a loop variable)
    return tl.load(ptr + (row64 * H + head) * D + cols, mask=cols < D, other=0.0)


@triton.jit
def load_lse_and_delta(lse_ptr, delta_ptr, rows, row_ok, head, H: tl.constexpr):
    """lse and delta of rows `rows` of head `head` ([tokens, H] tensors). Missing rows get lse = +inf, so that their
    probabilities 2^(s - lse) are 0 whatever their logits, and delta = 0."""
    return (tl.load(lse_ptr + rows.to(tl.int64) * H + head, mask=row_ok, other=float('inf')),
            tl.load(delta_ptr + rows.to(tl.int64) * H + head, mask=row_ok, other=0.0))


# ---------------------------------------------------------------------------------------------------------------
# online softmax

@triton.jit
def raised_max(m_i, tile_max):
    """The running max after a tile whose row maxima are tile_max, the shift its exponentials take, and the factor
    2^(m_i - shift) that rescales the running sum and output."""
    m_new = tl.maximum(m_i, tile_max)
    # A row with nothing visible yet keeps max -inf: shift by 0 instead so no exp2 sees -inf - -inf.
    m_shift = tl.where(m_new == float('-inf'), 0.0, m_new)
    return m_new, m_shift, tl.exp2(m_i - m_shift)


@triton.jit
def _in_log2(x, UNITS: tl.constexpr):
    """x given in units of UNITS log2, in log2 units."""
    if UNITS == 1.0:
        return x
    else:
        return x * UNITS


@triton.jit
def softmax_step(s, m_i, l_i, acc, v, UNITS: tl.constexpr = 1.0):
    """One online-softmax step over a tile of logits s [rows, keys] (-inf where hidden) and its values v [keys, VP];
    fully masked rows stay at zero."""
    m_new, m_shift, alpha = raised_max(m_i, _in_log2(tl.max(s, 1), UNITS))
    p = tl.exp2(_in_log2(s, UNITS) - m_shift[:, None])
    return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)


@triton.jit
def softmax_step_two_tiles(s1, v1, s2, v2, m_i, l_i, acc, UNITS: tl.constexpr = 1.0):
    """softmax_step over two tiles at once: one max and one rescale of the output for both."""
    m_new, m_shift, alpha = raised_max(m_i, _in_log2(tl.maximum(tl.max(s1, 1), tl.max(s2, 1)), UNITS))
    p1 = tl.exp2(_in_log2(s1, UNITS) - m_shift[:, None])
    p2 = tl.exp2(_in_log2(s2, UNITS) - m_shift[:, None])
    acc = acc * alpha[:, None] + tl.dot(p1.to(v1.dtype), v1) + tl.dot(p2.to(v2.dtype), v2)
    return m_new, l_i * alpha + tl.sum(p1, 1) + tl.sum(p2, 1), acc


@triton.jit
def softmax_step_one_key(s, m_i, l_i, acc, value):
    """softmax_step for a single key: s [rows] its logits, value [VP] its value row (no dot)."""
    m_new, m_shift, alpha = raised_max(m_i, s)
    p = tl.exp2(s - m_shift)
    acc = acc * alpha[:, None] + p[:, None] * value[None, :]
    return m_new, l_i * alpha + p, acc


@triton.jit
def softmax_merge_step(lse_s, o_s, m_i, l_i, acc):
    """One online-softmax step of a single row over partial results instead of keys: the rows of o_s are outputs
    normalised over their own keys, lse_s their log2 sums (-inf where a part saw no key)."""
    m_new, m_shift, alpha = raised_max(m_i, tl.max(lse_s, 0))
    w = tl.exp2(lse_s - m_shift)
    acc = acc * alpha + tl.sum(w[:, None] * o_s, 0)
    return m_new, l_i * alpha + tl.sum(w, 0), acc
