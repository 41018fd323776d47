"""
Write the data of the wall_* lm-eval tasks (hf/tasks/*.yaml) from held-out text, with this repository's own code:

    python -m hf.tasks.make --ckpt out/long/ckpt.pt --out hf_out/tasks
    python -m hf.tasks.make --data_dir data/installed --train_len 4096 --out hf_out/tasks --lengths 4096,16384

- niah.jsonl: eval/niah.py's probes, the same ones for the same --seed, --lengths, --depths and --trials (its
  haystacks from the val split, its needle values, in its order). Text is what eval/niah.py builds, so every
  tokenizer reads the probe; the repository's tokenizer reads exactly eval/niah.py's tokens.
- retrieval.jsonl: probes of data/retrieval.py's task at each distance. eval/retrieval.py builds its needles in
  token space, and as text those tokens do not come back (0 of 96 probes on the quick-start tokenizer: BPE merges
  the concatenated key and value words differently). Here every word of a needle is drawn so that the needle
  line goes through text and back to the same tokens, and a probe whose whole text does not is drawn again: the
  task is the one eval/retrieval.py asks, on other draws of the words, and the repository's tokenizer reads the
  tokens the model was trained on. Each line records the probe's tokens (`tokens`, `answer_tokens`).

Then: lm_eval --model hf --model_args pretrained=FOLDER,trust_remote_code=True --include_path hf/tasks \\
          --tasks wall_niah,wall_retrieval --metadata '{"wall_tasks": "hf_out/tasks"}'   (docs/hf.md)
"""
import argparse
import json
import os

import numpy as np

import checkpoint
from data.loader import EOT, load_tokenizer
from data.retrieval import VALUE_TOKENS, RetrievalTask
from eval import common
from eval.niah import make_prompts
from eval.retrieval import MULTIPLES

ATTEMPTS = 100  # draws of one retrieval probe before giving up on text that keeps its tokens


def niah_docs(tokenizer, eot, data_dir, lengths, depths, trials, seed):
    """eval/niah.py's prompts, in its order, as text: context ends with the cue, answer is ' <value>'."""
    docs = []
    for (length, depth, trial), (value, prompt, needle_at, _) in make_prompts(tokenizer, eot, data_dir, lengths, depths,
                                                                             trials, seed).items():
        context = tokenizer.decode(prompt[1:])
        assert tokenizer.encode(context).ids == prompt[1:], 'eval/niah.py builds its prompts from text'
        docs.append({'length': length, 'depth': depth, 'trial': trial, 'tokens': len(prompt),
                     'needle_at': needle_at, 'context': context, 'answer': f' {value}'})
    return docs


class TextRetrievalTask(RetrievalTask):
    """data/retrieval.py's task with needles whose text encodes back to their tokens."""

    def __init__(self, tokenizer, **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.tokenizer = tokenizer

    def round_trips(self, tokens):
        return self.tokenizer.encode(self.tokenizer.decode(list(tokens))).ids == list(tokens)

    def _pairs(self, rng, n, filler):
        """n (key, value) pairs, each word the first in a shuffled order that keeps the needle line's tokens through
        text: words the filler does not hold, each used once; with a small vocabulary any words, keys distinct."""
        candidates = list(rng.permutation(self.words if self.small_vocabulary else np.setdiff1d(self.words, filler)))
        pairs, keys = [], set()
        while len(pairs) < n:
            line = [int(t) for t in self.head]
            for _ in range(self.key_len + VALUE_TOKENS):
                if self.small_vocabulary:  # words may repeat: a fresh order for every word
                    candidates = list(rng.permutation(self.words))
                pick = next((i for i, w in enumerate(candidates) if self.round_trips(line + [int(w)])), None)
                if pick is None:
                    raise ValueError('no word left keeps a needle line\'s tokens through text')
                line.append(int(candidates.pop(pick)))
            words = np.array(line[len(self.head):], dtype=np.int64)
            if tuple(words[:self.key_len]) not in keys:
                keys.add(tuple(words[:self.key_len]))
                pairs.append((words[:self.key_len], words[self.key_len:]))
        return pairs


def retrieval_docs(task, tokenizer, stream, distances, trials, seed):
    """trials probes per distance whose text, context and context + answer, encodes back to their tokens."""
    docs = []
    for distance in distances:
        need = task.min_filler(distance)
        if need > len(stream):
            raise SystemExit(f'error: --distances: {distance} tokens needs {need} tokens of filler, the val split '
                             f'has {len(stream)}')
        for trial in range(trials):
            for attempt in range(ATTEMPTS):
                rng = np.random.default_rng((seed, distance, trial, attempt))
                start = rng.integers(0, len(stream) - need + 1)
                probe = task.probe(rng, stream[start:start + need], distance)
                prompt, answer = [int(t) for t in probe.prompt], [int(t) for t in probe.answer]
                context, target = tokenizer.decode(prompt), tokenizer.decode(answer)
                if (tokenizer.encode(context).ids == prompt and
                        tokenizer.encode(context + target).ids == prompt + answer):
                    break
            else:
                raise SystemExit(f'error: no probe at distance {distance} in {ATTEMPTS} draws has text that '
                                 f'encodes back to its tokens')
            docs.append({'distance': distance, 'exact_distance': probe.distance, 'trial': trial,
                         'attempts': attempt + 1, 'context': context, 'answer': target, 'tokens': prompt,
                         'answer_tokens': answer})
    return docs


def write_jsonl(path, docs):
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
        for doc in docs:
            f.write(json.dumps(doc) + '\n')
    os.replace(path + '.tmp', path)


def parse_list(text, kind, name):
    try:
        return [kind(x) for x in text.split(',')]
    except ValueError:
        raise SystemExit(f'error: --{name}={text!r}: expected comma-separated {kind.__name__}s')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--ckpt', help='take data_dir, the training length and retrieval_key_words from it')
    parser.add_argument('--data_dir', help='a prepared data dir (instead of --ckpt)')
    parser.add_argument('--train_len', type=int, help='with --data_dir: the training length the defaults scale')
    parser.add_argument('--key_words', type=int, help='retrieval key words (default: the checkpoint\'s, else 1)')
    parser.add_argument('--out', required=True, help='folder for niah.jsonl and retrieval.jsonl')
    parser.add_argument('--lengths', help='niah prompt lengths (default: 1/2 to 8 times the training length)')
    parser.add_argument('--depths', default='0,0.25,0.5,0.75,1')
    parser.add_argument('--trials', type=int, default=5, help='niah trials per (length, depth)')
    parser.add_argument('--distances', help='retrieval distances (default: 1/8 to 16 times the training length)')
    parser.add_argument('--retrieval_trials', type=int, default=32, help='retrieval probes per distance')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    if (args.ckpt is None) == (args.data_dir is None):
        raise SystemExit('error: --ckpt or --data_dir: give exactly one')
    if args.ckpt:
        try:
            train_config = checkpoint.load(args.ckpt)['config']
        except checkpoint.CheckpointError as e:
            raise SystemExit(f'error: --ckpt: {e}')
        data_dir = train_config['data_dir']
        train_len = min(train_config['max_doc_len'], train_config['tokens_per_batch'])
        key_words = args.key_words or train_config.get('retrieval_key_words', 1)
    else:
        data_dir, train_len, key_words = args.data_dir, args.train_len, args.key_words or 1
    if not (args.lengths and args.distances) and not train_len:
        raise SystemExit('error: --train_len: needed with --data_dir unless --lengths and --distances are given')
    for name in ('trials', 'retrieval_trials'):
        if getattr(args, name) < 1:
            raise SystemExit(f'error: --{name}={getattr(args, name)}: must be at least 1')
    try:
        tokenizer = load_tokenizer(data_dir)
    except FileNotFoundError as e:
        raise SystemExit(f'error: --data_dir {data_dir}: {e}')
    eot = tokenizer.token_to_id(EOT)
    lengths = (parse_list(args.lengths, int, 'lengths') if args.lengths else
               [train_len // 2, train_len, 2 * train_len, 4 * train_len, 8 * train_len])
    distances = (parse_list(args.distances, int, 'distances') if args.distances else
                 [max(1, round(m * train_len)) for m in MULTIPLES])
    depths = parse_list(args.depths, float, 'depths')
    if not all(0 <= d <= 1 for d in depths) or min(distances) < 1:
        raise SystemExit(f'error: --depths={args.depths}, --distances={args.distances}: depths in [0, 1], '
                         f'distances >= 1')

    os.makedirs(args.out, exist_ok=True)
    niah = niah_docs(tokenizer, eot, data_dir, lengths, depths, args.trials, args.seed)
    write_jsonl(os.path.join(args.out, 'niah.jsonl'), niah)
    try:
        task = TextRetrievalTask(tokenizer, key_words=key_words)
    except ValueError as e:
        raise SystemExit(f'error: --data_dir {data_dir}: its tokenizer cannot build the retrieval task: {e}')
    retrieval = retrieval_docs(task, tokenizer, common.held_out_stream(data_dir, eot), distances,
                               args.retrieval_trials, args.seed)
    write_jsonl(os.path.join(args.out, 'retrieval.jsonl'), retrieval)
    print(f'wrote {len(niah)} niah probes (lengths {lengths}) and {len(retrieval)} retrieval probes (distances '
          f'{distances}, {np.mean([d["attempts"] for d in retrieval]):.1f} draws each) to {args.out}')


if __name__ == '__main__':
    main()
