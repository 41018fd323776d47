"""eval/niah.py, eval/length.py, eval/copying.py and eval/retrieval.py end to end on tiny checkpoints (see
test_sample.py), plus the claims they rest on: teacher-forced scoring agrees with greedy decoding, a chunked prefill
scores what a full forward scores, the intervals cover what they should, the copy measure finds the repeats, and the
retrieval score tells a model that copies from one that does not."""
import json
import math

import matplotlib.image
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from checkpoint import load_model
from data.loader import EOT, load_tokenizer
from data.retrieval import RetrievalTask
from eval import common, copying, length, niah, retrieval, study
from generate import KVCache, decode, prefill
from tests.conftest import DEVICE
from tests.test_sample import CONFIGS, save_checkpoint  # data_dir is conftest.py's fixture


@pytest.fixture(scope='module')
def checkpoints(data_dir, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp('ckpts')
    return {name: save_checkpoint(folder / f'{name}.pt', data_dir, **CONFIGS[name]) for name in ('wall', 'rope')}


def read_png(path):
    with open(path, 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    return image


def test_niah_writes_every_cell(checkpoints, data_dir, tmp_path):  # noqa: F811
    tokenizer = load_tokenizer(data_dir)
    out = str(tmp_path / 'niah')
    niah.main(['--ckpt', checkpoints['wall'], '--lengths', '40,80', '--depths', '0,1', '--trials', '1', '--out', out,
               '--device', DEVICE])
    report = json.load(open(out + '.json'))
    assert report['train_len'] == 32 and report['lengths'] == [40, 80] and report['depths'] == [0, 1]
    assert {(c['length'], c['depth']) for c in report['cells']} == {(40, 0), (40, 1), (80, 0), (80, 1)}
    for cell in report['cells']:
        assert 0 <= cell['accuracy'] <= 1 and np.isfinite(cell['mean_logprob'])
        (trial,) = cell['trials']
        assert len(trial['value']) == 5 and trial['logprob'] < 0
        assert cell['length'] - 25 <= trial['tokens'] <= cell['length'] + 2  # at most a line short
        if cell['depth'] == 0:  # right after the EOT
            assert trial['needle_at'] == 1
        else:  # right before the cue
            needle_and_cue = tokenizer.encode(f'PASS_KEY = {trial["value"]}\nPASS_KEY =').ids
            assert trial['needle_at'] == trial['tokens'] - len(needle_and_cue)
        assert not trial['correct'] or trial['predicted'] == trial['value']
    read_png(out + '.png')


def test_niah_prompt_holds_needle_and_cue_as_the_text_tokenizes(data_dir):  # noqa: F811
    tokenizer = load_tokenizer(data_dir)
    eot = tokenizer.token_to_id(EOT)
    haystack = niah.Haystack(data_dir, tokenizer, eot)
    hay = haystack.take(60)
    assert hay.endswith('\n') and len(tokenizer.encode(hay).ids) <= 60
    assert haystack.take(60) != hay  # trials get different haystacks
    prompt, needle_at, answer = niah.make_prompt(tokenizer, eot, hay, 0.5, '48213')
    text = tokenizer.decode(prompt[1:])
    assert prompt[0] == eot and text.endswith('\nPASS_KEY =') and '\nPASS_KEY = 48213\n' in text
    assert tokenizer.decode(prompt[needle_at:]).startswith('PASS_KEY = 48213\n')
    assert tokenizer.decode(answer) == ' 48213'


def test_teacher_forced_score_agrees_with_greedy_decoding(checkpoints):
    model, _ = load_model(checkpoints['wall'], DEVICE, torch.float32)
    prompt = torch.randint(0, model.config.vocab_size, (20,)).tolist()
    cache = KVCache(model, 1, 24)
    logits = prefill(model, torch.tensor([prompt], device=DEVICE), cache)
    greedy = torch.cat(list(decode(model, logits, cache, 3, temperature=0)), dim=1)
    greedy = greedy[0].tolist()
    logprob, predicted = niah.score(model, cache, prompt, greedy, prefill_chunk=16)
    assert predicted == greedy
    with torch.no_grad():  # the log-probability of the answer, from one full forward
        logits = model.lm_head(model.hidden_states(torch.tensor([prompt + greedy[:-1]], device=DEVICE)))[0, -3:]
    expected = torch.log_softmax(logits, -1)[torch.arange(3), greedy].sum().item()
    assert logprob == pytest.approx(expected, abs=1e-4)
    wrong = greedy[:1] + [(greedy[1] + 1) % model.config.vocab_size] + greedy[2:]
    assert niah.score(model, cache, prompt, wrong, prefill_chunk=16)[1] == greedy[:2]  # stops at the first miss


def check_buckets(rows, first, last):
    """Bucket rows as common.bucket_rows writes them: contiguous from first to last, intervals around the means."""
    assert rows[0]['start'] == first and rows[-1]['end'] == last
    assert all(a['end'] == b['start'] for a, b in zip(rows, rows[1:]))
    for row in rows:
        if row['tokens']:
            assert row['lo'] <= row['mean'] + 1e-9 and row['mean'] <= row['hi'] + 1e-9 and row['docs'] >= 1
        else:
            assert row['mean'] is None and row['lo'] is None


def test_length_plots_several_checkpoints(checkpoints, tmp_path, capsys):
    out = str(tmp_path / 'length')
    length.main(['--ckpt', checkpoints['wall'], checkpoints['rope'], '--length', '150', '--docs', '3',
                 '--prefill_chunk', '100', '--out', out, '--device', DEVICE, '--copy'])
    report = json.load(open(out + '.json'))
    assert report['length'] == 150
    assert [run['ckpt'] for run in report['runs']] == [checkpoints['wall'], checkpoints['rope']]
    assert [run['attention'] for run in report['runs']] == ['wall', 'rope']
    for run in report['runs']:
        assert run['docs'] == 3 and run['train_len'] == 32
        assert len(run['loss_by_position']) == 150 and np.isfinite(run['loss_by_position']).all()
        check_buckets(run['buckets'], 1, 151)
        assert {32, 64, 128} <= {row['end'] for row in run['buckets']}  # every multiple of the training length an edge
        one, two, _ = run['table']  # 128 <= 150 < 256: 1x, 2x, 4x
        assert (one['multiple'], one['start'], one['end'], two['start'], two['end']) == (1, 16, 32, 32, 64)
        assert one['change'] == 0 and two['change'] == pytest.approx(two['mean'] - one['mean'])
        expected = np.mean(np.array(run['loss_by_position'])[31:63])  # positions 32..63
        assert two['mean'] == pytest.approx(expected, abs=1e-3)
        assert two['change_lo'] <= two['change'] <= two['change_hi']
        assert len(two['doc_means']) == 3 and np.mean(two['doc_means']) == pytest.approx(two['mean'], abs=1e-4)
        assert run['doc_fingerprints'] == report['runs'][0]['doc_fingerprints'] and len(run['doc_fingerprints']) == 3
        copy = run['copy']
        assert copy['ckpt'] == run['ckpt'] and copy['ngram'] == copying.NGRAM and 0 < copy['repeat_fraction'] < 1
        check_buckets(copy['repeat'], 1, 151)
        check_buckets(copy['nonrepeat'], 1, 151)
    printed = capsys.readouterr().out
    assert '| 1x | 2x | 4x |' in printed and 'change against 1x' in printed and 'distance' in printed
    read_png(out + '.png')
    read_png(out + '_copy.png')


def test_copying_runs_end_to_end(checkpoints, tmp_path):
    out = str(tmp_path / 'copying')
    copying.main(['--ckpt', checkpoints['rope'], '--length', '100', '--docs', '2', '--out', out, '--device', DEVICE])
    (run,) = json.load(open(out + '.json'))['runs']
    assert run['attention'] == 'rope' and run['docs'] == 2 and run['train_len'] == 32
    check_buckets(run['gain'], 1, 101)
    # a repeat token counts in the gain when non-repeat tokens share its position bucket
    assert sum(row['tokens'] for row in run['repeat']) >= sum(row['tokens'] for row in run['gain']) > 0
    read_png(out + '.png')


def test_bootstrap_interval_has_the_known_width_and_coverage():
    rng = np.random.default_rng(1)
    # 400 documents whose mean losses scatter with sd 0.5: the 95% interval of their mean is +-1.96 * 0.5 / 20
    doc_means = rng.normal(3.0, 0.5, 400)
    mean, lo, hi, _ = common.bootstrap(doc_means[:, None], np.ones((400, 1)))
    assert mean[0] == pytest.approx(doc_means.mean())
    assert (hi - lo)[0] == pytest.approx(2 * 1.96 * doc_means.std() / 20, rel=0.15)
    assert lo[0] < mean[0] < hi[0]
    # unequal token counts: the pooled mean weighs documents by their tokens, and the interval covers the truth
    # about 95% of the time
    covered = 0
    for trial in range(200):
        counts = rng.integers(1, 50, (30, 1)).astype(float)
        sums = rng.normal(2.0, 1.0 / np.sqrt(counts)) * counts  # each document's mean: 2 plus noise
        mean, lo, hi, _ = common.bootstrap(sums, counts, resamples=400, seed=trial)
        assert mean[0] == pytest.approx(sums.sum() / counts.sum())
        covered += lo[0] <= 2.0 <= hi[0]
    assert 0.88 <= covered / 200 <= 0.99
    # identical documents: no spread; a bucket no document has: no statistic
    mean, lo, hi, _ = common.bootstrap([[2.0, 0.0]] * 5, [[4, 0]] * 5)
    assert lo[0] == hi[0] == mean[0] == 0.5 and np.isnan([mean[1], lo[1], hi[1]]).all()
    mean, lo, hi, _ = common.bootstrap([[3.0]], [[2]])  # one document: a mean, but no interval
    assert mean[0] == 1.5 and np.isnan([lo[0], hi[0]]).all()


def test_buckets_meet_at_the_multiples_of_the_training_length():
    edges = common.position_edges(4096, 65536)
    assert edges[0] == 1 and edges[-1] == 65537 and {4096 * 2 ** k for k in range(-12, 4)} <= set(edges.tolist())
    assert edges[-2] == 55109  # not a last bucket of one position, 65536
    assert np.diff(edges).min() >= 1 and copying.distance_edges(100).tolist() == [1, 2, 4, 8, 16, 32, 64, 101]


def test_wilson_interval_at_the_edges():
    assert common.wilson(0, 32) == (0.0, pytest.approx(1.96 ** 2 / (32 + 1.96 ** 2), rel=1e-3))
    lo, hi = common.wilson(32, 32)
    assert hi == 1.0 and lo == pytest.approx(32 / (32 + 1.96 ** 2), rel=1e-3)
    lo, hi = common.wilson(16, 32)
    assert lo < 0.5 < hi and hi - 0.5 == pytest.approx(0.5 - lo)


def test_copy_measure_finds_the_repeats_of_a_hand_made_document():
    # 0 is the EOT; `7 8 9 10 11` (5 tokens, ngram 4) comes back 10 tokens later, and its last token again 20
    # tokens later after `8 9 10`; the runs of 1s repeat themselves at distance 1
    doc = np.array([0, 7, 8, 9, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
                    17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 7, 8, 9, 10, 11, 1, 1, 1, 1, 1, 1])
    distance = copying.repeats(doc, ngram=4)
    assert (distance[:4] == -1).all()
    expected = {15: 10, 39: 24, 45: 1}  # token 15 ends `7 8 9 10 11` 10 after token 5; token 39 24 after token 15
    assert {int(i): int(d) for i, d in enumerate(distance) if d > 0} == expected
    # with ngram 0 every token that occurred before repeats, at the distance to its last occurrence
    assert copying.repeats(np.array([5, 6, 5, 5, 6]), ngram=0).tolist() == [0, 0, 2, 1, 3]


def test_copy_analysis_separates_repeat_and_other_tokens():
    rng = np.random.default_rng(0)
    docs = rng.integers(1, 1000, (4, 201))
    docs[:, 0] = 0
    docs[:, 150:170] = docs[:, 10:30]  # a 20-token span seen 140 tokens before: 16 repeat tokens (ngram 4)
    distances = np.stack([copying.repeats(doc)[1:] for doc in docs])
    losses = np.where(distances > 0, 1.0, 3.0).astype(np.float32)  # a model that copies: low loss on repeats
    run = copying.analyse({'ckpt': 'x', 'attention': 'wall', 'train_len': 64}, docs, losses)
    (bucket,) = [row for row in run['repeat'] if row['tokens']]
    assert (bucket['start'], bucket['end'], bucket['tokens'], bucket['docs']) == (128, 201, 64, 4)
    assert bucket['mean'] == 1.0 and run['repeat_mean'] == 1.0 and run['nonrepeat_mean'] == 3.0
    (gain,) = [row for row in run['gain'] if row['tokens']]
    assert gain['mean'] == pytest.approx(2.0) and gain['lo'] == pytest.approx(2.0)


def perfect_copier(vocab):
    """A hand-built model that copies: after each context, the token that followed the last earlier occurrence of
    the context's last 5 tokens (an induction head), as logits 50 for it and 0 for every other."""
    def logits_of(prompts, answers):
        out = np.zeros((*answers.shape, vocab), dtype=np.float32)
        for b in range(len(prompts)):
            for i in range(answers.shape[1]):
                context = np.concatenate([prompts[b], answers[b, :i]])
                suffix = context[-5:]
                windows = np.lib.stride_tricks.sliding_window_view(context[:-1], 5)
                (earlier,) = np.nonzero((windows == suffix).all(1))
                out[b, i, context[earlier[-1] + 5]] = 50.0
        return out
    return logits_of


def test_retrieval_scores_a_copier_at_one_and_a_uniform_model_near_zero(data_dir):  # noqa: F811
    tokenizer = load_tokenizer(data_dir)
    eot, vocab = tokenizer.token_to_id(EOT), tokenizer.get_vocab_size()
    task, stream = RetrievalTask(tokenizer), common.held_out_stream(data_dir, eot)
    distances = [4, 32, 300]
    copier = retrieval.evaluate(perfect_copier(vocab), task, stream, eot, distances, 6, 4, seed=0)
    uniform = retrieval.evaluate(lambda p, a: np.zeros((*a.shape, vocab)), task, stream, eot, distances, 6, 4,
                                 seed=0)
    for row, flat in zip(copier, uniform):
        # the needle goes at a line end near the distance, and distractor needles may go in after it
        assert row['trials'] == 6 and abs(row['mean_distance'] - row['distance']) <= 30 + 3 * task.needle_len
        assert row['accuracy'] == 1.0 and row['token_accuracy'] == 1.0 and row['loss'] < 1e-2
        assert flat['accuracy'] == 0.0 and flat['loss'] == pytest.approx(math.log(vocab))
        assert flat['accuracy_lo'] == 0.0 < flat['accuracy_hi'] < 0.5 < row['accuracy_lo']


def test_retrieval_scores_what_a_full_forward_scores(checkpoints, data_dir):  # noqa: F811
    """The cached path (prefill in chunks, then decode steps, two probes at a time) gives the logits of one full
    forward over prompt and answer, for Wall (decode kernel) and RoPE."""
    tokenizer = load_tokenizer(data_dir)
    eot = tokenizer.token_to_id(EOT)
    prompts, answers, _ = retrieval.make_probes(RetrievalTask(tokenizer), common.held_out_stream(data_dir, eot), eot,
                                                30, 2, seed=0)
    for name in ('wall', 'rope'):
        model, _ = load_model(checkpoints[name], DEVICE, torch.float32)
        logits = retrieval.cached_answer_logits(model, prefill_chunk=300)(prompts, answers)
        expected = retrieval.forward_answer_logits(model)(prompts, answers)
        # fp32 cumulative decays: the eager forward and the kernels differ by ~1e-5 of logits of size ~6
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=5e-4)


def test_retrieval_runs_end_to_end(checkpoints, tmp_path, capsys):
    out = str(tmp_path / 'retrieval')
    retrieval.main(['--ckpt', checkpoints['wall'], checkpoints['rope'], '--distances', '8,64', '--trials', '2',
                    '--batch', '2', '--out', out, '--device', DEVICE])
    report = json.load(open(out + '.json'))
    assert report['distances'] == [8, 64] and report['trials'] == 2
    assert [run['attention'] for run in report['runs']] == ['wall', 'rope']
    for run in report['runs']:
        assert run['train_len'] == 32 and [row['distance'] for row in run['by_distance']] == [8, 64]
        for row in run['by_distance']:
            assert row['trials'] == len(row['trial_results']) == 2
            assert 0 <= row['accuracy_lo'] <= row['accuracy'] <= row['accuracy_hi'] <= 1
            assert row['loss_lo'] <= row['loss'] <= row['loss_hi'] and row['loss'] > 0
    assert '| checkpoint | 8 | 64 |' in capsys.readouterr().out
    read_png(out + '.png')


def test_retrieval_saves_each_distance_as_it_finishes(checkpoints, tmp_path, monkeypatch):
    """A run killed at a deadline during a long distance keeps the distances it finished."""
    out, score, calls = str(tmp_path / 'retrieval'), retrieval.score, []

    def score_one_distance(*args):  # evaluate scores each distance in one call
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt('stopped at the deadline')
        return score(*args)
    monkeypatch.setattr(retrieval, 'score', score_one_distance)
    with pytest.raises(KeyboardInterrupt):
        retrieval.main(['--ckpt', checkpoints['wall'], '--distances', '8,200', '--trials', '2', '--batch', '2',
                        '--out', out, '--device', DEVICE])
    (run,) = json.load(open(out + '.json'))['runs']
    assert [row['distance'] for row in run['by_distance']] == [8] and 'seconds' not in run


def test_chunked_prefill_scores_what_a_full_forward_scores(checkpoints):
    model, _ = load_model(checkpoints['wall'], DEVICE, torch.float32)
    tokens = torch.randint(0, model.config.vocab_size, (41,))
    losses = length.position_losses(model, KVCache(model, 1, 40), tokens.numpy(), prefill_chunk=15)
    with torch.no_grad():
        logits = model.lm_head(model.hidden_states(tokens[None, :-1].to(DEVICE)))[0]
    expected = F.cross_entropy(logits, tokens[1:].to(DEVICE), reduction='none')
    np.testing.assert_allclose(losses, expected.cpu().numpy(), atol=1e-4)


def test_eval_arguments_give_one_line_errors(checkpoints, tmp_path):
    cases = [(niah, ['--depths', '0,2'], '--depths'), (niah, ['--lengths', '40,x'], '--lengths'),
             (niah, ['--lengths', '8'], '--lengths'), (length, ['--length', '100000'], '--length'),
             (length, ['--docs', '0'], '--docs'), (copying, ['--ngram', '0'], '--ngram'),
             (retrieval, ['--distances', '8,x'], '--distances'), (retrieval, ['--distances', '0'], '--distances'),
             (retrieval, ['--distances', '100000'], '--distances'), (retrieval, ['--trials', '0'], '--trials')]
    for script, argv, name in cases:
        with pytest.raises(SystemExit) as e:
            script.main(['--ckpt', checkpoints['wall'], '--out', str(tmp_path / 'x'), *argv])
        assert str(e.value).startswith('error: ') and name in str(e.value) and '\n' not in str(e.value)


def test_study_puts_result_folders_side_by_side(checkpoints, tmp_path, capsys):
    """Two folders as eval/lengthgen.sh writes them, one model each: study.py's tables carry their numbers."""
    for name in ('wall', 'rope'):
        folder = tmp_path / name
        folder.mkdir()
        length.main(['--ckpt', checkpoints[name], '--length', '80', '--docs', '2', '--out', str(folder / 'length'),
                     '--device', DEVICE, '--copy'])
        retrieval.main(['--ckpt', checkpoints[name], '--distances', '8', '--trials', '2', '--batch', '2',
                        '--out', str(folder / 'retrieval'), '--device', DEVICE])
        # step times 100..111 ms after iteration 0's compilation: medians 102 of the first five, 109 of the last
        steps = ''.join(f'iter {i}: loss 5.0, lr 1.0e-03, time {9000 if i == 0 else 99 + i} ms, 10,000 tok/s\n'
                        for i in range(13))
        (folder / 'train.log').write_text('iter 0: val loss 9.0\n' + steps + 'iter 5: val loss 4.25\ndone at iter 5: '
                                          'ckpt.pt (best val loss 4.1), 1,000,000 tokens trained in 0:00:01\n')
    niah.main(['--ckpt', checkpoints['wall'], '--lengths', '40', '--depths', '0', '--trials', '2',
               '--out', str(tmp_path / 'wall' / 'niah'), '--device', DEVICE])
    capsys.readouterr()
    out = str(tmp_path / 'study')
    study.main([str(tmp_path / 'wall'), str(tmp_path / 'rope'), '--out', out])
    text = open(out + '.md').read()
    summary, paired, copy, found, found_paired = [block.splitlines() for block in text.strip().split('\n\n')]
    rope_length = json.load(open(tmp_path / 'rope' / 'length.json'))['runs'][0]
    wall_length = json.load(open(tmp_path / 'wall' / 'length.json'))['runs'][0]
    one = rope_length['table'][0]
    # the same 2 documents for both: rope's loss minus wall's, document by document
    assert paired[0].startswith('| model - wall | 1x |') and len(paired) == 3
    difference = np.mean(np.subtract(one['doc_means'], wall_length['table'][0]['doc_means']))
    assert paired[2].startswith(f'| rope | {difference:+.3f} [')
    assert summary[3].startswith(f'| rope | 4.250 | {common.interval(one["mean"], one["lo"], one["hi"])} |')
    assert summary[3].endswith('|  | 1M | 102 / 109 |')  # no needle test in rope's folder
    cells = json.load(open(tmp_path / 'wall' / 'niah.json'))['cells']
    hits = sum(t['correct'] for cell in cells for t in cell['trials'])
    assert summary[2].endswith(f'| {hits}/2 | 1M | 102 / 109 |')
    assert copy[0] == '| distance | wall (wall): loss, gain [95%], tokens | rope (rope): loss, gain [95%], tokens |'
    row = json.load(open(tmp_path / 'wall' / 'retrieval.json'))['runs'][0]['by_distance'][0]
    assert found[0] == '| model | 8 |' and found[2] == (f'| wall: exact match (loss) | {row["accuracy"]:.2f} '
                                                          f'[{row["accuracy_lo"]:.2f}, {row["accuracy_hi"]:.2f}] '
                                                          f'({row["loss"]:.2f}) |')
    rope_row = json.load(open(tmp_path / 'rope' / 'retrieval.json'))['runs'][0]['by_distance'][0]
    only_wall = sum(a['correct'] and not b['correct'] for a, b in zip(row['trial_results'], rope_row['trial_results']))
    only_rope = sum(b['correct'] and not a['correct'] for a, b in zip(row['trial_results'], rope_row['trial_results']))
    assert found_paired[2].startswith(f'| rope | {only_wall} / {only_rope} (')
    for name in ('loss', 'copy', 'retrieval'):
        read_png(f'{out}_{name}.png')
    with pytest.raises(SystemExit, match='not a result folder'):
        study.main([str(tmp_path / 'missing')])
    with pytest.raises(SystemExit, match='^error: --names: expected 2 '):
        study.main([str(tmp_path / 'wall'), str(tmp_path / 'rope'), '--names', 'w'])
    study.main([str(tmp_path / 'wall'), str(tmp_path / 'rope'), '--names', 'w,r', '--out', out])
    assert [line.split(' | ')[0] for line in open(out + '.md').read().splitlines()[2:4]] == ['| w', '| r']


def test_documents_to_separate_scales_the_interval_as_one_over_root_documents():
    # half-width 0.02 around +0.01 on 64 documents: four times the documents halve it to 0.01
    assert study.documents_to_separate(64, 0.01, -0.01, 0.03) == 256
    assert study.documents_to_separate(64, -0.01, -0.03, 0.01) == 256
    assert study.documents_to_separate(64, 0.02, 0.005, 0.035) is None  # already excludes zero


def test_mcnemar_p_is_the_exact_two_sided_binomial_test():
    assert study.mcnemar_p(0, 0) == 1.0 and study.mcnemar_p(3, 3) == 1.0
    assert study.mcnemar_p(18, 4) == study.mcnemar_p(4, 18) == pytest.approx(0.0043435, rel=1e-4)
    assert study.mcnemar_p(5, 0) == pytest.approx(2 / 32)  # all five of one side: 2 x 0.5^5
