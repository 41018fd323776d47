"""Registers and spills of the training kernels, compiled for an H100 (sm_90a) on any machine, no GPU needed.

    python -m bench.registers                        # every kernel at K=V=128, bf16, at its launch's config
    python -m bench.registers variant.py --ir out/   # a variant of kernels/parallel.py; also write each TTGIR
    python -m bench.registers --K 256 --V 128 --dtype fp32 --features --stages 1   # another launch
    PYTHONPATH=/tmp/triton36 python -m bench.registers      # with another Triton (e.g. the GPU machine's 3.6)

This reads ptxas's own report of each compile and the shared memory each kernel needs (an H100's and an H200's
limit: 232,448 bytes; a launch over it fails with OutOfResources), a check that costs no GPU time (whether a spill
costs time is for the GPU to say: bench/results_attn.md has cases where it does not). `--V` is one launch's value
tile (wall_attn splits wider values), `--features` turns on the scalar gate, window and sink. It loads
kernels/parallel.py without kernels/__init__.py (bench/kernel_files.py), so Triton compiles for the GPU instead of
running its CPU interpreter.
"""
import argparse
import contextlib
import io
import os
import re
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bench.kernel_files import load_kernel_file

os.environ['TRITON_DUMP_PTXAS_LOG'] = '1'
os.environ['TRITON_ALWAYS_COMPILE'] = '1'
parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
parser.add_argument('path', nargs='?', default=os.path.join(os.path.dirname(__file__), '..', 'kernels', 'parallel.py'))
parser.add_argument('--ir', metavar='DIR', help='also write each compile\'s TTGIR (layouts, shared-memory traffic)')
parser.add_argument('--K', type=int, default=128, help='query/key head dim')
parser.add_argument('--V', type=int, default=128, help='value head dim of one launch (at most MAX_VALUE_TILE)')
parser.add_argument('--dtype', default='bf16', choices=['bf16', 'fp16', 'fp32'], help="q, k, v's dtype")
parser.add_argument('--features', action='store_true', help="scalar gate, window and sink on (the launches' switches)")
parser.add_argument('--stages', type=int, help='num_stages for the forward, dq and dk/dv kernels instead of theirs')
parser.add_argument('--kernels', default='fwd,dq,dkv,diag_fwd,steep_bwd,intra_bwd', help='which (LAUNCH names)')
args = parser.parse_args()
chosen = args.kernels.split(',')
parallel = load_kernel_file(args.path, 'parallel')

# The shape every kernel compiles at, with the tunables the launches take from parallel.py, and None for the inputs
# that the switched-off features leave out (as the launches pass them); each kernel gets the constexprs it declares.
SHAPE = dict(HQ=16, H=16, HG=16, K=args.K, V=args.V, KP=parallel.padded_dim(args.K), VP=parallel.padded_dim(args.V),
             BLOCK=parallel.BLOCK, SUB=parallel.SUB, DK=parallel.DK, DKV_QUERY_ROWS=parallel.DKV_QUERY_ROWS,
             FAST_RANGE=parallel.FAST_RANGE[torch.bfloat16], HAS_GS=args.features, HAS_WINDOW=args.features,
             HAS_SINK=args.features)
if not args.features:
    SHAPE.update(Cl_ptr=None, Cs_ptr=None, sink_ptr=None)
POINTERS = {f'*{args.dtype}': ('q_ptr', 'kt_ptr', 'k_ptr', 'v_ptr', 'o_ptr', 'do_ptr', 'qh_ptr', 'kg_ptr', 'qg_ptr',
                              'qf_ptr', 'kf_ptr'),
            '*fp64': ('Pstart_ptr', 'Cs_ptr'), '*i32': ('blocks_ptr',)}
SCALARS = {'i32': ('WINDOW', 'num_blocks'), 'fp32': ('qk_scale', 'scale')}


def report(fn, constexprs, num_warps, num_stages):
    constexprs = {n: v for n, v in constexprs.items() if n in fn.arg_names}
    types = {name: kind for kind, names in {**POINTERS, **SCALARS}.items() for name in names}
    signature = {n: 'constexpr' if n in constexprs else types.get(n, '*fp32') for n in fn.arg_names}
    # as a launch specializes them: every tensor 16-byte aligned (torch's allocations are), so loads vectorize and
    # pipeline; without this the compile is a different, slower program
    aligned = {(i,): [['tt.divisibility', 16]] for i, n in enumerate(fn.arg_names) if signature[n].startswith('*')}
    src = ASTSource(fn, signature, constexprs={(fn.arg_names.index(n),): v for n, v in constexprs.items()},
                    attrs=aligned)
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(src, target=GPUTarget('cuda', 90, 32),
                                  options=dict(num_warps=num_warps, num_stages=num_stages))
    if args.ir:
        os.makedirs(args.ir, exist_ok=True)
        with open(os.path.join(args.ir, f'{fn.__name__}_{num_warps}x{num_stages}.ttgir'), 'w') as f:
            f.write(compiled.asm['ttgir'])
    seconds = time.perf_counter() - start
    regs = re.search(r'Used (\d+) registers', log.getvalue())
    spills = re.search(r'(\d+) bytes spill stores', log.getvalue())
    print(f'{fn.__name__:18s} {num_warps} warps x {num_stages} stages: {regs.group(1) if regs else "?"} registers, '
          f'{spills.group(1) if spills else 0} bytes of spill stores, {compiled.metadata.shared:,} bytes of shared '
          f'memory, compiled in {seconds:.0f} s')


print('triton', triton.__version__)
# the main kernels with their anchor-group sizes, then the diagonal kernels, each at its launch shape
for kernel, name in ((parallel._fwd_kernel, 'fwd'), (parallel._bwd_dq_kernel, 'dq'), (parallel._bwd_dkv_kernel, 'dkv'),
                     (parallel._diag_fwd_kernel, 'diag_fwd'), (parallel._steep_bwd_kernel, 'steep_bwd'),
                     (parallel._intra_bwd_kernel, 'intra_bwd')):
    if name in chosen:
        num_warps, num_stages = parallel.LAUNCH[name]
        main = name in parallel.GROUPS
        report(kernel, {**SHAPE, 'GROUP': parallel.GROUPS.get(name)}, num_warps,
               args.stages if main and args.stages else num_stages)
