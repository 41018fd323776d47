"""Training/prefill attention, side by side in one run: ours, flash-linear-attention's Wall and FoX, torch SDPA.

    python -m bench.bench_attn --out bench/results_attn.md [--baseline DIR]

Medians of triton.testing.do_bench on random bf16 inputs (never zeros). TFLOP/s count causal attention FLOPs
(forward 4 * T^2/2 * K per head and sequence, backward 2.5 x forward); "first call" is the first forward and
backward at a new shape, compile and autotune included. `--baseline DIR` also times the kernels of another
checkout's kernels/ folder (rows marked "baseline") for before/after tables from one run.
"""
import argparse
import datetime
import importlib.util
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton

from kernels import wall_attn

try:
    from fla.ops.forgetting_attn import parallel_forgetting_attn
    from fla.ops.wall_attn import parallel_wall_attn
except ImportError:
    parallel_wall_attn = parallel_forgetting_attn = None

SHAPES = {
    'B2 T8k H16': dict(B=2, T=8192, HQ=16, H=16, K=128),
    'B1 T16k GQA 16/4': dict(B=1, T=16384, HQ=16, H=4, K=128),
    'B1 T32k varlen': dict(B=1, T=32768, HQ=16, H=16, K=128,
                           docs=[9000, 700, 4096, 13000, 1, 2500, 3471]),
}


def make_inputs(B, T, HQ, H, K, docs=None, gate_heads=None):
    bf16 = dict(device='cuda', dtype=torch.bfloat16)
    q, k, v = torch.randn(B, T, HQ, K, **bf16), torch.randn(B, T, H, K, **bf16), torch.randn(B, T, H, K, **bf16)
    g = F.logsigmoid(4 + torch.randn(B, T, gate_heads or HQ, K, device='cuda'))
    g_scalar = F.logsigmoid(4 + torch.randn(B, T, HQ, device='cuda'))
    cu = None if docs is None else torch.tensor([0] + docs, device='cuda').cumsum(0).to(torch.int32)
    return q, k, v, g, g_scalar, cu


def load_baseline(path):
    """The kernels package in folder `path`, imported as `kernels_baseline` next to ours."""
    spec = importlib.util.spec_from_file_location('kernels_baseline', os.path.join(path, '__init__.py'),
                                                  submodule_search_locations=[path])
    module = importlib.util.module_from_spec(spec)
    sys.modules['kernels_baseline'] = module
    spec.loader.exec_module(module)
    return module


def candidates(shape, baseline=None):
    B, T, HQ, H, K, docs = (shape.get(n) for n in ('B', 'T', 'HQ', 'H', 'K', 'docs'))
    q, k, v, g, g_scalar, cu = make_inputs(B, T, HQ, H, K, docs)
    yield 'ours (gate per query head)', (q, k, v, g), lambda q, k, v, g: wall_attn(q, k, v, g, cu_seqlens=cu)
    if baseline is not None:
        yield 'baseline (gate per query head)', (q, k, v, g), \
            lambda q, k, v, g: baseline.wall_attn(q, k, v, g, cu_seqlens=cu)
    yield 'ours (gate per query head + scalar gate)', (q, k, v, g, g_scalar), \
        lambda q, k, v, g, gs: wall_attn(q, k, v, g, g_scalar=gs, cu_seqlens=cu)
    if H != HQ:
        g_kv = make_inputs(B, T, HQ, H, K, docs, gate_heads=H)[3]
        yield 'ours (gate per kv head)', (q, k, v, g_kv), lambda q, k, v, g: wall_attn(q, k, v, g, cu_seqlens=cu)
    if parallel_wall_attn is not None:
        yield 'fla Wall', (q, k, v, g), lambda q, k, v, g: parallel_wall_attn(q, k, v, g, cu_seqlens=cu)
        yield 'fla FoX (scalar decay)', (q, k, v, g_scalar), \
            lambda q, k, v, g: parallel_forgetting_attn(q, k, v, g, cu_seqlens=cu)
    if docs is None:
        yield 'torch SDPA (no decay)', (q, k, v), lambda q, k, v: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=H != HQ)


def causal_flops(shape):
    lengths = shape.get('docs') or [shape['T']] * shape['B']
    return sum(4 * n * (n + 1) / 2 * shape['K'] * shape['HQ'] for n in lengths)


def measure(fn, inputs):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*leaves)
    do = torch.randn_like(out)
    out.backward(do)
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    fwd = triton.testing.do_bench(lambda: fn(*leaves), warmup=50, rep=200, return_mode='median')
    fwd_bwd = triton.testing.do_bench(lambda: fn(*leaves).backward(do), warmup=50, rep=200,
                                      grad_to_none=leaves, return_mode='median')
    return fwd, fwd_bwd, first


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='bench/results_attn.md')
    parser.add_argument('--shapes', nargs='*', default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument('--skip', nargs='*', default=[], help='kernel names to leave out (substring match)')
    parser.add_argument('--baseline', metavar='DIR', help="another checkout's kernels/ folder, timed alongside")
    args = parser.parse_args()
    baseline = load_baseline(args.baseline) if args.baseline else None
    lines = [f'GPU: {torch.cuda.get_device_name()}; {datetime.date.today()}; torch {torch.__version__}, '
             f'triton {triton.__version__}', '',
             '| shape | kernel | forward ms (TFLOP/s) | fwd+bwd ms (TFLOP/s) | first call s |',
             '|---|---|---|---|---|']
    for name in args.shapes:
        shape = SHAPES[name]
        flops = causal_flops(shape)
        for kernel, inputs, fn in candidates(shape, baseline):
            if any(s in kernel for s in args.skip):
                continue
            try:
                fwd, fwd_bwd, first = measure(fn, inputs)
                row = (f'| {name} | {kernel} | {fwd:.2f} ({flops / fwd / 1e9:.0f}) | '
                       f'{fwd_bwd:.2f} ({3.5 * flops / fwd_bwd / 1e9:.0f}) | {first:.1f} |')
            except Exception as e:  # a peer that cannot run a shape is reported, not fatal
                row = f'| {name} | {kernel} | error: {type(e).__name__}: {str(e)[:80]} | | |'
            print(row, flush=True)
            lines.append(row)
            torch.cuda.empty_cache()
    table = '\n'.join(lines)
    with open(args.out, 'w') as f:
        f.write(table + '\n')
    print('\n' + table)


if __name__ == '__main__':
    main()
