"""
Sample from a trained model with cached decoding:

    python sample.py                                     # out/tiny/ckpt.pt, a document from scratch
    python sample.py --prompt "def parse(" --temperature 0 --max_new_tokens 100
    python sample.py --ckpt out/long/ckpt.pt --prompt FILE:long_file.py

The prompt follows an EOT, as every training document does. It is prefilled --prefill_chunk tokens at a time (the
first chunk by the training kernel, later ones appended to the cache and attended by the decode kernel), then
tokens are decoded one at a time against the cache and streamed to the terminal. A sample ends after
--max_new_tokens tokens or at an EOT: in training no token ever saw past the end of its document.
"""
import argparse
import math
import sys
import time

import torch
from tokenizers.decoders import DecodeStream

import generate
from checkpoint import DTYPES, load_data_tokenizer, load_model, synchronize, training_length
from generate import KVCache


def prefill(model, idx, cache, chunk_size, train_len, device):
    """generate.prefill, chunk_size tokens at a time; a prompt longer than the training length says so on stderr, and,
    when it takes several chunks, how far it is every few seconds, with an estimate of the time left."""
    n = idx.shape[1]
    if n > train_len:
        print(f'note: the prompt is {n:,} tokens, {n / train_len:.1f}x the training length ({train_len:,}); '
              f'prefilling it in {math.ceil(n / chunk_size)} chunk(s) of at most {chunk_size:,} (--prefill_chunk)',
              file=sys.stderr)
    if n <= train_len or n <= chunk_size:
        return generate.prefill(model, idx, cache, chunk_size)
    t0 = shown = last = time.perf_counter()
    for start in range(0, n, chunk_size):
        logits = generate.prefill(model, idx[:, start:start + chunk_size], cache)
        synchronize(device)
        now, done = time.perf_counter(), min(start + chunk_size, n)
        # A chunk attends to everything before it, so its time grows with its start: after the first chunk (which
        # attends to half a chunk per query) guess that attention is all of it, later fit a line through the
        # first chunk's time and the latest's.
        if start == 0:
            first = now - t0
            slope = 2 * first / chunk_size
        else:
            slope = max(0.0, (now - last - first) / start)
        last = now
        left = sum(first + slope * s for s in range(done, n, chunk_size))
        if start == 0 or done == n or now - shown > 5:
            shown = now
            print(f'prefill: {done:,} of {n:,} tokens in {now - t0:.1f} s' +
                  (f', about {left:.0f} s left' if done < n else ''), file=sys.stderr, flush=True)
    return logits


def one_step_late(tokens):
    """The ints of [1, 1] device tensors, each read one step late: reading waits for the device, and by then the
    generator has queued the next decode step, so the device never idles while Python prints."""
    previous = None
    for token in tokens:
        if previous is not None:
            yield previous.item()
        previous = token
    if previous is not None:
        yield previous.item()


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--ckpt', default='out/tiny/ckpt.pt', help='checkpoint written by train.py')
    parser.add_argument('--prompt', default='', help='prompt text, or FILE:path to read it from a file')
    parser.add_argument('--num_samples', type=int, default=1)
    parser.add_argument('--max_new_tokens', type=int, default=200)
    parser.add_argument('--temperature', type=float, default=0.8, help='0 = greedy')
    parser.add_argument('--top_k', type=int, default=200, help='sample among the top_k most likely tokens; 0 = all')
    parser.add_argument('--seed', type=int, default=1337)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--dtype', choices=DTYPES, default='bfloat16' if torch.cuda.is_available() else 'float32')
    parser.add_argument('--prefill_chunk', type=int, help='prompt tokens per prefill forward (default: 65536 on a '
                        'GPU; on a CPU 4096, so that a long prompt shows its progress)')
    parser.add_argument('--max_len', type=int, help='cache length (default: prompt + max_new_tokens)')
    parser.add_argument('--eager', action='store_true', help='decode without CUDA graphs (GPU), e.g. to debug')
    args = parser.parse_args(argv)
    if args.prefill_chunk is None:
        args.prefill_chunk = 65536 if args.device.startswith('cuda') else 4096
    for name in ('num_samples', 'max_new_tokens', 'prefill_chunk'):
        if getattr(args, name) < 1:
            parser.error(f'--{name}={getattr(args, name)}: must be at least 1')
    if args.temperature < 0 or args.top_k < 0:
        parser.error(f'--temperature={args.temperature}, --top_k={args.top_k}: must not be negative')
    return args


def read_prompt(prompt):
    if not prompt.startswith('FILE:'):
        return prompt
    try:
        with open(prompt[len('FILE:'):], encoding='utf-8') as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f'error: --prompt {prompt}: cannot read it as UTF-8 text ({e})')


def main(argv=None):
    args = parse_args(argv)
    text = read_prompt(args.prompt)
    model, train_config = load_model(args.ckpt, args.device, DTYPES[args.dtype])
    tokenizer, eot = load_data_tokenizer(train_config)
    prompt = [eot] + tokenizer.encode(text).ids
    max_len = args.max_len or len(prompt) + args.max_new_tokens
    if len(prompt) + args.max_new_tokens > max_len:
        raise SystemExit(f'error: the prompt ({len(prompt)} tokens with its EOT) and --max_new_tokens='
                         f'{args.max_new_tokens} do not fit the cache: --max_len={max_len}')
    try:
        cache = KVCache(model, 1, max_len)
    except ValueError as e:
        raise SystemExit(f'error: --ckpt {args.ckpt}: {e}')
    idx = torch.tensor([prompt], device=args.device)
    top_k = args.top_k or None
    torch.manual_seed(args.seed)

    for _ in range(args.num_samples):
        cache.reset()
        synchronize(args.device)
        t0 = time.perf_counter()
        logits = prefill(model, idx, cache, args.prefill_chunk, training_length(train_config), args.device)
        synchronize(args.device)
        t1 = time.perf_counter()
        print(text, end='', flush=True)
        stream, new_tokens = DecodeStream(skip_special_tokens=False), 0
        for token in one_step_late(generate.decode(model, logits, cache, args.max_new_tokens, args.temperature, top_k,
                                                     cuda_graph=not args.eager)):
            new_tokens += 1
            if token == eot:
                break
            print(stream.step(tokenizer, token) or '', end='', flush=True)
        synchronize(args.device)
        t2 = time.perf_counter()
        print(f'\n---------------\nprompt tokens {len(prompt)}, new tokens {new_tokens}, prefill {t1 - t0:.3f} s, '
              f'decode {new_tokens / (t2 - t1):.1f} tokens/s', flush=True)


if __name__ == '__main__':
    main(sys.argv[1:])
