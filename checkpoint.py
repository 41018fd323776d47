"""
train.py's checkpoints: written whole or not at all, read back with a one-line reason when they cannot be used,
and turned back into the model they hold. train.py, sample.py (and through it the evaluations) and the tests use
this module only.

A checkpoint is a dict: `model` (the state dict), `optimizer`, `model_args` (GPTConfig's fields), `iter_num`,
`best_val_loss`, `config` (train.py's effective config), `loader` (the batch stream's state), `rng` (one per rank).
"""
import os

import torch

from model import GPT, GPTConfig

KEYS = ('model', 'optimizer', 'model_args', 'iter_num', 'best_val_loss', 'config', 'loader', 'rng')  # to resume
MODEL_KEYS = ('model', 'model_args', 'config')  # to sample and evaluate
CONFIG_KEYS = ('data_dir', 'max_doc_len', 'tokens_per_batch')  # what sampling and evaluation read of `config`
RUNTIME_MODEL_KEYS = ('attn_impl', 'activation_checkpointing', 'loss_chunk_rows')  # how it runs, not what it computes


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message, one line, says why."""


def first_line(e):
    lines = str(e).strip().splitlines()
    return f'{type(e).__name__}: {lines[0][:300]}' if lines else type(e).__name__


def save(checkpoint, path):
    """torch.save to a temporary file next to path, renamed over path once complete: a crash mid-write leaves the
    previous checkpoint as it was."""
    tmp = f'{path}.{os.getpid()}.tmp'
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path, keys=MODEL_KEYS):
    """The checkpoint at path (on the CPU, weights without torch.compile's `_orig_mod.` prefix), or a
    CheckpointError naming the file when it is missing, unreadable or lacks any of `keys`."""
    if not os.path.isfile(path):
        raise CheckpointError(f'there is no checkpoint at {path}')
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises many kinds for a cut or foreign file; all mean "unusable"
        raise CheckpointError(f'{path} is not a readable checkpoint (truncated, or not written by torch.save?): '
                              f'{first_line(e)}')
    missing = [k for k in keys if k not in checkpoint] if isinstance(checkpoint, dict) else list(keys)
    if not missing and 'config' in keys:
        missing = [f'config[{k!r}]' for k in CONFIG_KEYS if k not in checkpoint['config']]
    if missing:
        raise CheckpointError(f'{path} is not a checkpoint of train.py (it lacks {", ".join(missing)})')
    if 'model' in checkpoint:
        checkpoint['model'] = {k.removeprefix('_orig_mod.'): v for k, v in checkpoint['model'].items()}
    return checkpoint


def build_model(checkpoint, **runtime):
    """The checkpoint's GPT with its weights, on the CPU; `runtime` may override RUNTIME_MODEL_KEYS. Raises a
    CheckpointError (without the file's name, which the caller knows) when this model.py cannot hold them."""
    try:
        config = GPTConfig(**(checkpoint['model_args'] | runtime))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f'its model_args do not fit this model.py: {first_line(e)}')
    model = GPT(config)
    try:
        model.load_state_dict(checkpoint['model'])
    except RuntimeError as e:
        raise CheckpointError(f'its weights do not fit this model.py: {first_line(e)}')
    return model
