"""
What training made of a Wall model's gates, and what they cost the kernels.

    python -m eval.gates --ckpt out/lengthgen_wall/ckpt.pt --out out/lengthgen/gates_wall

On one packed batch of held-out documents (--tokens tokens, documents cut at the training length, as in
training), every layer's per-step log-decay g (after the soft bound, as the kernels get it) is recorded:
- its quantiles per layer, in nats per step, and the decay over a 64-token block (the sum of g over a block of
  the kernels' tiling, per channel);
- the fraction of (block, gate head) pairs that take the kernels' steep diagonal path: a block is steep when
  some channel's prefix falls by FAST_RANGE or more (log2 units) inside it (counted here over all its BLOCK
  steps, one more than the kernels' test sees: an upper bound);
- on a GPU, the forward+backward time of one layer's attention (triton's do_bench median) on the trained q, k, v
  and g of the middle layer, against the same q, k, v with the benchmarks' gentle gates (logsigmoid(N(4, 1))).
Writes OUT.json. A model without per-channel gates (RoPE, FoX) writes nothing, and says so.
"""
import argparse
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

import kernels
from checkpoint import DTYPES, load_model, training_length
from data.loader import PackedBatches
from kernels.parallel import BLOCK, FAST_RANGE
from model import soft_bound

QUANTILES = [0.001, 0.01, 0.1, 0.5, 0.9, 0.99]


def record_projections(model):
    """Wrap every layer's projection so that its (q, k, v, g, g_scalar) of the last forward are kept."""
    kept = [None] * len(model.blocks)
    for i, block in enumerate(model.blocks):
        project = block.attn.project

        def recording(*args, i=i, project=project, **kwargs):
            kept[i] = project(*args, **kwargs)
            return kept[i]
        block.attn.project = recording
    return kept


def block_decay(g, cu_seqlens):
    """Per-channel sum of g over each BLOCK-token block of each document: [blocks, heads, K] (nats)."""
    sums = []
    for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        doc = g[a:b]
        pad = (-len(doc)) % BLOCK
        doc = F.pad(doc, (0, 0, 0, 0, 0, pad))
        sums.append(doc.view(-1, BLOCK, *doc.shape[1:]).sum(1))
    return torch.cat(sums)


def time_attention(q, k, v, g, cu_seqlens):
    import triton.testing

    q, k, v, g = (t.detach().requires_grad_() for t in (q, k, v, g))
    do = torch.randn_like(q)

    def step():
        o = kernels.wall_attn(q, k, v, g, cu_seqlens=cu_seqlens)
        o.backward(do)
    step()
    return triton.testing.do_bench(step, warmup=50, rep=300)


@torch.no_grad()
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--ckpt', default='out/tiny/ckpt.pt')
    parser.add_argument('--tokens', type=int, default=65536, help='tokens of held-out documents in the batch')
    parser.add_argument('--out', help='output path prefix for .json (default: next to the checkpoint)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--dtype', choices=DTYPES, default='bfloat16' if torch.cuda.is_available() else 'float32')
    args = parser.parse_args(argv)
    if args.tokens < 2:
        raise SystemExit(f'error: --tokens={args.tokens}: expected at least 2')
    model, train_config = load_model(args.ckpt, args.device, DTYPES[args.dtype])
    if model.config.attention != 'wall':  # not an error: lengthgen.sh runs this for every study model
        print(f'{args.ckpt}: a {model.config.attention} model has no per-channel gates: nothing to record')
        return
    out = args.out or os.path.join(os.path.dirname(args.ckpt), 'gates')
    x, _, cu_seqlens = next(PackedBatches(train_config['data_dir'], 'val', args.tokens, training_length(train_config)))
    x, cu_seqlens = x.to(args.device), cu_seqlens.to(args.device)
    kept = record_projections(model)
    model(x, cu_seqlens=cu_seqlens)

    layers = []
    for i, (q, k, v, g, g_scalar) in enumerate(kept):
        g = g[0].float()
        steps = g.flatten().cpu().numpy()
        per_block = block_decay(g, cu_seqlens)
        steepest = (-per_block / math.log(2)).amax(-1)  # [blocks, heads]: the steepest channel, log2 units
        layers.append({'layer': i,
                       'g_per_step_quantiles': dict(zip(map(str, QUANTILES), np.quantile(steps, QUANTILES).tolist())),
                       'g_per_step_mean': float(steps.mean()),
                       'block_decay_quantiles_nats': dict(zip(map(str, QUANTILES), np.quantile(
                           per_block.flatten().cpu().numpy(), QUANTILES).tolist())),
                       'steep_block_fraction': {str(dt).split('.')[-1]: float((steepest >= r).float().mean())
                                                for dt, r in FAST_RANGE.items()},
                       'g_scalar_mean': None if g_scalar is None else float(g_scalar.float().mean())})
    report = {'ckpt': args.ckpt, 'tokens': args.tokens, 'documents': len(cu_seqlens) - 1, 'block': BLOCK,
              'layers': layers}
    if torch.cuda.is_available() and args.device.startswith('cuda'):
        q, k, v, g, _ = kept[len(kept) // 2]
        gentle = soft_bound(F.logsigmoid(torch.randn_like(g) + 4), model.config.g_max)
        with torch.enable_grad():
            trained_ms = time_attention(q, k, v, g, cu_seqlens)
            gentle_ms = time_attention(q, k, v, gentle, cu_seqlens)
        report['attention_fwd_bwd_ms'] = {'layer': len(kept) // 2, 'trained_gates': trained_ms,
                                          'gentle_gates': gentle_ms, 'device': torch.cuda.get_device_name()}
    os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
    with open(out + '.json', 'w') as f:
        json.dump(report, f, indent=1)
    for layer in layers:
        q = layer['g_per_step_quantiles']
        print(f'layer {layer["layer"]}: g per step median {q["0.5"]:.2e}, 1% {q["0.01"]:.2e}, 0.1% {q["0.001"]:.2e}; '
              f'steep blocks (bf16) {layer["steep_block_fraction"]["bfloat16"]:.4f}')
    if 'attention_fwd_bwd_ms' in report:
        t = report['attention_fwd_bwd_ms']
        print(f'layer {t["layer"]} attention fwd+bwd: trained gates {t["trained_gates"]:.3f} ms, gentle '
              f'{t["gentle_gates"]:.3f} ms')
    print(f'wrote {out}.json')


if __name__ == '__main__':
    main()
