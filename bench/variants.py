"""Time whole-file variants of kernels/parallel.py side by side, in one GPU call.

    python -m bench.variants kernels/parallel.py /tmp/variant_a.py /tmp/variant_b.py [--B 2 --T 8192 --H 16 --K 128]
                             [--gate_bias 4]   (gates logsigmoid(gate_bias + randn); -2 makes every block steep)

Each file is loaded as its own module (its own Triton kernels and autotune cache), next to the kernels package's
other files (bench/kernel_files.py), and runs `wall_attn` on the same random bf16 inputs: first call (compile +
autotune), forward and forward+backward medians of `triton.testing.do_bench`, each kernel's own time from the
profiler, and the relative difference of o, dq, dk, dv, dg from the first file's (a variant that changes results shows
here; the GPU tests are still what decides). A variant that fails to compile or run prints its error and the others
go on. The table is printed again at the end.
"""
import argparse
import time

import torch
import torch.nn.functional as F
import triton

from bench.kernel_files import load_kernel_file

parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
parser.add_argument('files', nargs='+')
for name, default in (('B', 2), ('T', 8192), ('H', 16), ('K', 128)):
    parser.add_argument(f'--{name}', type=int, default=default)
parser.add_argument('--gate_bias', type=float, default=4.0)
args = parser.parse_args()

torch.manual_seed(0)
bf16 = dict(device='cuda', dtype=torch.bfloat16)
q, k, v = (torch.randn(args.B, args.T, args.H, args.K, **bf16).requires_grad_() for _ in range(3))
g = F.logsigmoid(args.gate_bias + torch.randn(args.B, args.T, args.H, args.K, device='cuda')).requires_grad_()
do = torch.randn(args.B, args.T, args.H, args.K, **bf16)
leaves = (q, k, v, g)


def outputs(wall_attn):
    for x in leaves:
        x.grad = None
    o = wall_attn(q, k, v, g)
    o.backward(do)
    # a copy: g's grad is fp32 already, so .float() would return the tensor that later backward calls add into
    return [o.detach().float()] + [x.grad.float().clone() for x in leaves]


def kernel_times(wall_attn, repeats=3):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            wall_attn(q, k, v, g).backward(do)
        torch.cuda.synchronize()
    times = {e.key: e.self_device_time_total / repeats / 1000 for e in prof.key_averages()
             if e.self_device_time_total}
    return sorted(times.items(), key=lambda kv: -kv[1])


def measure(index, path, reference):
    module = load_kernel_file(path, f'variant{index}')
    start = time.time()
    result = outputs(module.wall_attn)
    torch.cuda.synchronize()
    first = time.time() - start
    reference = reference or result
    diffs = ' '.join(f'{((a - b).norm() / b.norm()).item():.0e}' for a, b in zip(result, reference))
    fwd = triton.testing.do_bench(lambda: module.wall_attn(q, k, v, g), warmup=50, rep=200, return_mode='median')
    fwd_bwd = triton.testing.do_bench(lambda: module.wall_attn(q, k, v, g).backward(do), warmup=50, rep=200,
                                      grad_to_none=list(leaves), return_mode='median')
    top = ', '.join(f'{name[:22]} {ms:.2f}' for name, ms in kernel_times(module.wall_attn)[:5])
    return (f'{path:32s} fwd {fwd:.3f} fwd+bwd {fwd_bwd:.3f} ms, first {first:.0f} s, diff (o dq dk dv dg) {diffs} '
            f'| {top}'), reference


rows, reference = [], None
print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__, flush=True)
for index, path in enumerate(args.files):
    try:
        row, reference = measure(index, path, reference)
    except Exception as e:  # a variant that does not compile must not cost the others their turn
        row = f'{path:32s} FAILED {type(e).__name__}: {str(e)[-300:]}'
    print(row, flush=True)
    rows.append(row)
print('\n'.join(rows))
