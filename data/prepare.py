"""Prepare a corpus: train a byte-level BPE tokenizer, split documents into train/val, write token shards.

    python data/prepare.py                                       # this Python's standard library -> data/pystdlib/
    python data/prepare.py --source='~/notes/**/*.md' --out=data/notes
    python data/prepare.py --source=HuggingFaceFW/fineweb-edu --hf_config=sample-10BT --max_docs=200000 \\
        --out=data/fineweb-edu --vocab_size=32768                # needs access to the Hugging Face Hub

Writes tokenizer.json, train.bin and val.bin into --out (shard format: data/loader.py). The default corpus is
every *.py file of the running Python's standard library, one document per file, test suites included: they are
ordinary Python and almost triple the corpus (about 9M tokens) while it still prepares in 15-20 s on 2 idle cores.
Files that are not UTF-8 and empty files are skipped. The split is by document and seeded; each split keeps the
corpus order (files of a package stay adjacent, which makes eval pseudo-documents coherent). The tokenizer is
trained on the train split only. Everything is held in memory: cap big corpora with --max_docs.
"""
import argparse
import glob
import os
import sys
import sysconfig
import time
from contextlib import contextmanager
from itertools import islice

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # so `python data/prepare.py` works
from data.loader import DTYPES, EOT, HEADER, MAGIC, VERSION  # noqa: E402

OUTPUTS = ('tokenizer.json', 'train.bin', 'val.bin')


def stdlib_files():
    root = sysconfig.get_paths()['stdlib']
    paths = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in ('site-packages', 'dist-packages', '__pycache__'))
        paths += [os.path.join(folder, f) for f in sorted(files) if f.endswith('.py')]
    return paths


def local_files(source):
    pattern = os.path.join(source, '**', '*') if os.path.isdir(source) else source
    return sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))


def read_texts(paths):
    texts, skipped = [], 0
    for path in tqdm(paths, desc='reading files', unit='file'):
        try:
            with open(path, encoding='utf-8') as f:
                texts.append(f.read())
        except UnicodeDecodeError:
            skipped += 1
    return texts, skipped


def hub_texts(name, config, text_field, max_docs):
    import datasets
    try:
        rows = datasets.load_dataset(name, name=config, split='train', streaming=True)
        texts = [row[text_field] for row in tqdm(islice(rows, max_docs), desc=f'downloading {name}', unit='doc')]
    except KeyError as e:
        raise ValueError(f'--text_field={text_field!r} is not a column of {name}: {e}') from e
    except Exception as e:
        raise RuntimeError(f'could not load the Hugging Face dataset {name!r} ({type(e).__name__}: {e}). This needs '
                           f'access to the Hub; offline, use --source=stdlib or a local directory/glob.') from e
    return texts


def train_tokenizer(texts, vocab_size):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    return tokenizer


def encode(tokenizer, texts, dtype, chunk=1024):
    docs = []
    with tqdm(total=len(texts), desc='encoding', unit='doc') as progress:
        for i in range(0, len(texts), chunk):
            docs += [np.array(e.ids, dtype=dtype) for e in tokenizer.encode_batch_fast(texts[i:i + chunk])]
            progress.update(len(texts[i:i + chunk]))
    return docs


@contextmanager
def replacing(path):
    """Yield a temporary path next to `path`, moved over `path` only when the block completes."""
    tmp = f'{path}.{os.getpid()}.tmp'
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_shard(path, docs, dtype):
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum([len(d) for d in docs], out=offsets[1:])
    itemsize = np.dtype(dtype).itemsize
    with replacing(path) as tmp, open(tmp, 'wb') as f:
        f.write(HEADER.pack(MAGIC, VERSION, itemsize, offsets[-1], len(docs)))
        f.write(offsets.tobytes())
        for doc in docs:
            f.write(doc.tobytes())
    return offsets[-1]


def prepare(source='stdlib', out=None, vocab_size=4096, tokenizer=None, val_fraction=0.05, seed=0, num_proc=None,
            text_field='text', hf_config=None, max_docs=None, force=False):
    t0 = time.time()
    if source != 'stdlib' and out is None:
        raise ValueError(f'--out is required with --source={source!r} (the default data/pystdlib is for the stdlib)')
    out = out or os.path.join(os.path.dirname(os.path.abspath(__file__)), 'pystdlib')
    if not 0 < val_fraction < 1:
        raise ValueError(f'--val_fraction={val_fraction}, expected a number between 0 and 1')
    existing = [f for f in OUTPUTS if os.path.exists(os.path.join(out, f))]
    if existing and not force:
        raise FileExistsError(f'{out} is already prepared ({", ".join(existing)}); pass --force to overwrite')
    # The tokenizers library runs on rayon threads; the pool reads this when it first starts.
    os.environ['RAYON_NUM_THREADS'] = str(num_proc or os.cpu_count())

    skipped = 0
    local = os.path.expanduser(source)
    if source == 'stdlib':
        texts, skipped = read_texts(stdlib_files())
        source = f'stdlib ({sysconfig.get_paths()["stdlib"]})'
    elif os.path.exists(local) or glob.has_magic(local) or source.startswith(('/', '.', '~')):
        paths = local_files(local)
        if not paths:
            raise FileNotFoundError(f'--source={source!r}: no files match')
        texts, skipped = read_texts(paths)
    else:
        texts = hub_texts(source, hf_config, text_field, max_docs)
    texts = [t for t in texts if t][:max_docs]

    order = np.random.default_rng(seed).permutation(len(texts))
    num_val = round(val_fraction * len(texts))
    if not 0 < num_val < len(texts):
        raise ValueError(f'{len(texts)} documents and --val_fraction={val_fraction} give {num_val} val documents; '
                         f'need at least one document in each split')
    is_val = np.zeros(len(texts), dtype=bool)
    is_val[order[:num_val]] = True
    splits = {'train': [t for t, v in zip(texts, is_val) if not v], 'val': [t for t, v in zip(texts, is_val) if v]}

    if tokenizer:
        tokenizer = Tokenizer.from_file(tokenizer)
        if tokenizer.token_to_id(EOT) is None:
            raise ValueError(f'--tokenizer has no {EOT} token')
    else:
        tokenizer = train_tokenizer(splits['train'], vocab_size)
    # A literal '<|endoftext|>' in a document is text, not the document separator.
    tokenizer.encode_special_tokens = True
    dtype = DTYPES[2] if tokenizer.get_vocab_size() < 2 ** 16 else DTYPES[4]

    os.makedirs(out, exist_ok=True)
    summary = [f'source: {source}: {len(texts)} documents, {skipped} files skipped (not UTF-8)',
               f'vocab: {tokenizer.get_vocab_size()}, {np.dtype(dtype).name} tokens']
    for split, split_texts in splits.items():
        path = os.path.join(out, f'{split}.bin')
        num_tokens = write_shard(path, encode(tokenizer, split_texts, dtype), dtype)
        summary.append(f'{split}: {len(split_texts)} documents, {num_tokens:,} tokens -> {path} '
                       f'({os.path.getsize(path) / 2 ** 20:.1f} MiB)')
    with replacing(os.path.join(out, 'tokenizer.json')) as tmp:
        tokenizer.save(tmp)
    print('\n'.join(summary + [f'done in {time.time() - t0:.1f} s']))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--source', default='stdlib',
                        help="'stdlib', a local directory or glob of text files, or a Hugging Face dataset name")
    parser.add_argument('--out', help='output dir (default data/pystdlib for the stdlib)')
    parser.add_argument('--vocab_size', type=int, default=4096, help='of the trained tokenizer')
    parser.add_argument('--tokenizer', help='an existing tokenizer.json to reuse instead of training one')
    parser.add_argument('--val_fraction', type=float, default=0.05)
    parser.add_argument('--seed', type=int, default=0, help='seeds the train/val split')
    parser.add_argument('--num_proc', type=int, help='tokenizer threads (default: all cores)')
    parser.add_argument('--text_field', default='text', help='text column of a Hugging Face dataset')
    parser.add_argument('--hf_config', help='Hugging Face dataset config, e.g. sample-10BT')
    parser.add_argument('--max_docs', type=int, help='keep only the first documents of the corpus')
    parser.add_argument('--force', action='store_true', help='overwrite an already prepared --out')
    prepare(**vars(parser.parse_args(argv)))


if __name__ == '__main__':
    main()
