"""
Natural copying in real code: does the model use what it saw d tokens back? No synthetic data.

    python -m eval.copying --ckpt out/tiny/ckpt.pt
    python -m eval.copying --ckpt out/wall/ckpt.pt out/rope/ckpt.pt --length 65536 --docs 64

(eval/length.py --copy writes the same analysis from the same forward passes, next to its own.)

Token i of a held-out document continues a repeat when the ngram + 1 tokens ending at it (default 5: the token and
the 4 before it) occurred earlier in the document: a model that looks back at the earlier occurrence can predict
it, as with an identifier or a call seen before. Its distance is i minus the end of the most recent earlier
occurrence. Every other token from position ngram on is a non-repeat token. Reported per checkpoint, each with a
95% interval from resampling documents (eval/common.bootstrap):

- repeat: the mean loss of repeat tokens by distance, in octaves [2^k, 2^(k+1));
- gain: by distance, how much lower a repeat token's loss is than the mean loss of non-repeat tokens at the same
  position (half-octave position buckets), i.e. the copy advantage with the position effect taken out. Common
  n-grams are easy from training alone, so the gain is not zero without copying: what tells is how it falls with
  distance, and whether it still holds past the training length;
- nonrepeat: the mean loss of non-repeat tokens by position.

Documents, scoring and flags as eval/length.py. Writes OUT.json, OUT.png (three panels) and prints a table.
"""
import argparse
import json
import os

import numpy as np

from eval import common
from eval.common import plt

NGRAM = 4


def repeats(tokens, ngram=NGRAM):
    """Distance back to the previous occurrence of the (ngram + 1)-gram ending at each token, int64 [len(tokens)]:
    0 where it has none (a non-repeat token), -1 for the first ngram tokens (no full n-gram ends there).

    The n-grams are hashed to uint64 and sorted stably (equal n-grams end up adjacent, by position), and every
    adjacent pair is checked token by token: a hash collision (odds ~1e-10 per 64k-token document) would count as
    no repeat, never as a false one. 64k tokens take ~30 ms, 4x less than grouping the n-grams with np.unique."""
    tokens = np.ascontiguousarray(tokens, dtype=np.int64)
    distance = np.full(len(tokens), -1, dtype=np.int64)
    if len(tokens) <= ngram:
        return distance
    M = len(tokens) - ngram  # n-gram m is tokens[m:m + ngram + 1], ending at token m + ngram
    h = np.zeros(M, dtype=np.uint64)
    for j in range(ngram + 1):  # polynomial hash, wrapping mod 2^64
        h = h * np.uint64(0x9E3779B97F4A7C15) + tokens[j:j + M].astype(np.uint64)
    order = np.argsort(h, kind='stable')
    later, earlier = order[1:], order[:-1]
    same = h[later] == h[earlier]
    later, earlier = later[same], earlier[same]
    exact = np.all([tokens[later + j] == tokens[earlier + j] for j in range(ngram + 1)], axis=0)
    gaps = np.zeros(M, dtype=np.int64)
    gaps[later[exact]] = later[exact] - earlier[exact]
    distance[ngram:] = gaps
    return distance


def distance_edges(length):
    """Octaves [2^k, 2^(k+1)) of distance up to the scored length."""
    return common.close_edges(2 ** np.arange(0, int(np.log2(max(length, 1))) + 1), length + 1)


def analyse(run, docs, losses, ngram=NGRAM):
    """The copying analysis of documents [D, L + 1] with their losses [D, L] (column i - 1: token i), for the run
    (ckpt, attention, train_len) of eval/length.py."""
    D, L = losses.shape
    distances = np.stack([repeats(doc, ngram)[1:] for doc in docs])  # [D, L], aligned with losses
    is_repeat, is_novel = distances > 0, distances == 0
    pos_edges = common.position_edges(run['train_len'], L, per_octave=2)
    pos_bucket = np.searchsorted(pos_edges, np.arange(1, L + 1), side='right') - 1  # [L]
    dist_edges = distance_edges(L)
    dist_bucket = np.clip(np.searchsorted(dist_edges, distances, side='right') - 1, 0, len(dist_edges) - 2)

    def sums(mask, buckets, K, values):
        s, c = np.zeros((D, K)), np.zeros((D, K))
        for d in range(D):
            s[d] = np.bincount(buckets[d][mask[d]], weights=values[d][mask[d]], minlength=K)
            c[d] = np.bincount(buckets[d][mask[d]], minlength=K)
        return s, c

    P, K = len(pos_edges) - 1, len(dist_edges) - 1
    pos_buckets = np.broadcast_to(pos_bucket, (D, L))
    novel_sums, novel_counts = sums(is_novel, pos_buckets, P, losses)
    with np.errstate(invalid='ignore'):
        baseline = novel_sums.sum(0) / novel_counts.sum(0)  # [P], NaN where no non-repeat token sits
    gain = baseline[pos_buckets] - losses
    matched = is_repeat & np.isfinite(gain)
    repeat_sums, repeat_counts = sums(is_repeat, dist_bucket, K, losses)
    gain_sums, gain_counts = sums(matched, dist_bucket, K, gain)
    return {'ckpt': run['ckpt'], 'attention': run['attention'], 'train_len': run['train_len'], 'docs': D,
            'ngram': ngram, 'repeat_fraction': float(is_repeat.sum() / (is_repeat | is_novel).sum()),
            'repeat_mean': float(losses[is_repeat].mean()) if is_repeat.any() else None,
            'nonrepeat_mean': float(losses[is_novel].mean()) if is_novel.any() else None,
            'repeat': common.bucket_rows(dist_edges, repeat_sums, repeat_counts),
            'gain': common.bucket_rows(dist_edges, gain_sums, gain_counts),
            'nonrepeat': common.bucket_rows(pos_edges, novel_sums, novel_counts)}


def markdown_table(runs):
    """Rows: distance octaves; per checkpoint, the repeat tokens' loss and gain [95% interval] and their count."""
    lines = ['| distance | ' + ' | '.join(f'{common.label(run)}: loss, gain [95%], tokens' for run in runs) + ' |',
             '|---|' + '---|' * len(runs)]
    for k, row in enumerate(runs[0]['repeat']):
        cells = []
        for run in runs:
            loss, gain = run['repeat'][k], run['gain'][k]
            cells.append('' if gain['mean'] is None else f'{loss["mean"]:.3f}, '
                         f'{common.interval(gain["mean"], gain["lo"], gain["hi"], sign="+")}, {loss["tokens"]}')
        lines.append(f'| {row["start"]}-{row["end"] - 1} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def plot(runs, path):
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    common.plot_bands(axes[0], runs, 'repeat', 'distance back to the previous occurrence (tokens)',
                      'loss of repeat tokens (nats)')
    for i, run in enumerate(runs):  # the level a model that never copies would stay near
        if run['nonrepeat_mean'] is not None:
            axes[0].axhline(run['nonrepeat_mean'], color=f'C{i}', linestyle=':', linewidth=1)
    axes[0].set_title('dotted: mean loss of non-repeat tokens', fontsize=9)
    common.plot_bands(axes[1], runs, 'gain', 'distance back to the previous occurrence (tokens)',
                      'copy gain (nats)')
    axes[1].axhline(0, color='gray', linewidth=0.8)
    axes[1].set_title('copy gain: non-repeat loss at the same position minus repeat loss', fontsize=9)
    common.plot_bands(axes[2], runs, 'nonrepeat', 'position (tokens)', 'loss of non-repeat tokens (nats)')
    axes[2].legend(fontsize=8)
    fig.suptitle(f'natural copying: a token repeats when the {runs[0]["ngram"] + 1} tokens ending at it occurred '
                 f'before in the document ({runs[0]["docs"]} held-out documents)', fontsize=10)
    common.save(fig, path)


def main(argv=None):
    from eval import length  # here: length imports this module
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    length.add_arguments(parser, 'copying')
    args = parser.parse_args(argv)
    common.check_positive(args, ('length', 'docs', 'prefill_chunk', 'ngram'))
    out = args.out or os.path.join(os.path.dirname(args.ckpt[0]), 'copying')
    runs, total = [], common.Timer('cpu')
    for path, model, train_config, docs, losses, seconds in length.each_checkpoint(args):
        run = {'ckpt': path, 'attention': model.config.attention, 'train_len': common.training_length(train_config)}
        timer = common.Timer('cpu')
        runs.append(analyse(run, docs, losses, args.ngram) | {'seconds': round(seconds, 2)})
        print(f'{path}: copying analysis in {timer():.1f} s', flush=True)
    os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
    with open(out + '.json', 'w') as f:
        json.dump({'length': args.length, 'runs': runs}, f, allow_nan=False)
    plot(runs, out + '.png')
    print(markdown_table(runs))
    print(f'{total():.1f} s in all; wrote {out}.json and {out}.png')


if __name__ == '__main__':
    main()
