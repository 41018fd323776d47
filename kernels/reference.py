"""Eager PyTorch Wall Attention: the oracle every kernel is tested against, and the decode path on CPUs.

Computes docs/operator.md ("What is computed") literally: per visible pair (i, j),
    logit = scale * sum_d q[i,d] k[j,d] exp(L[i,d] - L[j,d]) + (C[i] - C[j]),   L = cumsum(g), C = cumsum(g_scalar)
with the prefix sums restarting at every document. It works in the promoted dtype of its inputs
(pass float64 tensors for a float64 oracle), differentiates through autograd, and never holds
more than a `[rows, keys, heads, dim]` slab of about 2**24 elements: each slab of query rows is
checkpointed, so backward recomputes it instead of storing `[T, T, K]`.
"""
import torch
from torch.utils.checkpoint import checkpoint

SLAB_ELEMENTS = 1 << 24


def wall_attn_reference(q, k, v, g, *, scale=None, g_scalar=None, sink_bias=None, window_size=None,
                        cu_seqlens=None):
    B, T, HQ, K = q.shape
    H, HG = k.shape[2], g.shape[2]
    scale = K ** -0.5 if scale is None else scale
    dtype = torch.promote_types(q.dtype, torch.float32)
    if cu_seqlens is None:
        documents = [(b, 0, T) for b in range(B)]
    else:
        bounds = cu_seqlens.tolist()
        documents = [(0, s, e) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    o = torch.empty(B, T, HQ, v.shape[-1], dtype=dtype, device=q.device)
    for b, s, e in documents:
        expand = lambda x, heads: x[b, s:e].to(dtype).repeat_interleave(HQ // heads, dim=1)
        o[b, s:e] = _document(
            expand(q, HQ), expand(k, H), expand(v, H), torch.cumsum(expand(g, HG), dim=0),
            None if g_scalar is None else torch.cumsum(g_scalar[b, s:e].to(dtype), dim=0),
            None if sink_bias is None else sink_bias.to(dtype), scale, window_size)
    return o.to(q.dtype)


def _document(q, k, v, L, C, sink_bias, scale, window_size):
    """One document: q, k, v, L of shape [T, HQ, *]; C [T, HQ] or None."""
    T, HQ, K = q.shape
    rows = max(1, SLAB_ELEMENTS // (T * HQ * K))
    out = []
    for a in range(0, T, rows):
        b = min(a + rows, T)
        lo = 0 if window_size is None else max(0, a - window_size + 1)
        args = (q[a:b], k[lo:b], v[lo:b], L[a:b], L[lo:b],
                None if C is None else C[a:b], None if C is None else C[lo:b], sink_bias)
        out.append(checkpoint(_slab, a, lo, scale, window_size, *args, use_reentrant=False))
    return torch.cat(out)


def _slab(a, lo, scale, window_size, q, k, v, Lq, Lk, Cq, Ck, sink_bias):
    i = torch.arange(a, a + q.shape[0], device=q.device)[:, None]
    j = torch.arange(lo, lo + k.shape[0], device=q.device)[None, :]
    visible = j <= i
    if window_size is not None:
        visible &= (i - j) < window_size
    # Invisible pairs can have L[i] - L[j] > 0 and overflow: give them exp(-inf) = 0 instead.
    decay = torch.exp((Lq[:, None] - Lk[None, :]).masked_fill(~visible[..., None, None], float('-inf')))
    logits = scale * torch.einsum('ijhd,ihd,jhd->hij', decay, q, k)
    if Cq is not None:
        logits = logits + (Cq.T[:, :, None] - Ck.T[:, None, :])
    logits = logits.masked_fill(~visible, float('-inf'))
    if sink_bias is not None:
        sink = sink_bias[:, None, None].expand(-1, logits.shape[1], 1)
        weights = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
    else:
        weights = torch.softmax(logits, dim=-1)
    return torch.einsum('hij,jhd->ihd', weights, v)


def wall_attn_decode_reference(q, v, p_curr, k_tilde, r_cache, sink_bias=None, scale=None, cache_chunk_size=64, *,
                               raw_tail=None, p_tail=None, g_scalar_cumsum=None, window_size=None):
    """`kernels.wall_attn_decode` in eager PyTorch, same arguments, cache conventions and NaN rows (see
    kernels/decode.py), computed in float64 for every (query row, cached key) pair at once: fast on a CPU, where the
    Triton kernel runs in the interpreter. Returns `(o [B, T_q, HQ, V] in q's dtype, lse [B, T_q, HQ] float32,
    natural log, sink included)`."""
    from . import decode
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
    factor = (q_groups.abs() * scale * decode.LOG2E)[:, :, None] * shifted
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
