"""The quick start as the README runs it (prepare, train config/tiny.py, sample), and the eager reference it trains
through, checked against two computations that share none of its code: the formula with an explicit [T, T, K]
decay tensor, and flash-linear-attention's naive oracle."""
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from kernels import reference, wall_attn_reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The final val loss that the README states for `python train.py config/tiny.py` (keep the two in step), and how far
# above it a run may end: other CPUs and BLAS builds round differently, and 580 steps amplify that a little.
README_VAL_LOSS = 4.79
MARGIN = 0.15


def naive(q, k, v, g, scale=None, g_scalar=None, sink_bias=None, window_size=None, cu_seqlens=None):
    """docs/operator.md term by term: the decay of pair (i, j) is exp of the sum of g over t = j+1 .. i, summed
    explicitly (no prefix differences), in a [B, T, T, HQ, K] tensor. Float64, tiny sizes only."""
    B, T, HQ, K = q.shape
    H, HG = k.shape[2], g.shape[2]
    scale = K ** -0.5 if scale is None else scale
    q, k, v, g = (x.double() for x in (q, k, v, g))
    k, v = (x.repeat_interleave(HQ // H, dim=2) for x in (k, v))
    g = g.repeat_interleave(HQ // HG, dim=2)
    i = torch.arange(T)[:, None, None]
    j = torch.arange(T)[None, :, None]
    t = torch.arange(T)[None, None, :]
    between = ((j < t) & (t <= i)).double()  # [i, j, t]: the steps whose gates decay key j as seen from i
    decay = torch.exp(torch.einsum('ijt,bthk->bijhk', between, g))  # <= 1 where j <= i, >= 1 above (masked below)
    logits = scale * torch.einsum('bihk,bjhk,bijhk->bhij', q, k, decay)
    if g_scalar is not None:
        logits = logits + torch.einsum('ijt,bth->bhij', between, g_scalar.double())
    visible = (j <= i)[..., 0]
    if window_size is not None:
        visible &= (i - j)[..., 0] < window_size
    if cu_seqlens is not None:
        doc = torch.bucketize(torch.arange(T), cu_seqlens[1:].long(), right=True)
        visible &= doc[:, None] == doc[None, :]
    logits = logits.masked_fill(~visible, float('-inf'))
    if sink_bias is not None:
        logits = torch.cat([logits, sink_bias.double()[None, :, None, None].expand(B, HQ, T, 1)], dim=-1)
    weights = torch.softmax(logits, dim=-1)[..., :T]
    return torch.einsum('bhij,bjhd->bihd', weights, v)


def inputs(B=1, T=40, HQ=4, H=2, HG=None, K=8, V=6, gates='mixed', scalar_gate=False, sink=False):
    HG = HG or HQ
    q, k, v = (torch.randn(B, T, h, d, dtype=torch.float64) for h, d in ((HQ, K), (H, K), (H, V)))
    if gates == 'mixed':    # ~0 and ~-10 nats per step side by side
        g = F.logsigmoid(3 * torch.randn(B, T, HG, K, dtype=torch.float64))
    elif gates == 'strong':  # -3 to -20 nats per step: a 64-step block decays by up to 1280 nats
        g = -3 - 17 * torch.rand(B, T, HG, K, dtype=torch.float64)
    else:                   # close to open, so far keys still count
        g = F.logsigmoid(6 + torch.randn(B, T, HG, K, dtype=torch.float64))
    return dict(q=q, k=k, v=v, g=g,
                g_scalar=F.logsigmoid(torch.randn(B, T, HQ, dtype=torch.float64)) if scalar_gate else None,
                sink_bias=torch.randn(HQ, dtype=torch.float64) if sink else None)


CASES = {
    'gqa': (dict(), dict()),
    'shared-gate-scalar-sink': (dict(HG=2, scalar_gate=True, sink=True), dict()),
    'weak-gates-long': (dict(T=150, HQ=2, H=1, gates='weak'), dict()),  # several query blocks, far keys matter
    'strong-gates': (dict(T=150, HQ=2, H=1, gates='strong'), dict()),
    'window': (dict(T=100, gates='weak', sink=True), dict(window_size=13)),
    'batch': (dict(B=3, T=33, scalar_gate=True), dict(window_size=20)),
    'varlen': (dict(T=120, gates='weak', scalar_gate=True, sink=True),
               dict(cu_seqlens=torch.tensor([0, 7, 7, 70, 71, 120], dtype=torch.int32))),
    'varlen-window': (dict(T=120, HG=2), dict(cu_seqlens=torch.tensor([0, 50, 120]), window_size=30)),
}


@pytest.fixture(params=['any', 'blocks'])
def path(request, monkeypatch):
    """Both of the reference's paths: as it chooses (one anchor per document where the decay allows), or blocks."""
    if request.param == 'blocks':
        monkeypatch.setattr(reference, 'dense_nats', lambda dtype: -1.0)
    return request.param


@pytest.mark.parametrize('case', CASES)
def test_reference_is_the_formula(case, path):
    """Outputs and every gradient of the chunked reference against the explicit formula, in float64."""
    torch.manual_seed(len(case))
    shape, options = CASES[case]
    x = inputs(**shape)
    ours = {n: t.clone().requires_grad_() for n, t in x.items() if t is not None}
    theirs = {n: t.clone().requires_grad_() for n, t in x.items() if t is not None}
    o = wall_attn_reference(**ours, **options)
    o_naive = naive(**theirs, **options)
    assert o.dtype == torch.float64
    torch.testing.assert_close(o, o_naive, rtol=1e-10, atol=1e-12)
    do = torch.randn_like(o)
    o.backward(do)
    o_naive.backward(do)
    for name in ours:
        torch.testing.assert_close(ours[name].grad, theirs[name].grad, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize('nats', [20, 120])
def test_reference_one_anchor_path_in_float32(nats, monkeypatch):
    """float32 documents whose channels decay by up to `nats`, near the one-anchor path's limit of 124: that path
    is taken, finite, and as close to the float64 formula as the blocks are."""
    torch.manual_seed(nats)
    x = inputs(B=2, T=64, gates='weak', scalar_gate=True, sink=True)
    x['g'] = -torch.rand_like(x['g']) * (2 * nats / 64)  # about `nats` over the document on the fastest channels
    x['g'] *= nats / -x['g'].sum(1).min()
    taken = []
    monkeypatch.setattr(reference, '_dense', lambda *a, dense=reference._dense: taken.append(1) or dense(*a))
    fp32 = {n: t.float().requires_grad_() for n, t in x.items()}
    o = wall_attn_reference(**fp32)
    o.backward(torch.ones_like(o))
    assert taken and torch.isfinite(o).all() and all(torch.isfinite(t.grad).all() for t in fp32.values())
    expected = naive(**x)
    torch.testing.assert_close(o.double(), expected, rtol=1e-5, atol=1e-5)


def test_reference_ignores_a_constant_prefix_shift():
    """A hugely negative first gate adds a constant to every prefix: no output may change (nor overflow)."""
    x = inputs(T=100, gates='weak')
    shifted = x['g'].clone()
    shifted[:, 0] = -3e4
    torch.testing.assert_close(wall_attn_reference(**{**x, 'g': shifted}), wall_attn_reference(**x), rtol=1e-9,
                               atol=1e-11)


def test_reference_against_flash_linear_attention_naive(monkeypatch):
    """fla's naive_wall_attn (a gate per query head, float32) on CPU: its one GPU-only piece, the Triton
    prefix sum, is replaced by torch's (the same per-document cumsum, times its scale)."""
    naive_module = pytest.importorskip('fla.ops.wall_attn.naive')

    def cumsum(s, cu_seqlens=None, scale=1.0):
        if cu_seqlens is None:
            return torch.cumsum(s, dim=1) * scale
        bounds = cu_seqlens.tolist()
        return torch.cat([torch.cumsum(s[:, a:b], dim=1) for a, b in zip(bounds[:-1], bounds[1:])], dim=1) * scale

    monkeypatch.setattr(naive_module, 'chunk_global_cumsum', cumsum)
    torch.manual_seed(3)
    x = inputs(T=130, gates='weak', scalar_gate=True, sink=True)
    for options in (dict(), dict(window_size=40), dict(cu_seqlens=torch.tensor([0, 60, 61, 130]))):
        as_float = {n: t.float() for n, t in x.items()}  # it mixes .float() and its inputs' dtype: give it fp32
        expected = naive_module.naive_wall_attn(**as_float, scale=8 ** -0.5, **options).double()
        torch.testing.assert_close(wall_attn_reference(**x, scale=8 ** -0.5, **options), expected, rtol=1e-4,
                                   atol=1e-5)


# The README's quick start, command by command (test_quickstart_learns adds its own paths, and a shorter sample)
QUICKSTART = ('python -m data.prepare', 'python train.py config/tiny.py', 'python sample.py')


def run(command, *args, **kw):
    """One of QUICKSTART, with more arguments, from the repository root; its stdout."""
    result = subprocess.run([sys.executable, *command.split()[1:], *args], cwd=REPO, capture_output=True, text=True,
                            **kw)
    assert result.returncode == 0, f'{command} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}'
    return result.stdout


def test_readme_quick_start_is_what_this_file_runs():
    with open(os.path.join(REPO, 'README.md')) as f:
        line = next(line for line in f if line.startswith('pip install') and 'train.py' in line)
    commands = [command.strip() for command in line.split('&&') if command.strip().startswith('python')]
    assert len(commands) == len(QUICKSTART) and all(map(str.startswith, commands, QUICKSTART)), line


def test_quickstart_learns(tmp_path):
    """prepare + `python train.py config/tiny.py` + sample.py, as the README runs them (into a tmp dir): the final
    val loss is the README's, and the sample is text."""
    data = tmp_path / 'pystdlib'
    prepare, train, sample = QUICKSTART
    run(prepare, f'--out={data}')
    out = run(train, f'--data_dir={data}', f'--out_dir={tmp_path / "out"}')
    val = [float(x) for x in re.findall(r'val loss ([\d.]+)', out)]
    assert val[-1] <= README_VAL_LOSS + MARGIN, f'final val loss {val[-1]:.4f}, the README says {README_VAL_LOSS}:\n{out}'
    printed = run(sample, f'--ckpt={tmp_path / "out" / "ckpt.pt"}', '--prompt', 'def ', '--max_new_tokens=50')
    assert printed.startswith('def ') and re.search(r'new tokens [1-9]', printed), printed
