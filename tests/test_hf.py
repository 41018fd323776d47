"""hf/: export to a Hugging Face folder, loading it with transformers in fresh processes, generate() through the Wall
cache, lm-eval on the shipped tasks, and the export's one-line errors.

transformers is never imported in this process: it imports the Hub's `kernels` package, and here (pytest puts the
repository first on sys.path) `kernels` is ours. The folders are loaded in subprocesses: one outside the
repository, as a user would, and one with the repository first on sys.path through hf.import_transformers().
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import checkpoint as ckpt
from data.loader import EOT, load_tokenizer
from generate import KVCache, decode, prefill
from hf import export
from hf.tasks import make as make_tasks
from tests.conftest import exit_message
from tests.test_sample import CONFIGS, save_checkpoint  # data_dir is conftest.py's fixture

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# every layer kind: windows, gates per query / kv head, scalar gate, sink, qk-norm, output gate, key/value shift
MODELS = CONFIGS | {'kv_shift': dict(attention='wall', kv_shift=True, sink=True)}
PROMPTS = ['class Point', 'def area(width, height):\n    return', 'LIMIT_3 =']
NEW_TOKENS = 6


def clean_env():
    return {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'TRITON_INTERPRET')}


def run_python(code, cwd, *args, timeout=600):
    result = subprocess.run([sys.executable, '-c', code, *map(str, args)], cwd=cwd, env=clean_env(),
                            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope='module')
def folders(data_dir, tmp_path_factory):  # noqa: F811
    """{name: (checkpoint, exported folder)} for every model kind."""
    root = tmp_path_factory.mktemp('hf')
    out = {}
    for name, kwargs in MODELS.items():
        path = save_checkpoint(root / f'{name}.pt', data_dir, **kwargs)
        export.main(['--ckpt', path, '--out', str(root / name), '--context', '128'])
        out[name] = (path, str(root / name))
    return out


LOAD = r'''
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folders, prompts, new_tokens, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
results = {}
with torch.no_grad():
    for name, folder in folders.items():
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        r = results[name] = {'ids': [tokenizer(p).input_ids for p in prompts], 'alone': [], 'greedy': []}
        for ids in r['ids']:
            ids = torch.tensor([ids])
            r['alone'].append(model(ids).logits[0])
            r['greedy'].append(model.generate(ids, max_new_tokens=new_tokens, do_sample=False)[0, ids.shape[1]:])
        for side in ('left', 'right'):
            tokenizer.padding_side = side
            batch = tokenizer(prompts + prompts[:1], return_tensors='pt', padding=True)
            r[side] = {'mask': batch.attention_mask, 'logits': model(**batch).logits,
                       'generated': model.generate(**batch, max_new_tokens=new_tokens, do_sample=False)}
        if name == 'wall':
            bf16 = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16)
            r['bf16'] = {n: p.detach().clone() for n, p in bf16.named_parameters()}
            r['bf16_logits'] = bf16(torch.tensor([r['ids'][0]])).logits.float()[0]
            r['tied'] = model.model.wte.weight is model.model.lm_head.weight
            r['eos'] = model.generation_config.eos_token_id
            r['context'] = model.config.max_position_embeddings
repo_modules = [m.__name__ for m in list(sys.modules.values())
                if getattr(m, '__file__', None) and m.__file__.startswith(sys.argv[5])]
results['_modules'] = {'repo': repo_modules, 'kernels': getattr(sys.modules.get('kernels'), '__file__', None),
                       'wall': sorted(k.rsplit('.', 1)[-1] for k in sys.modules if '.wall_' in k)}
torch.save(results, out)
'''


@pytest.fixture(scope='module')
def loaded(folders, tmp_path_factory):
    """What a fresh process outside the repository gets from every folder through the Auto classes."""
    tmp = tmp_path_factory.mktemp('load')
    out = tmp / 'results.pt'
    run_python(LOAD, tmp, json.dumps({n: f for n, (_, f) in folders.items()}), json.dumps(PROMPTS), NEW_TOKENS, out,
               REPO + os.sep)
    return torch.load(out)


def repo_model(path, dtype=torch.float32):
    return ckpt.build_model(ckpt.load(path), attn_impl='auto').to_inference_dtype(dtype).eval()


def sample_tokens(model, prompt, n):
    """Greedy tokens as sample.py decodes them (prefill in chunks of its CPU default, then the cached decode), up to
    and including the EOT that ends its sample (generate() stops there too: it is the eos token)."""
    idx = torch.tensor([prompt])
    cache = KVCache(model, 1, idx.shape[1] + n)
    tokens = torch.cat(list(decode(model, prefill(model, idx, cache, 4096), cache, n, temperature=0)), dim=1)[0]
    tokens, eot = tokens.tolist(), prompt[0]
    return tokens[:tokens.index(eot) + 1] if eot in tokens else tokens


def test_folder_is_self_contained(folders):
    _, folder = folders['wall']
    files = set(os.listdir(folder))
    assert {'config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json', 'generation_config.json',
            'README.md', 'modeling_wall.py', 'configuration_wall.py', 'wall_model.py', 'wall_generate.py',
            'wall_kernels.py', 'wall_kernels_parallel.py'} <= files
    config = json.load(open(os.path.join(folder, 'config.json')))
    assert config['auto_map']['AutoModelForCausalLM'] == 'modeling_wall.WallForCausalLM'
    assert config['max_position_embeddings'] == 128
    assert config['model_args'] == {k: v for k, v in ckpt.load(folders['wall'][0])['model_args'].items()
                                    if k != 'attn_impl'}
    for name in files:
        if name.endswith('.py'):
            text = open(os.path.join(folder, name)).read()
            for line in text.splitlines():
                assert not line.strip().startswith(('import kernels', 'from kernels', 'import model', 'from model ',
                                                    'import generate', 'from generate ')), (name, line)
    assert REPO not in open(os.path.join(folder, 'README.md')).read()


def test_loads_outside_the_repository_without_its_kernels(loaded):
    modules = loaded['_modules']
    assert modules['repo'] == [], 'a module of the checkout was imported'
    assert modules['kernels'] is None or 'site-packages' in modules['kernels']  # the Hub's, imported by transformers
    assert {'wall_model', 'wall_generate', 'wall_kernels', 'wall_kernels_reference'} <= set(modules['wall'])


def test_tokenizer_prepends_the_eot_as_training_did(loaded, data_dir):  # noqa: F811
    tokenizer = load_tokenizer(data_dir)
    eot = tokenizer.token_to_id(EOT)
    for name in MODELS:
        assert loaded[name]['ids'] == [[eot] + tokenizer.encode(p).ids for p in PROMPTS]
    assert loaded['wall']['eos'] == eot and loaded['wall']['context'] == 128


@pytest.mark.parametrize('name', MODELS)
def test_logits_and_greedy_tokens_equal_the_repository_model(folders, loaded, name):
    model = repo_model(folders[name][0])
    for ids, logits, greedy in zip(loaded[name]['ids'], loaded[name]['alone'], loaded[name]['greedy']):
        with torch.no_grad():
            expected = model.lm_head(model.hidden_states(torch.tensor([ids])))[0]
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        assert greedy.tolist() == sample_tokens(model, ids, NEW_TOKENS)
    assert len({t for g in loaded[name]['greedy'] for t in g.tolist()}) > 3, 'greedy tokens that hardly vary'


@pytest.mark.parametrize('name', MODELS)
@pytest.mark.parametrize('side', ['left', 'right'])
def test_padded_batches_give_each_row_what_it_gets_alone(loaded, name, side):
    r = loaded[name]
    batch = r[side]
    for row, alone in enumerate(r['alone'] + r['alone'][:1]):
        mask = batch['mask'][row].bool()
        assert int(mask.sum()) == len(alone)
        torch.testing.assert_close(batch['logits'][row][mask], alone, rtol=1e-4, atol=1e-4)
        generated = batch['generated'][row, batch['mask'].shape[1]:].tolist()
        greedy = r['greedy'][row % len(PROMPTS)].tolist()  # ends at the EOT, or after NEW_TOKENS
        eot = r['ids'][0][0]  # also the pad token that fills a row after its EOT
        assert generated[:len(greedy)] == greedy and set(generated[len(greedy):]) <= {eot}


def test_bf16_keeps_the_gates_and_sinks_fp32(folders, loaded):
    fp32 = repo_model(folders['wall'][0])
    expected = dict(fp32.named_parameters())
    for name, p in loaded['wall']['bf16'].items():
        name = name.removeprefix('model.')
        keep = '.gate.' in name or '.scalar_gate.' in name or name.endswith('.sink_bias')
        assert p.dtype == (torch.float32 if keep else torch.bfloat16), name
        torch.testing.assert_close(p, expected[name].to(p.dtype), rtol=0, atol=0)
    assert loaded['wall']['tied']
    bf16 = repo_model(folders['wall'][0], torch.bfloat16)
    with torch.no_grad():
        logits = bf16.lm_head(bf16.hidden_states(torch.tensor([loaded['wall']['ids'][0]])))[0].float()
    torch.testing.assert_close(loaded['wall']['bf16_logits'], logits, rtol=0, atol=0)


REPO_ON_PATH = r'''
import sys, torch
import model as repo_model_module  # this repository's kernels/ is `kernels` from here on
import hf
hf.import_transformers()
from transformers import AutoModelForCausalLM
import checkpoint
folder, path = sys.argv[1], sys.argv[2]
hf_model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
repo = checkpoint.build_model(checkpoint.load(path), attn_impl='auto').eval()
ids = torch.tensor([[0, 5, 9, 13, 2, 7, 7, 1]])
with torch.no_grad():
    torch.testing.assert_close(hf_model(ids).logits, repo.lm_head(repo.hidden_states(ids)), rtol=1e-5, atol=1e-5)
import kernels
assert kernels.__file__.startswith(hf.REPO) and repo_model_module.kernels is kernels, kernels.__file__
assert type(hf_model.model).__module__.startswith('transformers_modules.')
print('ok')
'''


def test_loads_with_the_repository_first_on_sys_path(folders):
    path, folder = folders['wall']
    assert run_python(REPO_ON_PATH, REPO, folder, path).strip().endswith('ok')


def test_folder_from_another_model_version_is_refused_in_one_line(folders, tmp_path):
    _, folder = folders['wall']
    newer = tmp_path / 'newer'
    subprocess.run(['cp', '-r', folder, str(newer)], check=True)
    config = json.load(open(newer / 'config.json'))
    config['model_args']['future_option'] = True
    json.dump(config, open(newer / 'config.json', 'w'))
    code = ('import sys\nfrom transformers import AutoModelForCausalLM\ntry:\n'
            '    AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n'
            'except ValueError as e:\n    print(e)\n')
    message = run_python(code, tmp_path, newer).strip()
    assert 'future_option' in message and 'export it again' in message and '\n' not in message


LM_EVAL = r'''
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager
folder, tasks_dir, data, out = sys.argv[1:5]
manager = TaskManager(include_path=tasks_dir, metadata={'wall_tasks': data})
results = lm_eval.simple_evaluate(model='hf', model_args=f'pretrained={folder},trust_remote_code=True,dtype=float32',
                                  tasks=['wall_niah', 'wall_niah_gen', 'wall_retrieval'], batch_size=3, limit=3,
                                  device='cpu', task_manager=manager, log_samples=False)
json.dump(results['results'], open(out, 'w'), default=str)
'''


def test_lm_eval_scores_the_shipped_tasks(folders, data_dir, tmp_path):  # noqa: F811
    path, folder = folders['wall']
    data = tmp_path / 'tasks'
    make_tasks.main(['--ckpt', path, '--out', str(data), '--lengths', '48,80', '--trials', '1', '--depths', '0,1',
                     '--distances', '16,40', '--retrieval_trials', '2'])
    niah = [json.loads(line) for line in open(data / 'niah.jsonl')]
    assert len(niah) == 4 and all(d['context'].endswith('PASS_KEY =') for d in niah)
    retrieval = [json.loads(line) for line in open(data / 'retrieval.jsonl')]
    tokenizer = load_tokenizer(ckpt.load(path)['config']['data_dir'])
    for doc in retrieval:  # the text encodes back to the probe's tokens, the needle's value among them
        assert tokenizer.encode(doc['context']).ids == doc['tokens']
        assert tokenizer.encode(doc['context'] + doc['answer']).ids == doc['tokens'] + doc['answer_tokens']
    out = tmp_path / 'results.json'
    run_python(LM_EVAL, tmp_path, folder, os.path.join(REPO, 'hf', 'tasks'), data, out)
    results = json.load(open(out))
    for task, metrics in (('wall_niah', ('acc,none', 'logprob,none')), ('wall_niah_gen', ('exact_match,none',)),
                          ('wall_retrieval', ('acc,none', 'logprob,none'))):
        for metric in metrics:
            value = float(results[task][metric])
            assert value == value and (metric.startswith('logprob') and value < 0 or 0 <= value <= 1), (task, metric)


# ----------------------------------------------------------------------------------------------------
# the export's inputs

def export_error(argv):
    return exit_message(export.main, argv)


def test_bad_inputs_give_one_line_errors_and_write_nothing(folders, data_dir, tmp_path):  # noqa: F811
    path, _ = folders['wall']
    out = tmp_path / 'out'
    text = tmp_path / 'text.pt'
    text.write_text('hello')
    assert '--ckpt' in export_error(['--ckpt', str(text), '--out', str(out)])
    foreign = tmp_path / 'foreign.pt'
    torch.save({'state_dict': {}}, foreign)
    assert 'not a checkpoint of train.py' in export_error(['--ckpt', str(foreign), '--out', str(out)])
    saved = torch.load(path)
    unknown = tmp_path / 'unknown.pt'
    torch.save(saved | {'model_args': saved['model_args'] | {'future_option': 1}}, unknown)
    assert 'future_option' in export_error(['--ckpt', str(unknown), '--out', str(out)])
    moved = tmp_path / 'moved.pt'
    torch.save(saved | {'config': saved['config'] | {'data_dir': str(tmp_path / 'gone')}}, moved)
    message = export_error(['--ckpt', str(moved), '--out', str(out)])
    assert str(tmp_path / 'gone') in message and '--tokenizer' in message
    assert not out.exists()
    export.main(['--ckpt', str(moved), '--out', str(out), '--tokenizer', data_dir])  # --tokenizer: a data dir
    assert (out / 'tokenizer.json').is_file()
    assert '--out' in export_error(['--ckpt', path, '--out', str(out)])  # exists, not empty: left as it was
    assert (out / 'model.safetensors').is_file()
    assert '--tokenizer' in export_error(['--ckpt', path, '--out', str(tmp_path / 'o2'), '--tokenizer',
                                          str(tmp_path / 'none.json')])
    assert sorted(p.name for p in tmp_path.iterdir()) == ['foreign.pt', 'moved.pt', 'out', 'text.pt', 'unknown.pt']


def test_a_failed_export_leaves_nothing(folders, tmp_path, monkeypatch):
    path, _ = folders['wall']

    def fail(*args, **kwargs):
        raise OSError('disk full')
    monkeypatch.setattr(export, 'save_file', fail)
    with pytest.raises(OSError):
        export.main(['--ckpt', path, '--out', str(tmp_path / 'out')])
    assert os.listdir(tmp_path) == []


def test_imports_are_rewritten_to_the_flat_modules():
    source = ('import kernels\nfrom kernels import wall_attn\nfrom generate import KVCache\n'
              'def f():\n    from kernels.parallel import x\n')
    out = export.rewrite(source, 'model.py')
    assert 'from . import wall_kernels as kernels' in out and 'from .wall_kernels import __name__' in out
    assert 'from .wall_kernels import wall_attn' in out and 'from .wall_generate import KVCache' in out
    assert '    from .wall_kernels_parallel import x' in out
    inside = export.rewrite('from .domain import check\ndef f():\n    from . import decode\n', 'kernels/cache.py',
                            'kernels')
    assert 'from .wall_kernels_domain import check' in inside
    assert 'from . import wall_kernels_decode as decode' in inside
    with pytest.raises(export.ExportError, match='checkpoint'):
        export.rewrite('import checkpoint\n', 'model.py')
