"""What the evaluations share: the scorer of an answer after a prompt (answer_logits), intervals, held-out tokens,
plots with bands."""
import os
import time

import matplotlib
import matplotlib.ticker
import numpy as np
import torch

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402,F401 (the scripts plot through this import)

from checkpoint import DTYPES, load_data_tokenizer, load_model, synchronize, training_length  # noqa: E402,F401
from data.loader import documents, read_shard  # noqa: E402,F401
from generate import DecodeStep, KVCache, prefill  # noqa: E402,F401

RESAMPLES = 1000
Z95 = 1.959963984540054


def bootstrap(sums, counts, resamples=RESAMPLES, seed=0):
    """Pooled mean of each column k, sum(sums[:, k]) / sum(counts[:, k]) over the rows (documents or trials), and
    its 95% percentile bootstrap interval from resampling rows with replacement: (mean, lo, hi), each [K]; the mean
    NaN where no row has a count, lo and hi NaN where fewer than two rows have. Resampling whole rows keeps the
    correlation of the tokens of one document; with equal counts the pooled mean is the mean of the per-row means.
    Also returns the resampled means [resamples, K], so that differences between columns can take their interval
    from the same resamples (paired)."""
    sums, counts = np.atleast_2d(np.asarray(sums, np.float64)), np.atleast_2d(np.asarray(counts, np.float64))
    rows = sums.shape[0]
    rng = np.random.default_rng(seed)
    # how often each row is drawn in each resample: [resamples, rows], then one matmul per statistic
    draws = rng.integers(0, rows, (resamples, rows)) + rows * np.arange(resamples)[:, None]
    weights = np.bincount(draws.ravel(), minlength=resamples * rows).reshape(resamples, rows).astype(np.float64)
    with np.errstate(invalid='ignore', divide='ignore'):
        mean = sums.sum(0) / counts.sum(0)
        means = (weights @ sums) / (weights @ counts)
    lo, hi = percentiles(means)
    # a column that one row alone has: every resample gives its value, and a zero-width interval would claim a
    # certainty nobody has
    single = (counts > 0).sum(0) < 2
    lo[single], hi[single] = np.nan, np.nan
    return mean, lo, hi, means


def percentiles(samples, q=(2.5, 97.5)):
    """The q-th percentiles of each column of samples [resamples, K], ignoring NaN (a resample that drew no row
    with a count there); NaN for a column with none (where np.nanpercentile would warn)."""
    samples = samples.reshape(len(samples), -1)
    out = np.full((len(q), samples.shape[1]), np.nan)
    for k in range(samples.shape[1]):
        finite = samples[:, k][np.isfinite(samples[:, k])]
        if len(finite):
            out[:, k] = np.percentile(finite, q)
    return out


def wilson(successes, n):
    """95% Wilson score interval of a binomial proportion: not empty at 0 or n successes, unlike the normal one."""
    if n == 0:
        return float('nan'), float('nan')
    p, z2 = successes / n, Z95 ** 2
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # exactly 0 and 1 at the edges, where rounding would leave 1e-17
    return (0.0 if successes == 0 else float(center - half)), (1.0 if successes == n else float(center + half))


def finite_or_none(x):
    """JSON has no NaN: a statistic with no data is null (the scripts write with allow_nan=False)."""
    return float(x) if x is not None and np.isfinite(x) else None


def interval(mean, lo, hi, digits=3, sign=''):
    """'3.343 [3.301, 3.385]', or the mean alone where the interval is null."""
    text = f'{mean:{sign}.{digits}f}'
    return text if lo is None or hi is None else f'{text} [{lo:{sign}.{digits}f}, {hi:{sign}.{digits}f}]'


def close_edges(edges, end):
    """Sorted unique bucket edges below end, then end (exclusive end of the last bucket); a last bucket under half
    the width of the one before it is merged into that one (else 65536 positions would end in a bucket of one)."""
    edges = np.unique(np.asarray(edges, dtype=np.int64))
    edges = edges[edges < end]
    if len(edges) >= 2 and end - edges[-1] < (edges[-1] - edges[-2]) / 2:
        edges = edges[:-1]
    return np.concatenate([edges, [end]])


def position_edges(train_len, length, per_octave=4):
    """Bucket edges over positions 1..length: `per_octave` per doubling, through every multiple 2^k of train_len."""
    k = np.arange(-per_octave * int(np.log2(train_len) + 1), per_octave * int(np.log2(length / train_len) + 2) + 1)
    edges = np.round(train_len * 2.0 ** (k / per_octave)).astype(np.int64)
    return close_edges(np.concatenate([[1], edges[edges > 1]]), length + 1)


def bucket_rows(edges, sums, counts, seed=0):
    """One JSON row per bucket [edges[k], edges[k + 1]): its mean and 95% interval over documents, the tokens in it
    and the documents that have any."""
    mean, lo, hi, _ = bootstrap(sums, counts, seed=seed)
    counts = np.atleast_2d(counts)
    return [{'start': int(edges[k]), 'end': int(edges[k + 1]), 'mean': finite_or_none(mean[k]),
             'lo': finite_or_none(lo[k]), 'hi': finite_or_none(hi[k]), 'tokens': int(counts[:, k].sum()),
             'docs': int((counts[:, k] > 0).sum())}
            for k in range(len(edges) - 1)]


def held_out_stream(data_dir, eot):
    """The val split as one stream of code: its documents end to end, EOTs dropped (as niah.Haystack). The shard
    holds just that (the loader adds the EOTs), so this is its memory map, not a copy of a split of maybe 1e8
    tokens as int64."""
    tokens, _ = read_shard(os.path.join(data_dir, 'val.bin'))
    return tokens if not (tokens == eot).any() else tokens[tokens != eot]


class Timer:
    """Seconds since construction, waiting for the device first so that queued kernels are counted."""

    def __init__(self, device):
        self.device, self.start = device, time.perf_counter()

    def __call__(self):
        synchronize(self.device)
        return time.perf_counter() - self.start


def label(run):
    return f'{run["ckpt"]} ({run["attention"]})'


def plot_bands(ax, runs, key, xlabel, ylabel, mark_training_length=True, x='center'):
    """Every run's buckets run[key] (rows of bucket_rows, or any rows with start, end, mean, lo, hi) as a line
    through the bucket means with its 95% band, against the bucket's geometric center (log x), each run's
    training length marked in its color."""
    for i, run in enumerate(runs):
        rows = [row for row in run[key] if row['mean'] is not None]
        if not rows:
            continue
        xs = np.array([np.sqrt(max(row['start'], 1) * row['end']) if x == 'center' else row[x] for row in rows])
        mean = np.array([row['mean'] for row in rows], dtype=float)
        lo = np.array([np.nan if row['lo'] is None else row['lo'] for row in rows], dtype=float)
        hi = np.array([np.nan if row['hi'] is None else row['hi'] for row in rows], dtype=float)
        ax.plot(xs, mean, color=f'C{i}', marker='.', label=label(run))
        ax.fill_between(xs, lo, hi, color=f'C{i}', alpha=0.2, linewidth=0)
        if len(rows) == 1:  # a band needs two points: show a lone bucket's interval as an error bar
            ax.errorbar(xs, mean, yerr=[mean - lo, hi - mean], color=f'C{i}', capsize=3)
        if mark_training_length:
            ax.axvline(run['train_len'], color=f'C{i}', linestyle='--', linewidth=1)
    log2_axis(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def tokens(x, _=None):
    """A tick label: 512, 4k, 64k, 1M."""
    for size, suffix in ((2 ** 20, 'M'), (2 ** 10, 'k')):
        if x >= size:
            return f'{x / size:g}{suffix}'
    return f'{x:g}'


def log2_axis(ax):
    """Log x with ticks at the powers of two (the training lengths are), labelled 512, 4k, 64k."""
    ax.set_xscale('log', base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(tokens))


def save(fig, path, note='dashed: training length; bands: 95% bootstrap intervals over documents'):
    fig.text(0.5, -0.02, note, ha='center', fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches='tight')
    plt.close(fig)


@torch.no_grad()
def answer_logits(model, cache, prompts, answers, prefill_chunk=None, cuda_graph=True):
    """The evaluations' one scorer of an answer after a prompt: prompts [B, P] are prefilled into cache (reset
    first), prefill_chunk tokens per forward, then answers [B, A] are fed back teacher-forced one decode step at a
    time, as sample.py decodes (generate.DecodeStep: replayed from a CUDA graph on a GPU unless cuda_graph=False).
    Returns the fp32 logits [B, A, vocab] that predict each answer token. Up to the first token whose argmax is not
    the answer's, greedy decoding would have fed the same tokens."""
    device = model.lm_head.weight.device
    prompts, answers = torch.as_tensor(prompts, device=device), torch.as_tensor(answers, device=device)
    cache.reset()
    first = prefill(model, prompts, cache, prefill_chunk)[:, -1]
    # copied out at every step: a replayed step returns the same output buffer each time
    logits = torch.empty(*answers.shape, first.shape[-1], dtype=torch.float32, device=device)
    logits[:, 0] = first
    step = DecodeStep(model, cache, cuda_graph)
    for i in range(answers.shape[1] - 1):
        logits[:, i + 1] = step(answers[:, i:i + 1])[:, -1]
    return logits


def make_cache(model, batch_size, max_len, path):
    """A KVCache, or a one-line exit for a model whose heads the decode kernel cannot take."""
    try:
        return KVCache(model, batch_size, max_len)
    except ValueError as e:
        raise SystemExit(f'error: --ckpt {path}: {e}')


def check_positive(args, names):
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f'error: --{name}={value}: must be at least 1')


def default_device():
    return 'cuda' if torch.cuda.is_available() else 'cpu'
