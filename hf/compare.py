"""
lm-eval's scores of an exported model next to eval/retrieval.py's and eval/niah.py's for the same checkpoint, by
length and distance: RESULTS/compare.md from what hf/gpu_run.sh left in RESULTS (any part may be missing).

    python -m hf.compare RESULTS [--out RESULTS/compare.md]

Reads lm-eval's per-probe samples (--log_samples) under RESULTS/lm_eval/ (wall_niah, wall_retrieval, niah_single_1;
the newest file of each task), RESULTS/retrieval.json, RESULTS/niah.json and RESULTS/steps.txt. The needle rows
compare the same probes (hf.tasks.make writes eval/niah.py's), so their verdicts are also matched probe by probe;
the retrieval rows compare the same task on other draws of the words, so they should agree within their intervals.
"""
import argparse
import glob
import json
import os

from eval.common import wilson


def newest(pattern):
    paths = glob.glob(pattern, recursive=True)
    return max(paths, key=os.path.getmtime) if paths else None


def lm_eval_samples(results, task):
    """lm-eval's logged samples of task (a list of dicts), or None."""
    path = newest(os.path.join(results, 'lm_eval', '**', f'samples_{task}_*.jsonl'))
    if path is None:
        return None
    with open(path, encoding='utf-8') as f:
        return [json.loads(line) for line in f if line.strip()]


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def exact(k, n):
    """'0.25 [0.14, 0.41]' for k of n, '' for no probes."""
    if not n:
        return ''
    lo, hi = wilson(k, n)
    return f'{k / n:.2f} [{lo:.2f}, {hi:.2f}]'


def number(x, fmt='.2f'):
    return '' if x is None or x != x else format(x, fmt)


def mean(xs):
    return sum(xs) / len(xs) if xs else None


def needle_rows(results):
    """wall_niah against eval/niah.py by prompt length: (rows, notes)."""
    samples, report = lm_eval_samples(results, 'wall_niah'), load_json(os.path.join(results, 'niah.json'))
    notes = []
    if samples is None:
        notes.append('wall_niah: no lm-eval samples')
    if report is None:
        notes.append('eval/niah.py: no niah.json')
    ours = {}  # (length, depth, trial) -> (correct, logprob)
    for cell in (report or {}).get('cells', []):
        for trial, t in enumerate(cell['trials']):
            ours[(cell['length'], cell['depth'], trial)] = (bool(t['correct']), t['logprob'])
    theirs = {}
    for s in samples or []:
        doc = s['doc']
        theirs[(doc['length'], doc['depth'], doc['trial'])] = (s['acc'] >= 0.5, s['logprob'])
    rows = []
    for length in sorted({key[0] for key in ours} | {key[0] for key in theirs}):
        a = [v for key, v in theirs.items() if key[0] == length]
        b = [v for key, v in ours.items() if key[0] == length]
        both = [key for key in theirs if key[0] == length and key in ours]
        same = sum(theirs[key][0] == ours[key][0] for key in both)
        rows.append(['needle (wall_niah; eval/niah.py)', f'{length} tokens',
                     exact(sum(c for c, _ in a), len(a)), number(mean([-lp for _, lp in a])),
                     exact(sum(c for c, _ in b), len(b)), number(mean([-lp for _, lp in b])),
                     f'{len(a)} / {len(b)}', f'{same} of {len(both)}' if both else ''])
    return rows, notes


def retrieval_rows(results):
    """wall_retrieval against eval/retrieval.py by distance: (rows, notes)."""
    samples, report = lm_eval_samples(results, 'wall_retrieval'), load_json(os.path.join(results, 'retrieval.json'))
    notes = []
    if samples is None:
        notes.append('wall_retrieval: no lm-eval samples')
    if report is None or not report.get('runs'):
        notes.append('eval/retrieval.py: no retrieval.json')
    ours = {row['distance']: row for run in (report or {}).get('runs', [])[:1] for row in run['by_distance']}
    theirs = {}
    for s in samples or []:
        doc = s['doc']  # lm-eval's logprob is the value's; eval/retrieval.py reports nats per value token
        theirs.setdefault(doc['distance'], []).append((s['acc'] >= 0.5, -s['logprob'] / len(doc['answer_tokens'])))
    rows = []
    for distance in sorted(set(ours) | set(theirs)):
        a, row = theirs.get(distance, []), ours.get(distance)
        k = round(row['accuracy'] * row['trials']) if row else 0
        rows.append(['retrieval (wall_retrieval; eval/retrieval.py)', f'distance {distance}',
                     exact(sum(c for c, _ in a), len(a)), number(mean([x for _, x in a])),
                     exact(k, row['trials']) if row else '', number(row['loss']) if row else '',
                     f'{len(a)} / {row["trials"] if row else 0}', 'other draws'])
    return rows, notes


def ruler_rows(results):
    """RULER's niah_single_1 by max_seq_length (lm-eval only: string match of the needle's number)."""
    samples = lm_eval_samples(results, 'niah_single_1')
    if samples is None:
        return [], ['niah_single_1: no lm-eval samples']
    by_length = {}
    for s in samples:
        length = s['doc']['max_length']
        by_length.setdefault(length, []).append(float(s[str(length)]))
    rows = []
    for length, scores in sorted(by_length.items()):
        k = sum(x >= 0.5 for x in scores)
        rows.append(['RULER niah_single_1 (lm-eval only)', f'{length} tokens', exact(k, len(scores)), '', '', '',
                     f'{len(scores)} / -', ''])
    return rows, []


def describe(results):
    """The model's line: checkpoint and training length, from whichever output names them."""
    for name in ('retrieval.json', 'niah.json'):
        report = load_json(os.path.join(results, name))
        if report:
            run = report['runs'][0] if 'runs' in report and report['runs'] else report
            if 'ckpt' in run:
                return f'`{run["ckpt"]}` ({run.get("attention", "?")}, trained at {run.get("train_len", "?")} tokens)'
    config = load_json(os.path.join(results, 'hf_model', 'config.json'))
    return f'the export in `{os.path.join(results, "hf_model")}`' if config else 'unknown (no outputs)'


def markdown(results):
    rows, notes = [], []
    for part in (needle_rows, retrieval_rows, ruler_rows):
        r, n = part(results)
        rows += r
        notes += n
    lines = ['# lm-eval next to the repository\'s evaluations', '', f'Model: {describe(results)}.', '',
             'Exact match of the value [95% Wilson interval]; nats: -log p(value) for the needle, loss per value '
             'token for retrieval (lower is better); n: probes, lm-eval / repository; same verdict: probes both '
             'score alike (the needle probes are the same ones, the retrieval probes other draws of the task).', '',
             '| probe (lm-eval task; repository) | length | lm-eval | nats | repository | nats | n | same verdict |',
             '|---|---|---|---|---|---|---|---|']
    lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
    if not rows:
        lines.append('| (no results) | | | | | | | |')
    if notes:
        lines += ['', 'Missing: ' + '; '.join(notes) + '.']
    steps = os.path.join(results, 'steps.txt')
    if os.path.isfile(steps):
        with open(steps) as f:
            lines += ['', 'Steps (hf/gpu_run.sh):', '', '```', f.read().rstrip(), '```']
    return '\n'.join(lines) + '\n'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('results', help='the RESULTS_DIR of hf/gpu_run.sh')
    parser.add_argument('--out', help='default: RESULTS/compare.md')
    args = parser.parse_args(argv)
    if not os.path.isdir(args.results):
        raise SystemExit(f'error: {args.results}: no such folder')
    out = args.out or os.path.join(args.results, 'compare.md')
    text = markdown(args.results)
    with open(out + '.tmp', 'w') as f:
        f.write(text)
    os.replace(out + '.tmp', out)
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
