"""Decode step, side by side in one run: ours (both gate layouts), flash-linear-attention's Wall decode, torch SDPA
over a plain GQA cache.

    python -m bench.bench_decode --out bench/results_decode.md [--sweep] [--baseline DIR]

One new token against a cache of T tokens, HQ=16 H=4 K=V=128, cache chunk 64, bf16, random non-zero data.
Medians of triton.testing.do_bench after warm-up. GB/s counts the cache bytes each kernel must read (keys or
k_tilde, values, anchors); the device copy line is a read + write of 1 GiB, the memory ceiling. `--sweep` also
times our kernel over split counts, to tune the default. `--baseline DIR` also times the kernels of another
checkout's kernels/ folder (e.g. `git archive REV kernels | tar -x -C /tmp/base`, DIR=/tmp/base/kernels) on the same
caches, rows marked "baseline", for before/after tables from one run, and ours compiled without the exponent shift.
"""
import argparse
import datetime
import math

import torch
import torch.nn.functional as F
import triton

from bench.bench_attn import load_baseline
from kernels import WallKVCache, build_wall_kv_cache, decode, wall_attn_decode

try:
    from fla.ops.wall_attn import build_wall_kv_cache as fla_build_wall_kv_cache
    from fla.ops.wall_attn import parallel_wall_attn_decode as fla_wall_attn_decode
except ImportError:
    fla_wall_attn_decode = None

CASES = [dict(B=1, T=32768), dict(B=1, T=131072), dict(B=16, T=8192)]
HQ, H, K, C = 16, 4, 128, 64


def nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def time_us(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode='median') * 1e3


def graph_time_us(fn):
    """The step replayed from a CUDA graph: no Python or launch overhead, as in a graph-captured decode loop."""
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode='median') * 1e3
    except Exception as e:  # a kernel that synchronises with the host cannot be captured
        print(f'  (not capturable: {type(e).__name__}: {str(e).splitlines()[0][:100]})')
        return float('nan')


def copy_bandwidth():
    src = torch.randn(1 << 28, device='cuda')
    dst = torch.empty_like(src)
    return 2 * nbytes(src) / (time_us(lambda: dst.copy_(src)) * 1e-6) / 1e9


def with_launch(fn, num_warps, num_stages, chunks_per_step):
    """fn run with the decode kernel launched as num_warps warps and num_stages pipeline stages, folding
    chunks_per_step anchored chunks per loop iteration."""
    def run():
        saved = decode.NUM_WARPS, decode.NUM_STAGES, decode.CHUNKS_PER_STEP
        decode.NUM_WARPS, decode.NUM_STAGES, decode.CHUNKS_PER_STEP = num_warps, num_stages, chunks_per_step
        try:
            return fn()
        finally:
            decode.NUM_WARPS, decode.NUM_STAGES, decode.CHUNKS_PER_STEP = saved
    return run


def without_shift(fn):
    """fn run with the decode kernel compiled without its exponent shift (decode.EXPONENT_SHIFT = 0): what the shift
    costs."""
    def run():
        saved, decode.EXPONENT_SHIFT = decode.EXPONENT_SHIFT, 0
        try:
            return fn()
        finally:
            decode.EXPONENT_SHIFT = saved
    return run


def candidates(B, T, split_counts=(), launches=(), baseline=None):
    """Yield (name, step function, cache bytes read)."""
    bf16 = dict(device='cuda', dtype=torch.bfloat16)
    q = torch.randn(B, 1, HQ, K, **bf16)
    k, v = torch.randn(B, T, H, K, **bf16), torch.randn(B, T, H, K, **bf16)
    scale = K ** -0.5
    for layout, HG in (('gate per query head', HQ), ('gate per kv head', H)):
        P = torch.cumsum(F.logsigmoid(4 + torch.randn(B, T, HG, K, device='cuda')), dim=1) / math.log(2)
        k_tilde, r_cache = build_wall_kv_cache(k, P, C)
        p_curr = P[:, -1:]
        read = nbytes(k_tilde, v, r_cache)
        yield f'ours ({layout})', lambda: wall_attn_decode(q, v, p_curr, k_tilde, r_cache, scale=scale), read
        if baseline is not None:  # the same cache: built over exactly these positions, both read it alike
            yield f'baseline ({layout})', lambda: baseline.wall_attn_decode(
                q, v, p_curr, k_tilde, r_cache, scale=scale), read
            yield f'ours ({layout}), no exponent shift', without_shift(
                lambda: wall_attn_decode(q, v, p_curr, k_tilde, r_cache, scale=scale)), read
        for n in split_counts:
            yield f'ours ({layout}), {n} splits', lambda n=n: wall_attn_decode(
                q, v, p_curr, k_tilde, r_cache, scale=scale, num_splits=n), read
        for w, s, n in launches:
            yield f'ours ({layout}), {w} warps, {s} stages, {n} chunks per step', with_launch(
                lambda: wall_attn_decode(q, v, p_curr, k_tilde, r_cache, scale=scale), w, s, n), read
        if HG == HQ and fla_wall_attn_decode is not None:
            fla_k_tilde, fla_r_cache = fla_build_wall_kv_cache(k, P, C)
            yield 'fla Wall decode', lambda: fla_wall_attn_decode(
                q, v, p_curr, fla_k_tilde, fla_r_cache, None, scale, C), nbytes(fla_k_tilde, v, fla_r_cache)
        del P, k_tilde, r_cache
    cache = WallKVCache(B, T, HQ, H, K, shared_gate=True, device='cuda')
    g = F.logsigmoid(4 + torch.randn(B, T, H, K, device='cuda'))
    cache.append(k[:, :-1], v[:, :-1], g[:, :-1])
    cache.append(k[:, -1:], v[:, -1:], g[:, -1:])  # closes every whole chunk: the streaming steady state
    yield 'ours, WallKVCache (gate per kv head, float64 anchors)', lambda: cache.attend(q, scale=scale), \
        nbytes(cache.k_tilde[:, :T], cache.v[:, :T], cache.anchors)
    if baseline is not None:
        base_cache = baseline.WallKVCache(B, T, HQ, H, K, shared_gate=True, device='cuda')
        base_cache.append(k[:, :-1], v[:, :-1], g[:, :-1])
        base_cache.append(k[:, -1:], v[:, -1:], g[:, -1:])
        yield 'baseline, WallKVCache (gate per kv head, float64 anchors)', \
            lambda: base_cache.attend(q, scale=scale), nbytes(cache.k_tilde[:, :T], cache.v[:, :T], cache.anchors)
        del base_cache
    del cache, g
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    yield 'torch SDPA, plain GQA cache (no decay)', lambda: F.scaled_dot_product_attention(
        qt, kt, vt, enable_gqa=True), nbytes(k, v)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default='bench/results_decode.md')
    parser.add_argument('--sweep', action='store_true', help='also time our kernel over split counts and launch shapes')
    parser.add_argument('--baseline', metavar='DIR', help="another checkout's kernels/ folder, timed alongside")
    args = parser.parse_args()
    baseline = load_baseline(args.baseline) if args.baseline else None
    name = torch.cuda.get_device_name()
    copy = copy_bandwidth()
    lines = [f'# Wall decode step, {name}, {datetime.date.today()}', '',
             f'HQ={HQ} H={H} K=V={K}, cache chunk {C}, bf16, one new token; torch {torch.__version__}, '
             f'triton {triton.__version__}. Device copy (read + write): {copy:.0f} GB/s.', '',
             'Time: eager launches (Python included); graph: replayed from a CUDA graph. GB/s from the graph time.',
             '',
             '| batch, cached tokens | kernel | time (us) | graph (us) | cache read (MiB) | GB/s |',
             '|---|---|---|---|---|---|']
    for case in CASES:
        sweep = (32, 64, 128, 256, 512) if args.sweep and case['B'] == 1 else (2, 4, 8, 16, 32) if args.sweep else ()
        launches = ((4, 2, 2), (4, 3, 2), (4, 2, 1), (4, 1, 2), (8, 2, 2)) if args.sweep else ()
        for kernel, fn, read in candidates(**case, split_counts=sweep, launches=launches, baseline=baseline):
            fn()  # compile outside the timing
            t, tg = time_us(fn), graph_time_us(fn)
            row = (f"| B={case['B']}, {case['T']} | {kernel} | {t:.0f} | {tg:.0f} | {read / 2**20:.0f} | "
                   f"{read / tg / 1e3:.0f} |")
            print(row, flush=True)
            lines.append(row)
        torch.cuda.empty_cache()
    with open(args.out, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
