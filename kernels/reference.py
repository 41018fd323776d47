"""Eager PyTorch Wall Attention: the oracle every kernel is tested against, and the training path on CPUs.

Computes docs/operator.md ("What is computed"): per visible pair (i, j),
    logit = scale * sum_d q[i,d] k[j,d] exp(L[i,d] - L[j,d]) + (C[i] - C[j]),   L = cumsum(g), C = cumsum(g_scalar)
with the prefix sums restarting at every document. It works in the promoted dtype of its inputs (pass float64
tensors for a float64 oracle) and differentiates through autograd.

Documents (the rows of the batch, or the pieces that cu_seqlens marks) are gathered into one zero-padded batch and
cut into blocks of `c` query rows. Each block is anchored on its first row s, and a key j before the block gets
its decay in two factors whose exponents are both <= 0 for any g <= 0:
    exp(L[i] - L[j]) = exp(L[i] - L[s]) * exp(L[s] - L[j])      (i >= s > j)
so those logits are one matmul of rescaled queries and per-block rescaled keys; the keys of the block itself get
the exact per-element decay ([c, c, K] per block). That is O(T^2 K) flops and O(T^2 K / c + T c K) memory
instead of a [T, T, K] decay tensor. Slabs of query blocks bound the memory; when there is more than one slab,
each is checkpointed, so backward recomputes it instead of storing it.

Where no channel of any document decays by more than dense_nats(dtype) from its first position to its last
(short documents: the soft bound caps a step at 0.86 nats), one anchor per document, its midpoint, does: the
rescaled queries and keys then stay inside the dtype's exponent range, and the logits are a single product with
no per-element decay at all, several times faster on a CPU and as exact. Only the pairs that the causal mask
removes can overflow there, and the mask replaces them before anything reads them.
"""
import math

import torch
from torch.utils.checkpoint import checkpoint

from .documents import layout_of

SLAB_ELEMENTS = 1 << 24


def dense_nats(dtype):
    """The most decay of a channel over one document that the one-anchor path takes: the rescaled factors reach
    exp(+-dense_nats / 2), 70% of the dtype's exponent range, so they stay normal numbers (124 nats in float32)."""
    return 1.4 * math.log(torch.finfo(dtype).max)


def block_size(T):
    """Query rows per block: about sqrt(T), which balances the exact diagonal (T c K elements) against the rescaled
    keys (T^2 K / c); a power of two between 8 and 64."""
    return max(8, min(64, 1 << round(math.log2(max(T, 1)) / 2)))


def wall_attn_reference(q, k, v, g, *, scale=None, g_scalar=None, sink_bias=None, window_size=None,
                        cu_seqlens=None, layout=None):
    """kernels.wall_attn's arguments and result (`layout`: kernels/documents.py), without its input checks."""
    B, T, HQ, K = q.shape
    H, HG, V = k.shape[2], g.shape[2], v.shape[3]
    scale = K ** -0.5 if scale is None else scale
    dtype = torch.promote_types(q.dtype, torch.float32)
    if cu_seqlens is None:
        starts, lengths = [0] * B, [T] * B
    else:
        bounds = layout_of(cu_seqlens, layout).bounds  # without a layout, the device-to-host read of cu_seqlens
        starts, lengths = bounds[:-1], [e - s for s, e in zip(bounds[:-1], bounds[1:])]
        starts, lengths = [s for s, n in zip(starts, lengths) if n], [n for n in lengths if n]
    o = torch.zeros(B, T, HQ, V, dtype=dtype, device=q.device)  # positions in no document stay 0
    if not lengths:
        return o.to(q.dtype)
    c = block_size(max(lengths))
    T_pad = -(-max(lengths) // c) * c
    # [N, T_pad] positions of each document in the flattened [B * T] input; padding reads a zero row after the end
    if cu_seqlens is None:
        index = None
    else:
        offsets = torch.arange(T_pad, device=q.device)
        index = torch.tensor(starts, device=q.device)[:, None] + offsets
        index = torch.where(offsets < torch.tensor(lengths, device=q.device)[:, None], index, B * T)

    def documents(x, heads):  # [B, T, heads, d] -> [N, HQ, T_pad, d] in dtype, zero-padded, kv heads widened
        x = x.to(dtype)
        if index is None:
            x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, T_pad - T))
        else:
            x = torch.cat([x.flatten(0, 1), x.new_zeros(1, *x.shape[2:])])[index]
        return x.repeat_interleave(HQ // heads, dim=2).transpose(1, 2)

    # zero gates on padding keep the prefix flat there: padded rows and keys come after every real one
    L = torch.cumsum(documents(g, HG), dim=2)
    C = None if g_scalar is None else torch.cumsum(documents(g_scalar[..., None], HQ)[..., 0], dim=2)
    out = _attend(documents(q, HQ), documents(k, H), documents(v, H), L, C,
                  None if sink_bias is None else sink_bias.to(dtype), scale, window_size, c)
    out = out.transpose(1, 2)  # [N, T_pad, HQ, V]
    if index is None:
        return out[:, :T].to(q.dtype)
    real = index < B * T
    return o.flatten(0, 1).index_put((index[real],), out[real]).view(B, T, HQ, V).to(q.dtype)


def _attend(q, k, v, L, C, sink_bias, scale, window_size, c):
    """Documents of one padded batch: q, k, v, L [N, HQ, T, *] with T a multiple of c; C [N, HQ, T] or None."""
    N, HQ, T, K = q.shape
    if N * HQ * T * T <= SLAB_ELEMENTS:
        top, bottom = L.amax(2, keepdim=True), L.amin(2, keepdim=True)
        if (top - bottom).max() <= dense_nats(q.dtype):
            return _dense(q, k, v, L, (top + bottom) / 2, C, sink_bias, scale, window_size)
    span = T if window_size is None else min(T, window_size + 2 * c)  # keys a query block can see
    per_row = N * HQ * (span * K // c + 2 * c * K + span)  # rescaled keys, exact diagonal, logits
    rows = max(c, SLAB_ELEMENTS // per_row // c * c)
    out = []
    for a in range(0, T, rows):
        b = min(a + rows, T)
        lo = 0 if window_size is None else max(0, a - window_size + 1) // c * c  # whole key blocks
        args = (q[:, :, a:b], k[:, :, lo:b], v[:, :, lo:b], L[:, :, a:b], L[:, :, lo:b],
                None if C is None else C[:, :, a:b], None if C is None else C[:, :, lo:b], sink_bias)
        if rows >= T:  # one slab: autograd keeps what it needs, nothing is recomputed
            out.append(_slab(a, lo, c, scale, window_size, *args))
        else:
            out.append(checkpoint(_slab, a, lo, c, scale, window_size, *args, use_reentrant=False))
    return torch.cat(out, dim=2)


def _slab(a, lo, c, scale, window_size, q, k, v, Lq, Lk, Cq, Ck, sink_bias):
    """Query rows [a, a + R) against keys [lo, a + R), all [N, HQ, rows, *]; a, lo and R multiples of c."""
    N, HQ, R, K = q.shape
    S, nb, nk = k.shape[2], R // c, k.shape[2] // c
    qb, Lqb = q.unflatten(2, (nb, c)), Lq.unflatten(2, (nb, c))
    kb, Lkb = k.unflatten(2, (nk, c)), Lk.unflatten(2, (nk, c))
    # Query block I (first row s) and an earlier key block J (last row e): for i in I, j in J,
    #   exp(L[i] - L[j]) = exp(L[i] - L[s]) * exp(L[s] - L[e]) * exp(L[e] - L[j]),   every exponent <= 0.
    # The outer factors rescale each query and key once; the middle one is a K-vector per block pair.
    q_start, k_end = Lqb[:, :, :, :1], Lkb[:, :, :, -1:]
    q_scaled = qb * torch.exp(Lqb - q_start)
    k_scaled = kb * torch.exp(k_end - Lkb)
    earlier = (lo // c + torch.arange(nk, device=q.device)) < (a // c + torch.arange(nb, device=q.device))[:, None]
    # pairs that are not earlier (the exponent can be positive there and overflow) get exp(-inf) = 0
    middle = torch.exp((q_start - k_end.transpose(2, 3)).masked_fill(~earlier[:, :, None], float('-inf')))
    keys = (k_scaled[:, :, None] * middle[:, :, :, :, None]).flatten(3, 4)  # [N, HQ, nb, S, K], per query block
    logits = q_scaled @ keys.transpose(-1, -2)  # [N, HQ, nb, c, S]
    # The diagonal blocks exactly: exp(L[i] - L[j]) per element for j <= i in the block, 0 above the diagonal.
    kd, Lkd = kb[:, :, nk - nb:], Lkb[:, :, nk - nb:]
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    diag_exp = (Lqb[:, :, :, :, None] - Lkd[:, :, :, None]).masked_fill(~causal[:, :, None], float('-inf'))
    diag = ((qb[:, :, :, :, None] * torch.exp(diag_exp)) * kd[:, :, :, None]).sum(-1)  # [N, HQ, nb, c, c]
    diag = torch.diag_embed(diag.permute(0, 1, 3, 4, 2), dim1=2, dim2=4).flatten(4, 5)  # [N, HQ, nb, c, R]
    logits = scale * torch.cat([logits[..., :S - R], logits[..., S - R:] + diag], dim=-1).flatten(2, 3)
    return _weigh(logits, v, Cq, Ck, sink_bias, a, lo, window_size)


def _dense(q, k, v, L, anchor, C, sink_bias, scale, window_size):
    """_attend for documents whose every channel decays by at most dense_nats: one anchor each (anchor [N, HQ, 1,
    K]), the midpoint of its prefix sums."""
    q_scaled = (scale * q) * torch.exp(L - anchor)
    k_scaled = k * torch.exp(anchor - L)
    T = q.shape[2]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    # above the diagonal the products can overflow to inf or nan; the mask replaces them, and backward reads only
    # the finite factors, with zero gradients there
    logits = (q_scaled @ k_scaled.transpose(-1, -2)).masked_fill(~causal, float('-inf'))
    return _weigh(logits, v, C, C, sink_bias, 0, 0, window_size)


def _weigh(logits, v, Cq, Ck, sink_bias, a, lo, window_size):
    """Attention of query rows [a, a + R) over keys [lo, lo + S) from their decayed logits [N, HQ, R, S]: the scalar
    gate's term, the causal (and window) mask, the sink, softmax, and the weighted values [N, HQ, R, V]."""
    N, _, R, S = logits.shape
    if Cq is not None:
        logits = logits + (Cq[:, :, :, None] - Ck[:, :, None, :])
    i = torch.arange(a, a + R, device=logits.device)[:, None]
    j = torch.arange(lo, lo + S, device=logits.device)[None, :]
    visible = j <= i
    if window_size is not None:
        visible &= (i - j) < window_size
    logits = logits.masked_fill(~visible, float('-inf'))
    if sink_bias is not None:
        sink = sink_bias[None, :, None, None].expand(N, -1, R, 1)
        weights = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
    else:
        weights = torch.softmax(logits, dim=-1)
    return weights @ v


def wall_attn_decode_reference(q, v, p_curr, k_tilde, r_cache, sink_bias=None, scale=None, cache_chunk_size=64, *,
                               raw_tail=None, p_tail=None, g_scalar_cumsum=None, window_size=None):
    """`kernels.wall_attn_decode` in eager PyTorch, same arguments, cache conventions and NaN rows (see
    kernels/decode.py), computed in float64 for every (query row, cached key) pair at once: fast on a CPU, where the
    Triton kernel runs in the interpreter. Returns `(o [B, T_q, HQ, V] in q's dtype, lse [B, T_q, HQ] float32,
    natural log, sink included)`."""
    from . import decode
    from .triton_helpers import LOG2E
    B, T_q, HQ, K = q.shape
    T, H = v.shape[1], v.shape[2]
    HG = k_tilde.shape[2]
    n_tail = 0 if p_tail is None else p_tail.shape[1]
    if raw_tail is None:
        raw_tail = n_tail + T_q if p_tail is not None else 0
    n_anchored = T - raw_tail
    scale = K ** -0.5 if scale is None else scale
    f64 = torch.float64
    # The prefix each stored key is expressed against: its chunk's anchor, or its own prefix while it is raw.
    chunk = torch.arange(n_anchored, device=q.device) // cache_chunk_size
    raw_rows = p_curr.new_zeros(B, 0, HG, K, dtype=f64) if p_tail is None else p_tail.to(f64)
    key_prefix = torch.cat([r_cache[:, chunk].to(f64), raw_rows, p_curr.to(f64)[:, T_q - min(raw_tail, T_q):]],
                           dim=1)
    rows = torch.arange(T - T_q, T, device=q.device)[:, None]
    cols = torch.arange(T, device=q.device)[None, :]
    visible = cols <= rows
    if window_size is not None:
        visible &= rows - cols < window_size
    exponent = p_curr.to(f64)[:, :, None] - key_prefix[:, None]  # [B, T_q, T, HG, K], <= 0 where visible
    decay = torch.exp2(exponent.masked_fill(~visible[None, :, :, None, None], float('-inf')))
    q_groups = q.to(f64).unflatten(2, (HG, HQ // HG))
    logits = scale * torch.einsum('btgpk,bsgk,btsgk->btgps', q_groups, k_tilde.to(f64), decay).flatten(2, 3)
    # What the kernel cannot decode exactly is NaN here too: pairs whose shifted query factor overflows fp32 (a row
    # far before its chunk's anchor), and non-finite logits (keys that overflowed when the cache was built).
    shifted = torch.exp2(exponent + decode.EXPONENT_SHIFT)[..., None, :]
    factor = (q_groups.abs() * scale * LOG2E.value)[:, :, None] * shifted
    overflow = (factor.masked_fill(~visible[None, :, :, None, None, None], 0.0) > torch.finfo(torch.float32).max)
    logits = logits.masked_fill(overflow.any(-1).permute(0, 1, 3, 4, 2).flatten(2, 3), float('nan'))
    logits = logits.masked_fill(logits == float('-inf'), float('nan'))
    if g_scalar_cumsum is not None:
        C = g_scalar_cumsum.to(f64)
        logits = logits + (C[:, -T_q:, :, None] - C.transpose(1, 2)[:, None])
    logits = logits.masked_fill(~visible[None, :, None], float('-inf'))
    if sink_bias is not None:
        logits = torch.cat([logits, sink_bias.to(f64)[None, None, :, None].expand(B, T_q, HQ, 1)], dim=-1)
    lse = torch.logsumexp(logits, dim=-1)
    weights = torch.exp(logits - lse[..., None])[..., :T]
    o = torch.einsum('bthrs,bshv->bthrv', weights.unflatten(2, (H, HQ // H)), v.to(f64)).flatten(2, 3)
    return o.to(q.dtype), lse.float()
