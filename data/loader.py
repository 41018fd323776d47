"""Read prepared token shards: packed training batches with document boundaries, and whole documents for evaluation.

A prepared data dir (see data/prepare.py) holds `tokenizer.json`, `train.bin` and `val.bin`.
Shard layout, little-endian:

    header   32 bytes: magic b'WALLTOK\\0', uint32 format version, uint32 bytes per token (2 or 4),
                       uint64 token count, uint64 document count N
    offsets  int64[N + 1]: document n is tokens[offsets[n]:offsets[n + 1]], offsets[0] = 0, offsets[N] = token count
    tokens   uint16[token count] when the vocab has < 65536 entries, else uint32

Shards store the documents' own tokens only. The loader prepends EOT, which doubles as BOS, to every document
piece it hands out, so every piece of a document cut for length or for the batch end starts the same way.
"""
import os
import struct

import numpy as np
import torch
from tokenizers import Tokenizer

from data.retrieval import RetrievalTask

EOT = '<|endoftext|>'
SPLITS = ('train', 'val', 'test')
MAGIC = b'WALLTOK\0'
VERSION = 1
HEADER = struct.Struct('<8sIIQQ')  # magic, version, bytes per token, token count, document count
DTYPES = {2: np.uint16, 4: np.uint32}


def read_shard(path):
    """Return (tokens, offsets) of a shard: tokens as a read-only memmap, offsets as int64[N + 1]."""
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        header = f.read(HEADER.size)
    if len(header) < HEADER.size:
        raise ValueError(f'{path}: truncated shard, {size} bytes is shorter than the {HEADER.size}-byte header')
    magic, version, itemsize, num_tokens, num_docs = HEADER.unpack(header)
    if magic != MAGIC:
        raise ValueError(f'{path}: not a token shard (magic bytes {magic!r}, expected {MAGIC!r})')
    if version != VERSION:
        raise ValueError(f'{path}: shard format version {version}, this loader reads version {VERSION}')
    if itemsize not in DTYPES:
        raise ValueError(f'{path}: {itemsize} bytes per token in the header, expected one of {sorted(DTYPES)}')
    tokens_at = HEADER.size + 8 * (num_docs + 1)
    if size != tokens_at + itemsize * num_tokens:
        raise ValueError(f'{path}: {size} bytes, but the header promises {num_docs} documents and {num_tokens} '
                         f'tokens = {tokens_at + itemsize * num_tokens} bytes (truncated or corrupt shard)')
    offsets = np.fromfile(path, dtype=np.int64, count=num_docs + 1, offset=HEADER.size)
    if offsets[0] != 0 or offsets[-1] != num_tokens or (np.diff(offsets) < 0).any():
        raise ValueError(f'{path}: document offsets are not non-decreasing from 0 to the token count {num_tokens}')
    tokens = np.memmap(path, dtype=DTYPES[itemsize], mode='r', offset=tokens_at, shape=(num_tokens,))
    return tokens, offsets


def _prepared(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f'{path} not found: prepare the data first, e.g. `python data/prepare.py` '
                                f'(writes data/pystdlib)')
    return path


def _shard_path(data_dir, split):
    if split not in SPLITS:
        raise ValueError(f'split={split!r}, expected one of {SPLITS}')
    return _prepared(os.path.join(data_dir, f'{split}.bin'))


def load_tokenizer(data_dir):
    tokenizer = Tokenizer.from_file(_prepared(os.path.join(data_dir, 'tokenizer.json')))
    # As at prepare time: the text '<|endoftext|>' inside a document is plain text, never the separator.
    tokenizer.encode_special_tokens = True
    return tokenizer


def _eot_id(data_dir):
    return load_tokenizer(data_dir).token_to_id(EOT)


class PackedBatches:
    """Endless stream of (x, y, cu_seqlens) batches of `tokens_per_batch` tokens, documents packed end to end.

    Each document is cut into pieces of at most `max_doc_len` tokens including the EOT/BOS that starts every piece,
    and the pieces come in a shuffled order, new for every epoch (seeded by (seed, epoch)): shuffling whole documents
    would let one long document fill many consecutive batches. A piece that does not fit the rest of a batch is cut
    there and its remainder opens the next batch as a new piece. When a single slot is
    left it holds a lone EOT with no target (padding). y[i] = x[i + 1] within a piece and -1 (ignore) at its last
    token, so no target crosses a piece boundary, and every corpus token is a target exactly once per epoch.

    With `retrieval_mix` = f > 0, synthetic retrieval documents (data/retrieval.py, keys of `retrieval_key_words`
    words) of the full piece length are mixed into the stream so that they make up a fraction f of its document
    tokens, exactly up to one document: one goes in whenever they are behind f and a whole one fits the batch.
    Each is made from its own seed (seed, number of the synthetic document), its filler a random window of this
    split's tokens.

    All ranks walk the same global stream of batches; rank r keeps batches r, r + world_size, ... so ranks never
    share tokens within a step, and state_dict() (the stream position after a whole step) is identical on all ranks.
    """

    def __init__(self, data_dir, split, tokens_per_batch, max_doc_len, *, rank=0, world_size=1, seed=0,
                 retrieval_mix=0.0, retrieval_key_words=1):
        if tokens_per_batch < 2:
            raise ValueError(f'tokens_per_batch={tokens_per_batch}, expected at least 2')
        if max_doc_len < 2:
            raise ValueError(f'max_doc_len={max_doc_len}, expected at least 2 (EOT plus one token)')
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f'rank={rank}, world_size={world_size}: expected 0 <= rank < world_size')
        if not 0 <= retrieval_mix < 1:
            raise ValueError(f'retrieval_mix={retrieval_mix}, expected a fraction in [0, 1)')
        self.tokens, self.offsets = read_shard(_shard_path(data_dir, split))
        tokenizer = load_tokenizer(data_dir)
        self.eot = tokenizer.token_to_id(EOT)
        self.tokens_per_batch, self.max_doc_len = tokens_per_batch, max_doc_len
        self.rank, self.world_size = rank, world_size
        # the shuffled units: pieces of max_doc_len - 1 tokens, [starts[u], ends[u]) in the shard
        lengths = np.diff(self.offsets)
        counts = -(-lengths // (max_doc_len - 1))
        doc_of = np.repeat(np.arange(len(lengths)), counts)
        first = np.cumsum(counts) - counts
        self.starts = self.offsets[doc_of] + (np.arange(len(doc_of)) - first[doc_of]) * (max_doc_len - 1)
        self.ends = np.minimum(self.starts + max_doc_len - 1, self.offsets[doc_of + 1])
        if not len(self.starts):
            raise ValueError(f'the {split} split of {data_dir} holds no tokens')
        self.retrieval_mix, self.synthetic_len = retrieval_mix, min(max_doc_len, tokens_per_batch) - 1
        if retrieval_mix:
            self.task = RetrievalTask(tokenizer, key_words=retrieval_key_words)
            if len(self.tokens) <= self.synthetic_len:
                raise ValueError(f'retrieval_mix: the {split} split has {len(self.tokens)} tokens, fewer than the '
                                 f'{self.synthetic_len} of filler one retrieval document needs')
            if self.synthetic_len < self.task.min_document_len:
                raise ValueError(f'retrieval_mix: pieces of {self.synthetic_len} tokens (max_doc_len, '
                                 f'tokens_per_batch) cannot hold a retrieval document of at least '
                                 f'{self.task.min_document_len}')
        self.load_state_dict({'seed': seed, 'epoch': 0, 'doc': 0, 'offset': 0})

    def state_dict(self):
        # Plain ints, so a checkpoint holding this loads under torch.load(weights_only=True).
        return {'seed': int(self.seed), 'epoch': int(self.epoch), 'doc': int(self.doc), 'offset': int(self.offset),
                'taken': int(self.taken), 'synthetic': int(self.synthetic)}

    def load_state_dict(self, state):
        """Resume at `state`: `doc` indexes the epoch's shuffled pieces, `offset` counts tokens already taken from it,
        `taken` counts all document tokens handed out, `synthetic` the retrieval documents among them."""
        self.seed, self.epoch, self.doc, self.offset = state['seed'], state['epoch'], state['doc'], state['offset']
        self.taken, self.synthetic = state.get('taken', 0), state.get('synthetic', 0)
        self.order = np.random.default_rng((self.seed, self.epoch)).permutation(len(self.starts))

    def _synthetic_document(self):
        rng = np.random.default_rng((self.seed, 1, self.synthetic))  # (seed, epoch) seeds the orders: no clash
        start = rng.integers(0, len(self.tokens) - self.synthetic_len + 1)
        self.synthetic += 1
        return self.task.document(rng, self.tokens[start:start + self.synthetic_len], self.synthetic_len)

    def _take_pieces(self):
        """Advance the stream by one batch; return its pieces, each the tokens of one piece without its EOT."""
        pieces, room = [], self.tokens_per_batch
        while room > 0:
            behind = self.synthetic * self.synthetic_len < self.retrieval_mix * self.taken
            if self.retrieval_mix and behind and room > self.synthetic_len:
                pieces.append(self._synthetic_document())
            else:
                if self.doc == len(self.order):
                    self.load_state_dict(self.state_dict() | {'epoch': self.epoch + 1, 'doc': 0, 'offset': 0})
                unit = self.order[self.doc]
                start, end = self.starts[unit] + self.offset, self.ends[unit]
                n = min(end - start, room - 1)  # a unit is at most max_doc_len - 1 tokens already
                pieces.append(self.tokens[start:start + n])
                self.offset += n
                if start + n == end:
                    self.doc, self.offset = self.doc + 1, 0
            room -= len(pieces[-1]) + 1
            self.taken += len(pieces[-1])
        return pieces

    def __iter__(self):
        return self

    def __next__(self):
        for _ in range(self.rank):
            self._take_pieces()
        pieces = self._take_pieces()
        for _ in range(self.world_size - 1 - self.rank):
            self._take_pieces()
        x = np.empty(self.tokens_per_batch, dtype=np.int64)
        cu_seqlens = np.zeros(len(pieces) + 1, dtype=np.int32)
        at = 0
        for i, piece in enumerate(pieces):
            x[at] = self.eot
            x[at + 1:at + 1 + len(piece)] = piece
            at += len(piece) + 1
            cu_seqlens[i + 1] = at
        y = np.full_like(x, -1)
        y[:-1] = x[1:]
        y[cu_seqlens[1:] - 1] = -1
        return torch.from_numpy(x)[None], torch.from_numpy(y)[None], torch.from_numpy(cu_seqlens)


def documents(data_dir, split, min_len=0, max_docs=None):
    """Yield documents of `split` as int64 token arrays of at least `min_len` tokens, each starting with EOT.

    Deterministic: first every document that is long enough on its own, in shard order; then long pseudo-documents,
    each the shortest run of consecutive remaining documents (each starting with its EOT) that reaches `min_len`.
    The stdlib corpus has few long files, so long-context evaluation mostly sees pseudo-documents.
    """
    if min_len < 0 or (max_docs is not None and max_docs < 0):
        raise ValueError(f'min_len={min_len}, max_docs={max_docs}: expected min_len >= 0 and max_docs None or >= 0')
    tokens, offsets = read_shard(_shard_path(data_dir, split))
    eot = _eot_id(data_dir)
    lengths = np.diff(offsets) + 1
    runs = [[doc] for doc in np.flatnonzero(lengths >= min_len)]
    run, run_len = [], 0
    for doc in np.flatnonzero(lengths < min_len):
        run, run_len = run + [doc], run_len + lengths[doc]
        if run_len >= min_len:
            runs.append(run)
            run, run_len = [], 0
    for run in runs[:max_docs]:
        parts = []
        for doc in run:
            parts += [[eot], tokens[offsets[doc]:offsets[doc + 1]]]
        yield np.concatenate(parts).astype(np.int64)
