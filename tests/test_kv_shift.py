"""The key/value shift (GPTConfig.kv_shift) in training, prefill, cached decoding and checkpoints.

The oracle for the shift itself is a loop over tokens; for the model it is the full forward of each document alone,
which the cached and packed paths must reproduce token for token.
"""
import pytest
import torch

import checkpoint as ckpt
from generate import KVCache, decode, generate_uncached, prefill
from model import GPT, GPTConfig, DecayGate, document_starts, shift_tokens
from tests.conftest import DEVICE
from tests.test_sample import CACHE_CHUNK, assert_graph_decoding_equals_full_forwards, tiny_model

SHIFTED = {  # the three attentions under the shift, with the options whose code paths it crosses
    'wall': dict(attention='wall', kv_shift=True, scalar_gate=True, sink=True),
    'wall_kv_gate': dict(attention='wall', kv_shift=True, gate_per_kv_head=True, qk_norm=True),
    'fox': dict(attention='fox', kv_shift=True),
    'rope': dict(attention='rope', kv_shift=True, qk_norm=True),
}


def test_shift_tokens_against_a_loop():
    x = torch.randn(1, 9, 2, 3)
    previous = torch.randn(1, 1, 2, 3)
    cu_seqlens = torch.tensor([0, 4, 4, 9])  # an empty document in the middle
    shifted = shift_tokens(x, document_starts(cu_seqlens, 9))
    for t in range(9):
        expected = torch.zeros(2, 3) if t in (0, 4) else x[0, t - 1]
        torch.testing.assert_close(shifted[0, t], expected, rtol=0, atol=0)
    carried = shift_tokens(x, previous=previous)
    torch.testing.assert_close(carried[:, 0], previous[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(carried[:, 1:], x[:, :-1], rtol=0, atol=0)


def test_shift_gate_is_not_a_decay_gate():
    """Gates are told apart by class, not name: the shift gate starts at bias 0 (a = 1/2) and follows the model's
    dtype, while the decay gates start nearly open and stay fp32."""
    model = GPT(GPTConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=32, scalar_gate=True,
                          kv_shift=True, sink=True))
    attn = model.blocks[0].attn
    assert isinstance(attn.gate, DecayGate) and isinstance(attn.scalar_gate, DecayGate)
    assert not isinstance(attn.kv_shift_gate, DecayGate)
    assert (attn.gate.bias == 8).all() and (attn.scalar_gate.bias == 8).all() and (attn.kv_shift_gate.bias == 0).all()
    model.to_inference_dtype(torch.bfloat16)
    assert attn.gate.weight.dtype == attn.scalar_gate.bias.dtype == attn.sink_bias.dtype == torch.float32
    assert attn.kv_shift_gate.weight.dtype == attn.c_attn.weight.dtype == torch.bfloat16


@pytest.mark.parametrize('name', SHIFTED)
def test_prefill_split_at_every_offset_equals_one_forward(name):
    """Batch 2, the prompt split in two at every offset: the second chunk's first token is shifted with the last
    cached token's k and v, which the cache carried."""
    model = tiny_model(**SHIFTED[name])
    idx = torch.randint(0, 97, (2, 21), device=DEVICE)
    with torch.no_grad():
        expected = model.hidden_states(idx)
        cache = KVCache(model, 2, 21, chunk_size=CACHE_CHUNK)
        for split in range(1, 21):
            cache.reset()
            got = torch.cat([model.hidden_states(idx[:, :split], cache=cache),
                             model.hidden_states(idx[:, split:], cache=cache)], dim=1)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, msg=f'split at {split}')


@pytest.mark.parametrize('name', SHIFTED)
def test_cached_greedy_decoding_equals_full_forwards(name):
    model = tiny_model(**SHIFTED[name])
    prompt = torch.randint(0, 97, (2, 20), device=DEVICE)
    expected = generate_uncached(model, prompt, 14, temperature=0)[:, 20:]
    cache = KVCache(model, 2, 40, chunk_size=CACHE_CHUNK)
    tokens = torch.cat(list(decode(model, prefill(model, prompt, cache, chunk_size=13), cache, 14, temperature=0)), 1)
    assert tokens.tolist() == expected.tolist()
    assert len(set(expected.flatten().tolist())) > 5, 'a sequence that hardly changes would not test the cache'


def test_the_shift_changes_the_model():
    """A shift that did nothing would pass every equality above: with it the same weights give other outputs."""
    idx = torch.randint(0, 97, (1, 16), device=DEVICE)
    with torch.no_grad():
        shifted = tiny_model(**SHIFTED['wall']).hidden_states(idx)
        plain = tiny_model(**(SHIFTED['wall'] | dict(kv_shift=False))).hidden_states(idx)
    assert (shifted - plain).abs().amax() > 0.1


@pytest.mark.gpu
@pytest.mark.parametrize('name', SHIFTED)
def test_graph_replayed_decoding_with_the_shift_on_gpu(name):
    """The carried token lives on the device: replayed steps shift with the token the previous replay stored."""
    assert_graph_decoding_equals_full_forwards(tiny_model(**SHIFTED[name]))


@pytest.mark.parametrize('name', SHIFTED)
def test_packed_documents_are_shifted_alone(name):
    """With cu_seqlens the first token of every document shifts in zeros: each document's features are those of
    its own forward, and changing document 1 changes nothing in document 2."""
    model = tiny_model(**SHIFTED[name])
    lengths = [7, 1, 12]
    idx = torch.randint(0, 97, (1, sum(lengths)), device=DEVICE)
    cu_seqlens = torch.tensor([0, 7, 8, 20], dtype=torch.int32, device=DEVICE)
    with torch.no_grad():
        packed = model.hidden_states(idx, cu_seqlens)
        for (start, end) in [(0, 7), (7, 8), (8, 20)]:
            alone = model.hidden_states(idx[:, start:end])
            torch.testing.assert_close(packed[:, start:end], alone, rtol=1e-4, atol=1e-4)
        changed = idx.clone()
        changed[0, :7] = (changed[0, :7] + 1) % 97
        repacked = model.hidden_states(changed, cu_seqlens)
    torch.testing.assert_close(repacked[:, 7:], packed[:, 7:], rtol=0, atol=1e-6)
    assert (repacked[:, :7] - packed[:, :7]).abs().amax() > 1e-3


def test_training_gradients_reach_the_shift_gate():
    model = tiny_model(**SHIFTED['wall']).train()
    idx = torch.randint(0, 97, (1, 16), device=DEVICE)
    _, loss = model(idx, targets=idx)
    loss.backward()
    for block in model.blocks:
        grad = block.attn.kv_shift_gate.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().amax() > 0


@pytest.mark.parametrize('kv_shift', [False, True])
def test_checkpoints_round_trip_with_and_without_the_shift(tmp_path, kv_shift):
    model = tiny_model(**(SHIFTED['wall'] | dict(kv_shift=kv_shift)))
    model_args = {k: getattr(model.config, k) for k in ('vocab_size', 'n_layer', 'n_head', 'n_kv_head', 'n_embd',
                                                        'attention', 'kv_shift', 'scalar_gate', 'sink', 'window_size',
                                                        'window_pattern')}
    if not kv_shift:  # a checkpoint from before the option: no kv_shift key at all
        del model_args['kv_shift']
    path = str(tmp_path / 'ckpt.pt')
    ckpt.save({'model': model.state_dict(), 'model_args': model_args, 'iter_num': 0, 'best_val_loss': 1.0,
               'config': {'data_dir': str(tmp_path), 'max_doc_len': 64, 'tokens_per_batch': 64}}, path)
    loaded = ckpt.build_model(ckpt.load(path)).to(DEVICE).eval()
    assert loaded.config.kv_shift == kv_shift
    idx = torch.randint(0, 97, (1, 12), device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(loaded.hidden_states(idx), model.hidden_states(idx), rtol=0, atol=0)
