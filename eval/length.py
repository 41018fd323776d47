"""
Loss by position on held-out documents, far past the training length.

    python eval/length.py --ckpt out/tiny/ckpt.pt
    python eval/length.py --ckpt out/wall/ckpt.pt out/rope/ckpt.pt out/fox/ckpt.pt --length 65536 --docs 16

Every document of the val split at least --length + 1 tokens long (the data pipeline joins consecutive short
documents into such pseudo-documents; their inner EOTs are dropped here, since in training no token ever attended
across an EOT) goes through one prefill into the cache, --prefill_chunk tokens per forward, and the next-token loss
of each of its first --length positions is kept. Writes OUT.json (mean loss at every position, per checkpoint) and
OUT.png (the loss smoothed over --smooth positions against position, log-scaled, each checkpoint's training length
marked).
"""
import argparse
import json
import os
import sys

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from data.loader import documents  # noqa: E402
from generate import KVCache  # noqa: E402
from sample import DTYPES, load_data_tokenizer, load_model, training_length  # noqa: E402


@torch.no_grad()
def position_losses(model, cache, tokens, prefill_chunk):
    """Next-token losses [len(tokens) - 1] of one document, prefilled into cache a chunk at a time: the logits of
    a chunk exist only while its loss is taken."""
    device = model.lm_head.weight.device
    idx = torch.as_tensor(tokens, device=device)[None]
    cache.reset()
    losses = []
    for start in range(0, idx.shape[1] - 1, prefill_chunk):
        chunk = idx[:, start:min(start + prefill_chunk, idx.shape[1] - 1)]
        logits = model.lm_head(model.hidden_states(chunk, cache=cache)).float()
        targets = idx[0, start + 1:start + 1 + chunk.shape[1]]
        losses.append(F.cross_entropy(logits[0], targets, reduction='none'))
    return torch.cat(losses).cpu().numpy()


def evaluate(path, model, train_config, args):
    _, eot = load_data_tokenizer(train_config)
    docs = [np.concatenate([[eot], doc[1:][doc[1:] != eot]])
            for doc in documents(train_config['data_dir'], 'val', min_len=args.length + 1, max_docs=args.docs)]
    docs = [doc[:args.length + 1] for doc in docs if len(doc) > args.length]  # long enough without its EOTs
    if not docs:
        raise SystemExit(f'error: --length={args.length}: no val document of {path}\'s data is that long')
    cache = KVCache(model, 1, args.length)
    losses = []
    for i, doc in enumerate(docs):
        losses.append(position_losses(model, cache, doc, args.prefill_chunk))
        print(f'{path}: document {i + 1} of {len(docs)}, mean loss {losses[-1].mean():.4f}', flush=True)
    mean = np.mean(losses, axis=0)
    return {'ckpt': path, 'attention': model.config.attention, 'train_len': training_length(train_config),
            'docs': len(docs), 'mean_loss': float(mean.mean()), 'loss_by_position': mean.tolist()}


def smooth(x, window):
    """Mean over the last `window` positions (fewer at the start)."""
    sums = np.cumsum(np.concatenate([[0.0], x]))
    ends = np.arange(1, len(x) + 1)
    return (sums[ends] - sums[np.maximum(ends - window, 0)]) / (ends - np.maximum(ends - window, 0))


def plot(runs, window, path):
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, run in enumerate(runs):
        color = f'C{i}'
        loss = np.array(run['loss_by_position'])
        ax.plot(np.arange(1, len(loss) + 1), smooth(loss, window), color=color,
                label=f'{run["ckpt"]} ({run["attention"]}, {run["docs"]} docs)')
        ax.axvline(run['train_len'], color=color, linestyle='--', linewidth=1,
                   label=f'training length {run["train_len"]}')
    ax.set_xscale('log')
    ax.set_xlabel('position (tokens)')
    ax.set_ylabel(f'loss (nats), mean over the last {window} positions')
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches='tight')
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--ckpt', nargs='+', default=['out/tiny/ckpt.pt'], help='one or more checkpoints')
    parser.add_argument('--length', type=int, help='positions scored per document (default: 8 x the first '
                                                    'checkpoint\'s training length)')
    parser.add_argument('--docs', type=int, default=8, help='documents per checkpoint, at most')
    parser.add_argument('--smooth', type=int, help='moving-average window of the plot (default: length / 64)')
    parser.add_argument('--out', help='output path prefix for .json and .png (default: next to the first checkpoint)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--dtype', choices=DTYPES, default='bfloat16' if torch.cuda.is_available() else 'float32')
    parser.add_argument('--prefill_chunk', type=int, default=65536)
    args = parser.parse_args(argv)
    for name in ('length', 'docs', 'smooth', 'prefill_chunk'):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f'error: --{name}={getattr(args, name)}: must be at least 1')
    out = args.out or os.path.join(os.path.dirname(args.ckpt[0]), 'length')

    runs = []
    for path in args.ckpt:
        model, train_config = load_model(path, args.device, DTYPES[args.dtype])
        args.length = args.length or 8 * training_length(train_config)
        runs.append(evaluate(path, model, train_config, args))
        del model  # before the next checkpoint's
    window = args.smooth or max(1, args.length // 64)
    os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
    with open(out + '.json', 'w') as f:
        json.dump({'length': args.length, 'runs': runs}, f)
    plot(runs, window, out + '.png')
    print('; '.join(f'{run["ckpt"]}: mean loss {run["mean_loss"]:.4f}' for run in runs) +
          f'; wrote {out}.json and {out}.png')


if __name__ == '__main__':
    main()
