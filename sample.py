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
import os
import sys
import time

import torch
from tokenizers.decoders import DecodeStream

import checkpoint
from data.loader import EOT, load_tokenizer
from generate import KVCache

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def load_model(path, device, dtype):
    """(model in eval mode on device, cast to dtype; the checkpoint's training config). Exits with one line when
    path is missing, unreadable or not a checkpoint of this repository's train.py."""
    try:
        if torch.device(device).type == 'cuda' and not torch.cuda.is_available():
            raise RuntimeError('no CUDA GPU here')
    except RuntimeError as e:
        raise SystemExit(f'error: --device {device}: {e}')
    try:
        ckpt = checkpoint.load(path)
    except checkpoint.CheckpointError as e:
        hint = ' (train one first, e.g. python train.py config/tiny.py)' if not os.path.isfile(path) else ''
        raise SystemExit(f'error: --ckpt: {e}{hint}')
    try:  # attn_impl is how the model runs, not what it computes: let it follow the device it is loaded on
        model = checkpoint.build_model(ckpt, attn_impl='auto')
    except checkpoint.CheckpointError as e:
        raise SystemExit(f'error: --ckpt {path}: {e}')
    return model.to(device).to_inference_dtype(dtype).eval(), ckpt['config']


def load_data_tokenizer(train_config):
    """The tokenizer of the data the model was trained on, and its EOT id."""
    try:
        tokenizer = load_tokenizer(train_config['data_dir'])
    except FileNotFoundError as e:
        raise SystemExit(f'error: cannot load the tokenizer of the checkpoint\'s data: {e}')
    return tokenizer, tokenizer.token_to_id(EOT)


def training_length(train_config):
    """The longest context the model saw in training: a document piece of at most max_doc_len tokens, in a batch."""
    return min(train_config['max_doc_len'], train_config['tokens_per_batch'])


def synchronize(device):
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)


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
    parser.add_argument('--prefill_chunk', type=int, default=65536, help='prompt tokens per prefill forward')
    parser.add_argument('--max_len', type=int, help='cache length (default: prompt + max_new_tokens)')
    parser.add_argument('--eager', action='store_true', help='decode without CUDA graphs (GPU), e.g. to debug')
    args = parser.parse_args(argv)
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
        logits = model.prefill(idx, cache, args.prefill_chunk)
        synchronize(args.device)
        t1 = time.perf_counter()
        print(text, end='', flush=True)
        stream, new_tokens = DecodeStream(skip_special_tokens=False), 0
        for token in one_step_late(model.decode(logits, cache, args.max_new_tokens, args.temperature, top_k,
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
