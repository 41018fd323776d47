"""Eager PyTorch Wall Attention: the oracle every kernel is tested against.

Computes SPEC section 1 literally: per visible pair (i, j),
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
