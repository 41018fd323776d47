"""The synthetic retrieval task (data/retrieval.py) and its mix into training batches (data/loader.py)."""
import numpy as np
import pytest

from data.loader import PackedBatches, load_tokenizer, read_shard
from data.retrieval import PAIR_SPACING, RetrievalTask
from tests.test_data import corpus, piece_contents  # noqa: F401 (corpus is a fixture)


def find(haystack, needle):
    """Start positions of the token list `needle` in the token list `haystack`."""
    n = len(needle)
    return [i for i in range(len(haystack) - n + 1) if haystack[i:i + n] == needle]


@pytest.fixture(scope='module')
def task_and_filler(corpus):  # noqa: F811
    data_dir, _ = corpus
    tokens, _ = read_shard(f'{data_dir}/train.bin')
    filler = np.tile(np.asarray(tokens, dtype=np.int64), 8)  # the tiny corpus is short
    return RetrievalTask(load_tokenizer(data_dir)), filler


def test_document_asks_for_every_needle_once_later(task_and_filler, corpus):  # noqa: F811
    task, _ = task_and_filler
    code = ''.join(f'x{i} = {i}\n' for i in range(1000))  # short lines, like code: line breaks every few tokens
    filler = np.array(load_tokenizer(corpus[0]).encode(code).ids, dtype=np.int64)
    assert task.starts_line[filler].mean() > 0.1
    gaps = []
    for seed in range(4):
        doc = task.document(np.random.default_rng(seed), filler, 2000)
        assert len(doc) == 2000 and doc.dtype == np.int64
        tokens = doc.tolist()
        heads = find(tokens, task.head.tolist())
        lines = [tuple(tokens[at:at + task.needle_len]) for at in heads]
        assert len(heads) == 2 * (2000 // PAIR_SPACING)
        assert all(lines.count(line) == 2 for line in lines)  # each key's line: its needle, then its query
        keys = [line[len(task.head):len(task.head) + task.key_len] for line in lines]
        assert len(set(keys)) == len(keys) // 2 and set(sum(keys, ())) <= set(task.words.tolist())
        first = {}
        for at, line in zip(heads, lines):
            if line in first:
                gaps.append(at - first[line])
            first.setdefault(line, at)
        again = task.document(np.random.default_rng(seed), filler, 2000)
        assert (again == doc).all()  # the generator's seed decides everything
    # log-uniform distances: short and long ones in every few documents
    assert min(gaps) < 100 and max(gaps) > 1000 and 0.2 < np.mean(np.array(gaps) < 200) < 0.8


@pytest.mark.parametrize('distance', [1, 30, 200, 700])
def test_probe_distance_is_exact_and_its_value_occurs_once(task_and_filler, distance):
    task, filler = task_and_filler
    probe = task.probe(np.random.default_rng(distance), filler, distance)
    prompt = probe.prompt.tolist()
    (at,) = find(prompt, probe.answer)
    assert len(prompt) - at == probe.distance
    assert abs(probe.distance - distance) <= 2 * task.num_pairs * task.needle_len + 64  # line ends and distractors
    cue = prompt[-(len(task.head) + task.key_len):]
    assert find(prompt, cue + probe.answer) == [at - len(cue)]  # the cue, completed, is the needle
    with pytest.raises(ValueError, match='filler'):
        task.probe(np.random.default_rng(0), filler[:task.min_filler(distance) - 1], distance)


def test_mix_is_exact_deterministic_and_resumable(corpus):  # noqa: F811
    data_dir, _ = corpus
    mix, tokens_per_batch, max_doc_len = 0.25, 2048, 600
    batches = PackedBatches(data_dir, 'train', tokens_per_batch, max_doc_len, seed=3, retrieval_mix=mix)
    task = batches.task
    synthetic = total = 0
    stream = []
    for _ in range(40):
        x, y, cu = next(batches)
        stream.append(x)
        for piece in piece_contents(x, cu):
            total += len(piece)
            if len(piece) == max_doc_len - 1 and find(piece.tolist(), task.head.tolist()):
                synthetic += len(piece)
    assert batches.synthetic > 10
    assert synthetic == batches.synthetic * (max_doc_len - 1)
    assert abs(synthetic - mix * total) <= max_doc_len  # exact up to one document
    state = batches.state_dict()
    ahead = [next(batches)[0] for _ in range(5)]
    resumed = PackedBatches(data_dir, 'train', tokens_per_batch, max_doc_len, seed=0, retrieval_mix=mix)
    resumed.load_state_dict(state)
    assert all((a == next(resumed)[0]).all() for a in ahead)
    replay = PackedBatches(data_dir, 'train', tokens_per_batch, max_doc_len, seed=3, retrieval_mix=mix)
    assert all((a == next(replay)[0]).all() for a in stream)
    plain = PackedBatches(data_dir, 'train', tokens_per_batch, max_doc_len, seed=3)
    assert plain.synthetic == 0 and not any(find(next(plain)[0][0].tolist(), task.head.tolist()) for _ in range(3))


def test_mix_refuses_bad_fractions(corpus):  # noqa: F811
    data_dir, _ = corpus
    for mix in (-0.1, 1.0):
        with pytest.raises(ValueError, match='retrieval_mix'):
            PackedBatches(data_dir, 'train', 2048, 600, retrieval_mix=mix)


@pytest.mark.parametrize('key_words', [1, 3])
def test_keys_and_values_are_words_the_filler_lacks_each_used_once(key_words):
    from data.prepare import train_tokenizer
    rng = np.random.default_rng(0)
    words = sorted({''.join(rng.choice(list('abcdefghij'), 5)) for _ in range(3000)})
    tokenizer = train_tokenizer(['\n'.join(words)] * 4 + ['x = 1\n    y = 2\n'], vocab_size=3000, max_chars=10 ** 7)
    task = RetrievalTask(tokenizer, key_words=key_words)
    assert task.key_len == key_words and len(task.words) > 1000
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match='key_words'):
            RetrievalTask(tokenizer, key_words=bad)
    code = ''.join(f'{w} = 1\n' for w in words[:300])  # code that uses some of the words
    filler = np.array(tokenizer.encode(code).ids, dtype=np.int64)
    doc = task.document(np.random.default_rng(1), filler, 2000).tolist()
    heads = find(doc, task.head.tolist())
    pieces = [doc[at + len(task.head):at + task.needle_len] for at in heads]
    used = [token for piece in pieces for token in piece]
    in_lines = {at + i for at in heads for i in range(task.needle_len)}
    assert not set(used) & {token for i, token in enumerate(doc) if i not in in_lines}  # the filler it took
    assert all(used.count(token) == 2 for token in used)  # once in the needle, once in its query
    probe = task.probe(np.random.default_rng(2), filler, 300)
    assert probe.prompt.tolist().count(probe.answer[0]) == 1  # the one token after the cue's key
    every_word = np.tile(task.words, 2)  # a window that holds every word leaves none for the needles
    with pytest.raises(ValueError, match='words unused'):
        task.probe(np.random.default_rng(3), every_word, len(every_word) - 256)


def test_probe_batch_packs_whole_probes_whose_only_targets_are_the_values(task_and_filler):
    task, filler = task_and_filler
    eot, distance, length = -7, 30, 2000  # an EOT id no probe token has, to tell the padding from the probes
    batch = task.probe_batch(np.random.default_rng(0), filler, eot, distance, length)
    x, y, cu_seqlens = batch
    assert x.shape == y.shape == (1, length) and cu_seqlens[0] == 0 and cu_seqlens[-1] == length
    x, y, bounds = x[0].tolist(), y[0].tolist(), cu_seqlens.tolist()
    docs = list(zip(bounds[:-1], bounds[1:]))
    *probes, padding = docs
    assert len(probes) >= 2 and set(x[padding[0]:padding[1]]) == {eot} and set(y[padding[0]:padding[1]]) == {-1}
    n = len(task.head) + task.key_len
    for start, end in probes:
        tokens, targets = x[start:end], y[start:end]
        assert tokens[0] == eot and eot not in tokens[1:]
        at = [i for i, t in enumerate(targets) if t != -1]
        assert at == list(range(end - start - 4, end - start))  # the value's 4 tokens, at the document's end
        answer = [targets[i] for i in at]
        assert answer[:-1] == tokens[-3:]  # teacher-forced: the value's tokens are the inputs after the cue
        cue = tokens[at[0] - n + 1:at[0] + 1]
        assert len(find(tokens[1:], cue + answer)) == 1  # the needle, once, before the cue: a real lookup
    again = task.probe_batch(np.random.default_rng(0), filler, eot, distance, length)
    assert all((a == b).all() for a, b in zip(again, batch))  # the generator's seed decides everything
    assert task.probe_batch(np.random.default_rng(0), filler, eot, distance, 100) is None  # not one probe fits
    with pytest.raises(ValueError, match='filler'):
        task.probe_batch(np.random.default_rng(0), filler[:task.min_filler(distance) - 1], eot, distance, length)
