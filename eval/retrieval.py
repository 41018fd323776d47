"""
Trained-in retrieval by distance: the synthetic key-value task of data/retrieval.py, from 1/8 to 16x the training
length.

    python -m eval.retrieval --ckpt out/tiny/ckpt.pt
    python -m eval.retrieval --ckpt out/wall/ckpt.pt out/rope/ckpt.pt --trials 32 --batch 8

A probe (data.retrieval.RetrievalTask.probe) is held-out code (a random window of the val split, EOTs dropped) with
needle lines `KEY_<key><value>` at line breaks (--pairs of them, 16 by default; key and value are words the
window does not hold), one of them about `distance` tokens before the end, and ends with that needle's cue
`KEY_<key>`, keys as long as the checkpoint trained on (train.py's retrieval_key_words). Needle and cue are joined
in token space, so copying the needle's value tokens is exactly right. Every model that trained on the task
(train.py's retrieval_mix) solves it inside the training length; the question is whether it still does past it.

Each probe, after an EOT, is prefilled into the cache --prefill_chunk tokens per forward, and the value's tokens go
through the decode step of sampling (generate.DecodeStep, CUDA graphs on a GPU) teacher-forced, --batch probes of
one distance at a time (eval/common.answer_logits, the scorer eval/niah.py shares). Exact match is whether every
step's argmax is the value's token: greedy decoding would produce the value exactly iff that holds (until the first
miss, greedy and teacher-forced decoding feed the same tokens). Also kept: the mean per-token loss of the value and
the fraction of its tokens that are the argmax.
Every distance uses the same probes for every checkpoint (seeded by --seed, distance and trial). --scorer forward
scores them with one full forward per probe instead (the training path): a check on the cached path.

Writes OUT.json and OUT.png (exact match and loss against distance, log x, 95% intervals: Wilson for exact match,
bootstrap over probes for the loss; training lengths dashed) and prints a table.
"""
import argparse
import json
import os

import numpy as np
import torch
import torch.nn.functional as F

from data.retrieval import RetrievalTask
from eval import common
from eval.common import plt

MULTIPLES = (1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8, 16)


def make_probes(task, stream, eot, distance, trials, seed):
    """trials probes at `distance`, each from its own window of stream: (prompts [trials, P] with the EOT first,
    answers [trials, A], exact distances [trials]). Within a distance every prompt has the same length."""
    need = task.min_filler(distance)
    if need > len(stream):
        raise SystemExit(f'error: --distances: {distance} tokens needs {need} tokens of filler, the val split has '
                         f'{len(stream)}')
    probes = []
    for trial in range(trials):
        rng = np.random.default_rng((seed, distance, trial))
        start = rng.integers(0, len(stream) - need + 1)
        probes.append(task.probe(rng, stream[start:start + need], distance))
    lengths = {len(p.prompt) for p in probes}
    assert len(lengths) == 1, f'probes at distance {distance} differ in length: {sorted(lengths)}'
    return (np.stack([np.concatenate([[eot], p.prompt]) for p in probes]), np.array([p.answer for p in probes]),
            np.array([p.distance for p in probes]))


def cached_answer_logits(model, prefill_chunk, cuda_graph=True, path=''):
    """The real model as a scorer: (prompts [B, P], answers [B, A]) -> fp32 logits [B, A, vocab] of each answer
    position, by common.answer_logits (prefill, then teacher-forced decode steps), in a cache per batch shape."""
    caches = {}

    def logits_of(prompts, answers):
        B, P = prompts.shape
        A = answers.shape[1]
        shape = (B, P + A)
        if shape not in caches:  # one cache per batch shape: a distance's batches share it
            caches.clear()  # the last distance's cache is done with; free it before the next one's
            caches[shape] = common.make_cache(model, B, P + A, path)
        return common.answer_logits(model, caches[shape], prompts, answers, prefill_chunk, cuda_graph)

    return logits_of


def forward_answer_logits(model):
    """The training path as a scorer, a check on the cached one: one full forward over each prompt and its answer
    (teacher-forced), (prompts [B, P], answers [B, A]) -> fp32 logits [B, A, vocab]."""
    device = model.lm_head.weight.device

    @torch.no_grad()
    def logits_of(prompts, answers):
        full = torch.as_tensor(np.concatenate([prompts, answers[:, :-1]], axis=1), device=device)
        return model.lm_head(model.hidden_states(full)[:, -answers.shape[1]:]).float()

    return logits_of


def score(logits_of, prompts, answers, batch):
    """(exact match [N] bool, mean answer-token loss [N], answer tokens that are the argmax [N]) of N probes, batch
    at a time through logits_of (a model, or anything mapping (prompts, answers) to logits [B, A, vocab])."""
    correct, loss, hits = [], [], []
    for start in range(0, len(prompts), batch):
        targets = torch.as_tensor(answers[start:start + batch])
        logits = torch.as_tensor(logits_of(prompts[start:start + batch], answers[start:start + batch])).float().cpu()
        right = logits.argmax(-1) == targets
        correct.append(right.all(1))
        hits.append(right.sum(1))
        loss.append(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction='none')
                    .view(targets.shape).mean(1))
    return torch.cat(correct).numpy(), torch.cat(loss).numpy(), torch.cat(hits).numpy()


def evaluate(logits_of, task, stream, eot, distances, trials, batch, seed, device='cpu', name='', on_row=None):
    """Rows per distance: exact match, per-token loss and token accuracy with 95% intervals, and every trial.
    on_row(rows) runs after each distance, so that a caller can save what is done before a long distance."""
    rows, f = [], common.finite_or_none
    for distance in distances:
        timer = common.Timer(device)
        prompts, answers, exact = make_probes(task, stream, eot, distance, trials, seed)
        correct, loss, hits = score(logits_of, prompts, answers, batch)
        lo, hi = common.wilson(int(correct.sum()), len(correct))
        loss_mean, loss_lo, loss_hi, _ = common.bootstrap(loss[:, None], np.ones((len(loss), 1)), seed=seed)
        tokens = answers.shape[1]
        token_mean, token_lo, token_hi, _ = common.bootstrap(hits[:, None], np.full((len(hits), 1), tokens),
                                                             seed=seed)
        rows.append({'distance': int(distance), 'mean_distance': float(exact.mean()), 'prompt_tokens': prompts.shape[1],
                     'trials': len(correct), 'accuracy': float(correct.mean()), 'accuracy_lo': lo,
                     'accuracy_hi': hi, 'loss': float(loss_mean[0]), 'loss_lo': f(loss_lo[0]),
                     'loss_hi': f(loss_hi[0]), 'token_accuracy': float(token_mean[0]),
                     'token_accuracy_lo': f(token_lo[0]), 'token_accuracy_hi': f(token_hi[0]),
                     'seconds': round(timer(), 2),
                     'trial_results': [{'distance': int(d), 'correct': bool(c), 'loss': round(float(x), 4),
                                        'tokens_right': int(h)} for d, c, x, h in zip(exact, correct, loss, hits)]})
        print(f'{name}distance {distance} ({prompts.shape[1]} tokens): exact match {rows[-1]["accuracy"]:.2f} '
              f'[{lo:.2f}, {hi:.2f}], loss {rows[-1]["loss"]:.3f}, token accuracy {rows[-1]["token_accuracy"]:.2f}, '
              f'{rows[-1]["seconds"]:.1f} s', flush=True)
        if on_row:
            on_row(rows)
    return rows


def series(run, key):
    """run's rows as the (distance, mean, lo, hi) rows common.plot_bands draws."""
    return [{'distance': row['distance'], 'mean': row[key], 'lo': row[f'{key}_lo'], 'hi': row[f'{key}_hi']}
            for row in run['by_distance']]


def plot(runs, path):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, ylabel in ((axes[0], 'accuracy', 'exact match of the value (greedy)'),
                            (axes[1], 'loss', 'loss per value token (nats)')):
        common.plot_bands(ax, [run | {key: series(run, key)} for run in runs], key,
                          'distance from needle to cue (tokens)', ylabel, x='distance')
    axes[0].set_ylim(-0.03, 1.03)
    axes[1].legend(fontsize=8)
    fig.suptitle(f'trained-in retrieval: KEY_<key><value> in held-out code, '
                 f'{runs[0]["by_distance"][0]["trials"]} probes per distance', fontsize=10)
    common.save(fig, path, 'dashed: training length; bands: 95% intervals (Wilson for exact match, bootstrap over '
                           'probes for the loss)')


def markdown_table(runs, name=None, intervals=False):
    """Exact match (loss) by distance, one row per run, over every distance any run has (cells of the others
    empty); `name(run)` labels a row (default: its checkpoint and training length), `intervals` adds the exact
    match's Wilson interval."""
    distances = sorted({row['distance'] for run in runs for row in run['by_distance']})
    lines = [f'| {"checkpoint" if name is None else "model"} | ' + ' | '.join(str(d) for d in distances) + ' |',
             '|---|' + '---|' * len(distances)]
    for run in runs:
        rows = {row['distance']: row for row in run['by_distance']}
        cells = [f'{rows[d]["accuracy"]:.2f}' + (f' [{rows[d]["accuracy_lo"]:.2f}, {rows[d]["accuracy_hi"]:.2f}]'
                                                 if intervals else '') + f' ({rows[d]["loss"]:.2f})'
                 if d in rows else '' for d in distances]
        label = f'{common.label(run)}, T={run["train_len"]}' if name is None else name(run)
        lines.append(f'| {label}: exact match (loss) | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def parse_distances(text):
    try:
        distances = [int(x) for x in text.split(',')]
    except ValueError:
        raise SystemExit(f'error: --distances={text!r}: expected comma-separated ints')
    if min(distances) < 1:
        raise SystemExit(f'error: --distances={text!r}: every distance must be at least 1')
    return distances


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--ckpt', nargs='+', default=['out/tiny/ckpt.pt'], help='one or more checkpoints')
    parser.add_argument('--distances', help='comma-separated needle-to-cue distances in tokens (default: 1/8, '
                                            '1/4, ..., 16 times the first checkpoint\'s training length)')
    parser.add_argument('--trials', type=int, default=32, help='probes per distance')
    parser.add_argument('--batch', type=int, default=8, help='probes per forward (all of one distance)')
    parser.add_argument('--pairs', type=int, help='needles per probe, the one asked for included (default: '
                                                  'RetrievalTask\'s)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', help='output path prefix for .json and .png (default: retrieval next to the first '
                                      'checkpoint)')
    parser.add_argument('--device', default=common.default_device())
    parser.add_argument('--dtype', choices=common.DTYPES,
                        default='bfloat16' if torch.cuda.is_available() else 'float32')
    parser.add_argument('--prefill_chunk', type=int, default=65536, help='tokens per prefill forward')
    parser.add_argument('--eager', action='store_true', help='decode without CUDA graphs (GPU)')
    parser.add_argument('--scorer', choices=('cache', 'forward'), default='cache',
                        help='cache: prefill and decode steps, as users decode; forward: one full forward per probe '
                             '(the training path), a check on the cache')
    args = parser.parse_args(argv)
    common.check_positive(args, ('trials', 'batch', 'pairs', 'prefill_chunk'))
    distances = parse_distances(args.distances) if args.distances else None
    out = args.out or os.path.join(os.path.dirname(args.ckpt[0]), 'retrieval')

    runs, total = [], common.Timer('cpu')
    os.makedirs(os.path.dirname(out) or '.', exist_ok=True)

    def save():  # after every distance: a run stopped at a deadline keeps the distances it finished
        with open(out + '.json.tmp', 'w') as f:
            json.dump({'distances': distances, 'trials': args.trials, 'seed': args.seed, 'runs': runs}, f,
                      allow_nan=False)
        os.replace(out + '.json.tmp', out + '.json')

    for path in args.ckpt:
        model, train_config = common.load_model(path, args.device, common.DTYPES[args.dtype])
        train_len = common.training_length(train_config)
        distances = distances or [max(1, round(m * train_len)) for m in MULTIPLES]
        tokenizer, eot = common.load_data_tokenizer(train_config)
        try:
            task = RetrievalTask(tokenizer, key_words=train_config.get('retrieval_key_words', 1),
                                 **({} if args.pairs is None else {'num_pairs': args.pairs}))
        except ValueError as e:
            raise SystemExit(f'error: --ckpt {path}: its tokenizer cannot build the task: {e}')
        stream = common.held_out_stream(train_config['data_dir'], eot)
        timer = common.Timer(args.device)
        run = {'ckpt': path, 'scorer': args.scorer, 'attention': model.config.attention, 'train_len': train_len,
               'retrieval_mix': train_config.get('retrieval_mix', 0.0), 'pairs': task.num_pairs,
               'key_words': task.key_len, 'by_distance': []}
        runs.append(run)

        def save_rows(rows):
            run['by_distance'] = rows
            save()

        logits_of = (cached_answer_logits(model, args.prefill_chunk, not args.eager, path) if args.scorer == 'cache'
                     else forward_answer_logits(model))
        evaluate(logits_of, task, stream, eot, distances,
                 args.trials, args.batch, args.seed, args.device, f'{path}: ', on_row=save_rows)
        run['seconds'] = round(timer(), 2)
        print(f'{path}: {len(distances)} distances x {args.trials} probes in {run["seconds"]:.1f} s', flush=True)
        del model
    save()
    plot(runs, out + '.png')
    print(markdown_table(runs))
    print(f'{total():.1f} s in all; wrote {out}.json and {out}.png')


if __name__ == '__main__':
    main()
