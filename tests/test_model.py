"""model.py on CPU with tiny models: document isolation, the open-gate limit, the chunked loss, optimizer groups."""
import pytest
import torch
import torch.nn.functional as F

import model as model_module
from generate import KVCache, prefill
from model import GPT, GPTConfig, chunked_cross_entropy

ATTENTIONS = ['wall', 'rope', 'fox']


def tiny(attention, **kwargs):
    config = dict(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, attention=attention,
                  attn_impl='reference', window_size=8, window_pattern='LG', qk_norm=True, output_gate=True,
                  sink=attention != 'rope', scalar_gate=attention == 'wall')
    torch.manual_seed(0)
    return GPT(GPTConfig(**(config | kwargs))).eval()


@pytest.mark.parametrize('attention', ATTENTIONS)
def test_packed_documents_see_nothing_of_each_other(attention):
    model = tiny(attention)
    idx = torch.randint(0, 97, (1, 40))
    cu_seqlens = torch.tensor([0, 15, 40], dtype=torch.int32)
    with torch.no_grad():
        logits = model.lm_head(model.hidden_states(idx, cu_seqlens))
        changed = idx.clone()
        changed[0, :15] = (changed[0, :15] + 1) % 97
        logits_changed = model.lm_head(model.hidden_states(changed, cu_seqlens))
        # each packed document computes exactly what it computes alone (RoPE positions restart, decays restart)
        alone = torch.cat([model.lm_head(model.hidden_states(idx[:, a:b])) for a, b in ((0, 15), (15, 40))], dim=1)
        unpacked = model.lm_head(model.hidden_states(changed))
    torch.testing.assert_close(logits_changed[:, 15:], logits[:, 15:], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, alone, rtol=0, atol=1e-5)
    # the test can see a leak: without cu_seqlens the second document does depend on the first
    assert (unpacked[:, 15:] - logits_changed[:, 15:]).abs().max() > 1e-3


@pytest.mark.parametrize('attention', ATTENTIONS)
def test_a_packed_forward_reads_cu_seqlens_on_the_host_once(attention, monkeypatch):
    """hidden_states reads the documents to the host once (kernels.document_layout) and hands them to every layer:
    on a GPU a read is a synchronisation, which the layers would otherwise each take."""
    model = tiny(attention, n_layer=3)
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, 'tolist', lambda t: reads.append(t.shape) or tolist(t))
    with torch.no_grad():
        model.hidden_states(torch.randint(0, 97, (1, 40)), torch.tensor([0, 15, 40], dtype=torch.int32))
    assert reads == [torch.Size([3])]


def causal_sdpa(impl, q, k, v, g, **kwargs):
    """Plain causal softmax attention of [B, T, heads, dim] tensors, ignoring every gate."""
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=True)
    return y.transpose(1, 2)


@pytest.mark.parametrize('gate_per_kv_head', [False, True])
def test_wall_with_open_gates_is_causal_attention_without_positions(monkeypatch, gate_per_kv_head):
    # logsigmoid(40) = -4e-18: the decay is 1 to fp32 precision, and the model is a NoPE causal transformer
    options = dict(gate_bias_init=40.0, gate_per_kv_head=gate_per_kv_head, window_pattern='G', sink=False,
                   scalar_gate=False)
    idx = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        wall = tiny('wall', **options).hidden_states(idx)
        barely_open = tiny('wall', **(options | {'gate_bias_init': 2.0})).hidden_states(idx)
        monkeypatch.setattr(model_module, 'wall_attention', causal_sdpa)
        expected = tiny('wall', **options).hidden_states(idx)
    torch.testing.assert_close(wall, expected, rtol=1e-5, atol=1e-5)
    assert (barely_open - expected).abs().max() > 1e-3, 'the comparison should notice a real decay'


@pytest.mark.parametrize('attention', ['wall', 'fox'])
def test_attention_kernels_get_q_k_v_contiguous(attention, monkeypatch):
    """The kernels read q, k and v as [tokens, heads, dim]: split views of one fused projection would be copied on
    every call (three copies per layer: bench/results_train.md)."""
    seen, attend = [], model_module.wall_attention

    def recording(impl, q, k, v, g, **kwargs):
        seen.append([t.is_contiguous() for t in (q, k, v)])
        return attend(impl, q, k, v, g, **kwargs)

    monkeypatch.setattr(model_module, 'wall_attention', recording)
    with torch.no_grad():  # without QK-norm, which would hand over new tensors anyway
        tiny(attention, qk_norm=False).hidden_states(torch.randint(0, 97, (1, 24)))
    assert seen == [[True, True, True]] * 2


@pytest.mark.parametrize('chunk_rows', [8, 50])  # chunked, and the one-chunk path
def test_chunked_loss_equals_cross_entropy_on_full_logits(chunk_rows):
    torch.manual_seed(0)
    x = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 37, (50,))
    targets[[0, 7, 49]] = -1
    loss = chunked_cross_entropy(x, weight, targets, chunk_rows=chunk_rows)
    grads = torch.autograd.grad(3 * loss, (x, weight))
    expected = F.cross_entropy(x @ weight.T, targets, ignore_index=-1)
    expected_grads = torch.autograd.grad(3 * expected, (x, weight))
    torch.testing.assert_close(loss, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)
    nothing = torch.full_like(targets, -1)  # no target at all: a loss of 0 with zero gradients, not NaN
    for rows in (8, 50):
        empty = chunked_cross_entropy(x, weight, nothing, chunk_rows=rows)
        assert empty.item() == 0 and all((grad == 0).all() for grad in torch.autograd.grad(empty, (x, weight)))


def test_model_loss_is_the_mean_over_targets_that_are_not_ignored():
    model = tiny('wall')
    idx = torch.randint(0, 97, (1, 20))
    targets = torch.randint(0, 97, (1, 20))
    targets[0, 5:9] = -1
    with torch.no_grad():
        _, loss = model(idx, targets)
        logits = model.lm_head(model.hidden_states(idx))
    torch.testing.assert_close(loss, F.cross_entropy(logits[0], targets[0], ignore_index=-1))


def test_bad_inputs_raise_naming_the_argument():
    model = tiny('wall')
    cu_seqlens = torch.tensor([0, 3, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match='cu_seqlens: packed documents need idx of batch 1, got batch 2'):
        model(torch.zeros(2, 6, dtype=torch.long), cu_seqlens=cu_seqlens)
    cache = KVCache(model, 1, 16)
    with pytest.raises(ValueError, match='cu_seqlens: a cache holds one document per row'):
        model(torch.zeros(1, 6, dtype=torch.long), cu_seqlens=cu_seqlens, cache=cache)
    with pytest.raises(ValueError, match=r'idx: prefill expects \[B, T\] with T >= 1, got shape \(1, 0\)'):
        prefill(model, torch.zeros(1, 0, dtype=torch.long), cache)


def test_weight_decay_only_on_matrices():
    model = tiny('wall')
    decayed, not_decayed = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu').param_groups
    assert decayed['weight_decay'] == 0.1 and not_decayed['weight_decay'] == 0.0
    assert all(p.dim() == 2 for p in decayed['params']) and all(p.dim() == 1 for p in not_decayed['params'])
    assert len(decayed['params']) + len(not_decayed['params']) == len(list(model.parameters()))


@pytest.mark.parametrize('attention', ['wall', 'fox'])
def test_gate_lr_scale_zero_keeps_the_decay_gates_and_trains_the_rest(attention):
    model = tiny(attention).train()
    gates = {n for n, m in model.named_modules() if isinstance(m, model_module.DecayGate)}
    assert gates
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), 'cpu', gate_lr_scale=0.0)
    for group in optimizer.param_groups:  # as train.py's schedule sets them
        group['lr'] = 1e-2 * group['lr_scale']
    idx = torch.randint(0, 97, (2, 16))
    model(idx, idx)[1].backward()
    optimizer.step()
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved != (name.rsplit('.', 1)[0] in gates), name
    with pytest.raises(ValueError, match='gate_lr_scale'):
        model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), 'cpu', gate_lr_scale=-1)


@pytest.mark.gpu
@pytest.mark.parametrize('attention', ATTENTIONS)
def test_gpu_paths_match_the_cpu_paths(attention):
    """Triton Wall kernel vs the reference; FlashAttention varlen vs the boolean mask."""
    model = tiny(attention, attn_impl='auto')
    idx = torch.randint(0, 97, (1, 300))
    cu_seqlens = torch.tensor([0, 100, 300], dtype=torch.int32)
    with torch.no_grad():
        cpu = model.hidden_states(idx, cu_seqlens)
        with torch.autocast('cuda', dtype=torch.bfloat16):
            gpu = model.cuda().hidden_states(idx.cuda(), cu_seqlens.cuda())
    torch.testing.assert_close(gpu.float().cpu(), cpu, rtol=3e-2, atol=3e-2)
