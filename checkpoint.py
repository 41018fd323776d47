"""
train.py's checkpoints: written whole or not at all, read back with a one-line reason when they cannot be used,
and turned back into the model they hold (load_model: on a device, in a dtype, with the tokenizer of its data).
train.py, sample.py, the evaluations and the tests use this module only.

A checkpoint is a dict: `model` (the state dict), `optimizer`, `model_args` (GPTConfig's fields), `iter_num`,
`best_val_loss`, `config` (train.py's effective config), `loader` (the batch stream's state), `rng` (one per rank).
"""
import atexit
import fcntl
import os
import re
import sys

import torch

from data.loader import EOT, load_tokenizer
from model import GPT, GPTConfig

KEYS = ('model', 'optimizer', 'model_args', 'iter_num', 'best_val_loss', 'config', 'loader', 'rng')  # to resume
MODEL_KEYS = ('model', 'model_args', 'config')  # to sample and evaluate
CONFIG_KEYS = ('data_dir', 'max_doc_len', 'tokens_per_batch')  # what sampling and evaluation read of `config`
RUNTIME_MODEL_KEYS = ('attn_impl', 'activation_checkpointing', 'loss_chunk_rows')  # how it runs, not what it computes
LOCK = 'run.lock'
REPO = os.path.dirname(os.path.abspath(__file__))
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}  # --dtype to load in


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message, one line, says why."""


def first_line(e):
    lines = str(e).strip().splitlines()
    return f'{type(e).__name__}: {lines[0][:300]}' if lines else type(e).__name__


def save(checkpoint, path):
    """torch.save to a temporary file next to path, renamed over path once it is on disk: a crash mid-write leaves
    the previous checkpoint as it was (and a temporary file, which remove_stale_temporaries clears)."""
    tmp = f'{path}.{os.getpid()}.tmp'
    try:
        with open(tmp, 'wb') as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
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
    if 'config' in keys:
        checkpoint['config']['data_dir'] = resolve_data_dir(checkpoint['config']['data_dir'])
    return checkpoint


def resolve_data_dir(data_dir):
    """train.py stores data_dir as it was given, usually relative to the repository root, where it runs: relative
    to the working directory if it is there, else to the repository root."""
    if os.path.isabs(data_dir) or os.path.isdir(data_dir):
        return data_dir
    return os.path.join(REPO, data_dir)


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


def load_model(path, device, dtype):
    """(model in eval mode on device, cast to dtype; the checkpoint's training config). Exits with one line when
    path is missing, unreadable or not a checkpoint of this repository's train.py."""
    try:
        if torch.device(device).type == 'cuda' and not torch.cuda.is_available():
            raise RuntimeError('no CUDA GPU here')
    except RuntimeError as e:
        raise SystemExit(f'error: --device {device}: {e}')
    try:
        checkpoint = load(path)
    except CheckpointError as e:
        hint = ' (train one first, e.g. python train.py config/tiny.py)' if not os.path.isfile(path) else ''
        raise SystemExit(f'error: --ckpt: {e}{hint}')
    try:  # attn_impl is how the model runs, not what it computes: let it follow the device it is loaded on
        model = build_model(checkpoint, attn_impl='auto')
    except CheckpointError as e:
        raise SystemExit(f'error: --ckpt {path}: {e}')
    best = checkpoint.get('best_val_loss')
    print(f'loaded {path}: iter {checkpoint.get("iter_num", "unknown")}' +
          (f', best val loss {best:.4f}' if isinstance(best, float) else '') +
          f', {model.config.attention}, {model.get_num_params() / 1e6:.2f}M parameters', file=sys.stderr)
    return model.to(device).to_inference_dtype(dtype).eval(), checkpoint['config']


def load_data_tokenizer(train_config):
    """The tokenizer of the data the model was trained on (train_config: load_model's), and its EOT id."""
    try:
        tokenizer = load_tokenizer(train_config['data_dir'])
    except FileNotFoundError as e:
        raise SystemExit(f'error: cannot load the tokenizer of the checkpoint\'s data: {e}')
    except Exception as e:  # the tokenizers library's bare Exception for a file it cannot parse names no file
        path = os.path.join(train_config['data_dir'], 'tokenizer.json')
        raise SystemExit(f'error: {path}, the tokenizer of the checkpoint\'s data, is not readable '
                         f'({first_line(e)}): prepare the data again')
    return tokenizer, tokenizer.token_to_id(EOT)


def training_length(train_config):
    """The longest context the model saw in training: a document piece of at most max_doc_len tokens, in a batch."""
    return min(train_config['max_doc_len'], train_config['tokens_per_batch'])


def synchronize(device):
    """Wait for the device a model was loaded on (load_model's `device`), e.g. before reading a clock."""
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)


def hold(out_dir):
    """Hold out_dir for this process's lifetime: an flock on out_dir/run.lock, which the kernel releases however
    the process ends. Creates out_dir, and removes it at exit if it is still empty. Returns a note when it took
    over the lock file of a run that ended without removing it, else None; raises CheckpointError when a running
    process holds it."""
    created = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, LOCK)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors='replace').strip() or 'unknown'
            os.close(fd)
            raise CheckpointError(f'out_dir={out_dir!r} is in use by another run (pid {holder}, which holds {path}): '
                                  f'wait for it to end, or choose another --out_dir')
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # its last holder removed the file between our open and our lock: take the new one
    previous = os.read(fd, 64).decode(errors='replace').strip()
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'{os.getpid()}\n'.encode(), 0)
    atexit.register(_release, fd, path, out_dir if created else None)
    return f'note: took over {path} from pid {previous}, which ended without releasing it' if previous else None


def _release(fd, path, created_dir):
    if os.path.exists(path):
        os.unlink(path)  # while still locked: a process waiting on the old file sees it is gone
    os.close(fd)
    if created_dir is not None and not os.listdir(created_dir):
        os.rmdir(created_dir)


def remove_stale_temporaries(path):
    """Remove the temporary files (see save) that writers of path left when they died mid-write; returns their
    names. Call it while holding the out_dir (hold): no other writer runs then."""
    folder, name = os.path.split(path)
    removed = []
    for entry in sorted(os.listdir(folder or '.')):
        match = re.fullmatch(re.escape(name) + r'\.(\d+)\.tmp', entry)
        if match and not _running(int(match[1])):
            os.unlink(os.path.join(folder, entry))
            removed.append(entry)
    return removed


def _running(pid):
    if pid == os.getpid():  # a dead writer's pid, reused: this process has written nothing yet
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's
        return True
    return True
