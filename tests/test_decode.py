"""Decoding against the pre-rescaled cache equals the training forward (the float64 oracle), row for row.

CPU runs go through Triton's interpreter: shapes are small and chunks 16 wide so a few dozen tokens cross several
chunk boundaries.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from kernels import WallKVCache, build_wall_kv_cache, wall_attn_decode, wall_attn_decode_reference, wall_attn_reference
from tests.conftest import DEVICE

C = 16
TOL = dict(atol=2e-5, rtol=1e-4)


def make_inputs(B, T, HQ, H, K=16, V=16, shared_gate=False, gate='moderate', scalar_gate=False, sink=False):
    """float64 tensors; gates per query head or per kv head."""
    HG = H if shared_gate else HQ
    q, k = torch.randn(B, T, HQ, K, dtype=torch.float64), torch.randn(B, T, H, K, dtype=torch.float64)
    v = torch.randn(B, T, H, V, dtype=torch.float64)
    if gate == 'moderate':
        g = F.logsigmoid(torch.randn(B, T, HG, K, dtype=torch.float64) + 2)
    elif gate == 'strong':  # -3 to -20 nats per step
        g = -3 - 17 * torch.rand(B, T, HG, K, dtype=torch.float64)
    else:  # 'mixed': ~0 and ~-10 nats per step side by side
        g = F.logsigmoid(3 * torch.randn(B, T, HG, K, dtype=torch.float64))
    inputs = dict(q=q, k=k, v=v, g=g)
    inputs['g_scalar'] = F.logsigmoid(torch.randn(B, T, HQ, dtype=torch.float64) + 2) if scalar_gate else None
    inputs['sink_bias'] = torch.randn(HQ, dtype=torch.float64) if sink else None
    return {name: None if x is None else x.to(DEVICE) for name, x in inputs.items()}


def prefix(g):
    return torch.cumsum(g, dim=1) / math.log(2)


def new_cache(x, max_len, dtype=torch.float32, impl='triton'):
    B, _, HQ, K = x['q'].shape
    H, V = x['v'].shape[2], x['v'].shape[3]
    return WallKVCache(B, max_len, HQ, H, K, V, shared_gate=x['g'].shape[2] == H != HQ,
                       scalar_gate=x['g_scalar'] is not None, chunk_size=C, dtype=dtype, device=DEVICE, impl=impl)


def append(cache, x, start, end):
    gs = x['g_scalar']
    cache.append(x['k'][:, start:end].float(), x['v'][:, start:end].float(), x['g'][:, start:end],
                 None if gs is None else gs[:, start:end])


def attend(cache, x, start, end, window_size=None, **kw):
    sink = x['sink_bias']
    return cache.attend(x['q'][:, start:end].float(), sink_bias=None if sink is None else sink.float(),
                        window_size=window_size, **kw)


def reference(x, window_size=None):
    return wall_attn_reference(x['q'], x['k'], x['v'], x['g'], g_scalar=x['g_scalar'], sink_bias=x['sink_bias'],
                               window_size=window_size)


def stream(x, start=0, window_size=None, cache=None, impl='triton', token_steps=False):
    """Append one token and decode it, for every position from `start` (a fresh cache is prefilled up to it);
    token_steps: through append_token and attend_token (device-side positions, what a CUDA graph replays)."""
    T = x['q'].shape[1]
    if cache is None:
        cache = new_cache(x, T, impl=impl)
        if start:
            append(cache, x, 0, start)
    outs = []
    for t in range(start, T):
        if token_steps:
            gs, sink = x['g_scalar'], x['sink_bias']
            cache.append_token(x['k'][:, t:t + 1].float(), x['v'][:, t:t + 1].float(), x['g'][:, t:t + 1],
                               None if gs is None else gs[:, t:t + 1])
            outs.append(cache.attend_token(x['q'][:, t:t + 1].float(), window_size=window_size,
                                           sink_bias=None if sink is None else sink.float())[0])
        else:
            append(cache, x, t, t + 1)
            outs.append(attend(cache, x, t, t + 1, window_size)[0])
    return torch.cat(outs, dim=1).double()


@pytest.mark.parametrize('shared_gate, options', [
    (False, dict(HQ=4, H=1, sink=True)),
    (True, dict(scalar_gate=True, window_size=21)),
    (True, dict(HQ=2, H=2, sink=True, scalar_gate=True)),
], ids=['per-query-head-gate-gqa-sink', 'shared-gate-gqa-scalar-window', 'mha-sink-scalar'])
def test_streaming_matches_training_forward(shared_gate, options):
    window_size = options.pop('window_size', None)
    heads = dict(HQ=options.pop('HQ', 4), H=options.pop('H', 2))
    x = make_inputs(1, 49, shared_gate=shared_gate, **heads, **options)
    torch.testing.assert_close(stream(x, window_size=window_size), reference(x, window_size), **TOL)


@pytest.mark.parametrize('start', [0, 23, 32])
@pytest.mark.parametrize('shared_gate', [False, True])
def test_token_steps_stream_like_the_training_forward(shared_gate, start):
    """Single-token steps with device-side positions, after prefills that end inside and at the end of a chunk."""
    x = make_inputs(1, 53, HQ=4, H=2, shared_gate=shared_gate, gate='mixed', sink=True, scalar_gate=True)
    expected = reference(x, window_size=21)[:, start:]
    torch.testing.assert_close(stream(x, start, window_size=21, token_steps=True), expected, **TOL)


@pytest.mark.parametrize('shared_gate', [False, True])
def test_eager_decode_streams_like_the_training_forward(shared_gate):
    """The CPU path (`impl='eager'`) on the same cache: across chunk boundaries, with every option at once."""
    x = make_inputs(1, 49, HQ=4, H=2, shared_gate=shared_gate, sink=True, scalar_gate=True)
    torch.testing.assert_close(stream(x, window_size=21, impl='eager'), reference(x, 21), **TOL)


def test_eager_decode_equals_the_kernel_on_several_query_rows():
    B, T, T_q = 2, 40, 19
    x = make_inputs(B, T, 4, 2, gate='mixed', sink=True, scalar_gate=True)
    P = prefix(x['g'])
    k_tilde, r_cache = build_wall_kv_cache(x['k'].float(), P, C, raw_tail=T - C)  # one anchored chunk
    args = (x['q'][:, -T_q:].float(), x['v'].float(), P[:, -T_q:], k_tilde, r_cache, x['sink_bias'].float())
    kw = dict(cache_chunk_size=C, p_tail=P[:, C:T - T_q], window_size=30,
              g_scalar_cumsum=torch.cumsum(x['g_scalar'], dim=1))
    o, lse = wall_attn_decode(*args, **kw)
    o_eager, lse_eager = wall_attn_decode_reference(*args, **kw)
    torch.testing.assert_close(o_eager, o, **TOL)
    torch.testing.assert_close(lse_eager, lse, **TOL)
    torch.testing.assert_close(o_eager.double(), reference(x, 30)[:, -T_q:], **TOL)


@pytest.mark.parametrize('shared_gate', [False, True])
def test_several_query_rows(shared_gate):
    """T_q > 1 (chunked prefill, speculative decoding): the same rows as the reference, via both APIs."""
    B, T, T_q = 2, 40, 19
    x = make_inputs(B, T, 2, 1, shared_gate=shared_gate, gate='mixed', sink=True)
    expected = reference(x)[:, -T_q:]
    sink = x['sink_bias'].float()
    k_tilde, r_cache = build_wall_kv_cache(x['k'].float(), prefix(x['g']), C, raw_tail=T_q - 1)
    o, _ = wall_attn_decode(x['q'][:, -T_q:].float(), x['v'].float(), prefix(x['g'])[:, -T_q:], k_tilde, r_cache,
                            sink_bias=sink, cache_chunk_size=C, num_splits=2)
    torch.testing.assert_close(o.double(), expected, **TOL)
    cache = new_cache(x, T)
    append(cache, x, 0, T - T_q)
    append(cache, x, T - T_q, T)
    torch.testing.assert_close(attend(cache, x, T - T_q, T)[0].double(), expected, **TOL)


def test_chunked_prefill_equals_single_prefill():
    T, half = 40, 20
    x = make_inputs(1, T, 4, 2, shared_gate=True, sink=True)
    single = new_cache(x, T)
    append(single, x, 0, T)
    o_single, lse_single = attend(single, x, T - 5, T)
    chunked = new_cache(x, T)
    append(chunked, x, 0, half)
    streamed = stream(x, start=half, cache=chunked)
    torch.testing.assert_close(streamed[:, -5:], o_single.double(), **TOL)
    torch.testing.assert_close(streamed, reference(x)[:, half:], **TOL)


@pytest.mark.parametrize('gate, shared_gate', [('strong', False), ('mixed', True)])
def test_strong_gates_stay_finite_and_exact(gate, shared_gate):
    """-3 to -20 nats per step decays a 16-token chunk by up to 320 nats: chunk-start anchors overflow fp32."""
    T = 36
    x = make_inputs(1, T, 2, 1, gate=gate, shared_gate=shared_gate)
    out = stream(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference(x), **TOL)
    k_tilde, r_cache = build_wall_kv_cache(x['k'].float(), prefix(x['g']), C)
    assert torch.isfinite(k_tilde).all()
    assert (k_tilde.abs() <= x['k'].float().repeat_interleave(k_tilde.shape[2], dim=2).abs()).all()
    o, _ = wall_attn_decode(x['q'][:, -1:].float(), x['v'].float(), prefix(x['g'])[:, -1:], k_tilde, r_cache,
                            cache_chunk_size=C)
    torch.testing.assert_close(o.double(), reference(x)[:, -1:], **TOL)


def test_position_shift_changes_outputs_only_at_rounding():
    """g at position 0 never matters: making it -3e4 shifts every prefix by a constant."""
    T = 36
    x = make_inputs(1, T, 4, 2, shared_gate=True)
    shifted = dict(x, g=x['g'].clone())
    shifted['g'][:, 0] = -3e4
    for run in (lambda x: stream(x, start=T - 3), lambda x: decode_last(x, prefix_dtype=torch.float64)):
        base, moved = run(x), run(shifted)
        assert ((moved - base).norm() / base.norm()).item() < 1e-5


def decode_last(x, prefix_dtype):
    P = prefix(x['g']).to(prefix_dtype)
    k_tilde, r_cache = build_wall_kv_cache(x['k'].float(), P, C)
    return wall_attn_decode(x['q'][:, -1:].float(), x['v'].float(), P[:, -1:], k_tilde, r_cache,
                            cache_chunk_size=C)[0].double()


def test_strided_views_at_batch_above_one():
    """The seed example passes q[:, -1:] and P[:, -1:]: strided views once B > 1."""
    x = make_inputs(3, 33, 4, 2, shared_gate=True)
    P = prefix(x['g']).float()
    k_tilde, r_cache = build_wall_kv_cache(x['k'].float(), P, C)
    q = x['q'].float()
    assert not q[:, -1:].is_contiguous()
    o, lse = wall_attn_decode(q[:, -1:], x['v'].float(), P[:, -1:], k_tilde, r_cache, cache_chunk_size=C)
    o_dense, lse_dense = wall_attn_decode(q[:, -1:].contiguous(), x['v'].float(), P[:, -1:].contiguous(),
                                          k_tilde, r_cache, cache_chunk_size=C)
    torch.testing.assert_close(o, o_dense)
    torch.testing.assert_close(lse, lse_dense)
    torch.testing.assert_close(o.double(), reference(x)[:, -1:], atol=1e-4, rtol=1e-3)


def test_cache_shapes():
    B, L, HQ, H, K, V = 2, 64, 8, 2, 16, 32
    shared = WallKVCache(B, L, HQ, H, K, V, shared_gate=True, chunk_size=C, device=DEVICE)
    per_head = WallKVCache(B, L, HQ, H, K, V, chunk_size=C, device=DEVICE)
    assert shared.k_tilde.shape == (B, L, H, K) and shared.v.shape == (B, L, H, V)  # a plain GQA cache
    assert per_head.k_tilde.shape == (B, L, HQ, K)
    assert shared.anchors.shape == (B, L // C, H, K) and shared.anchors.dtype == torch.float64


def test_reset_reuses_buffers():
    x = make_inputs(1, 20, 2, 1)
    cache = new_cache(x, 20)
    append(cache, x, 0, 20)
    buffer = cache.k_tilde.data_ptr()
    cache.reset()
    append(cache, x, 0, 20)
    assert cache.k_tilde.data_ptr() == buffer and cache.length == 20
    torch.testing.assert_close(attend(cache, x, 19, 20)[0].double(), reference(x)[:, -1:], **TOL)


def test_bad_inputs_raise_clear_errors():
    T = 33
    x = make_inputs(1, T, 4, 2)
    P = prefix(x['g']).float()
    k_tilde, r_cache = build_wall_kv_cache(x['k'].float(), P, C)
    q, v = x['q'][:, -1:].float(), x['v'].float()

    def decode(**changes):
        args = dict(q=q, v=v, p_curr=P[:, -1:], k_tilde=k_tilde, r_cache=r_cache, cache_chunk_size=C)
        return wall_attn_decode(**dict(args, **changes))

    with pytest.raises(ValueError, match='r_cache'):
        decode(r_cache=r_cache[:, :1])
    with pytest.raises(ValueError, match='k_tilde'):
        decode(k_tilde=k_tilde[:, :-1])
    with pytest.raises(ValueError, match='p_curr'):
        decode(p_curr=P[:, -2:])
    with pytest.raises(TypeError, match='p_curr'):
        decode(p_curr=P[:, -1:].half())
    with pytest.raises(ValueError, match='cache_chunk_size'):
        decode(cache_chunk_size=12)
    with pytest.raises(ValueError, match='p_tail'):
        decode(p_tail=P[:, :T])
    cache = new_cache(x, T)
    append(cache, x, 0, T)
    with pytest.raises(ValueError, match='max_len'):
        append(cache, x, 0, 1)
    with pytest.raises(ValueError, match='g must have shape'):
        cache.append(x['k'][:, :1].float(), x['v'][:, :1].float(), x['g'][:, :2])


@pytest.mark.gpu
@pytest.mark.parametrize('shared_gate', [False, True])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float32])
def test_long_cache_on_gpu(shared_gate, dtype):
    """Many splits over a few thousand positions, 64-wide chunks, head dims of the benchmark."""
    B, T, HQ, H, K, T_q = 2, 3000, 8, 2, 128, 3
    x = make_inputs(B, T, HQ, H, K, K, shared_gate=shared_gate, gate='mixed', scalar_gate=True, sink=True)
    expected = reference(x, window_size=2500)[:, -T_q:]
    cache = WallKVCache(B, T, HQ, H, K, shared_gate=shared_gate, scalar_gate=True, dtype=dtype, device=DEVICE)
    cache.append(x['k'][:, :-T_q].to(dtype), x['v'][:, :-T_q].to(dtype), x['g'][:, :-T_q], x['g_scalar'][:, :-T_q])
    cache.append(x['k'][:, -T_q:].to(dtype), x['v'][:, -T_q:].to(dtype), x['g'][:, -T_q:], x['g_scalar'][:, -T_q:])
    o, _ = cache.attend(x['q'][:, -T_q:].to(dtype), sink_bias=x['sink_bias'].float(), window_size=2500)
    tol = dict(atol=5e-2, rtol=5e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(o.double(), expected, **tol)
