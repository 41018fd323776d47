"""eval/niah.py and eval/length.py end to end on tiny checkpoints (see test_sample.py), plus the claims they rest on:
teacher-forced scoring agrees with greedy decoding, and a chunked prefill scores what a full forward scores."""
import json

import matplotlib.image
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sample
from eval import length, niah
from generate import KVCache
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
    tokenizer = sample.load_tokenizer(data_dir)
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
    tokenizer = sample.load_tokenizer(data_dir)
    eot = tokenizer.token_to_id(sample.EOT)
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
    model, _ = sample.load_model(checkpoints['wall'], DEVICE, torch.float32)
    prompt = torch.randint(0, model.config.vocab_size, (20,)).tolist()
    cache = KVCache(model, 1, 24)
    logits = model.prefill(torch.tensor([prompt], device=DEVICE), cache)
    greedy = torch.cat(list(model.decode(logits, cache, 3, temperature=0)), dim=1)
    greedy = greedy[0].tolist()
    logprob, predicted = niah.score(model, cache, prompt, greedy, prefill_chunk=16)
    assert predicted == greedy
    with torch.no_grad():  # the log-probability of the answer, from one full forward
        logits = model.lm_head(model.hidden_states(torch.tensor([prompt + greedy[:-1]], device=DEVICE)))[0, -3:]
    expected = torch.log_softmax(logits, -1)[torch.arange(3), greedy].sum().item()
    assert logprob == pytest.approx(expected, abs=1e-4)
    wrong = greedy[:1] + [(greedy[1] + 1) % model.config.vocab_size] + greedy[2:]
    assert niah.score(model, cache, prompt, wrong, prefill_chunk=16)[1] == greedy[:2]  # stops at the first miss


def test_length_plots_several_checkpoints(checkpoints, tmp_path):
    out = str(tmp_path / 'length')
    length.main(['--ckpt', checkpoints['wall'], checkpoints['rope'], '--length', '48', '--docs', '2',
                 '--prefill_chunk', '20', '--out', out, '--device', DEVICE])
    report = json.load(open(out + '.json'))
    assert report['length'] == 48
    assert [run['ckpt'] for run in report['runs']] == [checkpoints['wall'], checkpoints['rope']]
    assert [run['attention'] for run in report['runs']] == ['wall', 'rope']
    for run in report['runs']:
        assert run['docs'] == 2 and run['train_len'] == 32
        assert len(run['loss_by_position']) == 48 and np.isfinite(run['loss_by_position']).all()
    read_png(out + '.png')


def test_chunked_prefill_scores_what_a_full_forward_scores(checkpoints):
    model, _ = sample.load_model(checkpoints['wall'], DEVICE, torch.float32)
    tokens = torch.randint(0, model.config.vocab_size, (41,))
    losses = length.position_losses(model, KVCache(model, 1, 40), tokens.numpy(), prefill_chunk=15)
    with torch.no_grad():
        logits = model.lm_head(model.hidden_states(tokens[None, :-1].to(DEVICE)))[0]
    expected = F.cross_entropy(logits, tokens[1:].to(DEVICE), reduction='none')
    np.testing.assert_allclose(losses, expected.cpu().numpy(), atol=1e-4)


def test_eval_arguments_give_one_line_errors(checkpoints, tmp_path):
    cases = [(niah, ['--depths', '0,2'], '--depths'), (niah, ['--lengths', '40,x'], '--lengths'),
             (niah, ['--lengths', '8'], '--lengths'), (length, ['--length', '100000'], '--length'),
             (length, ['--docs', '0'], '--docs')]
    for script, argv, name in cases:
        with pytest.raises(SystemExit) as e:
            script.main(['--ckpt', checkpoints['wall'], '--out', str(tmp_path / 'x'), *argv])
        assert str(e.value).startswith('error: ') and name in str(e.value) and '\n' not in str(e.value)
