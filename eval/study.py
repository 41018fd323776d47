"""
One study from several result folders: each model of the length study trains and evaluates in its own run
(eval/lengthgen.sh writes one folder per model), and this puts them side by side.

    python -m eval.study out/lengthgen/rope out/lengthgen/wall --out docs/lengthgen/study [--names rope,wall]

A result folder holds what lengthgen.sh wrote: length.json (eval/length.py --copy), retrieval.json and
retrieval_far.json (eval/retrieval.py; the far one optional), niah.json (eval/niah.py) and train.log. Missing files
leave their cells empty. Writes OUT_loss.png (loss by position), OUT_copy.png (natural copying), OUT_retrieval.png
(exact match and loss by distance) and OUT.md, the tables of the results page:
- per model: val loss at the end of training, the loss at 1x..16x the training length with 95% intervals, the
  change at 16x against 1x, the needle test's accuracy, the tokens trained and the step time at the start and the
  end of training (medians of the first and last five logged steps);
- paired: each model's loss at 1x..16x minus the first folder's model's, with intervals from resampling the
  documents jointly, where both length.json files hold per-document means of the same documents; where an interval
  holds zero, about how many documents would make it exclude zero at the same difference and spread;
- natural copying: the loss and gain of repeat tokens by distance back (eval/copying.py's table);
- retrieval: exact match [95% Wilson interval] and loss per value token by distance; paired, the probes (the same
  for every model) that only the first model or only the other got right, with the exact McNemar p-value.
"""
import argparse
import json
import math
import os
import re

import numpy as np

from eval import common, copying, length, retrieval

def read_json(folder, name):
    path = os.path.join(folder, name + '.json')
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_training(folder):
    """From train.log: {'val': the final val loss, 'tokens': tokens trained, 'step_ms': (ms per step at the start,
    at the end), the medians of the first and the last five logged steps}; None for what the log does not say."""
    path = os.path.join(folder, 'train.log')
    text = open(path).read() if os.path.exists(path) else ''
    val = re.findall(r'iter \d+: val loss ([0-9.]+)', text)  # not the "best val loss" of the closing line
    tokens = re.findall(r'([0-9,]+) tokens trained', text)
    # iteration 0's time is the compilation's
    times = [float(ms) for it, ms in re.findall(r'^iter (\d+): loss .*?, time ([0-9.]+) ms', text, re.M) if int(it)]
    return {'val': float(val[-1]) if val else None, 'tokens': int(tokens[-1].replace(',', '')) if tokens else None,
            'step_ms': (float(np.median(times[:5])), float(np.median(times[-5:]))) if times else None}


def load(folder, name=None):
    """One model's results: {'name' (name, else the folder's), 'length', 'retrieval', 'niah', 'val', 'tokens',
    'step_ms'}; absent parts None."""
    if not os.path.isdir(folder):
        raise SystemExit(f'error: {folder}: not a result folder (expected eval/lengthgen.sh output)')
    model = {'name': name or os.path.basename(os.path.normpath(folder))}
    runs = (read_json(folder, 'length') or {}).get('runs') or [None]
    model['length'] = runs[0]
    # the far distances run in their own process: one run, its rows from both reports
    runs = [report['runs'][0] for report in (read_json(folder, 'retrieval'), read_json(folder, 'retrieval_far'))
            if report and report['runs']]
    rows = sorted((row for run in runs for row in run['by_distance']), key=lambda row: row['distance'])
    model['retrieval'] = dict(runs[0], by_distance=rows) if rows else None
    model['niah'] = read_json(folder, 'niah')
    model.update(read_training(folder))
    if not any(model[key] for key in ('length', 'retrieval', 'niah')):
        raise SystemExit(f'error: {folder}: holds no length.json, retrieval.json or niah.json')
    return model


def labelled(run, name):
    """run with its checkpoint path replaced by the model's name, for the plots' legends."""
    return dict(run, ckpt=name)


def summary_table(models):
    multiples = sorted({row['multiple'] for m in models for row in (m['length'] or {}).get('table', [])}) or [1]
    lines = ['| model | val loss | ' + ' | '.join(f'{n}x' for n in multiples) +
             f' | {multiples[-1]}x - 1x | needle test | tokens | ms/step, start / end |',
             '|---|---|' + '---|' * len(multiples) + '---|---|---|---|']
    for m in models:
        table = {row['multiple']: row for row in (m['length'] or {}).get('table', [])}
        cells = [common.interval(table[n]['mean'], table[n]['lo'], table[n]['hi']) if n in table else ''
                 for n in multiples]
        change = table.get(multiples[-1])
        change = common.interval(change['change'], change['change_lo'], change['change_hi'], sign='+') \
            if change else ''
        niah = ''
        if m['niah']:
            trials = [t['correct'] for cell in m['niah']['cells'] for t in cell['trials']]
            niah = f'{sum(trials)}/{len(trials)}'
        val = f'{m["val"]:.3f}' if m['val'] is not None else ''
        tokens = f'{m["tokens"] / 1e6:.0f}M' if m['tokens'] else ''
        step = '{:.0f} / {:.0f}'.format(*m['step_ms']) if m['step_ms'] else ''
        lines.append(f'| {m["name"]} | {val} | ' + ' | '.join(cells) + f' | {change} | {niah} | {tokens} | {step} |')
    return '\n'.join(lines)


def documents_to_separate(docs, mean, lo, hi):
    """How many documents would make a 95% interval [lo, hi] of a difference measured on docs documents exclude
    zero, if the difference and the spread between documents stayed as measured: the interval narrows as
    1/sqrt(documents). None where it already excludes zero or the difference is zero."""
    if lo > 0 or hi < 0 or mean == 0:
        return None
    return int(np.ceil(docs * ((hi - lo) / 2 / abs(mean)) ** 2))


def paired_table(models):
    """Each model's loss at 1x..16x minus the first model's, with 95% intervals from resampling the documents
    jointly (both scored the same documents: eval/length.py's fingerprints match), and where an interval holds
    zero, the documents that would separate it (documents_to_separate); None when no pair has them."""
    def tables(m):
        run = m['length'] or {}
        return run.get('doc_fingerprints'), {row['multiple']: row.get('doc_means') for row in run.get('table', [])}

    first, (ref_docs, ref) = models[0], tables(models[0])
    multiples = sorted(n for n, means in ref.items() if means)
    lines = [f'| model - {first["name"]} | ' + ' | '.join(f'{n}x' for n in multiples) + ' |',
             '|---|' + '---|' * len(multiples)]
    for m in models[1:]:
        docs, means = tables(m)
        if not ref_docs or docs != ref_docs:
            continue
        cells = []
        for n in multiples:
            if not means.get(n):
                cells.append('')
                continue
            diff = np.subtract(means[n], ref[n])[:, None]
            mean, lo, hi, _ = common.bootstrap(diff, np.ones_like(diff))
            lo, hi = common.finite_or_none(lo[0]), common.finite_or_none(hi[0])
            cell = common.interval(mean[0], lo, hi, sign='+')
            needed = documents_to_separate(len(diff), mean[0], lo, hi) if lo is not None else None
            cells.append(cell + (f' ~{needed} docs' if needed else ''))
        lines.append(f'| {m["name"]} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) if len(lines) > 2 else None


def mcnemar_p(only_first, only_other):
    """Exact two-sided McNemar p-value: under no difference, each probe that one model gets right and the other
    not is equally likely to be either model's."""
    n, k = only_first + only_other, min(only_first, only_other)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0


def paired_retrieval_table(models):
    """Retrieval probe by probe against the first model, at each distance where both scored the same probes:
    how many only the first model got right, how many only the other, and the exact McNemar p-value; None when
    no pair has them."""
    def by_distance(m):
        return {row['distance']: row.get('trial_results') for row in (m['retrieval'] or {}).get('by_distance', [])}

    first, ref = models[0], by_distance(models[0])
    distances = sorted(d for d, trials in ref.items() if trials)
    lines = [f'| probes right for only {first["name"]} / only the model (McNemar p) | '
             + ' | '.join(str(d) for d in distances) + ' |', '|---|' + '---|' * len(distances)]
    for m in models[1:]:
        trials, cells = by_distance(m), []
        for d in distances:
            other = trials.get(d) or []
            pairs = list(zip(ref[d], other))
            if len(other) != len(ref[d]) or any(a['distance'] != b['distance'] for a, b in pairs):
                cells.append('')
                continue
            only_first = sum(a['correct'] and not b['correct'] for a, b in pairs)
            only_other = sum(b['correct'] and not a['correct'] for a, b in pairs)
            cells.append(f'{only_first} / {only_other} ({mcnemar_p(only_first, only_other):.3f})')
        if any(cells):
            lines.append(f'| {m["name"]} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) if len(lines) > 2 else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('folders', nargs='+', help='result folders of eval/lengthgen.sh, one per model')
    parser.add_argument('--out', default='out/lengthgen/study', help='output path prefix for the .md and .png files')
    parser.add_argument('--names', help='comma-separated model names for the tables and legends, one per folder '
                        '(default: the folders\' names)')
    args = parser.parse_args(argv)
    names = args.names.split(',') if args.names else [None] * len(args.folders)
    if args.names and (len(names) != len(args.folders) or not all(names)):
        raise SystemExit(f'error: --names: expected {len(args.folders)} non-empty comma-separated names, one per '
                         f'folder, got {args.names!r}')
    models = [load(folder, name) for folder, name in zip(args.folders, names)]
    os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
    written, tables = [], [summary_table(models)]
    paired = paired_table(models)
    if paired:
        tables.append(paired)
    runs = [labelled(m['length'], m['name']) for m in models if m['length']]
    if runs:
        length.plot(runs, max(1, len(runs[0]['loss_by_position']) // 64), args.out + '_loss.png')
        written.append(args.out + '_loss.png')
    copy_runs = [labelled(run['copy'], run['ckpt']) for run in runs if run.get('copy')]
    if copy_runs:
        copying.plot(copy_runs, args.out + '_copy.png')
        written.append(args.out + '_copy.png')
        tables.append(copying.markdown_table(copy_runs))
    runs = [labelled(m['retrieval'], m['name']) for m in models if m['retrieval']]
    if runs:
        retrieval.plot(runs, args.out + '_retrieval.png')
        written.append(args.out + '_retrieval.png')
        tables.append(retrieval.markdown_table(runs, name=lambda run: run['ckpt'], intervals=True))
        paired_retrieval = paired_retrieval_table(models)
        if paired_retrieval:
            tables.append(paired_retrieval)
    text = '\n\n'.join(tables) + '\n'
    with open(args.out + '.md', 'w') as f:
        f.write(text)
    print(text)
    print('wrote ' + ', '.join(written + [args.out + '.md']))


if __name__ == '__main__':
    main()
