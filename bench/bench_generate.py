"""Decode speed of the whole model at batch 1 after a long context: Wall Attention (both gate layouts) against the
RoPE baseline on a static KV cache over SDPA, same model shape.

    python -m bench.bench_generate --out bench/results_generate.md     # GPU: config/long.py's shape, 32k context
    python -m bench.bench_generate --smoke                             # CPU: a tiny model, to check the script

Random weights in bf16 (the gates in fp32, as sample.py runs them). Each layer's cache is filled to --context
tokens with random keys, values and gates (no prefill: it would time the training kernel's compilation), then the
model decodes greedily through generate.decode, the path sample.py takes (a CUDA graph of the step on a GPU): --warmup
steps to compile the decode kernels and capture the graph, then --steps timed steps, end to end (Python included)
with the device synchronised at both ends.
"""
import argparse
import datetime
import os
import time

import torch
import torch.nn.functional as F

# model imports kernels, which picks Triton's CPU interpreter when there is no GPU: before anything imports triton
from generate import APPEND_ROWS, KVCache, decode
from model import GPT, GPTConfig
import triton

CONFIG = 'config/long.py'
VOCAB_SIZE = 32768  # config/long.py's tokenizer (data/prepare.py --vocab_size=32768)
FALLBACK = dict(n_layer=12, n_embd=768, n_head=6, n_kv_head=6)  # its shape, should the file be gone
SMOKE = dict(n_layer=2, n_embd=32, n_head=2, n_kv_head=1)


def model_shape(smoke):
    """GPTConfig keys of config/long.py (when present and not --smoke)."""
    if smoke:
        return SMOKE
    if not os.path.exists(CONFIG):
        return FALLBACK
    namespace = {}
    with open(CONFIG) as f:
        exec(compile(f.read(), CONFIG, 'exec'), namespace)
    # the attention and gate layout are what this benchmark varies
    return {k: v for k, v in namespace.items()
            if k in GPTConfig.__dataclass_fields__ and k not in ('attention', 'gate_per_kv_head')}


def fill(cache, model, context, device):
    """Append `context` tokens of random keys, values and gates to every layer of cache."""
    config = model.config
    head_dim = config.n_embd // config.n_head
    dtype = model.lm_head.weight.dtype
    for layer in cache.layers:
        for start in range(0, context, APPEND_ROWS):
            n = min(APPEND_ROWS, context - start)
            k, v = (torch.randn(1, n, config.n_kv_head, head_dim, device=device, dtype=dtype) for _ in range(2))
            if config.attention == 'rope':
                layer.append(k, v)
                continue
            g = F.logsigmoid(4 + torch.randn(1, n, layer.num_gate_heads, head_dim, device=device))
            g_scalar = F.logsigmoid(4 + torch.randn(1, n, config.n_head, device=device)) if config.scalar_gate else None
            layer.append(k, v, g, g_scalar)


def cache_bytes(cache):
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in vars(layer).values()
               if isinstance(t, torch.Tensor) and t.is_floating_point())  # not the position bookkeeping


def bench(shape, attention, gate_per_kv_head, args, device):
    config = GPTConfig(**shape, vocab_size=97 if args.smoke else VOCAB_SIZE, attention=attention,
                       gate_per_kv_head=gate_per_kv_head)
    torch.manual_seed(0)
    model = GPT(config).to(device).to_inference_dtype(torch.float32 if args.smoke else torch.bfloat16).eval()
    cache = KVCache(model, 1, args.context + args.warmup + args.steps + 4 * args.profile + 1)
    fill(cache, model, args.context, device)
    logits, _ = model(torch.zeros(1, 1, dtype=torch.long, device=device), cache=cache)
    # one decode loop throughout: its first steps (eager, then the CUDA graph's capture) are the warm-up
    steps = decode(model, logits, cache, args.warmup + args.steps + 4 * args.profile, temperature=0,
                         cuda_graph=not args.eager)
    for _ in range(args.warmup):
        next(steps)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        next(steps)
    sync(device)
    seconds = time.perf_counter() - t0
    if args.profile:  # where a step's time goes: host (Python, launches) against device
        with torch.profiler.profile() as prof:
            for _ in steps:
                pass
            sync(device)
        print(f'{attention}{" (gate per kv head)" if gate_per_kv_head else ""}, 4 decode steps:')
        print(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=12, max_name_column_width=60))
    return args.steps / seconds, 1e3 * seconds / args.steps, cache_bytes(cache) / 2 ** 20


def sync(device):
    if device == 'cuda':
        torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', help='markdown file for the table (default bench/results_generate.md; smoke: none)')
    parser.add_argument('--context', type=int, help='cached tokens before decoding (default 32768; smoke 40)')
    parser.add_argument('--warmup', type=int, default=16)
    parser.add_argument('--steps', type=int, default=256, help='timed decode steps (smoke: 4)')
    parser.add_argument('--smoke', action='store_true', help='a tiny model on the CPU, to check the script runs')
    parser.add_argument('--profile', action='store_true', help='also print the torch profiler table of 4 steps')
    parser.add_argument('--eager', action='store_true', help='decode without CUDA graphs')
    args = parser.parse_args()
    args.context = args.context or (40 if args.smoke else 32768)
    if args.smoke:
        args.warmup, args.steps = 1, 4
    elif not torch.cuda.is_available():
        raise SystemExit('error: needs a CUDA GPU; use --smoke on a CPU')
    device = 'cpu' if args.smoke else 'cuda'
    shape = model_shape(args.smoke)
    name = 'CPU (smoke)' if args.smoke else torch.cuda.get_device_name()
    lines = [f'# Decode tokens/s at batch 1, {name}, {datetime.date.today()}', '',
             f'Model {shape} ({"tiny" if args.smoke else CONFIG}), vocab {97 if args.smoke else VOCAB_SIZE}, '
             f'{"fp32" if args.smoke else "bf16"}; {args.context} cached tokens, then {args.steps} timed greedy '
             f'steps through generate.decode (on a GPU {"eager" if args.eager else "a CUDA graph for Wall, eager RoPE"}) '
             f'after {args.warmup} warm-up steps; torch {torch.__version__}, triton {triton.__version__}.', '',
             '| attention | cache (MiB) | ms / token | tokens/s | vs RoPE |', '|---|---|---|---|---|']
    results = []
    for label, attention, gate_per_kv_head in (('RoPE, static KV cache, SDPA', 'rope', False),
                                               ('Wall, gate per query head', 'wall', False),
                                               ('Wall, gate per kv head', 'wall', True)):
        results.append((label, *bench(shape, attention, gate_per_kv_head, args, device)))
    for label, tokens_per_s, ms, mib in results:
        row = f'| {label} | {mib:.1f} | {ms:.2f} | {tokens_per_s:.0f} | {tokens_per_s / results[0][1]:.2f}x |'
        print(row, flush=True)
        lines.append(row)
    out = args.out or (None if args.smoke else 'bench/results_generate.md')
    if out:
        with open(out, 'w') as f:
            f.write('\n'.join(lines) + '\n')
        print(f'wrote {out}')


if __name__ == '__main__':
    main()
