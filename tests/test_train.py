"""train.py end to end, as users run it: subprocesses on a tiny corpus, a tiny model, a few iterations, CPU.

The runs are started together where they do not depend on each other, one thread each, to fit CI's budget.
"""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import fields

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoint
from configurator import apply_overrides
from data.loader import PackedBatches, load_tokenizer
from data.prepare import main as prepare_main
from data.retrieval import VALUE_TOKENS, RetrievalTask
from eval import retrieval
from model import GPT, GPTConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(f for f in os.listdir(os.path.join(REPO, 'config')) if f.endswith('.py'))
# One thread per process: equal arithmetic in every run, and no two runs fighting over a core.
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
TINY = ['--n_layer=2', '--n_embd=32', '--n_head=2', '--n_kv_head=1', '--tokens_per_batch=128', '--max_doc_len=48',
        '--gradient_accumulation_steps=2', '--learning_rate=1e-2', '--warmup_iters=2', '--lr_decay_iters=12',
        '--min_lr=1e-3', '--eval_iters=2', '--log_interval=1', '--device=cpu', '--dtype=float32', '--compile=False']
ITERS = 12   # the uninterrupted run; the interrupted one stops at HALF and resumes
HALF = 6


@pytest.fixture(scope='module')
def stdlib_corpus(tmp_path_factory):
    """Real text, small: the standard library's json and email packages (about 30 files, 500 kB)."""
    src = tmp_path_factory.mktemp('src')
    stdlib = sysconfig.get_paths()['stdlib']
    for package in ('json', 'email'):
        shutil.copytree(os.path.join(stdlib, package), src / package, ignore=shutil.ignore_patterns('__pycache__'))
    out = tmp_path_factory.mktemp('prepared') / 'corpus'
    prepare_main([f'--source={src}/**/*.py', f'--out={out}', '--vocab_size=512', '--val_fraction=0.2'])
    return str(out)


def run_train(*args, nproc=1):
    """`python train.py *args` (under torchrun with nproc ranks), in the background."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
    return subprocess.Popen(launcher + ['train.py', *args], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def start(data_dir, out_dir, *overrides, nproc=1):
    """train.py with the tiny settings (later overrides win), in the background."""
    return run_train(*TINY, f'--data_dir={data_dir}', f'--out_dir={out_dir}', *overrides, nproc=nproc)


def finish(process):
    """(stdout, stderr) of a run that must succeed."""
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, f'train.py failed:\n{err[-3000:]}'
    return out, err


def losses(out, kind='loss'):
    """{iter: loss} of the train (kind='loss') or validation (kind='val loss') log lines."""
    return {int(i): float(x) for i, x in re.findall(rf'^iter (\d+): {kind} ([-\d.]+)', out, re.MULTILINE)}


def fails(process):
    """The one line a run that must fail says (and the run says nothing else on stderr)."""
    out, err = process.communicate(timeout=300)
    assert process.returncode != 0, f'expected an error, the run succeeded:\n{out[-2000:]}'
    assert 'Traceback' not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope='module')
def runs(stdlib_corpus, tmp_path_factory):
    """Logs of: an uninterrupted run, one interrupted at HALF and resumed, and a 2-rank DDP run with the same
    total accumulation; plus the uninterrupted run's out_dir."""
    root = tmp_path_factory.mktemp('runs')
    full_dir, cut_dir, ddp_dir = (str(root / name) for name in ('full', 'cut', 'ddp'))
    save = ['--eval_interval=3', '--always_save_checkpoint=True']
    full = start(stdlib_corpus, full_dir, f'--max_iters={ITERS}', *save)
    cut = start(stdlib_corpus, cut_dir, f'--max_iters={HALF}', *save)
    ddp = start(stdlib_corpus, ddp_dir, f'--max_iters={HALF}', '--eval_interval=3', nproc=2)
    cut_out, _ = finish(cut)
    resumed = start(stdlib_corpus, cut_dir, f'--max_iters={ITERS}', '--init_from=resume', *save)
    logs = {'full': finish(full)[0], 'cut': cut_out, 'resumed': finish(resumed)[0], 'ddp': finish(ddp)[0]}
    return logs, full_dir


def test_training_lowers_the_loss(runs):
    logs, _ = runs
    val = losses(logs['full'], 'val loss')
    assert sorted(val) == [0, 3, 6, 9, 12]
    assert val[12] < val[0] - 0.5, val  # from ln(512) = 6.2 at the start
    train = losses(logs['full'])
    assert sorted(train) == list(range(ITERS))
    assert sum(train[i] for i in range(9, 12)) < sum(train[i] for i in range(3)) - 3 * 0.2, train


def test_resume_continues_exactly(runs):
    logs, _ = runs
    full, cut, resumed = (losses(logs[name]) for name in ('full', 'cut', 'resumed'))
    assert sorted(cut) == list(range(HALF)) and sorted(resumed) == list(range(HALF, ITERS))
    assert cut == {i: full[i] for i in range(HALF)}
    assert resumed == {i: full[i] for i in range(HALF, ITERS)}  # bit for bit, as printed
    assert losses(logs['resumed'], 'val loss')[ITERS] == losses(logs['full'], 'val loss')[ITERS]


def test_two_rank_ddp_matches_one_rank_with_the_same_accumulation(runs):
    # 2 ranks x 1 micro-batch against 1 rank x 2: the same micro-batches, gradients and logged (mean) losses
    logs, _ = runs
    full, ddp = losses(logs['full']), losses(logs['ddp'])
    assert sorted(ddp) == list(range(HALF))
    for i in ddp:
        assert ddp[i] == pytest.approx(full[i], abs=1e-5), (i, ddp[i], full[i])
    full_val, ddp_val = losses(logs['full'], 'val loss'), losses(logs['ddp'], 'val loss')
    for i in (0, 3, 6):  # the same validation batches, whatever the number of ranks
        assert ddp_val[i] == pytest.approx(full_val[i], abs=1e-4)


def test_a_run_ends_saying_what_is_on_disk(runs):
    logs, full_dir = runs
    last = logs['full'].splitlines()[-1]
    assert last.startswith(f'done at iter {ITERS}: {os.path.join(full_dir, "ckpt.pt")} holds iter {ITERS} '), last
    assert f'saved by this run; {ITERS * 2 * 128:,} tokens trained in 0:' in last, last
    last = logs['resumed'].splitlines()[-1]
    assert f'holds iter {ITERS} ' in last and f'{(ITERS - HALF) * 2 * 128:,} tokens' in last, last


def test_checkpoint_holds_what_sampling_and_resuming_read(runs):
    _, full_dir = runs
    checkpoint = torch.load(os.path.join(full_dir, 'ckpt.pt'), map_location='cpu', weights_only=True)
    assert checkpoint['iter_num'] == ITERS
    assert checkpoint['model_args']['vocab_size'] == 512 and checkpoint['model_args']['n_layer'] == 2
    assert {'data_dir', 'max_doc_len', 'tokens_per_batch'} <= set(checkpoint['config'])
    assert set(checkpoint['loader']) == {'seed', 'epoch', 'doc', 'offset', 'taken', 'synthetic'}
    assert not [f for f in os.listdir(full_dir) if f != 'ckpt.pt'], 'a temporary file was left behind'


def test_config_mistakes_are_one_clear_line(stdlib_corpus, tmp_path):
    bad_file = tmp_path / 'bad.py'
    bad_file.write_text('n_layer = 2\nlearning_rate = "fast"\n')
    cases = {  # arguments -> what the error must say
        ('--n_layers=3',): "unknown config key 'n_layers'",
        (str(bad_file),): "learning_rate must be a float",
        ('no/such/config.py',): "cannot read config file 'no/such/config.py'",
        ('--init_from=resum',): "init_from='resum', expected 'scratch' or 'resume'",
        ('--n_head=3',): 'model config',
        ('--attention=foo',): "attention='foo': expected 'wall', 'rope' or 'fox'",
        ('--gate_frozen_iters=-1',): 'gate_frozen_iters=-1',
        ('--gate_lr_scale=-1',): 'gate_lr_scale=-1.0, expected a number >= 0',
    }
    processes = {args: start(stdlib_corpus, str(tmp_path / f'out{i}'), '--max_iters=0', *args)
                 for i, args in enumerate(cases)}
    for i, (args, expected) in enumerate(cases.items()):
        line = fails(processes[args])
        assert expected in line and line.startswith(('error:', 'config error:')), (args, line)
        assert not (tmp_path / f'out{i}').exists(), f'{args}: a failed start left its out_dir behind'


def test_gate_frozen_iters_holds_the_decay_gates_then_trains_them(stdlib_corpus, tmp_path):
    """Gates held for 2 of 2 iterations end at gate_bias_init exactly, the rest trained; held for 1 of 2, they move."""
    processes = {frozen: start(stdlib_corpus, str(tmp_path / f'out{frozen}'), '--max_iters=2', '--eval_interval=2',
                               f'--gate_frozen_iters={frozen}', '--kv_shift=True') for frozen in (1, 2)}
    for frozen, process in processes.items():
        finish(process)
        state = torch.load(tmp_path / f'out{frozen}' / 'ckpt.pt', map_location='cpu')['model']
        biases = [v for k, v in state.items() if k.endswith('attn.gate.bias')]
        assert biases and all((b == 8.0).all() for b in biases) == (frozen == 2), frozen
        assert not (state['blocks.0.attn.kv_shift_gate.bias'] == 0).all(), 'the other parameters must train'


def test_retrieval_mix_logs_the_loss_per_value_token_of_held_out_probes(stdlib_corpus, tmp_path):
    """With retrieval_mix, every evaluation logs the loss on held-out probes a quarter document back: the mean loss
    of their value tokens, as one forward per probe through the saved model gives it."""
    out, batch, doc_len = tmp_path / 'out', 1024, 256
    log, _ = finish(start(stdlib_corpus, str(out), '--retrieval_mix=0.5', f'--tokens_per_batch={batch}',
                          f'--max_doc_len={doc_len}', '--max_iters=2', '--eval_interval=2',
                          '--always_save_checkpoint=True'))
    found = re.findall(r'^iter (\d+): val loss [\d.]+, retrieval loss ([\d.]+) \(64 tokens back\)$', log, re.MULTILINE)
    assert [i for i, _ in found] == ['0', '2'], log
    model = checkpoint.build_model(torch.load(out / 'ckpt.pt', map_location='cpu', weights_only=False)).eval()
    val = PackedBatches(stdlib_corpus, 'val', batch, doc_len)
    task = RetrievalTask(load_tokenizer(stdlib_corpus))
    x, y, cu_seqlens = task.probe_batch(np.random.default_rng((0, 2)), val.tokens, val.eot, 64, batch)
    logits_of, losses = retrieval.forward_answer_logits(model), []
    for start_at, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        answer = y[:, end - VALUE_TOKENS:end]
        if (answer == -1).all():  # the padding after the probes
            continue
        prompt = x[:, start_at:end - VALUE_TOKENS + 1]  # EOT, the probe's prompt
        losses.append(F.cross_entropy(logits_of(prompt.numpy(), answer.numpy())[0], answer[0], reduction='none'))
    assert len(losses) >= 2
    assert float(found[-1][1]) == pytest.approx(torch.cat(losses).mean().item(), abs=2e-3)


def test_help_lists_every_key_with_its_default_and_comment():
    run = subprocess.run([sys.executable, 'train.py', '--help'], cwd=REPO, env=ENV, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and not run.stderr, run.stderr
    lines = run.stdout.splitlines()
    for setting, comment in [('--eval_iters=20', 'validation micro-batches per evaluation'),
                             ('--init_from=scratch', ''), ('--n_kv_head=12', 'fewer than n_head is GQA'),
                             ('--g_max=0.86', 'soft bound')]:
        assert any(line.split()[0] == setting and comment in line for line in lines if line.strip()), setting
    for group in ('I/O:', 'AdamW:', 'system:', 'model (model.py, GPTConfig):'):
        assert group in lines, group
    settings = [line.split()[0] for line in lines if line.startswith('  --')]
    assert len(settings) == len(set(settings)) > 40  # every key, once


def test_bad_data_files_are_named_in_one_line(stdlib_corpus, tmp_path):
    def broken(name, damage):
        folder = tmp_path / name
        shutil.copytree(stdlib_corpus, folder)
        damage(folder)
        return folder

    cases = {  # data dir -> the file the error must name
        broken('val_truncated', lambda d: (d / 'val.bin').write_bytes((d / 'val.bin').read_bytes()[:100])): 'val.bin',
        broken('val_missing', lambda d: (d / 'val.bin').unlink()): 'val.bin',
        broken('tokenizer_corrupt', lambda d: (d / 'tokenizer.json').write_text('{"model": ')): 'tokenizer.json',
    }
    processes = {folder: run_train(*TINY, f'--data_dir={folder}', f'--out_dir={tmp_path / "out" / folder.name}',
                                   '--max_iters=2') for folder in cases}
    for folder, name in cases.items():
        line = fails(processes[folder])
        assert line.startswith('error: ') and str(folder / name) in line, (name, line)
    assert not (tmp_path / 'out').exists()


def test_one_run_at_a_time_per_out_dir_and_stale_files_are_cleared(stdlib_corpus, tmp_path):
    out_dir = tmp_path / 'out'
    first = start(stdlib_corpus, str(out_dir), '--max_iters=1000000', '--eval_interval=1000000')  # never saves
    for line in first.stdout:  # the lock is held from before the model is built
        if 'parameters, attention=' in line:
            break
    second = start(stdlib_corpus, str(out_dir), '--max_iters=2')
    line = fails(second)
    assert f'is in use by another run (pid {first.pid}' in line and '--out_dir' in line, line
    first.kill()  # SIGKILL: no exit handler runs, the lock file stays, the kernel drops the lock
    first.communicate(timeout=60)
    assert (out_dir / 'run.lock').read_text().strip() == str(first.pid)
    dead = out_dir / 'ckpt.pt.4194999.tmp'  # above Linux's largest pid: its writer cannot be running
    dead.write_bytes(b'half a checkpoint')
    out, _ = finish(start(stdlib_corpus, str(out_dir), '--max_iters=0'))
    assert f'took over {out_dir / "run.lock"} from pid {first.pid}' in out
    assert f'removed {dead}' in out and not dead.exists()
    assert os.listdir(out_dir) == [], 'the lock file outlived its run'
    assert 'done at iter 0: no checkpoint saved' in out.splitlines()[-1]


def test_shipped_configs_are_valid(tmp_path):
    # every key exists with the right type and passes train.py's checks: each run gets as far as the data
    processes = {config: run_train(f'config/{config}', f'--data_dir={tmp_path / "no_data"}', f'--out_dir={tmp_path}')
                 for config in CONFIGS}
    for config, process in processes.items():
        line = fails(process)
        assert line.startswith(f"error: data_dir='{tmp_path / 'no_data'}'"), (config, line)
        # and the model it describes builds: on the meta device, without memory or arithmetic
        model_args = apply_overrides([os.path.join(REPO, 'config', config)],
                                     {f.name: f.default for f in fields(GPTConfig)}, skip_unknown=True)
        with torch.device('meta'):
            GPT(GPTConfig(**model_args))


def test_unusable_checkpoints_are_refused_and_left_as_they_were(runs, stdlib_corpus, tmp_path):
    _, full_dir = runs
    good = open(os.path.join(full_dir, 'ckpt.pt'), 'rb').read()
    checkpoint = torch.load(os.path.join(full_dir, 'ckpt.pt'), map_location='cpu', weights_only=True)
    checkpoint['model'].pop('lm_head.weight')
    cases = {  # name -> (how to make it, what the error must say)
        'truncated': (lambda path: open(path, 'wb').write(good[:len(good) // 2]), 'is not a readable checkpoint'),
        'foreign': (lambda path: torch.save({'a': 1}, path), 'is not a checkpoint of train.py'),
        'wrong weights': (lambda path: torch.save(checkpoint, path), 'does not fit this run'),
    }
    processes, contents = {}, {}
    for i, (name, (make, _)) in enumerate(cases.items()):
        out_dir = tmp_path / f'case{i}'
        out_dir.mkdir()
        make(str(out_dir / 'ckpt.pt'))
        contents[name] = (out_dir / 'ckpt.pt').read_bytes()
        # would save at once (iteration 1 with always_save) if it got that far
        processes[name] = start(stdlib_corpus, str(out_dir), '--init_from=resume', '--max_iters=2', '--eval_interval=1',
                                '--always_save_checkpoint=True')
    (tmp_path / 'kept').mkdir()
    (tmp_path / 'kept' / 'ckpt.pt').write_bytes(good)
    processes['scratch over a checkpoint'] = start(stdlib_corpus, str(tmp_path / 'kept'), '--max_iters=2')
    processes['resume without a checkpoint'] = start(stdlib_corpus, str(tmp_path / 'none'), '--init_from=resume')
    for name, (_, expected) in cases.items():
        line = fails(processes[name])
        assert expected in line and 'ckpt.pt' in line, (name, line)
        assert (tmp_path / f'case{list(cases).index(name)}' / 'ckpt.pt').read_bytes() == contents[name], name
    assert 'exists and a run from scratch would replace it' in fails(processes['scratch over a checkpoint'])
    assert (tmp_path / 'kept' / 'ckpt.pt').read_bytes() == good
    assert 'no checkpoint at' in fails(processes['resume without a checkpoint'])


def test_training_benchmark_runs_at_smoke_shapes(tmp_path):
    out = tmp_path / 'train.md'
    bench = subprocess.run([sys.executable, '-m', 'bench.bench_train', '--smoke', '--attention', 'wall,rope',
                            '--warmup', '1', '--steps', '1', '--out', str(out)],
                           cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert bench.returncode == 0, bench.stderr[-3000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith(('| wall', '| rope'))]
    assert len(rows) == 2 and 'x rope)' in rows[0], rows
