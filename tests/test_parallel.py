"""The fused training kernel against the float64 eager oracle: outputs and every gradient."""
import math
import os
import zlib

import pytest
import torch
import torch.nn.functional as F

from kernels import document_layout, wall_attn, wall_attn_reference
from tests.conftest import DEVICE


def make_inputs(B=1, T=100, HQ=2, H=1, K=32, V=16, gate_heads=None, scalar_gate=False, sink=False,
                gates='logsigmoid', dtype=torch.float32, device=DEVICE):
    HG = gate_heads or HQ
    q, k, v = (torch.randn(B, T, h, d, device=device) for h, d in ((HQ, K), (H, K), (H, V)))
    if gates == 'logsigmoid':      # mixes ~0 and ~-10 nats per step: the published kernel's NaN case
        g = F.logsigmoid(3 * torch.randn(B, T, HG, K, device=device))
    elif gates == 'strong':        # -3 to -20 nats per step
        g = -3 - 17 * torch.rand(B, T, HG, K, device=device)
    elif gates == 'zero':
        g = torch.zeros(B, T, HG, K, device=device)
    else:
        g = F.logsigmoid(gates + torch.randn(B, T, HG, K, device=device))
    return dict(q=q.to(dtype), k=k.to(dtype), v=v.to(dtype), g=g,
                g_scalar=F.logsigmoid(torch.randn(B, T, HQ, device=device)) if scalar_gate else None,
                sink_bias=torch.randn(HQ, device=device) if sink else None)


@pytest.fixture(autouse=True)
def _small_anchor_groups(request, monkeypatch):
    """CPU shapes are a few blocks long: groups of 2 blocks give them far groups as well as near blocks. GPU tests
    keep the real group size."""
    if 'gpu' not in request.keywords:
        import kernels.parallel as parallel
        monkeypatch.setattr(parallel, 'GROUPS', dict(fwd=2, dq=2, dkv=2))


def rel(a, b):
    """Relative error; an all-zero expectation (e.g. dg with window 1) is compared absolutely."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1.0)).item()


def run_both(inputs, **kw):
    """Kernel and float64 oracle on the same inputs; returns {name: relative error} for o and all gradients."""
    names = [n for n, x in inputs.items() if x is not None]
    ours = {n: x.clone().requires_grad_() for n, x in inputs.items() if x is not None}
    ref = {n: x.double().clone().requires_grad_() for n, x in inputs.items() if x is not None}
    o = wall_attn(**ours, **kw)
    o_ref = wall_attn_reference(**ref, **kw)
    do = torch.randn_like(o_ref)
    o.backward(do.to(o.dtype))
    o_ref.backward(do)
    assert torch.isfinite(o).all()
    errors = {'o': rel(o, o_ref)}
    for n in names:
        assert torch.isfinite(ours[n].grad).all(), f'd{n} is not finite'
        errors['d' + n] = rel(ours[n].grad, ref[n].grad)
    return errors


def assert_close(errors, tol):
    # Gate gradients are differences q*dq - k*dk summed over the future: with strong gates the two terms
    # nearly cancel, so they keep fewer correct digits than dq and dk themselves.
    limit = lambda n: 10 * tol if n in ('dg', 'dg_scalar') else tol
    bad = {n: e for n, e in errors.items() if not e < limit(n)}
    assert not bad, f'relative errors over {tol}: {bad} (all: {errors})'


CASES = {
    'plain': dict(),
    'gqa': dict(HQ=4, H=2),
    'gqa-shared-gate': dict(HQ=4, H=2, gate_heads=2),
    'scalar-gate-sink': dict(HQ=2, scalar_gate=True, sink=True),
    'odd-dims': dict(K=48, V=20, T=77),
    'dim-100': dict(K=100, V=100, T=40),
    'dim-24': dict(K=24, V=24, T=70),
    'dim-96-gqa': dict(K=96, V=96, T=70, HQ=4, H=2, gate_heads=2),
    'dim-256': dict(K=256, V=256, T=70),
    'values-320': dict(K=48, V=320, T=70, HQ=4, H=2),              # two value tiles, 256 + 64
    'values-512': dict(K=24, V=512, T=70, scalar_gate=True, sink=True),
    'batch': dict(B=2, T=70),
    'strong-gates': dict(gates='strong'),
    'weak-gates': dict(gates=6.0),
}


@pytest.mark.parametrize('case', CASES)
def test_parity(case):
    torch.manual_seed(zlib.crc32(case.encode()))  # hash() is salted per process: not reproducible
    assert_close(run_both(make_inputs(**CASES[case])), 3e-5)


@pytest.mark.parametrize('window', [1, 5, 64, 100])
def test_window(window):
    inputs = make_inputs(T=150, HQ=2, H=1, scalar_gate=True, sink=True)
    assert_close(run_both(inputs, window_size=window), 3e-5)


@pytest.mark.parametrize('index_dtype', [torch.int32, torch.int64])
def test_varlen(index_dtype):
    cu = torch.tensor([0, 30, 30, 95, 96, 200], dtype=index_dtype, device=DEVICE)
    inputs = make_inputs(T=200, HQ=4, H=2, gate_heads=2, scalar_gate=True, sink=True)
    assert_close(run_both(inputs, cu_seqlens=cu), 3e-5)
    assert_close(run_both(inputs, cu_seqlens=cu, window_size=20), 3e-5)


@pytest.mark.parametrize('steep_first', [False, True])
def test_gentle_and_steep_blocks_side_by_side(steep_first):
    """Blocks of 64 alternate between the one-dot diagonal and the steep path, so a program's two query blocks,
    and a block and the keys before it, take different paths."""
    inputs = make_inputs(T=300, HQ=2, H=1, gates=6.0, scalar_gate=True)
    steep = (torch.arange(300, device=DEVICE) // 64 % 2 == 0) == steep_first
    inputs['g'][:, steep] = -3 - 17 * torch.rand_like(inputs['g'][:, steep])
    assert_close(run_both(inputs), 3e-5)
    assert_close(run_both(inputs, window_size=70), 3e-5)


@pytest.mark.parametrize('groups', [(1, 1, 1), (3, 3, 3), (3, 1, 2)])
def test_anchor_group_sizes(groups, monkeypatch):
    """Every key block its own group (all keys far), groups that documents and windows cut in odd places, and a
    different group size in each kernel (forward, dq, dk/dv). Weak gates (and no scalar gate) keep far keys in play,
    so an anchor frame off by one group shows."""
    import kernels.parallel as parallel
    monkeypatch.setattr(parallel, 'GROUPS', dict(zip(('fwd', 'dq', 'dkv'), groups)))
    cu = torch.tensor([0, 20, 270, 400], device=DEVICE)
    inputs = make_inputs(T=400, HQ=2, H=1, gates=6.0, sink=True)
    assert_close(run_both(inputs, cu_seqlens=cu), 3e-5)
    assert_close(run_both(inputs, cu_seqlens=cu, window_size=150), 3e-5)


@pytest.mark.parametrize('scale', [-0.3, 0.0])
def test_negative_and_zero_scale(scale):
    """Any float scale is valid input, on far and near tiles alike."""
    assert_close(run_both(make_inputs(T=300, gates=6.0), scale=scale), 3e-5)


def test_documents_do_not_see_each_other():
    cu = torch.tensor([0, 70, 150], device=DEVICE)
    inputs = make_inputs(T=150)
    o = wall_attn(**inputs, cu_seqlens=cu)
    second = {n: x[:, 70:] if x is not None and x.dim() > 1 else x for n, x in inputs.items()}
    torch.testing.assert_close(o[:, 70:], wall_attn(**second), rtol=1e-5, atol=1e-6)


def test_zero_gate_is_causal_softmax_attention():
    inputs = make_inputs(T=130, HQ=4, H=2, gates='zero')
    o = wall_attn(**inputs, scale=0.3)
    k, v = (inputs[n].repeat_interleave(2, dim=2).transpose(1, 2) for n in ('k', 'v'))
    expected = F.scaled_dot_product_attention(inputs['q'].transpose(1, 2), k, v, is_causal=True, scale=0.3)
    torch.testing.assert_close(o, expected.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_fully_decayed_key_gets_logit_zero():
    """The decay multiplies the logit: a key decayed to nothing still weighs exp(0), not exp(-inf)."""
    T = 40
    q = torch.randn(1, T, 1, 16, device=DEVICE)
    k = torch.randn(1, T, 1, 16, device=DEVICE)
    v = torch.randn(1, T, 1, 8, device=DEVICE)
    g = torch.zeros(1, T, 1, 16, device=DEVICE)
    g[:, 1:] = -1e4   # every key is fully decayed for every later query
    o = wall_attn(q, k, v, g)
    scale = 16 ** -0.5
    diag = (q * k).sum(-1) * scale  # only the pair i == j keeps its logit
    logits = torch.zeros(T, T, device=DEVICE).masked_fill(torch.ones(T, T, device=DEVICE).triu(1).bool(), -math.inf)
    logits[range(T), range(T)] = diag[0, :, 0]
    expected = torch.softmax(logits, -1) @ v[0, :, 0]
    torch.testing.assert_close(o[0, :, 0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('varlen', [False, True])
def test_position_shift_invariance(varlen):
    """A huge gate where a document starts shifts all of its prefix; results must not move past fp32 rounding."""
    inputs = make_inputs(T=160, HQ=2, H=1, scalar_gate=True)
    cu = torch.tensor([0, 64, 100, 160], device=DEVICE) if varlen else None
    starts = cu[:-1].tolist() if varlen else [0]
    shifted = dict(inputs, g=inputs['g'].clone(), g_scalar=inputs['g_scalar'].clone())
    shifted['g'][:, starts] -= 3e4
    shifted['g_scalar'][:, starts] -= 3e4
    results = []
    for x in (inputs, shifted):
        leaves = {n: t.clone().requires_grad_() for n, t in x.items() if t is not None}
        o = wall_attn(**leaves, cu_seqlens=cu)
        o.backward(torch.ones_like(o))
        results.append([o] + [leaves[n].grad for n in ('q', 'k', 'v')])
    for a, b in zip(*results):
        assert rel(b, a) < 1e-5


def test_gate_gradient_matches_formula():
    """dg[t] = sum over s >= t of (q*dq - k*dk)[s]: the ln 2 factors must cancel."""
    inputs = make_inputs(T=90, HQ=2, H=2)
    leaves = {n: x.clone().requires_grad_() for n, x in inputs.items() if x is not None}
    o = wall_attn(**leaves)
    o.backward(torch.randn_like(o))
    terms = leaves['q'] * leaves['q'].grad - leaves['k'] * leaves['k'].grad
    expected = terms.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(leaves['g'].grad, expected, rtol=1e-4, atol=1e-5)
    assert leaves['g'].grad[:, 0].abs().max() < 1e-4  # the first gate never matters


def test_reference_gradients_by_finite_differences():
    """The oracle's own gate gradients, checked numerically in float64."""
    torch.manual_seed(1)
    inputs = {n: None if x is None else x.double().requires_grad_(n in ('g', 'g_scalar', 'sink_bias'))
              for n, x in make_inputs(T=12, HQ=2, H=1, K=4, V=3, scalar_gate=True, sink=True, device='cpu').items()}
    fn = lambda g, g_scalar, sink_bias: wall_attn_reference(inputs['q'], inputs['k'], inputs['v'], g, g_scalar=g_scalar,
                                                            sink_bias=sink_bias, window_size=7)
    assert torch.autograd.gradcheck(fn, (inputs['g'], inputs['g_scalar'], inputs['sink_bias']))


def test_against_flash_linear_attention_naive():
    """A second, independent oracle where it is defined (it needs a GPU for its cumsum)."""
    naive = pytest.importorskip('fla.ops.wall_attn').naive_wall_attn
    if DEVICE != 'cuda':
        pytest.skip("fla's naive oracle calls an autotuned Triton cumsum: GPU only")
    inputs = make_inputs(T=300, HQ=4, H=2, scalar_gate=True, sink=True)
    kw = dict(scale=32 ** -0.5, window_size=50)
    torch.testing.assert_close(wall_attn(**inputs, **kw), naive(**inputs, **kw).to(torch.float32), rtol=1e-4,
                               atol=1e-4)


def _error_for(**changes):
    inputs = make_inputs(T=8, HQ=4, H=2, device='cpu')
    inputs.update(changes)
    return inputs


@pytest.mark.parametrize('changes, error, words', [
    (dict(k=torch.randn(1, 8, 3, 32)), ValueError, 'query heads'),
    (dict(k=torch.randn(1, 9, 2, 32)), ValueError, '`k`'),
    (dict(v=torch.randn(1, 8, 1, 16)), ValueError, '`v`'),
    (dict(g=torch.randn(1, 8, 3, 32)), ValueError, '`g`'),
    (dict(q=torch.randn(8, 4, 32)), ValueError, '`q`'),
    (dict(k=torch.randn(1, 8, 2, 32, dtype=torch.float64)), TypeError, '`k`'),
    (dict(q=torch.randn(1, 8, 4, 300), k=torch.randn(1, 8, 2, 300), g=torch.randn(1, 8, 4, 300)), ValueError,
     'up to 256'),
    (dict(sink_bias=torch.randn(2)), ValueError, '`sink_bias`'),
    (dict(g_scalar=torch.randn(1, 8, 2)), ValueError, '`g_scalar`'),
    (dict(scale=float('nan')), ValueError, '`scale`'),
    (dict(window_size=0), ValueError, '`window_size`'),
    (dict(window_size=2.5), ValueError, '`window_size`'),
    (dict(cu_seqlens=torch.tensor([0, 4, 9])), ValueError, 'end at T'),
    (dict(cu_seqlens=torch.tensor([1, 4, 8])), ValueError, 'start at 0'),
    (dict(cu_seqlens=torch.tensor([0, 5, 4, 8])), ValueError, 'non-decreasing'),
    (dict(cu_seqlens=torch.tensor([0.0, 8.0])), TypeError, '`cu_seqlens`'),
    (dict(q=torch.randn(1, 8, 4, 32).int()), TypeError, '`q`'),
])
def test_bad_inputs(changes, error, words):
    with pytest.raises(error, match=words):
        wall_attn(**_error_for(**changes))


def test_layout_passed_or_computed_gives_the_same_results():
    """The documents' layout computed once (kernels.document_layout, as model.py does per batch) and the one each
    call computes from cu_seqlens give the same outputs and gradients, bit for bit, in the kernel and the reference."""
    cu = torch.tensor([0, 50, 50, 130], device=DEVICE)
    inputs = make_inputs(T=130, HQ=2, H=1, scalar_gate=True, sink=True)
    do = torch.randn(1, 130, 2, 16, device=DEVICE)
    for attend in (wall_attn, wall_attn_reference):
        results = []
        for layout in (None, document_layout(cu)):
            leaves = {n: x.clone().requires_grad_() for n, x in inputs.items() if x is not None}
            o = attend(**leaves, cu_seqlens=cu, window_size=40, layout=layout)
            o.backward(do)
            results.append([o] + [leaves[n].grad for n in sorted(leaves)])
        for ours, computed in zip(*results):
            assert torch.equal(ours, computed), attend.__name__


@pytest.mark.parametrize('attend, other, words', [
    (wall_attn, [0, 8], '`layout` holds 2 boundaries but `cu_seqlens` 3'),
    (wall_attn_reference, [0, 8], '`layout` holds 2 boundaries but `cu_seqlens` 3'),
    (wall_attn, [0, 4, 9], 'end at T=8'),
])
def test_a_layout_of_other_documents_is_refused(attend, other, words):
    """What the host knows of cu_seqlens without reading it: how many boundaries it has, and (wall_attn) that the
    last one is T. A one-line error."""
    with pytest.raises(ValueError) as error:
        attend(**_error_for(), cu_seqlens=torch.tensor([0, 4, 8]), layout=document_layout(torch.tensor(other)))
    assert words in str(error.value) and '\n' not in str(error.value)


def test_a_layout_goes_with_its_cu_seqlens():
    cu = torch.tensor([0, 4, 8])
    with pytest.raises(ValueError, match='`layout`'):
        wall_attn(**_error_for(), layout=document_layout(cu))
    with pytest.raises(TypeError, match='`layout` must be a kernels.DocumentLayout'):
        wall_attn(**_error_for(), cu_seqlens=cu, layout=(0, 4, 8))


def test_a_layout_is_taken_as_given():
    """As documented (kernels/documents.py): a layout with as many boundaries, ending at T, is not compared with
    cu_seqlens' values, which would take the device-to-host read it spares; its boundaries are the ones used."""
    inputs = make_inputs(T=40, HQ=2, H=1)
    given = wall_attn(**inputs, cu_seqlens=torch.tensor([0, 20, 40], device=DEVICE),
                      layout=document_layout(torch.tensor([0, 10, 40])))
    assert torch.equal(given, wall_attn(**inputs, cu_seqlens=torch.tensor([0, 10, 40], device=DEVICE)))


def test_varlen_needs_batch_one():
    inputs = make_inputs(B=2, T=8, device='cpu')
    with pytest.raises(ValueError, match='batch size 1'):
        wall_attn(**inputs, cu_seqlens=torch.tensor([0, 8]))


def test_parallel_loads_as_a_kernel_file(monkeypatch):
    """bench/registers.py and bench/variants.py load parallel.py by path without kernels/__init__.py
    (bench/kernel_files.py): its relative imports must resolve that way too."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), '..', 'bench'))
    from kernel_files import load_kernel_file
    import kernels.parallel as parallel
    lone = load_kernel_file(parallel.__file__, 'parallel')
    assert lone is not parallel and lone.LAUNCH == parallel.LAUNCH and callable(lone.wall_attn)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs two devices')
def test_inputs_on_different_devices():
    inputs = make_inputs(T=8, device='cpu')
    inputs['q'] = inputs['q'].cuda()
    with pytest.raises(ValueError, match='device'):
        wall_attn(**inputs)


def test_non_contiguous_inputs():
    base = make_inputs(T=80, HQ=2, H=2, K=32)
    strided = {n: None if x is None else torch.cat([x, x], dim=-1)[..., ::2] for n, x in base.items()}
    assert not strided['q'].is_contiguous()
    torch.testing.assert_close(wall_attn(**strided), wall_attn(**{n: x.contiguous() if x is not None else None
                                                                    for n, x in strided.items()}))


def test_split_projection_and_summed_loss():
    """q, k, v as the split views of one fused projection, and the loss o.sum(), whose gradient reaches the backward
    as a stride-0 tensor (the kernels read it as [tokens, heads, dim]: all gradients were NaN before it was copied)."""
    B, T, HQ, H, K = 2, 90, 4, 2, 32
    x = torch.randn(B, T, (HQ + 2 * H) * K, device=DEVICE)
    g = F.logsigmoid(3 * torch.randn(B, T, HQ, K, device=DEVICE))
    results = []
    for attend, dtype in ((wall_attn, torch.float32), (wall_attn_reference, torch.float64)):
        xs, gs = (t.to(dtype).clone().requires_grad_() for t in (x, g))
        q, k, v = (t.unflatten(-1, (-1, K)) for t in xs.split([HQ * K, H * K, H * K], dim=-1))
        o = attend(q, k, v, gs)
        o.sum().backward()
        results.append((o, xs.grad, gs.grad))
    for name, ours, ref in zip(('o', 'dqkv', 'dg'), *results):
        assert torch.isfinite(ours).all(), name
        assert rel(ours, ref) < 3e-5, name


@pytest.mark.gpu
@pytest.mark.parametrize('case', ['plain', 'gqa-shared-gate', 'strong-gates'])
@pytest.mark.parametrize('T', [1000, 2048])
def test_parity_bf16_gpu(case, T):
    inputs = make_inputs(T=T, K=128, V=128, dtype=torch.bfloat16, **{k: v for k, v in CASES[case].items()
                                                                      if k not in ('K', 'V', 'T')})
    assert_close(run_both(inputs), 2e-2)


@pytest.mark.gpu
def test_varlen_window_sink_bf16_gpu():
    cu = torch.tensor([0, 700, 701, 2000, 4096], device='cuda', dtype=torch.int32)
    inputs = make_inputs(T=4096, HQ=8, H=2, K=64, V=64, scalar_gate=True, sink=True, dtype=torch.bfloat16)
    assert_close(run_both(inputs, cu_seqlens=cu, window_size=300), 2e-2)
    assert_close(run_both(make_inputs(T=1500, HQ=4, H=4, K=64, V=64)), 1e-4)  # fp32 (IEEE dots) on GPU


@pytest.mark.gpu
def test_backward_launches_the_kernels_compiled_ahead():
    """The first forward at a new specialization compiles dq and dk/dv on other threads; the backward must launch
    those compiles: each kernel's cache grows by one entry. A compile ahead that Triton specialized otherwise than
    the launch would leave two (and cost the compile time twice)."""
    import kernels.parallel as parallel
    device = torch.cuda.current_device()
    entries = lambda: [len(kernel.device_caches[device][0])
                       for kernel in (parallel._bwd_dq_kernel, parallel._bwd_dkv_kernel)]
    before, specializations = entries(), len(parallel._compiles_ahead)
    inputs = make_inputs(T=300, HQ=2, H=2, K=72, V=72, dtype=torch.bfloat16)  # a head dim no other test compiles
    assert_close(run_both(inputs), 2e-2)
    assert len(parallel._compiles_ahead) == specializations + 1
    assert entries() == [n + 1 for n in before]


@pytest.mark.parametrize('case', ['gqa-shared-gate', 'scalar-gate-sink', 'weak-gates'])
def test_steep_diagonal_path_everywhere(case, monkeypatch):
    """Force every diagonal tile through the sub-block path that steep gates take, on all features."""
    import kernels.parallel as parallel
    monkeypatch.setattr(parallel, 'FAST_RANGE', {dtype: -1.0 for dtype in parallel.FAST_RANGE})
    cu = torch.tensor([0, 50, 130], device=DEVICE)
    assert_close(run_both(make_inputs(T=130, **{k: v for k, v in CASES[case].items()}), cu_seqlens=cu,
                          window_size=40), 3e-5)


@pytest.mark.gpu
@pytest.mark.parametrize('gates', ['zero', 6.0, 'logsigmoid'])
def test_steep_diagonal_path_bf16_gpu(gates, monkeypatch):
    """The sub-block diagonal in bf16 on every block, including gates weak enough that its outer pairs dominate."""
    import kernels.parallel as parallel
    monkeypatch.setattr(parallel, 'FAST_RANGE', {dtype: -1.0 for dtype in parallel.FAST_RANGE})
    torch.manual_seed(0)
    assert_close(run_both(make_inputs(T=1000, K=128, V=128, dtype=torch.bfloat16, gates=gates)), 2e-2)


@pytest.mark.parametrize('name', ['g', 'g_scalar'])
def test_positive_gates_raise(name):
    """Raw logits passed as gates: outside the domain the kernels would clamp silently, so they raise instead."""
    inputs = make_inputs(T=70, scalar_gate=True)
    inputs[name] = inputs[name].clone()
    inputs[name][0, 33, 0] = 2.5
    with pytest.raises(ValueError, match=rf'`{name}` must be <= 0.*largest value is 2\.5'):
        wall_attn(**inputs)
    import kernels
    kernels.set_gate_check('off')
    try:
        assert torch.isfinite(wall_attn(**inputs)).all()
    finally:
        kernels.set_gate_check('auto')
    with pytest.raises(ValueError, match='gate check mode'):
        kernels.set_gate_check('never')


@pytest.mark.gpu
def test_positive_gates_raise_on_gpu_without_stalling():
    """First call: at once. Later calls: no synchronisation, the error comes at the first call after one."""
    from kernels import domain
    inputs = make_inputs(T=1000, HQ=4, H=2, K=64, V=64, dtype=torch.bfloat16)
    wall_attn(**inputs)  # the first, synchronous check passes
    bad = dict(inputs, g=inputs['g'].abs())
    wall_attn(**bad)  # queued
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match='`g` must be <= 0.*after the call returned'):
        wall_attn(**inputs)
    domain.set_gate_check('sync')
    try:
        with pytest.raises(ValueError, match='`g` must be <= 0'):
            wall_attn(**bad)
    finally:
        domain.set_gate_check('auto')


def test_launch_pipelines_less_where_shared_memory_runs_out(monkeypatch):
    """A launch whose first stages need more shared memory than the GPU has goes down a stage at a time, remembers
    the count that fitted for that specialization, and raises when even one stage does not fit. fp32 tiles of wide
    heads start at WIDE_FP32_STAGES."""
    from triton.runtime.errors import OutOfResources
    import kernels.parallel as parallel
    monkeypatch.setattr(parallel, '_fitting_stages', {})
    launched = []

    class Kernel:
        def __init__(self, fits):
            self.fits = fits

        def __getitem__(self, grid):
            def run(*args, num_warps, num_stages, **constexprs):
                launched.append(num_stages)
                if num_stages > self.fits:
                    raise OutOfResources(300000, 232448, 'shared memory')
            return run

    bf16, fp32 = torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1)
    parallel._launch('fwd', Kernel(fits=1), (1,), bf16, KP=256, VP=256)
    assert launched == [3, 2, 1]
    parallel._launch('fwd', Kernel(fits=1), (1,), bf16, KP=256, VP=256)   # remembered
    parallel._launch('fwd', Kernel(fits=3), (1,), bf16, KP=128, VP=128)   # another specialization: its own count
    parallel._launch('fwd', Kernel(fits=3), (1,), fp32, KP=128, VP=128)   # fp32 at 256 columns in all: tuned
    assert launched == [3, 2, 1, 1, 3, 3]
    launched.clear()
    for name, fits in (('fwd', 3), ('dq', 3), ('dkv', 3)):                # fp32, wide: the first try fits
        parallel._launch(name, Kernel(fits=fits), (1,), fp32, KP=256, VP=128)
    assert launched == [parallel.WIDE_FP32_STAGES[n] for n in ('fwd', 'dq', 'dkv')]
    with pytest.raises(OutOfResources):
        parallel._launch('dq', Kernel(fits=0), (1,), bf16, KP=256, VP=256)
    assert [parallel._value_tile(torch.zeros(1, 1, 1, K)) for K in (64, 96, 128, 200, 256)] == [256, 128, 128, 64, 64]
    assert parallel._value_tile(torch.zeros(1, 1, 1, 256, dtype=torch.bfloat16)) == parallel.MAX_VALUE_TILE


@pytest.mark.parametrize('failing', ['fwd', 'dq', 'dkv'])
def test_launches_that_never_fit_split_the_value_columns(monkeypatch, failing):
    """Where a main kernel overflows shared memory even at one stage, the forward or backward runs over halves of
    the value columns, exact, and later calls start at the narrower tile."""
    from triton.runtime.errors import OutOfResources
    import kernels.parallel as parallel
    monkeypatch.setattr(parallel, '_narrowed_value_tiles', {})
    monkeypatch.setattr(parallel, '_fitting_stages', {})
    launch, overflows = parallel._launch, []

    def launch_fitting_32_columns(name, kernel, grid, *args, **constexprs):
        if name == failing and constexprs['VP'] > 32:
            overflows.append(constexprs['VP'])
            raise OutOfResources(300000, 232448, 'shared memory')
        launch(name, kernel, grid, *args, **constexprs)

    monkeypatch.setattr(parallel, '_launch', launch_fitting_32_columns)
    torch.manual_seed(0)
    inputs = make_inputs(T=70, HQ=4, H=2, K=32, V=64, scalar_gate=True, sink=True)
    assert_close(run_both(inputs, window_size=40), 2e-5)
    assert overflows == [64] and parallel._narrowed_value_tiles == {(torch.float32, 32): 32}
    assert_close(run_both(inputs, window_size=40), 2e-5)
    assert overflows == [64]  # the second call launched 32 columns at a time from the start
    v = torch.zeros(1, 1, 1, 16)
    with pytest.raises(OutOfResources):  # as narrow as halving goes: the error stands
        parallel._narrowed(v, v, OutOfResources(300000, 232448, 'shared memory'))


@pytest.mark.gpu
@pytest.mark.parametrize('K, V', [(24, 24), (48, 48), (96, 96), (100, 100), (256, 256), (64, 320), (128, 512)])
def test_head_dims_on_gpu(K, V):
    """Head dims that are not powers of two, and values wider than one launch's tile, at GPU sizes."""
    inputs = make_inputs(T=700, HQ=4, H=2, K=K, V=V, scalar_gate=True, sink=True)
    assert_close(run_both(inputs, window_size=300), 3e-5)
