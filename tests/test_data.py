"""Data pipeline: prepare a tiny corpus, then check the tokenizer, shards, packed batches and eval documents."""
import os
import pickle

import numpy as np
import pytest
import torch

from data.loader import EOT, PackedBatches, documents, load_tokenizer, read_shard
from data.prepare import main as prepare_main, write_shard

NUM_FILES = 12


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    """(data dir, the documents' texts): NUM_FILES text files of varied length, plus an empty and a latin-1 file."""
    src = tmp_path_factory.mktemp('src')
    rng = np.random.default_rng(0)
    words = ['wall', 'decay', 'héllo', 'wörld', '∑', '😀', 'def', '\n', '    ', 'x = 1;', '<|endoftext|>']
    texts = []
    for i in range(NUM_FILES):
        text = ' '.join(rng.choice(words, size=int(rng.integers(1, 400)))) + f'\nfile {i}\n'
        (src / f'doc{i:02d}.txt').write_text(text, encoding='utf-8')
        texts.append(text)
    (src / 'empty.txt').write_text('')
    (src / 'latin1.txt').write_bytes('caf\xe9'.encode('latin-1'))
    out = tmp_path_factory.mktemp('prepared') / 'tiny'
    prepare_main([f'--source={src}', f'--out={out}', '--vocab_size=300', '--val_fraction=0.25', '--seed=1'])
    return str(out), texts


def shard_docs(data_dir, split):
    tokens, offsets = read_shard(os.path.join(data_dir, f'{split}.bin'))
    return [np.asarray(tokens[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]


def eot_id(data_dir):
    return load_tokenizer(data_dir).token_to_id(EOT)


def piece_contents(x, cu_seqlens):
    """The corpus tokens of each piece of a batch: the piece without its leading EOT."""
    x, cu = x[0].numpy(), cu_seqlens.numpy()
    return [x[a + 1:b] for a, b in zip(cu[:-1], cu[1:])]


def test_text_round_trips_through_tokenizer_and_shards(corpus):
    data_dir, texts = corpus
    tokenizer = load_tokenizer(data_dir)
    assert tokenizer.get_vocab_size() == 300
    decoded = {split: [tokenizer.decode(d.tolist()) for d in shard_docs(data_dir, split)] for split in ('train', 'val')}
    assert len(decoded['val']) == round(0.25 * NUM_FILES)
    # Every non-empty UTF-8 file is exactly one document of exactly one split; the literal EOT text stays text.
    assert sorted(decoded['train'] + decoded['val']) == sorted(texts)
    for split in ('train', 'val'):
        assert all(eot_id(data_dir) not in doc for doc in shard_docs(data_dir, split))
    # documents() hands out the same documents, each with a leading EOT.
    val_docs = list(documents(data_dir, 'val'))
    assert [d[0] for d in val_docs] == [eot_id(data_dir)] * len(val_docs)
    assert [tokenizer.decode(d[1:].tolist()) for d in val_docs] == decoded['val']


def test_shard_header_is_validated(corpus, tmp_path):
    data_dir, _ = corpus
    with open(os.path.join(data_dir, 'val.bin'), 'rb') as f:
        good = f.read()
    for name, content, problem in [('cut.bin', good[:-1], 'truncated'), ('stub.bin', good[:10], 'truncated'),
                                   ('foreign.bin', b'GPT2' + good[4:], 'magic'),
                                   ('longer.bin', good + b'\0\0', 'truncated or corrupt')]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError, match=problem) as error:
            read_shard(str(path))
        assert name in str(error.value)


def test_packed_batches_shapes_and_document_boundaries(corpus):
    data_dir, _ = corpus
    tokens_per_batch, max_doc_len = 64, 20
    batches = PackedBatches(data_dir, 'train', tokens_per_batch, max_doc_len, seed=3)
    for _ in range(30):
        x, y, cu = next(batches)
        assert x.shape == y.shape == (1, tokens_per_batch) and x.dtype == y.dtype == torch.int64
        assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == tokens_per_batch
        lengths = (cu[1:] - cu[:-1]).tolist()
        assert min(lengths) >= 1 and max(lengths) <= max_doc_len
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            assert x[0, a] == eot_id(data_dir)
            assert torch.equal(y[0, a:b - 1], x[0, a + 1:b])
            assert y[0, b - 1] == -1


def test_every_piece_appears_exactly_once_per_epoch(corpus):
    data_dir, _ = corpus
    docs = [d[i:i + 15] for d in shard_docs(data_dir, 'train') for i in range(0, len(d), 15)]  # the 15-token units
    total = sum(len(d) for d in docs)
    batches = PackedBatches(data_dir, 'train', 50, 16)
    stream = []
    while sum(len(p) for p in stream) < 2 * total:
        stream += piece_contents(*next(batches)[::2])
    stream = np.concatenate(stream)
    epochs = stream[:total], stream[total:2 * total]
    for epoch in epochs:
        # Token counts match the corpus, and the epoch is the documents' pieces, each whole and once, in some order.
        assert np.array_equal(np.bincount(epoch, minlength=300), np.bincount(np.concatenate(docs), minlength=300))
        unused, at = list(range(len(docs))), 0
        while at < total:
            match = next(i for i in unused if np.array_equal(epoch[at:at + len(docs[i])], docs[i]))
            unused.remove(match)
            at += len(docs[match])
    assert not np.array_equal(*epochs), 'each epoch should be reshuffled'


def test_resume_from_state_dict_gives_the_same_batches(corpus, tmp_path):
    data_dir, _ = corpus
    first = PackedBatches(data_dir, 'train', 48, 20, seed=7)
    for _ in range(200):  # resume mid-document, past the first epoch
        next(first)
        if first.state_dict()['epoch'] > 0 and first.state_dict()['offset'] > 0:
            break
    state = first.state_dict()
    assert state['epoch'] > 0 and state['offset'] > 0
    torch.save(state, tmp_path / 'state.pt')
    state = torch.load(tmp_path / 'state.pt', weights_only=True)
    assert pickle.loads(pickle.dumps(state)) == state
    resumed = PackedBatches(data_dir, 'train', 48, 20, seed=0)
    resumed.load_state_dict(state)
    for _ in range(40):
        for a, b in zip(next(first), next(resumed)):
            assert torch.equal(a, b)


def test_ranks_split_one_stream_disjointly(corpus):
    data_dir, _ = corpus
    single = PackedBatches(data_dir, 'train', 40, 16)
    ranks = [PackedBatches(data_dir, 'train', 40, 16, rank=r, world_size=2) for r in range(2)]
    for _ in range(20):
        for rank in ranks:  # rank r takes batches r, r + 2, ... of the single-process stream
            for a, b in zip(next(rank), next(single)):
                assert torch.equal(a, b)
        assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()


def test_documents_min_len_builds_long_documents(corpus):
    data_dir, _ = corpus
    eot = eot_id(data_dir)
    all_val = np.concatenate(list(documents(data_dir, 'val')))
    longest = max(len(d) for d in documents(data_dir, 'val'))
    # Long enough to need every val document concatenated: exactly one pseudo-document, the whole split.
    (only,) = documents(data_dir, 'val', min_len=len(all_val))
    assert np.array_equal(only, all_val)
    # Longer than any document: pseudo-documents of consecutive documents, together a prefix of the split.
    long_docs = list(documents(data_dir, 'val', min_len=longest + 1))
    joined = np.concatenate(long_docs)
    assert all(len(d) > longest and d[0] == eot for d in long_docs)
    assert np.array_equal(joined, all_val[:len(joined)]) and len(all_val) - len(joined) < longest + 1
    # Short enough for some real documents; max_docs caps the count.
    some = list(documents(data_dir, 'train', min_len=100, max_docs=3))
    assert len(some) == 3 and all(len(d) >= 100 for d in some)
    assert list(documents(data_dir, 'val', min_len=len(all_val) + 1)) == []


def test_prepare_refuses_to_overwrite_without_force(corpus, tmp_path):
    data_dir, _ = corpus
    src = tmp_path / 'src'
    src.mkdir()
    for i in range(4):
        (src / f'{i}.txt').write_text(f'document number {i} ' * (i + 1))
    args = [f'--source={src}', f'--out={data_dir}', '--vocab_size=300', '--val_fraction=0.25', '--seed=1']
    before = {f: open(os.path.join(data_dir, f), 'rb').read() for f in os.listdir(data_dir)}
    with pytest.raises(SystemExit, match='--force'):
        prepare_main(args)
    assert {f: open(os.path.join(data_dir, f), 'rb').read() for f in os.listdir(data_dir)} == before
    out = tmp_path / 'again'
    prepare_main(args[:1] + [f'--out={out}'] + args[2:])
    first = {f: (out / f).read_bytes() for f in os.listdir(out)}
    prepare_main(args[:1] + [f'--out={out}'] + args[2:] + ['--force'])
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == first, 'prepare should be deterministic'
    assert sorted(first) == ['manifest.json', 'tokenizer.json', 'train.bin', 'val.bin'], 'no temporary files left'


def test_interrupted_shard_write_leaves_nothing(tmp_path):
    class Interrupted(np.ndarray):
        def tobytes(self):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        docs = [np.arange(5, dtype=np.uint16), np.zeros(3, dtype=np.uint16).view(Interrupted)]
        write_shard(str(tmp_path / 'train.bin'), docs, np.uint16)
    assert os.listdir(tmp_path) == []


def test_clear_errors_for_bad_arguments(corpus, tmp_path):
    data_dir, _ = corpus
    with pytest.raises(FileNotFoundError, match='prepare.py'):
        PackedBatches(str(tmp_path / 'missing'), 'train', 64, 16)
    with pytest.raises(FileNotFoundError, match='prepare.py'):
        load_tokenizer(str(tmp_path))
    for kwargs, name in [({'tokens_per_batch': 1}, 'tokens_per_batch'), ({'max_doc_len': 1}, 'max_doc_len'),
                         ({'rank': 2, 'world_size': 2}, 'rank'), ({'split': 'valid'}, 'split')]:
        args = {'split': 'train', 'tokens_per_batch': 64, 'max_doc_len': 16} | kwargs
        with pytest.raises(ValueError, match=name):
            PackedBatches(data_dir, args.pop('split'), **args)
    with pytest.raises(ValueError, match='min_len'):
        next(documents(data_dir, 'val', min_len=-1))
