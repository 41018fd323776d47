"""The decode cache of one Wall Attention layer: preallocated, appended in place, anchors fixed as chunks close.

Layout (see kernels/decode.py): positions [0, n_anchored) are whole chunks, each anchored on its decaying end, with
`k_tilde = k * 2^(anchor - P) <= |k|`; the positions after them keep raw keys in the same buffer until their chunk
is closed. A chunk is closed (rescaled in place, once) at the first append after it lies wholly before the newest
tokens, so queries never sit inside an anchored chunk and every exponent stays <= 0.

Precision does not decay with position: the running prefix, the anchors and the raw positions' prefixes are kept in
float64, differences of two prefixes are taken in float64 before any fp32 exp2, and stored keys are O(1).

Single-token steps (`append_token`, `attend_token`) do the same with every index on the device (`position`), so a
decode step can be captured once in a CUDA graph and replayed: the chunk a token completes is closed by arithmetic
that leaves the keys unchanged when it does not, and the raw prefixes of the open chunk sit at position % C.
"""
import math

import torch

from .domain import check_gates
from .decode import default_num_splits, wall_attn_decode, wall_attn_decode_at
from .reference import wall_attn_decode_reference


class WallKVCache:
    """Key/value cache of one layer for `B` sequences of at most `max_len` tokens.

    num_heads: query heads HQ; num_kv_heads: H; shared_gate: gate per kv head (`k_tilde` is `[B, max_len, H, K]`,
    exactly a plain GQA key cache) instead of per query head; scalar_gate: also track a FoX scalar gate;
    impl: 'triton' (the decode kernel), 'eager' (`wall_attn_decode_reference`) or 'auto' (Triton on a GPU).
    """

    def __init__(self, batch_size, max_len, num_heads, num_kv_heads, head_dim, value_dim=None, *,
                 shared_gate=False, scalar_gate=False, chunk_size=64, dtype=torch.bfloat16, device=None, impl='auto'):
        if impl not in ('auto', 'triton', 'eager'):
            raise ValueError(f"impl must be 'auto', 'triton' or 'eager', got {impl!r}")
        if num_heads % num_kv_heads:
            raise ValueError(f'num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}')
        B, K, V = batch_size, head_dim, value_dim or head_dim
        # 'auto': the Triton kernel on GPUs, the eager decode on CPUs (Triton's interpreter is far slower there)
        on_gpu = torch.device(device if device is not None else 'cpu').type == 'cuda'
        self.decode = wall_attn_decode if impl == 'triton' or (impl == 'auto' and on_gpu) else wall_attn_decode_reference
        self.max_len, self.chunk_size = max_len, chunk_size
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.num_gate_heads = num_kv_heads if shared_gate else num_heads
        HG = self.num_gate_heads
        self.k_tilde = torch.empty(B, max_len, HG, K, dtype=dtype, device=device)
        self.v = torch.empty(B, max_len, num_kv_heads, V, dtype=dtype, device=device)
        # at least one anchor: single-token steps index it even while no chunk can close
        self.anchors = torch.empty(B, max(1, max_len // chunk_size), HG, K, dtype=torch.float64, device=device)
        self.scalar_prefix = (torch.empty(B, max_len, num_heads, dtype=torch.float64, device=device)
                              if scalar_gate else None)
        # Prefixes of the raw positions [n_anchored, length); grows only if one append exceeds its capacity.
        self._raw_prefix = torch.empty(B, 2 * chunk_size, HG, K, dtype=torch.float64, device=device)
        self._last_prefix = torch.empty(B, HG, K, dtype=torch.float64, device=device)
        self._last_scalar = torch.empty(B, num_heads, dtype=torch.float64, device=device)
        # Single-token steps (append_token, attend_token) index everything by device tensors, so that a CUDA graph
        # of a decode step replays them unchanged: `position` mirrors `length`, `_query_position` is the last token's.
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self._query_position = torch.zeros(1, dtype=torch.long, device=device)
        self._chunk_rows = torch.arange(chunk_size, device=device)
        self._token_splits = default_num_splits(self.k_tilde.device, B * HG, max_len // chunk_size + 1,
                                                num_heads // HG)
        self.reset()

    def reset(self):
        """Forget every sequence; the buffers are reused."""
        self.length = self.n_anchored = 0
        self.position.zero_()
        self._last_prefix.zero_()
        self._last_scalar.zero_()

    def append(self, k, v, g, g_scalar=None):
        """Append T_new tokens: k `[B, T_new, H, K]`, v `[B, T_new, H, V]`, per-channel log-decay g
        `[B, T_new, HG, K]` (natural log, <= 0), and with a scalar gate g_scalar `[B, T_new, HQ]`."""
        T_new = self._check_append(k, v, g, g_scalar)
        check_gates('WallKVCache.append',
                    [('g', g.amax())] + ([] if g_scalar is None else [('g_scalar', g_scalar.amax())]))
        start, end = self.length, self.length + T_new
        B, HG = self.k_tilde.shape[0], self.num_gate_heads
        self._close_chunks_before(start)
        prefix = self._last_prefix[:, None] + torch.cumsum(g.to(torch.float64), dim=1) / math.log(2)
        self._last_prefix.copy_(prefix[:, -1])
        offset = start - self.n_anchored
        if offset + T_new > self._raw_prefix.shape[1]:
            grown = torch.empty(B, offset + T_new, HG, self._raw_prefix.shape[3],
                                dtype=torch.float64, device=self._raw_prefix.device)
            grown[:, :offset] = self._raw_prefix[:, :offset]
            self._raw_prefix = grown
        self._raw_prefix[:, offset:offset + T_new] = prefix
        self.k_tilde[:, start:end] = k.repeat_interleave(HG // self.num_kv_heads, dim=2)
        self.v[:, start:end] = v
        if self.scalar_prefix is not None:
            scalar = self._last_scalar[:, None] + torch.cumsum(g_scalar.to(torch.float64), dim=1)
            self._last_scalar.copy_(scalar[:, -1])
            self.scalar_prefix[:, start:end] = scalar
        self.length = end
        self.position.fill_(end)

    def append_token(self, k, v, g, g_scalar=None):
        """`append` of one token per sequence (T_new = 1) with every index on the device: the chunk that the token
        completes is closed by arithmetic that leaves the keys unchanged when it does not (no branch on the host).
        Its gates are not checked against the domain (g <= 0; `append` checks them): a CUDA graph replays this step."""
        if self._check_append(k, v, g, g_scalar) != 1:
            raise ValueError(f'append_token takes one token per sequence, got {k.shape[1]}')
        C, start = self.chunk_size, self.length
        # Host work only outside the steady state (after a multi-token append): afterwards the raw prefixes cover at
        # most the chunk of the previous token, from index 0.
        self._close_chunks_before((start - 1) // C * C if start else 0)
        pos = self.position
        closing = ((pos % C == 0) & (pos > 0)).view(1, 1, 1, 1)
        # a cache shorter than a chunk clamps rows to its end: the duplicates rewrite one unchanged row
        rows = ((pos - C).clamp(min=0) + self._chunk_rows).clamp(max=self.max_len - 1)
        chunk_prefix = self._raw_prefix[:, :C]
        anchor = chunk_prefix[:, -1:]
        keys = self.k_tilde.index_select(1, rows)
        rescale = torch.exp2(torch.where(closing, anchor - chunk_prefix, 0.0).float())
        self.k_tilde.index_copy_(1, rows, (keys.float() * rescale).to(keys.dtype))
        chunk = (pos - C).clamp(min=0) // C
        self.anchors.index_copy_(1, chunk, torch.where(closing, anchor, self.anchors.index_select(1, chunk)))

        prefix = self._last_prefix + g[:, 0].to(torch.float64) / math.log(2)
        self._last_prefix.copy_(prefix)
        self._raw_prefix.index_copy_(1, pos % C, prefix[:, None])
        self.k_tilde.index_copy_(1, pos, k.repeat_interleave(self.num_gate_heads // self.num_kv_heads, dim=2))
        self.v.index_copy_(1, pos, v)
        if self.scalar_prefix is not None:
            scalar = self._last_scalar + g_scalar[:, 0].to(torch.float64)
            self._last_scalar.copy_(scalar)
            self.scalar_prefix.index_copy_(1, pos, scalar[:, None])
        self._query_position.copy_(pos)
        pos += 1
        self.advance(1)

    def advance(self, n):
        """Move the host's view on by n single-token steps that ran on the device (a replayed CUDA graph)."""
        self.length += n
        self.n_anchored = (self.length - 1) // self.chunk_size * self.chunk_size

    def _check_append(self, k, v, g, g_scalar):
        B, HG = self.k_tilde.shape[0], self.num_gate_heads
        T_new = k.shape[1] if k.dim() == 4 else -1
        expected = {'k': (k, (B, T_new, self.num_kv_heads, self.k_tilde.shape[3])),
                    'v': (v, (B, T_new, self.num_kv_heads, self.v.shape[3])),
                    'g': (g, (B, T_new, HG, self.k_tilde.shape[3]))}
        if self.scalar_prefix is not None:
            expected['g_scalar'] = (g_scalar, (B, T_new, self.num_heads))
        elif g_scalar is not None:
            raise ValueError('g_scalar given but the cache was built with scalar_gate=False')
        for name, (x, shape) in expected.items():
            if not isinstance(x, torch.Tensor):
                raise TypeError(f'{name} must be a torch.Tensor, got {type(x).__name__}')
            if tuple(x.shape) != shape or T_new < 1:
                raise ValueError(f'{name} must have shape {list(shape)} (T_new >= 1 tokens), got {list(x.shape)}')
        if self.length + T_new > self.max_len:
            raise ValueError(f'appending {T_new} tokens to {self.length} cached exceeds max_len={self.max_len}')
        return T_new

    def attend(self, q, *, scale=None, sink_bias=None, window_size=None, num_splits=None):
        """Decode the last T_q cached positions (at most the tokens since the last closed chunk, which include the
        latest append): q `[B, T_q, HQ, K]` -> `(o [B, T_q, HQ, V], lse [B, T_q, HQ])`."""
        T_q = q.shape[1] if isinstance(q, torch.Tensor) and q.dim() == 4 else 0
        n_raw = self.length - self.n_anchored
        if not 1 <= T_q <= n_raw:
            raise ValueError(f'q must be [B, T_q, HQ, K] with 1 <= T_q <= {n_raw} (the positions appended since the '
                             f'last closed chunk), got {list(q.shape) if isinstance(q, torch.Tensor) else q!r}')
        n_tail = n_raw - T_q
        splits = {} if num_splits is None else {'num_splits': num_splits}
        return self.decode(
            q, self.v[:, :self.length], self._raw_prefix[:, n_tail:n_raw], self.k_tilde[:, :self.length],
            self.anchors[:, :self.n_anchored // self.chunk_size], sink_bias, scale, self.chunk_size,
            p_tail=self._raw_prefix[:, :n_tail],
            g_scalar_cumsum=None if self.scalar_prefix is None else self.scalar_prefix[:, :self.length],
            window_size=window_size, **splits)

    def attend_token(self, q, *, scale=None, sink_bias=None, window_size=None):
        """`attend` of the token that append_token appended, q `[B, 1, HQ, K]`; on the Triton path nothing in the
        launch depends on the position (the kernel reads it from the device), so a CUDA graph can replay it."""
        if self.decode is wall_attn_decode_reference:  # the CPU path: no graphs there
            return self.attend(q, scale=scale, sink_bias=sink_bias, window_size=window_size)
        return wall_attn_decode_at(q, self.v, self.k_tilde, self.anchors, self._raw_prefix, self._query_position,
                                   self._token_splits, sink_bias=sink_bias, scale=scale,
                                   cache_chunk_size=self.chunk_size, g_scalar_cumsum=self.scalar_prefix,
                                   window_size=window_size)

    def _close_chunks_before(self, position):
        """Anchor every whole chunk before `position` on its end and rescale its keys in place, once."""
        C = self.chunk_size
        end = position // C * C
        if end <= self.n_anchored:
            return
        n_closed = end - self.n_anchored
        prefix = self._raw_prefix[:, :n_closed].unflatten(1, (-1, C))
        anchor = prefix[:, :, -1]
        keys = self.k_tilde[:, self.n_anchored:end].unflatten(1, (-1, C))
        keys.copy_(keys.float() * torch.exp2((anchor[:, :, None] - prefix).float()))
        self.anchors[:, self.n_anchored // C:end // C] = anchor
        n_left = self.length - end
        self._raw_prefix[:, :n_left] = self._raw_prefix[:, n_closed:n_closed + n_left].clone()
        self.n_anchored = end
