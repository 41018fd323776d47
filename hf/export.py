"""
Export a checkpoint of train.py as a self-contained Hugging Face folder:

    python -m hf.export --ckpt out/long/ckpt.pt --out hf_out/wall-125m
    python -m hf.export --ckpt out/long/ckpt.pt --out hf_out/wall-125m --tokenizer data/installed --context 65536

The folder holds config.json (the checkpoint's model_args, as they are, under `model_args`, and `auto_map` for
trust_remote_code), model.safetensors (fp32, as trained), the tokenizer of the training data (tokenizer.json;
the EOT that starts every training document is prepended to every encoding, as training saw it),
generation_config.json (sample.py's defaults), a model card (README.md) and the code: configuration_wall.py and
modeling_wall.py (hf/template/), and this checkout's model.py, generate.py and kernels/*.py, copied as they are
now and flattened into the folder (kernels/parallel.py -> wall_kernels_parallel.py, imports rewritten), because
custom code in a Hugging Face folder cannot hold subpackages. Nothing in the folder refers back to this checkout.

It is written into a temporary folder beside --out and renamed to --out at the end: a failed export leaves nothing.
"""
import argparse
import ast
import datetime
import glob
import json
import os
import re
import shutil
import subprocess
import sys

from safetensors.torch import save_file
from tokenizers import Tokenizer, processors

import checkpoint
from data.loader import EOT

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = os.path.join(REPO, 'hf', 'template')
# the repository's modules the model needs, and their names in the folder; kernels/ is flattened to wall_kernels_*
COPIED = {'model': 'wall_model', 'generate': 'wall_generate', 'kernels': 'wall_kernels'}
ENTRY = 'modeling_wall'


class ExportError(ValueError):
    """An export that cannot be done; the message, one line, names the argument."""


# ----------------------------------------------------------------------------------------------------
# the code: copied from this checkout, flattened, imports rewritten

def local_modules():
    """Top-level modules and packages of this checkout: none of them may be imported by the exported code except
    through the rewriting below."""
    names = {os.path.splitext(n)[0] for n in os.listdir(REPO) if n.endswith('.py')}
    return names | {n for n in os.listdir(REPO) if os.path.isfile(os.path.join(REPO, n, '__init__.py'))}


def flat_name(module, package=None):
    """The folder's module name for `module`, seen from a file of `package` (None: top level; 'kernels': inside
    kernels/): model -> wall_model, kernels -> wall_kernels, kernels.parallel -> wall_kernels_parallel."""
    if package is not None and module.startswith('.'):
        module = package + module if module != '.' else package
    top, _, rest = module.partition('.')
    if top not in COPIED:
        return None
    return COPIED[top] + ('_' + rest.replace('.', '_') if rest else '')


IMPORT = re.compile(r'^(?P<indent>\s*)import (?P<module>[\w.]+)(?: as (?P<alias>\w+))?(?P<tail>\s*(#.*)?)$')
FROM = re.compile(r'^(?P<indent>\s*)from (?P<module>\.?[\w.]*|\.) import (?P<names>.*)$')


def alias_import(indent, flat, alias, original):
    """`import kernels` as the folder's module: `from . import wall_kernels as kernels`, after a `from .wall_kernels
    import` line, the only form that makes transformers copy the file along (get_relative_imports)."""
    return (f'{indent}from .{flat} import __name__ as _{flat}  # noqa: F401 (hf/export.py: `{original.strip()}`)\n'
            f'{indent}from . import {flat} as {alias}')


def rewrite(source, path, package=None):
    """source with every import of model, generate and kernels (absolute, or relative inside kernels/) rewritten to
    the folder's flat modules. Every rewritten import is a `from .name import` line, the form transformers follows
    to copy a module's files (dynamic_module_utils.get_relative_imports). Refuses an import of another module of
    this checkout, which the folder would not have."""
    out = []
    for number, line in enumerate(source.splitlines(keepends=True), 1):
        text = line.rstrip('\n')
        m = IMPORT.match(text)
        if m and flat_name(m['module'], package):
            if '.' in m['module'] and not m['alias']:
                raise ExportError(f'{path}:{number}: cannot rewrite `{text.strip()}` (import a submodule with '
                                  f'`from ... import`)')
            text = alias_import(m['indent'], flat_name(m['module'], package), m['alias'] or m['module'], text)
        elif m := FROM.match(text):
            module, names = m['module'], m['names']
            if module == '.' and package is not None:  # from . import decode -> wall_kernels_decode as decode
                parts = [p.strip() for p in names.split('#')[0].strip().strip('()').split(',') if p.strip()]
                aliases = [part.partition(' as ') for part in parts]
                text = '\n'.join(alias_import(m['indent'], flat_name(f'.{sub.strip()}', package),
                                              (alias or sub).strip(), text) for sub, _, alias in aliases)
            elif flat_name(module, package):
                text = f'{m["indent"]}from .{flat_name(module, package)} import {names}'
        out.append(text + ('\n' if line.endswith('\n') else ''))
    result = ''.join(out)
    tree = ast.parse(result, filename=path)
    local = local_modules()
    for node in ast.walk(tree):
        modules = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                   [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
        for module in modules:
            if module.split('.')[0] in local:
                raise ExportError(f'{path}:{node.lineno}: imports `{module}`, a module of this checkout that the '
                                  f'export does not carry (only {", ".join(COPIED)})')
    return result


def copy_code(folder):
    """Write the flattened model.py, generate.py and kernels/*.py and the templates into folder."""
    sources = [(os.path.join(REPO, 'model.py'), None), (os.path.join(REPO, 'generate.py'), None)]
    sources += [(path, 'kernels') for path in sorted(glob.glob(os.path.join(REPO, 'kernels', '*.py')))]
    for path, package in sources:
        relative = os.path.relpath(path, REPO)
        module = relative[:-3].replace(os.sep, '.').removesuffix('.__init__')
        with open(path, encoding='utf-8') as f:
            code = rewrite(f.read(), relative, package)
        header = f'# Exported by hf/export.py from {relative} of the wall-gpt repository; imports rewritten.\n'
        with open(os.path.join(folder, flat_name(module) + '.py'), 'w', encoding='utf-8') as f:
            f.write(header + code)
    for name in ('configuration_wall.py', 'modeling_wall.py'):
        shutil.copyfile(os.path.join(TEMPLATE, name), os.path.join(folder, name))
    # Some transformers versions (5.0) copy only the files that the entry module names itself: name them all.
    flat = sorted(n[:-3] for n in os.listdir(folder) if n.startswith('wall_') and n.endswith('.py'))
    with open(os.path.join(folder, ENTRY + '.py'), 'a', encoding='utf-8') as f:
        f.write('\n\n# hf/export.py: every module of the folder, named for transformers to copy along with this file\n')
        f.writelines(f'from .{name} import __name__ as _{name}  # noqa: E402,F401\n' for name in flat)


def relative_closure(folder, entry):
    """The modules transformers copies along with `entry` (the files named by `from .x import` lines, recursively)."""
    seen, todo = set(), [entry]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        with open(os.path.join(folder, name + '.py'), encoding='utf-8') as f:
            todo += re.findall(r'^\s*from\s+\.(\S+)\s+import', f.read(), flags=re.MULTILINE)
    return seen


def check_closure(folder):
    code = {n[:-3] for n in os.listdir(folder) if n.endswith('.py')}
    missed = code - relative_closure(folder, ENTRY) - {'configuration_wall'}
    if missed:
        raise ExportError(f'transformers would not copy {", ".join(sorted(missed))} with {ENTRY}.py: no `from .name '
                          f'import` line names it')


# ----------------------------------------------------------------------------------------------------
# config, weights, tokenizer, card

def find_tokenizer(args, train_config):
    """The training data's tokenizer (tokenizers.Tokenizer) and where it came from: --tokenizer (a tokenizer.json
    or a prepared data dir) or the checkpoint's data_dir."""
    where = args.tokenizer or train_config['data_dir']
    path = where if where.endswith('.json') else os.path.join(where, 'tokenizer.json')
    try:
        if not os.path.isfile(path):
            raise FileNotFoundError(path)
        tokenizer = Tokenizer.from_file(path)
        tokenizer.encode_special_tokens = True  # as data.loader.load_tokenizer
    except FileNotFoundError:
        if args.tokenizer:
            raise ExportError(f'--tokenizer {args.tokenizer}: there is no {path}')
        raise ExportError(f'--ckpt {args.ckpt}: its tokenizer is {path} (data_dir={train_config["data_dir"]!r} of '
                          f'its training config), which does not exist: prepare that data or pass --tokenizer '
                          f'(a tokenizer.json or a prepared data dir)')
    except Exception as e:  # the tokenizers library raises a bare Exception for a file it cannot parse
        raise ExportError(f'--tokenizer: {path} is not a readable tokenizer ({checkpoint.first_line(e)})')
    if tokenizer.token_to_id(EOT) is None:
        raise ExportError(f'--tokenizer: {path} has no {EOT} token, which starts every training document')
    return tokenizer, path


def hf_tokenizer_files(tokenizer, context):
    """tokenizer.json with the EOT prepended to every encoding (add_special_tokens, the transformers default), and
    the tokenizer_config.json that AutoTokenizer reads. The text '<|endoftext|>' inside a document stays plain text,
    as in data/prepare.py (split_special_tokens)."""
    eot = tokenizer.token_to_id(EOT)
    tokenizer.post_processor = processors.TemplateProcessing(single=f'{EOT} $A', pair=f'{EOT} $A {EOT} $B',
                                                             special_tokens=[(EOT, eot)])
    config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': EOT, 'eos_token': EOT, 'pad_token': EOT,
              'model_max_length': context, 'padding_side': 'left', 'split_special_tokens': True,
              'clean_up_tokenization_spaces': False, 'add_bos_token': True}
    return tokenizer, config, eot


def model_card(ckpt, model, args, tokenizer_path, context, eot):
    cfg, train = model.config, ckpt['config']
    tokens = None
    if all(k in train for k in ('gradient_accumulation_steps', 'tokens_per_batch')) and 'iter_num' in ckpt:
        tokens = ckpt['iter_num'] * train['gradient_accumulation_steps'] * train['tokens_per_batch']
    results = []
    best = ckpt.get('best_val_loss')
    if isinstance(best, float):
        results.append(f'| best validation loss (train.py) | {best:.4f} |')
    folder = os.path.dirname(os.path.abspath(args.ckpt))
    for name in ('retrieval.json', 'niah.json', 'length.json'):  # the evaluations' outputs beside the checkpoint
        if os.path.isfile(os.path.join(folder, name)):
            results.append(f'| eval/{name[:-5]}.py | `{name}` beside the checkpoint (not copied) |')
    model_args = '\n'.join(f'| `{k}` | `{v!r}` |' for k, v in ckpt['model_args'].items())
    train_config = '\n'.join(f'| `{k}` | `{v!r}` |' for k, v in sorted(train.items()))
    return f"""---
library_name: transformers
tags: [wall-attention, custom_code]
---
# {os.path.basename(os.path.abspath(args.out))}

A GPT with **Wall Attention** ({cfg.attention}), trained from scratch with the wall-gpt repository's train.py and
exported by `python -m hf.export` on {datetime.date.today().isoformat()}. Wall Attention is causal softmax
attention whose query-key product carries a learned per-channel, per-timestep multiplicative decay; the decay is
the model's only positional signal (no position embeddings), so the context length is not a limit of the model:
`max_position_embeddings` ({context}) is the context this export was made for.

```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(FOLDER, trust_remote_code=True, dtype=torch.bfloat16)
tokenizer = AutoTokenizer.from_pretrained(FOLDER, trust_remote_code=True)
ids = tokenizer('def main(', return_tensors='pt').input_ids   # starts with {EOT} (id {eot}), as in training
print(tokenizer.decode(model.generate(ids, max_new_tokens=50, do_sample=False)[0]))
```

- Weights: fp32 as trained; under bf16/fp16 the decay gates and sink logits stay fp32.
- Kernels: the Triton kernels on a GPU, the eager reference on a CPU (Triton's interpreter for decoding).
- `generate()` decodes through the Wall cache (cost per token independent of the context), greedy, or sampling
  with temperature and top_k; batches of prompts of different lengths are padded on either side.
- `attention_mask` is honoured in the full forward: padding is never attended.
- The tokenizer prepends {EOT} to every encoding; do not strip it (every training document started with it).

## Architecture

{model.get_num_params() / 1e6:.2f}M parameters, {cfg.n_layer} layers, {cfg.n_head} query heads on {cfg.n_kv_head}
kv heads, width {cfg.n_embd}, vocabulary {cfg.vocab_size} (byte-level BPE from `{tokenizer_path}`).

| model_args | |
|---|---|
{model_args}

## Training

{f'{tokens:,} tokens' if tokens is not None else 'tokens trained: unknown'} ({ckpt.get('iter_num', '?')} steps).

| train.py config | |
|---|---|
{train_config}

## Results

| measure | value |
|---|---|
{chr(10).join(results) or '| (none recorded) | |'}
"""


def build_folder(ckpt, model, tokenizer, tokenizer_path, args, folder):
    cfg = model.config
    context = args.context or ckpt['config'].get('max_doc_len', 4096)
    tokenizer, tokenizer_config, eot = hf_tokenizer_files(tokenizer, context)
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise ExportError(f'--tokenizer {tokenizer_path}: {tokenizer.get_vocab_size()} tokens, more than the '
                          f'model\'s vocab_size={cfg.vocab_size}')
    copy_code(folder)
    check_closure(folder)
    tokenizer.save(os.path.join(folder, 'tokenizer.json'))
    write_json(folder, 'tokenizer_config.json', tokenizer_config)
    write_json(folder, 'special_tokens_map.json', {k: EOT for k in ('bos_token', 'eos_token', 'pad_token')})
    model_args = dict(ckpt['model_args'])
    model_args.pop('attn_impl', None)  # how it runs follows the device it is loaded on
    write_json(folder, 'config.json', {
        'architectures': ['WallForCausalLM'], 'model_type': 'wall_gpt',
        'auto_map': {'AutoConfig': 'configuration_wall.WallConfig',
                     'AutoModelForCausalLM': 'modeling_wall.WallForCausalLM'},
        'model_args': model_args, 'vocab_size': cfg.vocab_size, 'hidden_size': cfg.n_embd,
        'num_hidden_layers': cfg.n_layer, 'num_attention_heads': cfg.n_head, 'num_key_value_heads': cfg.n_kv_head,
        'max_position_embeddings': context, 'bos_token_id': eot, 'eos_token_id': eot, 'pad_token_id': eot,
        'tie_word_embeddings': cfg.tie_embeddings, 'dtype': 'float32',
        'training': {k: ckpt[k] for k in ('iter_num', 'best_val_loss') if k in ckpt} | {'config': ckpt['config']}})
    # sample.py's defaults: a sampled document, ended by an EOT
    write_json(folder, 'generation_config.json', {'bos_token_id': eot, 'eos_token_id': eot, 'pad_token_id': eot,
                                                  'do_sample': True, 'temperature': 0.8, 'top_k': 200,
                                                  'max_new_tokens': 200})
    state = {f'model.{k}': v.detach().float().contiguous() for k, v in model.state_dict().items()
             if not (cfg.tie_embeddings and k == 'wte.weight')}  # tied: lm_head.weight holds it
    save_file(state, os.path.join(folder, 'model.safetensors'), metadata={'format': 'pt'})
    with open(os.path.join(folder, 'README.md'), 'w', encoding='utf-8') as f:
        f.write(model_card(ckpt, model, args, tokenizer_path, context, eot))


def write_json(folder, name, obj):
    with open(os.path.join(folder, name), 'w', encoding='utf-8') as f:
        json.dump(obj, f, indent=2, default=str)
        f.write('\n')


def export(args):
    """Write the folder for args.ckpt at args.out, or raise an ExportError (one line, naming the argument)."""
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise ExportError(f'--out {args.out} exists and is not an empty folder: choose another or remove it')
    if args.context is not None and args.context < 1:
        raise ExportError(f'--context={args.context}: must be at least 1')
    try:
        ckpt = checkpoint.load(args.ckpt)
        model = checkpoint.build_model(ckpt, attn_impl='reference')
    except checkpoint.CheckpointError as e:
        raise ExportError(f'--ckpt {args.ckpt}: {e}')
    tokenizer, tokenizer_path = find_tokenizer(args, ckpt['config'])
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = f'{out}.{os.getpid()}.tmp'
    try:
        os.makedirs(tmp)
        build_folder(ckpt, model, tokenizer, tokenizer_path, args, tmp)
        if os.path.isdir(out):
            os.rmdir(out)  # empty, checked above
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def check(folder):
    """Load the folder with transformers in a fresh process outside this checkout and run a forward."""
    code = ('import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer; '
            'm = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True); '
            't = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True); '
            'ids = t("def main(", return_tensors="pt").input_ids; '
            'print(f"loaded: {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M parameters, logits", '
            'tuple(m(ids).logits.shape))')
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    result = subprocess.run([sys.executable, '-c', code, folder], cwd=os.path.dirname(folder), env=env,
                            capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode:
        raise ExportError(f'--check: {folder} does not load: {result.stderr.strip().splitlines()[-1]}')
    print(result.stdout.strip())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--ckpt', required=True, help='checkpoint written by train.py')
    parser.add_argument('--out', required=True, help='folder to write (must not exist, or be empty)')
    parser.add_argument('--tokenizer', help='tokenizer.json, or the prepared data dir holding it (default: the '
                                            'checkpoint\'s data_dir)')
    parser.add_argument('--context', type=int, help='max_position_embeddings: the context length users should '
                                                    'expect, e.g. for lm-eval (default: the training length)')
    parser.add_argument('--check', action='store_true', help='then load the folder with transformers in a fresh '
                                                              'process')
    args = parser.parse_args(argv)
    try:
        out = export(args)
        print(f'wrote {out}')
        if args.check:
            check(out)
    except ExportError as e:
        raise SystemExit(f'error: {e}')


if __name__ == '__main__':
    main()
