"""Prepare a corpus: train a byte-level BPE tokenizer, split documents into train/val(/test), write token shards.

    python -m data.prepare                                       # this Python's standard library -> data/pystdlib/
    python -m data.prepare --source=installed --vocab_size=16384 # all installed Python source -> data/installed/
    python -m data.prepare --source='~/notes/**/*.md' --out=data/notes
    python -m data.prepare --source=HuggingFaceFW/fineweb-edu --hf_config=sample-10BT --max_docs=200000 \\
        --out=data/fineweb-edu --vocab_size=32768                # needs access to the Hugging Face Hub

Writes tokenizer.json, train.bin, val.bin (test.bin for --source=installed) and manifest.json into --out (shard
format: data/loader.py); everything is written beside the output first and moved in at the end, so a failed run
leaves nothing behind.

Sources:
- stdlib (the default, the quick start's): every *.py file of the running Python's standard library, one document
  per file, test suites included (about 9M tokens on a full install; 15-20 s on 2 idle cores). The split is by
  document and seeded.
- installed: the Python source of everything installed in the running interpreter, the standard library and
  site-packages, read from disk. One document per folder: the folder's .py files in sorted path order, each
  preceded by a `# file: <path>` line, so documents run from a few hundred to hundreds of thousands of tokens and
  keep their long-range structure (imports and definitions used far below). Exact duplicate files (vendored copies)
  are dropped by content hash first. Validation and test are whole held-out top-level packages (a stdlib package
  such as `email`, or a site-packages distribution's top-level folder), drawn in a seeded order until each holds
  its share of the corpus and, for validation, --min_long_docs documents of at least 64k tokens where the corpus
  has them; packages over 5% of the corpus stay in training. --packages restricts it to named top-level packages.
  manifest.json records every package: its split, distribution, version, license, files and tokens.
- a local folder or glob of text files, one document per file; or else a Hugging Face dataset name.
Files that are not UTF-8 and empty files are skipped. The tokenizer is trained on the train split only (at most
--tokenizer_chars characters of it). Everything is held in memory: cap big corpora with --max_docs.
"""
import argparse
import glob
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import socket
import sysconfig
import time
from contextlib import contextmanager
from itertools import islice

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from data.loader import DTYPES, EOT, HEADER, MAGIC, VERSION

DATA = os.path.dirname(os.path.abspath(__file__))
KEYWORD_OUT = {'stdlib': 'pystdlib', 'installed': 'installed'}
LONG = 65536                # a "long" document, in tokens
CHARS_PER_TOKEN = 4.2       # to pick held-out packages before there is a tokenizer: errs towards more long docs
MAX_HELD_OUT_SHARE = 0.05   # a package bigger than this and val_fraction stays in training: one must not be a split


class SourceError(ValueError):
    """--source names nothing usable; the message says why in one line."""


# ---------------------------------------------------------------------------------------------------------------
# reading sources

def python_files(root, skip=()):
    """Sorted .py files under root, not descending into `skip` folder names or __pycache__."""
    paths = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in skip and d != '__pycache__')
        paths += [os.path.join(folder, f) for f in sorted(files) if f.endswith('.py')]
    return paths


def read_text(path):
    """The file's text, or None when it is not UTF-8."""
    try:
        with open(path, encoding='utf-8') as f:
            return f.read()
    except UnicodeDecodeError:
        return None


def read_texts(paths):
    texts, skipped = [], 0
    for path in tqdm(paths, desc='reading files', unit='file'):
        text = read_text(path)
        if text is None:
            skipped += 1
        else:
            texts.append(text)
    return texts, skipped


def local_files(source):
    pattern = os.path.join(source, '**', '*') if os.path.isdir(source) else source
    return sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))


def looks_local(source):
    """A path the user means on this disk: explicit (/ . ~), a glob, or under a folder that exists here."""
    first = source.replace('\\', '/').split('/')[0]
    return source.startswith(('/', '.', '~')) or glob.has_magic(source) or os.path.isdir(first) or \
        os.path.exists(source)


def hub_texts(name, config, text_field, max_docs):
    if os.environ.get('HF_HUB_OFFLINE') == '1':
        raise SourceError(f'--source={name!r} is not a local path, and HF_HUB_OFFLINE=1 rules out the Hugging Face Hub')
    try:  # a quick probe: without a network the datasets library retries for half a minute
        socket.create_connection(('huggingface.co', 443), timeout=5).close()
    except OSError:
        raise SourceError(f'--source={name!r} is not a local path, and the Hugging Face Hub cannot be reached (no '
                          f'network?): use --source=stdlib, --source=installed or a local folder') from None
    import datasets
    try:
        rows = datasets.load_dataset(name, name=config, split='train', streaming=True)
        texts = [row[text_field] for row in tqdm(islice(rows, max_docs), desc=f'downloading {name}', unit='doc')]
    except KeyError as e:
        raise SourceError(f'--text_field={text_field!r} is not a column of {name}: {e}') from None
    except Exception as e:
        raise SourceError(f'--source={name!r}: could not load it from the Hugging Face Hub '
                          f'({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ""})') from None
    return texts


def site_roots():
    stdlib = os.path.realpath(sysconfig.get_paths()['stdlib'])
    roots = [os.path.realpath(p) for p in [sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib']]]
    return stdlib, [r for i, r in enumerate(roots) if os.path.isdir(r) and r not in roots[:i]]


def distribution_info(top_levels):
    """{top-level name: (distribution, version, license)} from the installed packages' metadata."""
    owners = importlib.metadata.packages_distributions()
    info = {}
    for name in top_levels:
        for dist_name in owners.get(name, [])[:1]:
            try:
                meta = importlib.metadata.metadata(dist_name)
            except importlib.metadata.PackageNotFoundError:
                continue
            license = meta.get('License-Expression') or (meta.get('License') or '').strip().split('\n')[0][:80]
            if not license:
                license = '; '.join(c.split(' :: ')[-1] for c in meta.get_all('Classifier') or [] if
                                    c.startswith('License ::')) or 'unknown'
            info[name] = (dist_name, meta.get('Version'), license)
    return info


def installed_packages(packages=None, roots=None):
    """(packages, stats): packages maps a top-level package to its folder documents [(folder, text, files)],
    in a fixed order; exact duplicate files are dropped (the first in that order stays). roots: (the stdlib
    folder, [site-packages folders]), by default this interpreter's."""
    stdlib, sites = roots or site_roots()
    groups = []  # (package, folder relative to its root, [paths])
    skip = {'site-packages', 'dist-packages'}
    for path in python_files(stdlib, skip):
        rel = os.path.relpath(path, stdlib)
        top = rel.split(os.sep)[0] if os.sep in rel else 'stdlib'  # the stdlib's own modules form one package
        groups.append((f'stdlib/{top}' if top != 'stdlib' else 'stdlib', os.path.dirname(rel) or '.', path, rel))
    for root in sites:
        for entry in sorted(os.listdir(root)):
            full = os.path.join(root, entry)
            if entry.endswith(('.dist-info', '.egg-info')) or entry == '__pycache__':
                continue
            if os.path.isdir(full):
                for path in python_files(full):
                    rel = os.path.relpath(path, root)
                    groups.append((entry, os.path.dirname(rel), path, rel))
            elif entry.endswith('.py'):
                groups.append((entry[:-3], '.', full, entry))
    if packages is not None:
        unknown = sorted(set(packages) - {g[0] for g in groups})
        if unknown:
            raise SourceError(f'--packages: {", ".join(unknown)} not installed here (top-level names, e.g. numpy or '
                              f'stdlib/email)')
        groups = [g for g in groups if g[0] in packages]
    seen, by_package = set(), {}
    stats = {'files': 0, 'duplicates': 0, 'skipped': 0, 'empty': 0}
    for package, folder, path, rel in tqdm(groups, desc='reading installed source', unit='file'):
        with open(path, 'rb') as f:
            data = f.read()
        digest = hashlib.sha1(data).digest()
        if not data.strip():
            stats['empty'] += 1
            continue
        if digest in seen:
            stats['duplicates'] += 1
            continue
        seen.add(digest)
        try:
            text = data.decode('utf-8')
        except UnicodeDecodeError:
            stats['skipped'] += 1
            continue
        stats['files'] += 1
        docs = by_package.setdefault(package, {})
        docs.setdefault(folder, []).append(f'# file: {rel}\n{text}' + ('' if text.endswith('\n') else '\n'))
    return {p: [(folder, ''.join(texts), len(texts)) for folder, texts in docs.items()]
            for p, docs in by_package.items()}, stats


def hold_out(packages, seed, val_fraction, test_fraction, min_long_docs):
    """{package: split}: whole packages drawn into val, then test, until each holds its share of the corpus's
    characters and val its long documents (estimated from characters; at most half of the corpus's), but never
    more than three times its share; the rest is train."""
    if len(packages) < 3:
        raise SourceError(f'{len(packages)} packages: holding out whole packages for val and test needs at least 3')
    chars = {p: sum(len(t) for _, t, _ in docs) for p, docs in packages.items()}
    long_docs = {p: sum(len(t) >= LONG * CHARS_PER_TOKEN for _, t, _ in docs) for p, docs in packages.items()}
    total = sum(chars.values())
    names = sorted(packages)
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))
             if chars[names[i]] <= max(MAX_HELD_OUT_SHARE, val_fraction) * total]
    split = {p: 'train' for p in names}
    # val draws the packages densest in long documents first (ties in the seeded order), then the rest
    densest = sorted(order, key=lambda p: -long_docs[p] / max(chars[p], 1))
    for name, fraction, want_long, candidates in [
            ('val', val_fraction, min(min_long_docs, sum(long_docs.values()) // 2), densest),
            ('test', test_fraction, 0, order)]:
        held = held_long = 0
        for p in candidates:
            if held >= 3 * fraction * total or (held >= fraction * total and held_long >= want_long):
                break
            if split[p] == 'train':
                split[p], held, held_long = name, held + chars[p], held_long + long_docs[p]
    if 'train' not in split.values() or 'val' not in split.values():
        raise SourceError(f'{len(packages)} packages of these sizes leave no package for train or val')
    return split


# ---------------------------------------------------------------------------------------------------------------
# tokenizer and shards

def train_tokenizer(texts, vocab_size, max_chars):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    sample, chars = [], 0
    for text in texts:  # documents cut to 1M characters; past max_chars, a seeded random choice of them
        sample.append(text[:1 << 20])
        chars += len(sample[-1])
    if chars > max_chars:
        keep = np.random.default_rng(0).permutation(len(sample))
        picked, chars = [], 0
        for i in keep:
            if chars >= max_chars:
                break
            picked.append(sample[i])
            chars += len(sample[i])
        sample = picked
    tokenizer.train_from_iterator(sample, trainer, length=len(sample))
    return tokenizer


def encode(tokenizer, texts, dtype, chunk=256):
    # longest first, so the batch's threads are not left waiting on one huge document at the end
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    encoded = [None] * len(texts)
    with tqdm(total=sum(len(t) for t in texts), desc='encoding', unit='char', unit_scale=True) as progress:
        for i in range(0, len(order), chunk):
            batch = order[i:i + chunk]
            for j, e in zip(batch, tokenizer.encode_batch_fast([texts[j] for j in batch])):
                encoded[j] = np.array(e.ids, dtype=dtype)
            progress.update(sum(len(texts[j]) for j in batch))
    return encoded


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


@contextmanager
def staging(out):
    """A fresh folder beside `out` to write into; on success its files move into `out` (created if need be)."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f'.{os.path.basename(os.path.abspath(out))}.{os.getpid()}.tmp')
    os.makedirs(tmp)
    try:
        yield tmp
        os.makedirs(out, exist_ok=True)
        for name in sorted(os.listdir(tmp)):
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------

def prepare(source='stdlib', out=None, vocab_size=4096, tokenizer=None, val_fraction=0.05, test_fraction=None,
            seed=0, num_proc=None, text_field='text', hf_config=None, max_docs=None, force=False, packages=None,
            min_long_docs=64, tokenizer_chars=100_000_000):
    t0 = time.time()
    if source not in KEYWORD_OUT and out is None:
        raise ValueError(f'--out is required with --source={source!r} (data/pystdlib and data/installed are for '
                         f'--source=stdlib and --source=installed)')
    out = out or os.path.join(DATA, KEYWORD_OUT[source])
    if not 0 < val_fraction < 1:
        raise ValueError(f'--val_fraction={val_fraction}, expected a number between 0 and 1')
    test_fraction = val_fraction / 2 if test_fraction is None else test_fraction
    if not 0 <= test_fraction < 1 - val_fraction:
        raise ValueError(f'--test_fraction={test_fraction}, expected a number in [0, 1 - val_fraction)')
    if packages is not None and source != 'installed':
        raise ValueError('--packages goes with --source=installed')
    existing = [f for f in ('tokenizer.json', 'train.bin', 'val.bin') if os.path.exists(os.path.join(out, f))]
    if existing and not force:
        raise FileExistsError(f'{out} is already prepared ({", ".join(existing)}); pass --force to overwrite')
    manifest = {'source': source, 'python': platform.python_version(), 'seed': seed,
                'tokenizer': {'trained_on': os.path.abspath(tokenizer) if tokenizer else 'the train split'}}
    if tokenizer:
        try:
            tokenizer = Tokenizer.from_file(tokenizer)
        except Exception as e:
            raise ValueError(f'--tokenizer={tokenizer}: not a tokenizer.json ({str(e).splitlines()[0][:200]})') from None
        if tokenizer.token_to_id(EOT) is None:
            raise ValueError(f'--tokenizer has no {EOT} token')
    # The tokenizers library runs on rayon threads; the pool reads this when it first starts.
    os.environ['RAYON_NUM_THREADS'] = str(num_proc or os.cpu_count())

    if source == 'installed':
        by_package, stats = installed_packages(packages)
        if not by_package:
            raise SourceError('--source=installed: no Python source found in this interpreter')
        split_of = hold_out(by_package, seed, val_fraction, test_fraction, min_long_docs)
        info = distribution_info({p for p in by_package if not p.startswith('stdlib')})
        splits = {s: [] for s in ('train', 'val', 'test')}
        records = []
        for package in sorted(by_package):
            docs = by_package[package]
            splits[split_of[package]] += [text for _, text, _ in docs]
            dist, version, license = (('python', platform.python_version(), 'PSF-2.0') if
                                      package.startswith('stdlib') else info.get(package, (None, None, 'unknown')))
            records.append({'package': package, 'split': split_of[package], 'distribution': dist, 'version': version,
                            'license': license, 'files': sum(n for _, _, n in docs), 'documents': len(docs)})
        manifest |= {'files': stats['files'], 'duplicates_dropped': stats['duplicates'],
                     'skipped_not_utf8': stats['skipped'], 'empty_files': stats['empty']}
        summary = [f'source: installed Python source: {stats["files"]} files in {len(by_package)} packages, '
                   f'{stats["duplicates"]} duplicate files dropped, {stats["skipped"]} skipped (not UTF-8)']
    else:
        skipped = 0
        local = os.path.expanduser(source)
        if source == 'stdlib':
            texts, skipped = read_texts(python_files(sysconfig.get_paths()['stdlib'], {'site-packages',
                                                                                       'dist-packages'}))
            label = f'stdlib ({sysconfig.get_paths()["stdlib"]})'
        elif looks_local(local):
            if not glob.has_magic(local) and not os.path.exists(local):
                raise SourceError(f'--source={source!r}: no such file or folder')
            paths = local_files(local)
            if not paths:
                raise SourceError(f'--source={source!r}: ' + ('the folder holds no files' if os.path.isdir(local)
                                                               else 'no files match'))
            texts, skipped = read_texts(paths)
            if not any(texts):
                raise SourceError(f'--source={source!r}: every one of its {len(paths)} files was skipped as not '
                                  f'UTF-8 text or empty')
            label = source
        else:
            texts = hub_texts(source, hf_config, text_field, max_docs)
            label = f'Hugging Face dataset {source}'
        texts = [t for t in texts if t][:max_docs]
        order = np.random.default_rng(seed).permutation(len(texts))
        num_val = round(val_fraction * len(texts))
        if not 0 < num_val < len(texts):
            raise ValueError(f'{len(texts)} documents and --val_fraction={val_fraction} give {num_val} val '
                             f'documents; need at least one document in each split')
        is_val = np.zeros(len(texts), dtype=bool)
        is_val[order[:num_val]] = True
        # each split keeps the corpus order (files of a package stay adjacent: coherent eval pseudo-documents)
        splits = {'train': [t for t, v in zip(texts, is_val) if not v], 'val': [t for t, v in zip(texts, is_val) if v]}
        records = None
        manifest |= {'skipped_not_utf8': skipped}
        summary = [f'source: {label}: {len(texts)} documents, {skipped} files skipped (not UTF-8)']

    if not tokenizer:
        t1 = time.time()
        tokenizer = train_tokenizer(splits['train'], vocab_size, tokenizer_chars)
        summary.append(f'tokenizer trained in {time.time() - t1:.1f} s')
    # A literal '<|endoftext|>' in a document is text, not the document separator.
    tokenizer.encode_special_tokens = True
    dtype = DTYPES[2] if tokenizer.get_vocab_size() < 2 ** 16 else DTYPES[4]
    summary.append(f'vocab: {tokenizer.get_vocab_size()}, {np.dtype(dtype).name} tokens')
    manifest['tokenizer']['vocab_size'] = tokenizer.get_vocab_size()
    manifest['splits'] = {}

    with staging(out) as tmp:
        lengths = {}
        for split, split_texts in splits.items():
            if not split_texts and split == 'test':
                continue
            docs = encode(tokenizer, split_texts, dtype)
            lengths[split] = [len(d) for d in docs]
            num_tokens = write_shard(os.path.join(tmp, f'{split}.bin'), docs, dtype)
            long_docs = sum(n >= LONG for n in lengths[split])
            manifest['splits'][split] = {'documents': len(docs), 'tokens': int(num_tokens),
                                         'documents_32k': sum(n >= 32768 for n in lengths[split]),
                                         'documents_64k': long_docs}
            summary.append(f'{split}: {len(docs)} documents, {num_tokens:,} tokens, {long_docs} of at least '
                           f'{LONG // 1024}k tokens -> {os.path.join(out, split + ".bin")}')
        if records is not None:
            at = {s: 0 for s in lengths}
            for record in records:
                n, split = record['documents'], record['split']
                record['tokens'] = int(sum(lengths[split][at[split]:at[split] + n]))
                record['documents_64k'] = sum(x >= LONG for x in lengths[split][at[split]:at[split] + n])
                at[split] += n
            manifest['packages'] = records
        tokenizer.save(os.path.join(tmp, 'tokenizer.json'))
        manifest['tokenizer']['sha256'] = hashlib.sha256(open(os.path.join(tmp, 'tokenizer.json'), 'rb')
                                                         .read()).hexdigest()
        with open(os.path.join(tmp, 'manifest.json'), 'w') as f:
            json.dump(manifest, f, indent=1)
    print('\n'.join(summary + [f'done in {time.time() - t0:.1f} s']))
    return manifest


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--source', default='stdlib', help="'stdlib', 'installed', a local folder or glob of text "
                                                           "files, or a Hugging Face dataset name")
    parser.add_argument('--out', help='output dir (default data/pystdlib or data/installed for those sources)')
    parser.add_argument('--vocab_size', type=int, default=4096, help='of the trained tokenizer')
    parser.add_argument('--tokenizer', help='an existing tokenizer.json to reuse instead of training one')
    parser.add_argument('--tokenizer_chars', type=int, default=100_000_000,
                        help='train the tokenizer on at most this many characters of the train split')
    parser.add_argument('--val_fraction', type=float, default=0.05)
    parser.add_argument('--test_fraction', type=float, help='--source=installed (default: half of val_fraction)')
    parser.add_argument('--min_long_docs', type=int, default=64,
                        help='--source=installed: validation documents of 64k+ tokens to aim for')
    parser.add_argument('--packages', help='--source=installed: comma-separated top-level packages to keep')
    parser.add_argument('--seed', type=int, default=0, help='seeds the split')
    parser.add_argument('--num_proc', type=int, help='tokenizer threads (default: all cores)')
    parser.add_argument('--text_field', default='text', help='text column of a Hugging Face dataset')
    parser.add_argument('--hf_config', help='Hugging Face dataset config, e.g. sample-10BT')
    parser.add_argument('--max_docs', type=int, help='keep only the first documents of the corpus')
    parser.add_argument('--force', action='store_true', help='overwrite an already prepared --out')
    args = vars(parser.parse_args(argv))
    if args['packages'] is not None:
        args['packages'] = [p for p in args['packages'].split(',') if p]
    try:
        prepare(**args)
    except (ValueError, FileExistsError) as e:
        raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
    main()
