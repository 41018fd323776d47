"""
Needle in a haystack for models trained from scratch: retrieval by copying, no instructions.

    python -m eval.niah --ckpt out/tiny/ckpt.pt
    python -m eval.niah --ckpt out/long/ckpt.pt --lengths 4096,16384,65536 --depths 0,0.5,1 --trials 8

A needle line `PASS_KEY = 48213` (a fresh 5-digit value per trial) goes in at a line boundary at a given depth of a
haystack of held-out code (consecutive documents of the val split, EOTs dropped), and the prompt ends with the cue
`PASS_KEY =` on a line of its own: its continuation is the value. Depth 0 puts the needle first, depth 1 right
before the cue; all depths of one (length, trial) share the haystack and the value.

The prompt is prefilled into the cache, then the value's tokens go through the cached decoding path one step at a
time, teacher-forced (eval/common.answer_logits, the scorer eval/retrieval.py shares; CUDA graphs on a GPU unless
--eager): that gives the value's log-probability, and greedy decoding would produce the value exactly iff every
step's argmax is the value's token (up to the first miss, greedy and teacher-forced decoding feed the same
tokens). Writes OUT.json with every trial and OUT.png, exact-match accuracy by depth and length with the training
length marked.
"""
import argparse
import json
import os

import matplotlib
import numpy as np
import torch

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

from checkpoint import DTYPES, load_data_tokenizer, load_model, training_length  # noqa: E402
from data.loader import documents  # noqa: E402
from eval import common  # noqa: E402
from generate import KVCache  # noqa: E402

NAME = 'PASS_KEY'


class Haystack:
    """The val split's documents, EOTs dropped, as one stream of code, handed out in consecutive pieces of whole
    lines (the stream restarts when a piece would run past its end)."""

    def __init__(self, data_dir, tokenizer, eot):
        self.tokens = np.concatenate([doc[doc != eot] for doc in documents(data_dir, 'val')])
        self.tokenizer = tokenizer
        self.at = 0

    def take(self, n):
        """The next whole lines of the stream, as text: at most n tokens, and at most one line short of n."""
        window = n + n // 4 + 64  # room to drop a partial first line and still fill n tokens
        if window > len(self.tokens):
            raise SystemExit(f'error: a haystack of {n} tokens needs more of the val split than its '
                             f'{len(self.tokens)} tokens')
        if self.at + window > len(self.tokens):
            self.at = 0
        text = self.tokenizer.decode(self.tokens[self.at:self.at + window].tolist())
        self.at += window
        text = text[text.find('\n') + 1:]  # the window may start inside a line
        encoding = self.tokenizer.encode(text)
        end = encoding.offsets[n][0] if len(encoding.ids) > n else len(text)
        lines = text[:text.rfind('\n', 0, end) + 1]
        if not lines:
            raise SystemExit(f'error: {n} tokens of the val split hold no whole line: ask for longer --lengths')
        return lines


def make_prompt(tokenizer, eot, haystack, depth, value):
    """(prompt tokens, needle position, answer tokens): the needle line goes in at the line start nearest to
    `depth` of the haystack (by characters), and the cue ends the prompt on a line of its own."""
    starts = np.array([0] + [i + 1 for i, c in enumerate(haystack) if c == '\n'])
    at = starts[np.abs(starts - depth * len(haystack)).argmin()]
    text = f'{haystack[:at]}{NAME} = {value}\n{haystack[at:]}{NAME} ='
    encoding, answer = tokenizer.encode(text), tokenizer.encode(f' {value}').ids
    if tokenizer.encode(text + f' {value}').ids != encoding.ids + answer:
        raise SystemExit(f'error: the tokenizer joins the cue "{NAME} =" and the value " {value}" into other tokens')
    needle_at = 1 + next(i for i, (start, _) in enumerate(encoding.offsets) if start >= at)
    # the value must be the same tokens in the needle as after the cue, or copying it could not score
    head = tokenizer.encode(f'{NAME} =').ids
    if encoding.ids[needle_at - 1:needle_at - 1 + len(head) + len(answer)] != head + answer:
        raise SystemExit(f'error: the tokenizer merges the needle "{NAME} = {value}" with the code around it')
    return [eot] + encoding.ids, needle_at, answer


def score(model, cache, prompt, answer, prefill_chunk, cuda_graph=True):
    """Teacher-forced decoding of answer after prompt (common.answer_logits): (log-probability of answer, greedy
    tokens up to and including the first that differs from answer)."""
    logprobs = torch.log_softmax(common.answer_logits(model, cache, [prompt], [answer], prefill_chunk, cuda_graph)[0],
                                 dim=-1)
    logprob = sum(logprobs[torch.arange(len(answer)), answer].tolist())
    greedy = []
    for predicted, token in zip(logprobs.argmax(-1).tolist(), answer):
        greedy.append(predicted)
        if predicted != token:  # greedy decoding leaves the answer here
            break
    return logprob, greedy


def plot(cells, lengths, depths, train_len, title, path):
    accuracy = np.array([[cells[(L, d)]['accuracy'] for L in lengths] for d in depths])
    logprob = np.array([[cells[(L, d)]['mean_logprob'] for L in lengths] for d in depths])
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2.5, 0.6 * len(depths) + 2))
    image = ax.imshow(accuracy, cmap='RdYlGn', vmin=0, vmax=1, aspect='auto')
    for (row, col), a in np.ndenumerate(accuracy):  # a model short of exact matches still shows its log-probs
        ax.text(col, row, f'{a:.2f}\n{logprob[row, col]:.1f}', ha='center', va='center', fontsize=8)
    ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
    ax.set_yticks(range(len(depths)), [f'{d:g}' for d in depths])
    ax.set_xlabel('context length (tokens)')
    ax.set_ylabel('needle depth (0 = first, 1 = last)')
    # the lengths are categories: mark the training length between the last one within it and the next
    within = sum(L <= train_len for L in lengths)
    ax.axvline(within - 0.5, color='black', linestyle='--', label=f'training length {train_len}')
    ax.legend(loc='upper center', bbox_to_anchor=(0.5, -0.12), frameon=False)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label='exact match')
    fig.savefig(path, dpi=120, bbox_inches='tight')
    plt.close(fig)


def parse_list(text, kind, name):
    try:
        values = [kind(x) for x in text.split(',')]
    except ValueError:
        raise SystemExit(f'error: --{name}={text!r}: expected comma-separated {kind.__name__}s')
    return values


def make_prompts(tokenizer, eot, data_dir, lengths, depths, trials, seed):
    """{(length, depth, trial): (value, prompt, needle position, answer)}, in the order they are scored: one haystack
    of the val split per (length, trial), shared by its depths, and a needle value per (length, trial) by seed."""
    haystack = Haystack(data_dir, tokenizer, eot)
    rng = np.random.default_rng(seed)
    needle_and_cue = len(tokenizer.encode(f'{NAME} = 99999\n{NAME} =').ids)
    prompts = {}
    for L in lengths:
        if L < needle_and_cue + 3:
            raise SystemExit(f'error: --lengths: {L} tokens cannot hold the EOT, the needle, the cue and a haystack')
        for trial in range(trials):
            value = str(rng.integers(10000, 100000))
            hay = haystack.take(L - 1 - needle_and_cue)
            for d in depths:
                prompts[(L, d, trial)] = (value, *make_prompt(tokenizer, eot, hay, d, value))
    return prompts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--ckpt', default='out/tiny/ckpt.pt')
    parser.add_argument('--lengths', help='comma-separated prompt lengths in tokens (default: 1/2 to 8 times the '
                                          'training length)')
    parser.add_argument('--depths', default='0,0.25,0.5,0.75,1', help='comma-separated, 0 to 1')
    parser.add_argument('--trials', type=int, default=5, help='per (length, depth) cell')
    parser.add_argument('--out', help='output path prefix for .json and .png (default: next to the checkpoint)')
    parser.add_argument('--seed', type=int, default=0, help='of the needle values')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--dtype', choices=DTYPES, default='bfloat16' if torch.cuda.is_available() else 'float32')
    parser.add_argument('--prefill_chunk', type=int, default=65536)
    parser.add_argument('--eager', action='store_true', help='decode without CUDA graphs (GPU)')
    args = parser.parse_args(argv)
    depths = parse_list(args.depths, float, 'depths')
    if not all(0 <= d <= 1 for d in depths):
        raise SystemExit(f'error: --depths={args.depths}: every depth must be between 0 and 1')
    if args.trials < 1 or args.prefill_chunk < 1:
        raise SystemExit(f'error: --trials={args.trials}, --prefill_chunk={args.prefill_chunk}: must be >= 1')

    model, train_config = load_model(args.ckpt, args.device, DTYPES[args.dtype])
    tokenizer, eot = load_data_tokenizer(train_config)
    train_len = training_length(train_config)
    lengths = (parse_list(args.lengths, int, 'lengths') if args.lengths else
               [train_len // 2, train_len, 2 * train_len, 4 * train_len, 8 * train_len])
    out = args.out or os.path.join(os.path.dirname(args.ckpt), 'niah')
    prompts = make_prompts(tokenizer, eot, train_config['data_dir'], lengths, depths, args.trials, args.seed)
    # the needle's junctions with the haystack can tokenize a token longer or shorter than the parts alone
    cache = KVCache(model, 1, max(len(prompt) + len(answer) for _, prompt, _, answer in prompts.values()))

    results = {(L, d): [] for L in lengths for d in depths}
    for (L, d, trial), (value, prompt, needle_at, answer) in prompts.items():
        logprob, greedy = score(model, cache, prompt, answer, args.prefill_chunk, not args.eager)
        results[(L, d)].append({'tokens': len(prompt), 'needle_at': needle_at, 'value': value,
                                'predicted': tokenizer.decode(greedy).strip(), 'correct': greedy == answer,
                                'logprob': logprob})
        print(f'length {L}, depth {d:g}, trial {trial}: {"right" if greedy == answer else "wrong"}, '
              f'log p(value) {logprob:.2f}', flush=True)

    cells = {key: {'length': key[0], 'depth': key[1], 'accuracy': float(np.mean([t['correct'] for t in trials])),
                   'mean_logprob': float(np.mean([t['logprob'] for t in trials])), 'trials': trials}
             for key, trials in results.items()}
    report = {'ckpt': args.ckpt, 'attention': model.config.attention, 'train_len': train_len,
              'needle': f'{NAME} = <5 digits>', 'cue': f'{NAME} =', 'lengths': lengths, 'depths': depths,
              'trials': args.trials, 'cells': list(cells.values())}
    os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
    with open(out + '.json', 'w') as f:
        json.dump(report, f, indent=1)
    plot(cells, lengths, depths, train_len,
         f'{args.ckpt} ({model.config.attention}): exact match and mean log p(value), {args.trials} trials per cell', out + '.png')
    print(f'accuracy {np.mean([c["accuracy"] for c in cells.values()]):.3f}; wrote {out}.json and {out}.png')


if __name__ == '__main__':
    main()
