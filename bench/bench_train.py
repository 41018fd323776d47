"""Training speed of config/long.py's model with Wall Attention against the RoPE baseline at the same shapes.

    python -m bench.bench_train --out bench/results_train.md       # one GPU; about 3 minutes on an H100
    python -m bench.bench_train --attention wall,rope,fox --steps 3
    python -m bench.bench_train --smoke                            # tiny shapes, any machine, seconds on a CPU

Each attention in turn: build the model from the config file, warm up (torch.compile, kernel autotuning), then
time whole optimizer steps (forward + backward of every micro-batch, gradient clipping, AdamW) between
synchronisations. Micro-batches are random tokens packed like training data: B = 1, `tokens_per_batch` tokens,
documents of mixed lengths up to `max_doc_len` (log-uniform from 64) with cu_seqlens, the same for every attention.
MFU counts model.flops (6 per parameter and token plus causal attention) against the GPU's bf16 peak.
"""
import argparse
import datetime
import math
import os
import statistics
import time
from dataclasses import fields

import torch

from configurator import apply_overrides
from data.prepare import replacing
from model import GPT, GPTConfig
import triton  # after model: on a CPU, kernels must set up triton's interpreter first

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ATTENTIONS = ('wall', 'rope', 'fox')
# The smoke test's shapes: every code path, tiny sizes.
SMOKE = ['--n_layer=2', '--n_embd=64', '--n_head=2', '--n_kv_head=1', '--tokens_per_batch=512', '--max_doc_len=160']


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', default=os.path.join(REPO, 'config', 'long.py'),
                        help='training config file: model shape, tokens_per_batch, max_doc_len, compile, dtype')
    parser.add_argument('--attention', default='wall,rope', help=f'comma-separated, from {",".join(ATTENTIONS)}')
    parser.add_argument('--micro_batches', type=int, default=2, help='micro-batches per optimizer step')
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps first (compilation, autotuning)')
    parser.add_argument('--steps', type=int, default=5, help='timed steps; the table shows their median')
    parser.add_argument('--vocab_size', type=int,
                        help="the tokenizer's: default 32768 as config/long.py's, 512 with --smoke")
    parser.add_argument('--out', help='also write the markdown table to this file')
    parser.add_argument('--profile', action='store_true',
                        help='after timing, profile two more steps and print the kernels that take the most time')
    parser.add_argument('--smoke', action='store_true', help='tiny shapes, no compile: a quick check on any machine')
    parser.add_argument('overrides', nargs='*', help='config overrides after the config file, e.g. --n_layer=6')
    args, unknown = parser.parse_known_args(argv)
    args.overrides += unknown  # --key=value config overrides look like options
    args.attention = args.attention.split(',')
    if args.vocab_size is None:
        args.vocab_size = 512 if args.smoke else 32768
    if not args.attention or not set(args.attention) <= set(ATTENTIONS):
        parser.error(f'--attention={",".join(args.attention)}: expected a comma-separated list of {ATTENTIONS}')
    for name in ('micro_batches', 'steps', 'vocab_size'):
        if getattr(args, name) < 1:
            parser.error(f'--{name}={getattr(args, name)}: expected a positive integer')
    if args.warmup < 0:
        parser.error(f'--warmup={args.warmup}: expected an integer >= 0')
    return args


def read_config(args):
    """The config file's model and batch keys, on top of GPTConfig's and train.py's defaults."""
    cuda = torch.cuda.is_available()
    config = {f.name: f.default for f in fields(GPTConfig) if f.name not in ('vocab_size', 'attention')}
    config |= {'tokens_per_batch': 65536, 'max_doc_len': 16384, 'compile': True,  # train.py's defaults
               'dtype': 'bfloat16' if cuda else 'float32'}
    apply_overrides([args.config], config, skip_unknown=True)  # its training-loop keys are not ours
    apply_overrides((SMOKE + ['--compile=False'] if args.smoke else []) + args.overrides, config)
    if config['dtype'] not in ('float32', 'bfloat16'):
        raise SystemExit(f"error: dtype={config['dtype']!r}, expected 'float32' or 'bfloat16'")
    return config


def random_batches(count, tokens, max_doc_len, vocab_size, seed=0):
    """`count` micro-batches (x, y, cu_seqlens, document lengths): random tokens, documents packed end to end."""
    rng = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        lengths = []
        while sum(lengths) < tokens:
            u = torch.rand((), generator=rng).item()
            n = round(math.exp(math.log(min(64, max_doc_len)) * (1 - u) + math.log(max_doc_len) * u))
            lengths.append(min(n, tokens - sum(lengths)))
        cu_seqlens = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
        x, y = torch.randint(0, vocab_size, (2, 1, tokens), generator=rng)
        batches.append((x, y, cu_seqlens, lengths))
    return batches


def sync(device):
    if device == 'cuda':
        torch.cuda.synchronize()


def bench(attention, config, args, device):
    """One row of the table, as a dict."""
    model_args = {f.name: config[f.name] for f in fields(GPTConfig) if f.name not in ('vocab_size', 'attention')}
    torch.manual_seed(0)
    model = GPT(GPTConfig(**model_args, attention=attention, vocab_size=args.vocab_size)).to(device)
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device)
    forward = torch.compile(model) if config['compile'] else model
    batches = random_batches(args.micro_batches, config['tokens_per_batch'], config['max_doc_len'], args.vocab_size)
    flops = sum(model.flops(lengths) for *_, lengths in batches)
    batches = [(x.to(device), y.to(device), cu.to(device)) for x, y, cu, _ in batches]
    for *_, cu_seqlens in batches:  # the number of documents varies: compile once for any, not once per count
        torch._dynamo.maybe_mark_dynamic(cu_seqlens, 0)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=config['dtype'] == 'bfloat16')

    def step():
        for x, y, cu_seqlens in batches:
            with autocast:
                _, loss = forward(x, y, cu_seqlens)
            (loss / len(batches)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync(device)
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    if args.profile:
        print_top_kernels(attention, step, device)
    dt = statistics.median(times)
    tokens = args.micro_batches * config['tokens_per_batch']
    return {'params': model.get_num_params(), 'tokens': tokens, 'ms': dt * 1e3, 'tokens_s': tokens / dt,
            'mfu': model.estimate_mfu(flops, dt), 'warmup_s': warmup_s,
            'memory': torch.cuda.max_memory_allocated() / 2 ** 30 if device == 'cuda' else None}


def print_top_kernels(attention, step, device, steps=2, top=24):
    from torch.profiler import ProfilerActivity, profile
    cuda = device == 'cuda'
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        sync(device)
    events = prof.key_averages()
    time_of = (lambda e: e.device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    print(f'{attention}: {"device" if cuda else "CPU"} time per step {sum(map(time_of, events)) / steps / 1e3:.1f} ms;'
          f' the {top} longest kernels (ms per step, calls per step):')
    for e in sorted(events, key=time_of, reverse=True)[:top]:
        print(f'{time_of(e) / steps / 1e3:9.2f} {e.count // steps:5d}  {e.key[:110]}')


def table(rows, baseline):
    lines = ['| attention | params | tokens/step | step ms | tokens/s | MFU | peak memory | warmup |',
             '|---|---|---|---|---|---|---|---|']
    for attention, row in rows.items():
        if isinstance(row, str):  # the reason it has no numbers
            lines.append(f'| {attention} | {row} | | | | | | |')
            continue
        ratio = f' ({row["ms"] / baseline["ms"]:.2f}x rope)' if baseline and attention != 'rope' else ''
        lines.append(f'| {attention} | {row["params"] / 1e6:.1f}M | {row["tokens"]:,} | {row["ms"]:.1f}{ratio} | '
                     f'{row["tokens_s"]:,.0f} | ' + ('-' if row['mfu'] is None else f'{row["mfu"] * 100:.1f}%') +
                     ' | ' + ('-' if row['memory'] is None else f'{row["memory"]:.1f} GiB') +
                     f' | {row["warmup_s"]:.0f} s |')
    return lines


def main(argv=None):
    args = parse_args(argv)
    config = read_config(args)
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    # as train.py sets them: fp32 matmuls use TF32 tensor cores. Wall's gate projections run in fp32 under autocast,
    # 2.8 TFLOP per 64k-token micro-batch of config/long.py, which without this ran on the CUDA cores
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    rows = {}
    for attention in args.attention:
        if device == 'cuda':
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        print(f'{attention}: warming up ({args.warmup} steps), then timing {args.steps}', flush=True)
        try:
            rows[attention] = bench(attention, config, args, device)
        except torch.cuda.OutOfMemoryError:
            rows[attention] = 'out of memory (try --activation_checkpointing=True)'
        print('\n'.join(table({attention: rows[attention]}, None)[2:]), flush=True)
        torch._dynamo.reset()  # each model compiles afresh, as in its own training run
    where = torch.cuda.get_device_name() if device == 'cuda' else f'CPU ({os.cpu_count()} cores)'
    shape = {k: config[k] for k in ('n_layer', 'n_embd', 'n_head', 'n_kv_head', 'window_pattern', 'tokens_per_batch',
                                    'max_doc_len', 'compile', 'dtype')}
    baseline = rows.get('rope') if isinstance(rows.get('rope'), dict) else None
    report = [f'# Training step: {os.path.relpath(args.config, REPO)}' + (' (smoke shapes)' if args.smoke else ''),
              '',
              f'{where}, torch {torch.__version__}, triton {triton.__version__}, '
              f'{datetime.date.today().isoformat()}. {args.micro_batches} micro-batches per step, median of '
              f'{args.steps} steps after {args.warmup} warm-up steps; vocab {args.vocab_size}; TF32 matmuls as in '
              f'train.py; {shape}.',
              ''] + table(rows, baseline)
    print('\n' + '\n'.join(report))
    if args.out:
        with replacing(args.out) as tmp, open(tmp, 'w') as f:
            f.write('\n'.join(report) + '\n')


if __name__ == '__main__':
    main()
