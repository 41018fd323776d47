"""Cached decoding (generate.py's KVCache, its prefill and decode) and sample.py, on CPU with tiny models.

The Wall and FoX caches decode through Triton's interpreter here, about a quarter second per layer and step, so the
models are tiny: 2 layers (one local, one global), 2 query heads on 1 kv head of 16 channels, 16-token cache chunks.
Their weights are scaled up from the GPT init: a freshly initialised model repeats one token, which would let a
broken cache pass a greedy comparison.
"""
import os
import shutil

import pytest
import torch

import checkpoint as ckpt
import sample
from data.loader import load_tokenizer
from generate import KVCache, decode, generate_uncached, prefill, row_pieces
from model import GPT, GPTConfig
from tests.conftest import DEVICE, exit_message

CACHE_CHUNK = 16
CONFIGS = {  # every layer kind the decode path has: local and global windows, gates per query / kv head, sink
    'wall': dict(attention='wall', scalar_gate=True, sink=True),
    'wall_kv_gate': dict(attention='wall', gate_per_kv_head=True, qk_norm=True, output_gate=True),
    'rope': dict(attention='rope'),
    'fox': dict(attention='fox', sink=True),
}


def tiny_model(vocab_size=97, **kwargs):
    config = dict(vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, attn_impl='reference',
                  window_size=12, window_pattern='LG') | kwargs
    torch.manual_seed(0)
    model = GPT(GPTConfig(**config)).to(DEVICE).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.5 / p.shape[1] ** 0.5)
            elif name.endswith('gate.bias'):  # some channels decay fast, some barely
                p.uniform_(-1, 4)
    return model


@pytest.mark.parametrize('name', CONFIGS)
def test_cached_greedy_decoding_equals_greedy_by_full_forwards(name):
    model = tiny_model(**CONFIGS[name])
    prompt = torch.randint(0, 97, (1, 20), device=DEVICE)
    expected = generate_uncached(model, prompt, 14, temperature=0)[0, 20:]
    # 20 + 14 tokens cross the 16-token cache chunks twice; the prompt goes in as a fused chunk and a cached one
    cache = KVCache(model, 1, 40, chunk_size=CACHE_CHUNK)
    logits = prefill(model, prompt, cache, chunk_size=13)
    tokens = torch.cat(list(decode(model, logits, cache, 14, temperature=0)), dim=1)[0]
    assert tokens.tolist() == expected.tolist()
    assert cache.length == 33  # every decoded token but the last went into the cache
    assert len(set(expected.tolist())) > 5, 'a sequence that hardly changes would not test the cache'


@pytest.mark.gpu
@pytest.mark.parametrize('name', CONFIGS)
def test_graph_replayed_decoding_equals_greedy_by_full_forwards_on_gpu(name):
    assert_graph_decoding_equals_full_forwards(tiny_model(**CONFIGS[name]))


def assert_graph_decoding_equals_full_forwards(model):
    """From its third step decode replays a CUDA graph: 45 of them cross the 16-token chunks three times."""
    prompt = torch.randint(0, 97, (1, 20), device='cuda')
    expected = generate_uncached(model, prompt, 48, temperature=0)[0, 20:]
    cache = KVCache(model, 1, 80, chunk_size=CACHE_CHUNK)
    tokens = torch.cat(list(decode(model, prefill(model, prompt, cache), cache, 48, temperature=0)), dim=1)[0]
    assert tokens.tolist() == expected.tolist()
    assert cache.length == 67 and int(cache.position) == 67


@pytest.mark.parametrize('name', ['wall', 'fox', 'rope'])
def test_chunked_prefill_equals_one_forward(name):
    model = tiny_model(**CONFIGS[name])
    idx = torch.randint(0, 97, (1, 40), device=DEVICE)
    with torch.no_grad():
        expected = model.hidden_states(idx)
        cache = KVCache(model, 1, 40, chunk_size=CACHE_CHUNK)
        # a fused first chunk, then cached chunks across both chunk boundaries: single tokens, and 22 rows that
        # the decode kernel takes in pieces of 16, 4 and 2
        chunks = [model.hidden_states(idx[:, a:b], cache=cache) for a, b in ((0, 7), (7, 16), (16, 17), (17, 18),
                                                                             (18, 40))]
        one_prefill = model.hidden_states(idx, cache=KVCache(model, 1, 40, chunk_size=CACHE_CHUNK))
    torch.testing.assert_close(torch.cat(chunks, dim=1), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(one_prefill, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('n_embd, n_head, chunk_size', [(48, 2, 12), (32, 4, 16)])
def test_head_dims_that_are_not_powers_of_two_decode(n_embd, n_head, chunk_size):
    """Head dims 24 and 8 and 12-token chunks: a model trains with any head dim, so it must decode with it too."""
    model = tiny_model(**CONFIGS['wall'], n_embd=n_embd, n_head=n_head)
    prompt = torch.randint(0, 97, (1, 15), device=DEVICE)
    expected = generate_uncached(model, prompt, 12, temperature=0)[0, 15:]
    cache = KVCache(model, 1, 30, chunk_size=chunk_size)
    tokens = torch.cat(list(decode(model, prefill(model, prompt, cache, chunk_size=9), cache, 12, temperature=0)), 1)
    assert tokens[0].tolist() == expected.tolist()
    assert len(set(expected.tolist())) > 4, 'a sequence that hardly changes would not test the cache'


def test_cache_rejects_what_it_cannot_hold():
    model = tiny_model(**CONFIGS['wall'])
    cache = KVCache(model, 1, 8, chunk_size=CACHE_CHUNK)
    with pytest.raises(ValueError, match='max_len=8'):
        prefill(model, torch.zeros(1, 9, dtype=torch.long, device=DEVICE), cache)


def test_row_pieces_cover_the_rows_in_power_of_two_runs():
    for n in range(1, 70):
        pieces = list(row_pieces(n, 16))
        assert [i for p in pieces for i in range(n)[p]] == list(range(n))
        assert all(p.stop - p.start in (1, 2, 4, 8, 16) for p in pieces)


# ----------------------------------------------------------------------------------------------------
# sample.py end to end, on a checkpoint as train.py writes it (on conftest's data_dir)

def save_checkpoint(path, data_dir, train_config=None, **model_kwargs):
    """A checkpoint with the keys train.py writes, for a tiny model on data_dir's tokenizer; trained for 32 tokens
    (train_config: keys of the training config to store instead)."""
    model = tiny_model(vocab_size=load_tokenizer(data_dir).get_vocab_size(), **model_kwargs)
    model_args = {k: getattr(model.config, k) for k in GPTConfig.__dataclass_fields__}
    config = {'data_dir': data_dir, 'max_doc_len': 32, 'tokens_per_batch': 256} | (train_config or {})
    ckpt.save({'model': model.cpu().state_dict(), 'optimizer': {}, 'model_args': model_args, 'iter_num': 0,
               'best_val_loss': 0.0, 'config': config, 'loader': {}, 'rng': {}}, str(path))
    return str(path)


@pytest.fixture(scope='module')
def checkpoint(data_dir, tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp('ckpt') / 'ckpt.pt', data_dir, **CONFIGS['wall'])


def test_sample_streams_and_reports(checkpoint, data_dir, capsys):
    sample.main(['--ckpt', checkpoint, '--prompt', 'def area', '--max_new_tokens', '6', '--num_samples', '2',
                 '--prefill_chunk', '2', '--seed', '0', '--device', DEVICE])
    out = capsys.readouterr().out
    assert out.count('def area') == 2
    summaries = [line for line in out.splitlines() if line.startswith('prompt tokens')]
    assert len(summaries) == 2
    for line in summaries:  # EOT + 'def area', then 6 tokens, fewer when an EOT ends the sample
        prompt_tokens, new_tokens = (int(part.split()[-1]) for part in line.split(', ')[:2])
        assert prompt_tokens == 1 + len(load_tokenizer(data_dir).encode('def area').ids)
        assert 1 <= new_tokens <= 6
        assert 'prefill' in line and line.endswith('tokens/s')


def printed_and_greedy(path, dtype, capsys):
    """(what `sample.py --temperature 0` prints after 'class Point', the same greedy continuation from full
    forwards): the stream holds back the bytes of a character it has not seen the end of."""
    sample.main(['--ckpt', path, '--prompt', 'class Point', '--max_new_tokens', '5', '--temperature', '0',
                 '--device', DEVICE, '--dtype', dtype])
    printed = capsys.readouterr().out.split('\n---------------\n')[0]
    model, train_config = ckpt.load_model(path, DEVICE, getattr(torch, dtype))
    tokenizer, eot = ckpt.load_data_tokenizer(train_config)
    prompt = torch.tensor([[eot] + tokenizer.encode('class Point').ids], device=DEVICE)
    greedy = generate_uncached(model, prompt, 5, temperature=0)[0, prompt.shape[1]:].tolist()
    greedy = greedy[:greedy.index(eot)] if eot in greedy else greedy
    return printed, 'class Point' + tokenizer.decode(greedy).rstrip('\ufffd')


def test_sample_with_temperature_zero_prints_the_greedy_continuation(checkpoint, capsys):
    printed, greedy = printed_and_greedy(checkpoint, 'float32', capsys)
    assert printed == greedy


def one_line_error(argv):
    return exit_message(sample.main, argv)


def test_bad_checkpoints_give_one_line_errors(checkpoint, tmp_path):
    assert '--ckpt' in one_line_error(['--ckpt', str(tmp_path / 'missing.pt')])
    assert '--device' in one_line_error(['--ckpt', checkpoint, '--device', 'tpu:7'])
    truncated = tmp_path / 'truncated.pt'
    truncated.write_bytes(open(checkpoint, 'rb').read()[:1000])
    assert 'not a readable checkpoint' in one_line_error(['--ckpt', str(truncated)])
    text = tmp_path / 'text.pt'
    text.write_text('hello')
    assert 'not a readable checkpoint' in one_line_error(['--ckpt', str(text)])
    foreign = tmp_path / 'foreign.pt'
    torch.save({'state_dict': {}}, foreign)
    assert 'not a checkpoint of train.py' in one_line_error(['--ckpt', str(foreign)])
    mismatched = tmp_path / 'mismatched.pt'
    saved = torch.load(checkpoint)
    torch.save(saved | {'model_args': saved['model_args'] | {'n_layer': 3}}, mismatched)
    assert 'do not fit' in one_line_error(['--ckpt', str(mismatched)])
    unknown = tmp_path / 'unknown.pt'
    torch.save(saved | {'model_args': saved['model_args'] | {'rotary_dim': 8}}, unknown)
    assert 'do not fit' in one_line_error(['--ckpt', str(unknown)])


def test_bad_prompts_give_one_line_errors(checkpoint, tmp_path):
    message = one_line_error(['--ckpt', checkpoint, '--prompt', 'def area(width)', '--max_len', '8'])
    assert '--max_len=8' in message and 'prompt' in message
    assert '--prompt' in one_line_error(['--ckpt', checkpoint, '--prompt', f'FILE:{tmp_path / "missing.txt"}'])
    latin1 = tmp_path / 'latin1.txt'
    latin1.write_bytes('caf\xe9'.encode('latin-1'))
    assert '--prompt' in one_line_error(['--ckpt', checkpoint, '--prompt', f'FILE:{latin1}'])


def test_float16_samples_for_every_attention(data_dir, tmp_path, capsys):
    # the Wall and FoX caches hold an fp16 model's keys and values in fp32, so its steps match its full forwards
    for name in ('wall', 'fox', 'rope'):
        path = save_checkpoint(tmp_path / f'{name}.pt', data_dir, **CONFIGS[name])
        printed, greedy = printed_and_greedy(path, 'float16', capsys)
        assert printed == greedy, name


def test_sample_says_what_it_loaded(checkpoint, capsys):
    sample.main(['--ckpt', checkpoint, '--prompt', 'def', '--max_new_tokens', '1', '--device', DEVICE])
    err = capsys.readouterr().err
    assert f'loaded {checkpoint}: iter 0, best val loss 0.0000, wall, ' in err


def test_checkpoints_of_compiled_models_load(data_dir, tmp_path, capsys):
    path = save_checkpoint(tmp_path / 'compiled.pt', data_dir, **CONFIGS['wall'])
    saved = torch.load(path, weights_only=True)
    ckpt.save(saved | {'model': {f'_orig_mod.{k}': v for k, v in saved['model'].items()}}, path)
    sample.main(['--ckpt', path, '--prompt', 'def', '--max_new_tokens', '1', '--device', DEVICE])
    assert 'new tokens 1' in capsys.readouterr().out


def test_relative_data_dir_resolves_from_another_directory(data_dir, tmp_path, monkeypatch, capsys):
    # train.py runs in the repository root and stores data_dir as given there
    relative = os.path.relpath(data_dir, os.path.dirname(os.path.abspath(ckpt.__file__)))
    path = save_checkpoint(tmp_path / 'relative.pt', data_dir, {'data_dir': relative}, **CONFIGS['rope'])
    monkeypatch.chdir(tmp_path)
    sample.main(['--ckpt', path, '--prompt', 'def', '--max_new_tokens', '1', '--device', DEVICE])
    assert 'new tokens 1' in capsys.readouterr().out


def test_corrupt_tokenizer_gives_one_line_naming_it(data_dir, tmp_path):
    broken = tmp_path / 'broken'
    shutil.copytree(data_dir, broken)
    (broken / 'tokenizer.json').write_text('{"model": ')
    path = save_checkpoint(tmp_path / 'broken.pt', data_dir, {'data_dir': str(broken)}, **CONFIGS['rope'])
    message = one_line_error(['--ckpt', path, '--device', DEVICE])
    assert str(broken / 'tokenizer.json') in message


def test_long_prompt_shows_an_estimate_and_progress(checkpoint, capsys):
    # 32 training tokens; the prompt is several times that, prefilled 16 tokens at a time
    sample.main(['--ckpt', checkpoint, '--prompt', 'def area_1(width, height):\n    return width * height\n' * 4,
                 '--max_new_tokens', '1', '--prefill_chunk', '16', '--device', DEVICE])
    err = capsys.readouterr().err.splitlines()
    note = next(line for line in err if line.startswith('note: the prompt is '))
    assert 'x the training length (32)' in note and 'chunk(s) of at most 16' in note
    progress = [line for line in err if line.startswith('prefill: ')]
    assert progress[0].startswith('prefill: 16 of ') and ' s left' in progress[0]
    total = int(progress[-1].split(' of ')[1].split()[0])
    assert progress[-1].startswith(f'prefill: {total} of {total} tokens in ') and total > 32
