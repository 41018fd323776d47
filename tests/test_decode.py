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
                            sink_bias=sink, cache_chunk_size=C, raw_tail=T_q - 1, num_splits=2)
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
        decode(cache_chunk_size=257)
    with pytest.raises(ValueError, match='raw_tail'):
        decode(raw_tail=T + 1)
    with pytest.raises(ValueError, match='p_tail'):
        decode(raw_tail=3)  # two raw positions before the query need their prefixes
    with pytest.raises(ValueError, match='p_tail'):
        decode(p_tail=P[:, :T])
    cache = new_cache(x, T)
    append(cache, x, 0, T)
    with pytest.raises(ValueError, match='max_len'):
        append(cache, x, 0, 1)
    with pytest.raises(ValueError, match='g must have shape'):
        cache.append(x['k'][:, :1].float(), x['v'][:, :1].float(), x['g'][:, :2])


def seed_cache(k, P, chunk_size):
    """The seed's cache by its own formula: chunk c anchored on its FIRST position, R_c = P[c * C] and
    k_tilde = k * 2^(R_c - P), in float64, stored in fp32. Appending a token never changes earlier entries, so the
    cache after t tokens is the first t positions of this one."""
    T, HG, H = k.shape[1], P.shape[2], k.shape[2]
    r_cache = P[:, ::chunk_size]
    chunk = torch.arange(T, device=k.device) // chunk_size
    k_tilde = k.double().repeat_interleave(HG // H, dim=2) * torch.exp2(r_cache[:, chunk].double() - P.double())
    return k_tilde.float(), r_cache


def decode_prefix(x, k_tilde, r_cache, n, T_q=1, window_size=None, impl=wall_attn_decode, **kw):
    """Decode rows n - T_q .. n - 1 against the first n positions of a cache (a prefix of it is a cache)."""
    sink, gs = x['sink_bias'], x['g_scalar']
    P = prefix(x['g'])
    return impl(x['q'][:, n - T_q:n].float(), x['v'][:, :n].float(), P[:, n - T_q:n], k_tilde[:, :n],
                r_cache[:, :-(-n // C)], sink_bias=None if sink is None else sink.float(), cache_chunk_size=C,
                g_scalar_cumsum=None if gs is None else torch.cumsum(gs, dim=1)[:, :n], window_size=window_size,
                **kw)


OPTIONS = {'per-query-head-gate-gqa-sink-window': (False, dict(sink=True), 21),
           'shared-gate-gqa-scalar': (True, dict(scalar_gate=True), None)}


def option_case(options, T):
    """(inputs, the oracle's output, window_size) of one OPTIONS case over T positions."""
    shared_gate, inputs, window_size = OPTIONS[options]
    x = make_inputs(1, T, 4, 2, shared_gate=shared_gate, **inputs)
    return x, reference(x, window_size), window_size


@pytest.mark.parametrize('options', OPTIONS)
def test_prefix_slices_of_a_built_cache(options):
    """A cache built once over T positions, cut to its first n: at every offset inside a chunk, one and three rows."""
    x, expected, window_size = option_case(options, 2 * C + 3)
    k_tilde, r_cache = build_wall_kv_cache(x['k'].float(), prefix(x['g']), C)
    for n in range(C + 1, 2 * C + 1):
        o, _ = decode_prefix(x, k_tilde, r_cache, n, window_size=window_size)
        torch.testing.assert_close(o.double(), expected[:, n - 1:n], **TOL)
    for n in (C + 2, 2 * C - 5):
        for impl in (wall_attn_decode, wall_attn_decode_reference):
            o, _ = decode_prefix(x, k_tilde, r_cache, n, T_q=3, window_size=window_size, impl=impl)
            torch.testing.assert_close(o.double(), expected[:, n - 3:n], **TOL)


@pytest.mark.parametrize('options', OPTIONS)
def test_seed_convention_cache_appended_token_by_token(options):
    """Chunk-start anchors, as the seed's streaming loop builds them: every step from the first token on."""
    T = 2 * C + 5
    x, expected, window_size = option_case(options, T)
    k_tilde, r_cache = seed_cache(x['k'], prefix(x['g']), C)
    for n in range(1, T + 1):
        o, _ = decode_prefix(x, k_tilde, r_cache, n, window_size=window_size)
        torch.testing.assert_close(o.double(), expected[:, n - 1:n], **TOL)
    for impl in (wall_attn_decode, wall_attn_decode_reference):  # several rows, all anchored
        o, _ = decode_prefix(x, k_tilde, r_cache, T, T_q=4, window_size=window_size, impl=impl)
        torch.testing.assert_close(o.double(), expected[:, -4:], **TOL)


def assert_exact_or_nan(o, expected):
    """Each row either matches the oracle or is NaN throughout: never a plausible wrong number."""
    nan_rows = torch.isnan(o).all(-1)
    assert (torch.isnan(o).any(-1) == nan_rows).all()
    torch.testing.assert_close(o.double()[~nan_rows], expected[~nan_rows], **TOL)
    return nan_rows


def test_caches_that_cannot_be_decoded_give_nan_rows():
    """Strong gates (-3 to -20 nats per step): the seed's chunk-start keys overflow fp32 within a chunk, and a
    built cache cut far before its chunk's end anchor has lost its keys to underflow. Both kernels say NaN."""
    T = 2 * C + 3
    x = make_inputs(1, T, 2, 1, gate='strong')
    expected = reference(x)
    P = prefix(x['g'])
    seed = seed_cache(x['k'], P, C)
    assert torch.isinf(seed[0]).any()
    built = build_wall_kv_cache(x['k'].float(), P, C)
    for cache, nan_seen in ((seed, []), (built, [])):
        for n in (C - 3, C + 5, 2 * C - 1, T):
            for impl in (wall_attn_decode, wall_attn_decode_reference):
                o, lse = decode_prefix(x, *cache, n, impl=impl)
                nan_rows = assert_exact_or_nan(o, expected[:, n - 1:n])
                assert (torch.isnan(lse) == nan_rows).all()
                nan_seen.append(nan_rows.any().item())
        assert any(nan_seen)
    # the whole built cache decodes its last row exactly, as every cache it builds over the visible positions
    o, _ = decode_prefix(x, *built, T)
    torch.testing.assert_close(o.double(), expected[:, -1:], **TOL)


@pytest.mark.parametrize('K, V, chunk', [(24, 24, 16), (48, 96, 48), (100, 100, 16), (256, 320, 16), (96, 512, 48)])
def test_head_dims_and_chunk_sizes(K, V, chunk):
    """Head dims and chunks that are not powers of two, and values split over two tiles, in both cache kinds."""
    T = 2 * chunk + 3
    x = make_inputs(1, T, 2, 1, K=K, V=V, shared_gate=True, gate='mixed', sink=True, scalar_gate=True)
    expected = reference(x, window_size=T - 5)
    P = prefix(x['g'])
    gs = torch.cumsum(x['g_scalar'], dim=1)
    for raw_tail in (0, chunk + 2):  # every position anchored; a raw tail that starts inside a chunk
        k_tilde, r_cache = build_wall_kv_cache(x['k'].float(), P, chunk, raw_tail=raw_tail)
        for impl in (wall_attn_decode, wall_attn_decode_reference):
            o, _ = impl(x['q'][:, -2:].float(), x['v'].float(), P[:, -2:], k_tilde, r_cache, x['sink_bias'].float(),
                        cache_chunk_size=chunk, raw_tail=raw_tail, p_tail=P[:, T - raw_tail:-2] if raw_tail else None,
                        g_scalar_cumsum=gs, window_size=T - 5)
            torch.testing.assert_close(o.double(), expected[:, -2:], **TOL)
    cache = WallKVCache(1, T, 2, 1, K, V, shared_gate=True, scalar_gate=True, chunk_size=chunk, dtype=torch.float32,
                        device=DEVICE, impl='triton')
    cache.append(x['k'][:, :-1].float(), x['v'][:, :-1].float(), x['g'][:, :-1], x['g_scalar'][:, :-1])
    cache.append_token(x['k'][:, -1:].float(), x['v'][:, -1:].float(), x['g'][:, -1:], x['g_scalar'][:, -1:])
    o, _ = cache.attend_token(x['q'][:, -1:].float(), sink_bias=x['sink_bias'].float(), window_size=T - 5)
    torch.testing.assert_close(o.double(), expected[:, -1:], **TOL)


@pytest.mark.parametrize('name', ['g', 'g_scalar'])
def test_positive_gates_raise_in_the_cache(name):
    x = make_inputs(1, 20, 2, 1, scalar_gate=True)
    x[name] = x[name].clone()
    x[name][0, 7, 0] = 0.75
    with pytest.raises(ValueError, match=rf'WallKVCache.append: `{name}` must be <= 0.*largest value is 0\.75'):
        append(new_cache(x, 20), x, 0, 20)


@pytest.mark.gpu
@pytest.mark.parametrize('K, V', [(48, 48), (100, 100), (256, 256), (128, 320), (128, 512)])
def test_head_dims_on_gpu(K, V):
    B, T, HQ, H = 2, 1500, 8, 2
    x = make_inputs(B, T, HQ, H, K, V, shared_gate=True, gate='mixed', scalar_gate=True, sink=True)
    expected = reference(x)[:, -1:]
    for chunk in (48, 64):
        cache = WallKVCache(B, T, HQ, H, K, V, shared_gate=True, scalar_gate=True, chunk_size=chunk,
                            dtype=torch.bfloat16, device=DEVICE)
        cache.append(x['k'][:, :-1].bfloat16(), x['v'][:, :-1].bfloat16(), x['g'][:, :-1], x['g_scalar'][:, :-1])
        cache.append(x['k'][:, -1:].bfloat16(), x['v'][:, -1:].bfloat16(), x['g'][:, -1:], x['g_scalar'][:, -1:])
        o, _ = cache.attend(x['q'][:, -1:].bfloat16(), sink_bias=x['sink_bias'].float())
        torch.testing.assert_close(o.double(), expected, atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float32])
def test_seed_convention_and_prefixes_on_gpu(dtype):
    """64-wide chunks, many splits: seed-convention caches and prefixes of a built one, every offset of a chunk."""
    B, T, HQ, H, K = 2, 2000, 8, 2, 128
    x = make_inputs(B, T, HQ, H, K, K, gate='moderate', sink=True)
    expected = reference(x)
    P = prefix(x['g'])
    tol = dict(atol=5e-2, rtol=5e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-3)
    for k_tilde, r_cache in (seed_cache(x['k'], P, 64), build_wall_kv_cache(x['k'].float(), P, 64)):
        for n in range(T - 64, T + 1, 7):
            o, _ = wall_attn_decode(x['q'][:, n - 1:n].to(dtype), x['v'][:, :n].to(dtype), P[:, n - 1:n],
                                    k_tilde[:, :n].to(dtype), r_cache[:, :-(-n // 64)],
                                    sink_bias=x['sink_bias'].float())
            torch.testing.assert_close(o.double(), expected[:, n - 1:n], **tol)


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
