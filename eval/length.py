"""
Loss by position on held-out documents, far past the training length, with 95% intervals over documents.

    python -m eval.length --ckpt out/tiny/ckpt.pt
    python -m eval.length --ckpt out/wall/ckpt.pt out/rope/ckpt.pt --length 65536 --docs 64 --copy

Every document of the val split at least --length + 1 tokens long (the data pipeline joins consecutive short
documents into such pseudo-documents; their inner EOTs are dropped here, since in training no token ever attended
across an EOT), at most --docs of them (default: all), goes through one prefill into the cache, --prefill_chunk
tokens per forward (the first by the training kernel, later ones by the decode kernel, as sample.py), and the
next-token loss of each of its first --length positions is kept. Position i is the loss of predicting token i of
the document (the EOT is token 0), having seen i tokens.

Statistics are over documents, not tokens: a document's tokens are correlated, so each bucket's 95% interval comes
from resampling documents with replacement (eval/common.bootstrap, 1000 resamples, seeded). Buckets are quarter
octaves of position around the training length T. "Loss at Nx" is the mean over positions [N T / 2, N T), the last
half before N times the training length; its change against 1x has a paired interval (the same resamples).

Writes OUT.json (per checkpoint: the mean loss at every position, the buckets, the Nx table with each document's
own mean and the documents' fingerprints, so that runs can be compared document by document; with --copy also
the natural-copying analysis of eval/copying.py, from the same forward pass), OUT.png (loss against position, log
x, each checkpoint's line and band, training lengths dashed), with --copy OUT_copy.png; prints the table as
markdown.
"""
import argparse
import json
import os
import zlib

import numpy as np
import torch
import torch.nn.functional as F

from checkpoint import DTYPES, load_data_tokenizer, load_model, training_length
from data.loader import documents
from eval import common, copying
from eval.common import plt
from generate import KVCache

MULTIPLES = (1, 2, 4, 8, 16)
LOSS_ROWS = 8192  # logits rows at a time: a 64k-token chunk's fp32 logits at once would take GBs


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
        hidden = model.hidden_states(chunk, cache=cache)[0]
        for row in range(0, chunk.shape[1], LOSS_ROWS):
            logits = model.lm_head(hidden[row:row + LOSS_ROWS]).float()
            targets = idx[0, start + 1 + row:start + 1 + row + len(logits)]
            losses.append(F.cross_entropy(logits, targets, reduction='none'))
    return torch.cat(losses).cpu().numpy()


def held_out_documents(train_config, length, max_docs, path):
    """The val documents (EOT first, inner EOTs dropped) of at least length + 1 tokens, cut to length + 1."""
    _, eot = load_data_tokenizer(train_config)
    docs = [np.concatenate([[eot], doc[1:][doc[1:] != eot]])
            for doc in documents(train_config['data_dir'], 'val', min_len=length + 1, max_docs=max_docs)]
    docs = [doc[:length + 1] for doc in docs if len(doc) > length]  # long enough without its EOTs
    if not docs:
        raise SystemExit(f'error: --length={length}: no val document of {path}\'s data is that long')
    return np.stack(docs)


def score_documents(path, model, train_config, args):
    """(documents [D, length + 1], losses [D, length], seconds): every held-out document through the cached path."""
    docs = held_out_documents(train_config, args.length, args.docs, path)
    try:
        cache = KVCache(model, 1, args.length)
    except ValueError as e:
        raise SystemExit(f'error: --ckpt {path}: {e}')
    timer = common.Timer(args.device)
    losses = np.empty((len(docs), args.length), dtype=np.float32)
    for i, doc in enumerate(docs):
        losses[i] = position_losses(model, cache, doc, args.prefill_chunk)
        if args.verbose:
            print(f'{path}: document {i + 1} of {len(docs)}, mean loss {losses[i].mean():.4f}', flush=True)
    seconds = timer()
    print(f'{path}: {len(docs)} documents of {args.length} tokens in {seconds:.1f} s '
          f'({losses.size / seconds:,.0f} tokens/s)', flush=True)
    return docs, losses, seconds


def bucket_sums(losses, edges):
    """Per-document loss sums and counts [D, buckets] over positions [edges[k], edges[k + 1]) (position i is
    column i - 1 of losses)."""
    sums = np.add.reduceat(losses.astype(np.float64), edges[:-1] - 1, axis=1)
    return sums, np.broadcast_to(np.diff(edges), sums.shape)


def multiples_table(losses, train_len, seed=0):
    """Loss at N x the training length, for every N of MULTIPLES that the scored length reaches: rows with the
    positions [N T / 2, N T), mean and interval, and the change against 1x with its paired interval."""
    multiples = [n for n in MULTIPLES if n * train_len <= losses.shape[1]]
    if not multiples:
        return []
    sums = np.stack([losses[:, n * train_len // 2 - 1:n * train_len - 1].sum(1) for n in multiples], axis=1)
    counts = np.broadcast_to([n * train_len - n * train_len // 2 for n in multiples], sums.shape)
    mean, lo, hi, means = common.bootstrap(sums, counts, seed=seed)
    delta_lo, delta_hi = common.percentiles(means - means[:, :1])
    if len(losses) < 2:
        delta_lo, delta_hi = np.full_like(mean, np.nan), np.full_like(mean, np.nan)
    f = common.finite_or_none
    doc_means = sums / counts
    return [{'multiple': n, 'start': n * train_len // 2, 'end': n * train_len, 'mean': float(mean[k]),
             'lo': f(lo[k]), 'hi': f(hi[k]), 'change': float(mean[k] - mean[0]), 'change_lo': f(delta_lo[k]),
             'change_hi': f(delta_hi[k]), 'doc_means': np.round(doc_means[:, k], 5).tolist()}
            for k, n in enumerate(multiples)]


def fingerprints(docs):
    """One crc32 per document of its tokens: two runs scored the same documents, in the same order, when these
    match, so their per-document losses can be compared pairwise (eval/study.py)."""
    return [zlib.crc32(np.ascontiguousarray(doc, dtype=np.int64).tobytes()) for doc in docs]


def analyse(path, model, train_config, docs, losses, seconds):
    train_len = training_length(train_config)
    edges = common.position_edges(train_len, losses.shape[1])
    sums, counts = bucket_sums(losses, edges)
    mean = losses.mean(0)
    return {'ckpt': path, 'attention': model.config.attention, 'train_len': train_len, 'docs': len(docs),
            'doc_fingerprints': fingerprints(docs),
            'seconds': round(seconds, 2), 'mean_loss': float(mean.mean()),
            'loss_by_position': np.round(mean, 4).tolist(), 'buckets': common.bucket_rows(edges, sums, counts),
            'table': multiples_table(losses, train_len)}


def markdown_table(runs):
    """Mean loss at 1x..16x the training length, [95% interval], and below it the change against 1x."""
    multiples = sorted({row['multiple'] for run in runs for row in run['table']})
    lines = ['| checkpoint | ' + ' | '.join(f'{n}x' for n in multiples) + ' |',
             '|---|' + '---|' * len(multiples)]
    for run in runs:
        rows = {row['multiple']: row for row in run['table']}
        cells = [common.interval(rows[n]['mean'], rows[n]['lo'], rows[n]['hi']) if n in rows else ''
                 for n in multiples]
        changes = [common.interval(rows[n]['change'], rows[n]['change_lo'], rows[n]['change_hi'], sign='+')
                   if n in rows and n > 1 else '' for n in multiples]
        lines += [f'| {common.label(run)}, T={run["train_len"]} | ' + ' | '.join(cells) + ' |',
                  '| change against 1x | ' + ' | '.join(changes) + ' |']
    return '\n'.join(lines)


def plot(runs, window, path):
    fig, ax = plt.subplots(figsize=(8, 4.5))
    # buckets with bands; the per-position mean smoothed under them shows the shape inside a bucket
    common.plot_bands(ax, runs, 'buckets', 'position (tokens)', 'loss (nats)')
    for i, run in enumerate(runs):
        loss = np.array(run['loss_by_position'])
        ax.plot(np.arange(1, len(loss) + 1), smooth(loss, window), color=f'C{i}', linewidth=0.6, alpha=0.5)
    ax.set_title(f'mean loss by position over held-out documents ({runs[0]["docs"]} per checkpoint; thin: mean over '
                 f'the last {window} positions)', fontsize=9)
    ax.legend(fontsize=8)
    common.save(fig, path)


def smooth(x, window):
    """Mean over the last `window` positions (fewer at the start)."""
    sums = np.cumsum(np.concatenate([[0.0], x]))
    ends = np.arange(1, len(x) + 1)
    return (sums[ends] - sums[np.maximum(ends - window, 0)]) / (ends - np.maximum(ends - window, 0))


def add_arguments(parser, out_name):
    """The flags length.py and copying.py share: which documents and how they go through the model."""
    parser.add_argument('--ckpt', nargs='+', default=['out/tiny/ckpt.pt'], help='one or more checkpoints')
    parser.add_argument('--length', type=int, help='positions scored per document (default: 16 x the first '
                                                    'checkpoint\'s training length)')
    parser.add_argument('--docs', type=int, help='documents per checkpoint, at most (default: every val document '
                                                  'that is long enough)')
    parser.add_argument('--out', help=f'output path prefix for .json and .png (default: {out_name} next to the '
                                      f'first checkpoint)')
    parser.add_argument('--device', default=common.default_device())
    parser.add_argument('--dtype', choices=DTYPES, default='bfloat16' if torch.cuda.is_available() else 'float32')
    parser.add_argument('--prefill_chunk', type=int, default=65536, help='tokens per prefill forward')
    parser.add_argument('--ngram', type=int, default=copying.NGRAM, help='copying: a token continues a repeat when '
                                                                          'the ngram + 1 tokens ending at it occurred '
                                                                          'before')
    parser.add_argument('--verbose', action='store_true', help='print every document\'s mean loss')


def each_checkpoint(args):
    """(path, model, train_config, documents, losses, seconds) per checkpoint, one model in memory at a time."""
    for path in args.ckpt:
        model, train_config = load_model(path, args.device, DTYPES[args.dtype])
        args.length = args.length or 16 * training_length(train_config)
        yield path, model, train_config, *score_documents(path, model, train_config, args)
        del model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, 'length')
    parser.add_argument('--smooth', type=int, help='moving-average window of the thin lines (default: length / 64)')
    parser.add_argument('--copy', action='store_true', help='also the natural-copying analysis (eval/copying.py) '
                                                            'of the same forward passes')
    args = parser.parse_args(argv)
    common.check_positive(args, ('length', 'docs', 'smooth', 'prefill_chunk', 'ngram'))
    out = args.out or os.path.join(os.path.dirname(args.ckpt[0]), 'length')

    runs, copy_runs, timer = [], [], common.Timer('cpu')
    for path, model, train_config, docs, losses, seconds in each_checkpoint(args):
        runs.append(analyse(path, model, train_config, docs, losses, seconds))
        if args.copy:  # the same losses: one forward per document serves both
            copy_timer = common.Timer('cpu')
            copy_runs.append(copying.analyse(runs[-1], docs, losses, args.ngram))
            runs[-1]['copy'] = copy_runs[-1]
            print(f'{path}: copying analysis in {copy_timer():.1f} s', flush=True)
    window = args.smooth or max(1, args.length // 64)
    os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
    with open(out + '.json', 'w') as f:
        json.dump({'length': args.length, 'multiples': 'loss at Nx: mean over positions [N T / 2, N T)',
                   'runs': runs}, f, allow_nan=False)
    plot(runs, window, out + '.png')
    written = f'{out}.json and {out}.png'
    if args.copy:
        copying.plot(copy_runs, out + '_copy.png')
        print(copying.markdown_table(copy_runs))
        written += f' and {out}_copy.png'
    print(markdown_table(runs))
    print(f'{timer():.1f} s in all; wrote {written}')


if __name__ == '__main__':
    main()
