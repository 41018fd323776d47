"""
Train a Wall Attention GPT (or the RoPE / FoX baseline) on packed documents.

CPU smoke run (data from `python data/prepare.py`):  python train.py config/tiny.py
one GPU:                                             python train.py config/long.py
8 GPUs on one node:                                  torchrun --standalone --nproc_per_node=8 train.py config/long.py
override any key:                                    python train.py config/tiny.py --max_iters=50 --attention=rope
continue from out_dir/ckpt.pt:                       python train.py config/tiny.py --init_from=resume

Every micro-batch is one row of `tokens_per_batch` tokens holding whole documents or pieces of them, with
cu_seqlens marking the documents: attention never crosses a document boundary.
"""
import inspect
import math
import os
import random
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
from configurator import apply_overrides
from data.loader import PackedBatches, load_tokenizer
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------------------------------------
# default config; the model's keys (n_layer, attention, ...) are GPTConfig's fields in model.py, same defaults
# I/O
out_dir = 'out'
eval_interval = 250
eval_iters = 20                   # validation micro-batches per evaluation, shared among the ranks; always the same
log_interval = 10
eval_only = False                 # evaluate once and exit
always_save_checkpoint = False    # else save only when the validation loss improves
init_from = 'scratch'             # 'scratch' | 'resume' (from out_dir/ckpt.pt)
# wandb
wandb_log = False
wandb_project = 'wall-attention'
wandb_run_name = 'run'
# data
data_dir = 'data/pystdlib'
tokens_per_batch = 65536          # tokens in one micro-batch
max_doc_len = 16384               # longer documents are cut into pieces of at most this many tokens
gradient_accumulation_steps = 8   # micro-batches per optimizer step, summed over all ranks
data_seed = 0                     # document order
retrieval_mix = 0.0               # fraction of training tokens from synthetic retrieval documents (data/retrieval.py)
retrieval_key_words = 1           # words per key of those documents (eval/retrieval.py probes with the same)
# AdamW
learning_rate = 6e-4
max_iters = 10000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0                   # 0 = off
gate_lr_scale = 1.0               # decay gates' learning rate relative to the rest (0: frozen at gate_bias_init)
gate_frozen_iters = 0             # decay gates held at gate_bias_init for this many iterations first
# learning rate: linear warmup, then cosine decay to min_lr at lr_decay_iters
decay_lr = True
warmup_iters = 200
lr_decay_iters = 10000
min_lr = 6e-5
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'  # autocast dtype; 'float32' = no autocast
compile = True                    # torch.compile everything but the attention kernels
seed = 1337
# -----------------------------------------------------------------------------------------------------------
config = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}
config |= {f.name: f.default for f in fields(GPTConfig) if f.name != 'vocab_size'}
apply_overrides(sys.argv[1:], config, sources=(__file__, inspect.getsourcefile(GPTConfig)))  # and --help
globals().update(config)
# -----------------------------------------------------------------------------------------------------------


def fail(message):
    """End the program with one line: bad input is the user's to fix, a traceback would only hide it."""
    raise SystemExit(f'error: {message}')


for key in ('tokens_per_batch', 'max_doc_len', 'gradient_accumulation_steps', 'eval_interval', 'eval_iters',
            'log_interval', 'retrieval_key_words'):
    if config[key] < 1:
        fail(f'{key}={config[key]}, expected a positive integer')
if max_iters < 0 or warmup_iters < 0 or gate_frozen_iters < 0:
    fail(f'max_iters={max_iters}, warmup_iters={warmup_iters}, gate_frozen_iters={gate_frozen_iters}: expected '
         f'integers >= 0')
if not gate_lr_scale >= 0:
    fail(f'gate_lr_scale={gate_lr_scale}, expected a number >= 0 (0: gates frozen at gate_bias_init)')
if decay_lr and lr_decay_iters <= warmup_iters:
    fail(f'lr_decay_iters={lr_decay_iters} must exceed warmup_iters={warmup_iters} (or set decay_lr=False)')
if init_from not in ('scratch', 'resume'):
    fail(f"init_from={init_from!r}, expected 'scratch' or 'resume' (from {out_dir}/ckpt.pt)")
if dtype not in ('float32', 'bfloat16'):
    fail(f"dtype={dtype!r}, expected 'float32' or 'bfloat16' (float16 would need loss scaling)")
if device != 'cpu' and not (re.fullmatch(r'cuda(:\d+)?', device) and torch.cuda.is_available()):
    fail(f"device={device!r}, expected 'cpu'" + (" or 'cuda' ('cuda:N')" if torch.cuda.is_available() else
                                                  ' (this torch sees no CUDA GPU)'))
model_args = {f.name: config[f.name] for f in fields(GPTConfig) if f.name != 'vocab_size'}
try:  # before anything is loaded: vocab_size comes from the tokenizer
    GPTConfig(**model_args)
except ValueError as e:
    fail(f'model config: {e}')

ddp = 'RANK' in os.environ  # launched by torchrun
if ddp:
    rank, local_rank, world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
    if device.startswith('cuda'):
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
else:
    rank, world_size = 0, 1
master_process = rank == 0
if gradient_accumulation_steps % world_size:
    fail(f'gradient_accumulation_steps={gradient_accumulation_steps} is not a multiple of the {world_size} ranks')
micro_steps = gradient_accumulation_steps // world_size
tokens_per_iter = gradient_accumulation_steps * tokens_per_batch
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
ctx = torch.autocast(device_type, dtype=getattr(torch, dtype), enabled=dtype != 'float32')
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
if init_from == 'scratch' and not eval_only and os.path.exists(ckpt_path):
    fail(f'{ckpt_path} exists and a run from scratch would replace it: continue it with --init_from=resume, or '
         f'start over in another --out_dir (or delete it)')
if master_process:
    print(f'config: {config}')
    print(f'tokens per iteration: {tokens_per_iter:,} ({world_size} ranks x {micro_steps} micro-batches x '
          f'{tokens_per_batch:,})')


def rng_states():
    return {'python': random.getstate(), 'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state() if device_type == 'cuda' else None,
            # as plain ints: the checkpoint then loads with torch.load(weights_only=True)
            'numpy': [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()]}


def set_rng_states(states):
    random.setstate(states['python'])
    torch.set_rng_state(states['torch'])
    if states['cuda'] is not None:
        torch.cuda.set_rng_state(states['cuda'])
    name, key, *rest = states['numpy']
    np.random.set_state((name, np.array(key, dtype=np.uint32), *rest))


# Every rank builds the same initial weights (DDP would broadcast rank 0's anyway).
torch.manual_seed(seed)
np.random.seed(seed)
random.seed(seed)

try:
    vocab_size = load_tokenizer(data_dir).get_vocab_size()
    train_batches = PackedBatches(data_dir, 'train', tokens_per_batch, max_doc_len, rank=rank,
                                  world_size=world_size, seed=data_seed, retrieval_mix=retrieval_mix,
                                  retrieval_key_words=retrieval_key_words)
    val_data = PackedBatches(data_dir, 'val', tokens_per_batch, max_doc_len)  # read at every evaluation: checked now
    # with the retrieval task mixed in, every evaluation also scores held-out probes a quarter document back
    probe_distance = max(1, max_doc_len // 4)
    retrieval_probes = None if not retrieval_mix else train_batches.task.probe_batch(
        np.random.default_rng((data_seed, 2)), val_data.tokens, val_data.eot, probe_distance, tokens_per_batch)
except (OSError, ValueError) as e:
    fail(f'data_dir={data_dir!r}: {e}')
except Exception as e:  # the tokenizers library raises a bare Exception, not naming the file, for one it cannot parse
    fail(f"data_dir={data_dir!r}: {os.path.join(data_dir, 'tokenizer.json')} is not a readable tokenizer "
         f"({checkpoint.first_line(e)}): prepare the data again")
if master_process and retrieval_mix and retrieval_probes is None:
    print(f'note: no retrieval loss in the log: one probe {probe_distance} tokens back does not fit '
          f'tokens_per_batch={tokens_per_batch}')
if master_process and not eval_only:  # one run at a time writes out_dir (and a failed start leaves no empty one)
    try:
        notes = [checkpoint.hold(out_dir)]
        notes += [f'note: removed {os.path.join(out_dir, name)}, left by a checkpoint write that was killed'
                  for name in checkpoint.remove_stale_temporaries(ckpt_path)]
    except checkpoint.CheckpointError as e:
        fail(e)
    except OSError as e:
        fail(f'out_dir={out_dir!r}: {e}')
    for note in filter(None, notes):
        print(note)
# the decay gates get optimizer groups of their own only when they train apart, so default runs resume old checkpoints
gate_groups_scale = gate_lr_scale if gate_lr_scale != 1 or gate_frozen_iters else None
if init_from == 'scratch':
    model_args['vocab_size'] = vocab_size
    raw_model = GPT(GPTConfig(**model_args)).to(device)
    optimizer = raw_model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type,
                                               gate_groups_scale)
    iter_num, best_val_loss = 0, float('inf')
else:
    try:
        ckpt = checkpoint.load(ckpt_path, checkpoint.KEYS)
    except checkpoint.CheckpointError as e:
        fail(f'init_from=resume but {e}')
    try:
        # the architecture comes from the checkpoint; how to run it may change
        runtime = {k: config[k] for k in checkpoint.RUNTIME_MODEL_KEYS}
        model_args = ckpt['model_args'] | runtime
        ignored = {k: v for k, v in model_args.items() if k in config and config[k] != v}
        if ignored and master_process:
            print(f'note: the checkpoint fixes the architecture: {ignored} (this config says otherwise)')
        if model_args['vocab_size'] != vocab_size:
            fail(f'{ckpt_path} has a vocabulary of {model_args["vocab_size"]} tokens, the tokenizer of '
                 f'data_dir={data_dir!r} has {vocab_size}: resume on the data it was trained on')
        raw_model = checkpoint.build_model(ckpt, **runtime).to(device)
        optimizer = raw_model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type,
                                                   gate_groups_scale)
        optimizer.load_state_dict(ckpt['optimizer'])
        train_batches.load_state_dict(ckpt['loader'])
        iter_num, best_val_loss = int(ckpt['iter_num']), float(ckpt['best_val_loss'])
        if len(ckpt['rng']) == world_size:
            set_rng_states(ckpt['rng'][rank])
        elif master_process:
            print(f'note: checkpoint from {len(ckpt["rng"])} ranks, now {world_size}: RNG states start fresh')
    except checkpoint.CheckpointError as e:
        fail(f'{ckpt_path} does not fit this run: {e}')
    except Exception as e:  # any piece that does not fit means the checkpoint cannot continue this run
        fail(f'{ckpt_path} does not fit this run: {checkpoint.first_line(e)}')
    del ckpt
start_iter = iter_num
if master_process:
    print(f'{raw_model.get_num_params() / 1e6:.2f}M parameters, attention={raw_model.config.attention}, '
          f'starting at iter {iter_num}')

model = torch.compile(raw_model) if compile else raw_model
# Evaluation runs `model` on each rank's own share of batches; only training goes through DDP.
train_model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None) if ddp else model


def get_lr(it):
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * decay_ratio)) * (learning_rate - min_lr)


def to_device(batch):
    return (t.to(device, non_blocking=True) for t in batch)


def mean_over_ranks(total, count):
    """total / count summed over all ranks (gloo has no average)."""
    both = torch.stack([torch.as_tensor(total, dtype=torch.float64), torch.as_tensor(count, dtype=torch.float64)])
    if ddp:
        both = both.to(device)
        dist.all_reduce(both)
    return (both[0] / both[1]).item()


@torch.no_grad()
def validation_loss():
    """Mean loss over the first eval_iters validation micro-batches, whatever the number of ranks: rank r takes
    batches r, r + world_size, ..."""
    model.eval()
    val_batches = PackedBatches(data_dir, 'val', tokens_per_batch, max_doc_len, rank=rank, world_size=world_size)
    total, count = torch.zeros((), device=device, dtype=torch.float64), 0
    for _ in range(rank, eval_iters, world_size):
        x, y, cu_seqlens = to_device(next(val_batches))
        with ctx:
            total += model(x, y, cu_seqlens)[1].double()
        count += 1
    model.train()
    return mean_over_ranks(total.cpu(), count)


@torch.no_grad()
def retrieval_loss():
    """Loss per value token of retrieval_probes, eager (a second compiled graph would cost more than it saves)."""
    raw_model.eval()
    x, y, cu_seqlens = to_device(retrieval_probes)
    with ctx:
        loss = raw_model(x, y, cu_seqlens)[1].item()
    raw_model.train()
    return loss


if wandb_log and master_process:
    import socket
    import wandb
    try:
        socket.create_connection(('api.wandb.ai', 443), timeout=5).close()
        mode = 'online'
    except OSError:
        mode = 'offline'
    wandb.init(project=wandb_project, name=wandb_run_name, config=config, mode=mode)
    if mode == 'offline':
        print(f'wandb: no network, logging offline; upload later with `wandb sync {os.path.dirname(wandb.run.dir)}`')

# Speed is measured over all steps since the last log line or evaluation, ended by a GPU sync (.item()).
t_mark, steps_timed, flops_timed = time.time(), 0, 0
t_start, saved_iter = t_mark, None
while True:
    lr = get_lr(iter_num) if decay_lr else learning_rate
    for param_group in optimizer.param_groups:  # checkpoints before gate_lr_scale lack lr_scale and decay_gates
        frozen = param_group.get('decay_gates', False) and iter_num < gate_frozen_iters
        param_group['lr'] = 0.0 if frozen else lr * param_group.get('lr_scale', 1.0)

    if iter_num % eval_interval == 0 or iter_num == max_iters or eval_only:
        val_loss = validation_loss()
        if master_process:
            metrics = {'iter': iter_num, 'val/loss': val_loss, 'lr': lr}
            if retrieval_probes is not None:
                metrics['val/retrieval_loss'] = retrieval_loss()
            print(f'iter {iter_num}: val loss {val_loss:.4f}' + ('' if retrieval_probes is None else
                  f", retrieval loss {metrics['val/retrieval_loss']:.3f} ({probe_distance} tokens back)"))
            if wandb_log:
                wandb.log(metrics)
        # never at the first iteration: nothing was trained yet, and a checkpoint being resumed stays as it is
        if iter_num > start_iter and (val_loss < best_val_loss or always_save_checkpoint):
            best_val_loss = min(val_loss, best_val_loss)
            rng = [None] * world_size
            if ddp:
                dist.all_gather_object(rng, rng_states())
            else:
                rng[0] = rng_states()
            if master_process:
                checkpoint.save({'model': raw_model.state_dict(), 'optimizer': optimizer.state_dict(),
                                 'model_args': model_args, 'iter_num': iter_num, 'best_val_loss': best_val_loss,
                                 'config': config, 'loader': train_batches.state_dict(), 'rng': rng}, ckpt_path)
                print(f'saved {ckpt_path}')
            saved_iter = iter_num
        t_mark, steps_timed, flops_timed = time.time(), 0, 0
    if iter_num == max_iters or eval_only:
        break

    loss_sum = torch.zeros((), device=device)
    for micro_step in range(micro_steps):
        x, y, cu_seqlens = next(train_batches)
        flops_timed += raw_model.flops(cu_seqlens.diff().tolist())
        x, y, cu_seqlens = to_device((x, y, cu_seqlens))
        if compile:  # the number of documents varies: one graph for any, instead of a recompilation for a new one
            torch._dynamo.maybe_mark_dynamic(cu_seqlens, 0)
        # gradients are all-reduced once per step, in the backward of the last micro-batch
        with train_model.no_sync() if ddp and micro_step < micro_steps - 1 else nullcontext():
            with ctx:
                _, loss = train_model(x, y, cu_seqlens)
            (loss / micro_steps).backward()
        loss_sum += loss.detach()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    steps_timed += 1

    if iter_num % log_interval == 0:
        train_loss = mean_over_ranks(loss_sum.double().cpu(), micro_steps)  # every rank's micro-batches
        dt = (time.time() - t_mark) / steps_timed
        mfu = raw_model.estimate_mfu(flops_timed / steps_timed, dt)  # this rank's work on this rank's GPU
        if master_process:
            print(f'iter {iter_num}: loss {train_loss:.6f}, lr {lr:.3e}, time {dt * 1000:.0f} ms, '
                  f'{tokens_per_iter / dt:,.0f} tok/s' + ('' if mfu is None else f', mfu {mfu * 100:.1f}%'))
            if wandb_log:
                wandb.log({'iter': iter_num, 'train/loss': train_loss, 'lr': lr, 'tokens_per_s': tokens_per_iter / dt,
                           **({} if mfu is None else {'mfu': mfu})})
        t_mark, steps_timed, flops_timed = time.time(), 0, 0
    iter_num += 1

if master_process:  # what is on disk now
    if saved_iter is not None:
        saved = f'{ckpt_path} holds iter {saved_iter} (best val loss {best_val_loss:.4f}), saved by this run'
    elif init_from == 'resume':
        saved = f'{ckpt_path} holds iter {start_iter} (best val loss {best_val_loss:.4f}) as before: nothing saved'
    else:
        saved = 'no checkpoint saved'
    elapsed = time.time() - t_start
    print(f'done at iter {iter_num}: {saved}; {(iter_num - start_iter) * tokens_per_iter:,} tokens trained in '
          f'{int(elapsed // 3600)}:{int(elapsed % 3600 // 60):02d}:{elapsed % 60:04.1f}')

if ddp:
    # Tear down together and only after DDP lets go of the group: a rank whose gloo group outlives it into
    # interpreter shutdown (while another rank still writes the checkpoint) can abort there.
    dist.barrier()
    del train_model
    dist.destroy_process_group()
