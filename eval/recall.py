"""
Multi-query associative recall (MQAR, after Zoology): train small model.GPT models from scratch on synthetic
key-value lookups generated on the fly, and measure how well each attention recalls, by training step and by how
far the lookups reach back. Minutes on a CPU at the default setting.

    python -m eval.recall --variants wall,wall+shift --steps 300
    python -m eval.recall --variants wall,wall+shift,fox,fox+shift,rope,rope+shift --out docs/recall

Vocabulary. Token ids fall in three disjoint ranges: keys [0, n_keys), values [n_keys, n_keys + n_values) and
filler [n_keys + n_values, vocab_size). A sequence of `pairs` pairs and gap `gap` is

    k1 v1 k2 v2 ... kP vP | f1 ... f_gap | q1 q2 ... qP

the pairs (P distinct keys, P distinct values, all uniform), `gap` filler tokens (uniform, with repeats), then
the same P keys again in a random order, the queries. The target at each query is the value its key was paired
with (the answer); every other target is -1, so the loss and the accuracy count the P answers alone, accuracy as
the fraction of answers that are the argmax of the logits over the whole vocabulary. The key a query matches sits
gap + 2 to gap + 3P - 1 tokens before it. Answers are never part of the input (as in Zoology): with each query
followed by its answer (--answers_in_input), a 2-layer Wall with the shift is near chance after 600 steps (docs).

The study's layout (--needles, needle_batch): `gap` filler tokens holding `pairs` needles `c k v1 .. vn` in their
first half, each queried later by the whole needle again (answers in the input, as data/retrieval.py's documents),
the loss on the value tokens. A miniature of docs/length_generalization.md's retrieval task, without its natural text.

Gaps. Every training batch takes one gap from --train_gaps (seeded); --test_gaps must all be longer than any
training gap, so they test recall past the training length, in miniature. Accuracy by step is measured every
--eval_every steps on fixed held-out batches of the training gaps (--eval_batch sequences per gap, the same for
every variant); accuracy by gap, at the end, on held-out batches of every training and test gap.

Variants. 'wall', 'fox' and 'rope' are GPTConfig.attention; '+shift' adds the data-dependent key/value shift
(GPTConfig.kv_shift: k_t <- a_t k_{t-1} + (1 - a_t) k_t, the same for v). Every variant starts from the same
seed and sees the same batches. Writes OUT/recall.json, OUT/recall.md (the tables) and OUT/recall.png.
"""
import argparse
import dataclasses
import json
import os
import platform
import time

import torch

from model import ATTENTIONS, GPT, GPTConfig

VARIANTS = tuple(a + s for a in ATTENTIONS for s in ('', '+shift'))


# ----------------------------------------------------------------------------------------------------
# data

def mqar_batch(gen, batch, pairs, gap, n_keys, n_values, n_filler, answers_in_input=False):
    """One batch drawn from the torch.Generator gen: (idx [batch, 3 pairs + gap], targets of the same shape, -1
    except at the queries, where they hold the answers). See the module docstring for the layout. With
    answers_in_input, each query is followed by its answer (`q1 a1 q2 a2 ...`, 4 pairs + gap tokens), as the
    study's retrieval task teacher-forces its values."""
    keys = torch.rand(batch, n_keys, generator=gen).argsort(-1)[:, :pairs]
    values = n_keys + torch.rand(batch, n_values, generator=gen).argsort(-1)[:, :pairs]
    filler = n_keys + n_values + torch.randint(0, max(n_filler, 1), (batch, gap), generator=gen)
    order = torch.rand(batch, pairs, generator=gen).argsort(-1)
    queries, answers = keys.gather(1, order), values.gather(1, order)
    if answers_in_input:
        queries, answers = (torch.stack([queries, answers], -1).flatten(1),
                            torch.stack([answers, torch.full_like(answers, -1)], -1).flatten(1))
    idx = torch.cat([torch.stack([keys, values], -1).flatten(1), filler, queries], 1)
    targets = torch.cat([torch.full((batch, 2 * pairs + gap), -1), answers], 1)
    return idx, targets


def needle_batch(gen, batch, pairs, gap, n_keys, n_values, n_filler, value_tokens=2):
    """The study's retrieval layout (data/retrieval.py) in miniature, drawn from gen: `gap` filler tokens with
    `pairs` needles `c k v1 .. vn` (n = value_tokens) inserted at random places in their first half, and each needle
    again, whole, at a random place in their second half: its query, with the answers in the input (teacher-forced).
    The cue c is the first filler token, which the filler also holds (as the study's line break and `KEY_`); keys
    and value tokens are distinct within a sequence. Targets: at a query's key its first value token, at its value
    token i the token i + 1; -1 elsewhere. Returns (idx, targets), [batch, gap + 2 pairs (n + 2)]."""
    cue = n_keys + n_values
    rows = []
    for _ in range(batch):
        keys = torch.randperm(n_keys, generator=gen)[:pairs].tolist()
        values = (n_keys + torch.randperm(n_values, generator=gen)[:pairs * value_tokens]).view(pairs, -1).tolist()
        filler = (cue + torch.randint(0, n_filler, (gap,), generator=gen)).tolist()
        at = (torch.randint(0, gap // 2 + 1, (pairs,), generator=gen).tolist()
              + torch.randint(gap // 2, gap + 1, (pairs,), generator=gen).tolist())
        idx, targets, last = [], [], 0
        for i in sorted(range(2 * pairs), key=lambda i: (at[i], i)):  # at one place, needles before queries
            line = [cue, keys[i % pairs]] + values[i % pairs]
            idx += filler[last:at[i]] + line
            targets += [-1] * (at[i] - last) + ([-1] + line[2:] + [-1] if i >= pairs else [-1] * len(line))
            last = at[i]
        rows.append((idx + filler[last:], targets + [-1] * (gap - last)))
    return tuple(torch.tensor([row[j] for row in rows]) for j in (0, 1))


def make_batch(args, gen, size, gap):
    """One batch of the layout that args ask for (mqar_batch, or needle_batch with --needles)."""
    if args.needles:
        return needle_batch(gen, size, args.pairs, gap, args.n_keys, args.n_values, args.n_filler, args.value_tokens)
    return mqar_batch(gen, size, args.pairs, gap, args.n_keys, args.n_values, args.n_filler, args.answers_in_input)


def eval_batches(args, gaps):
    """{gap: (idx, targets)}: held-out batches, fixed by --seed and the gap alone."""
    out = {}
    for gap in gaps:
        gen = torch.Generator().manual_seed((args.seed + 1) * 1_000_003 + gap)  # never the training stream's seed
        out[gap] = make_batch(args, gen, args.eval_batch, gap)
    return out


# ----------------------------------------------------------------------------------------------------
# models, training, scoring

def model_config(args, variant):
    attention, shift = variant.split('+')[0], variant.endswith('+shift')
    return GPTConfig(vocab_size=args.n_keys + args.n_values + args.n_filler, n_layer=args.n_layer, n_head=args.n_head,
                     n_kv_head=args.n_kv_head or args.n_head, n_embd=args.n_embd, attention=attention,
                     attn_impl=args.attn_impl, kv_shift=shift)


@torch.no_grad()
def accuracy(model, idx, targets, chunk=64):
    """Fraction of the answers (targets != -1) that are the argmax of the logits."""
    model.eval()
    device, hits, total = model.lm_head.weight.device, 0, 0
    for a in range(0, len(idx), chunk):
        x, y = idx[a:a + chunk].to(device), targets[a:a + chunk].to(device)
        mask = y != -1
        pred = model.lm_head(model.hidden_states(x)[mask]).argmax(-1)
        hits, total = hits + (pred == y[mask]).sum().item(), total + mask.sum().item()
    model.train()
    return hits / total


def train_variant(args, variant, held_out):
    """Train one variant; returns its record: accuracy and loss by step, accuracy by gap, time, parameters."""
    torch.manual_seed(args.seed)
    model = GPT(model_config(args, variant)).to(args.device)
    gates = {id(p) for p in model.decay_gate_parameters()}
    groups = [dict(params=[p for p in model.parameters() if id(p) not in gates])]
    if gates:  # the decay gates at their own rate (train.py's gate_lr_scale)
        groups.append(dict(params=[p for p in model.parameters() if id(p) in gates], lr=args.lr * args.gate_lr_scale))
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)  # the same batches for every variant
    train_eval = [held_out[g] for g in args.train_gaps]
    record = dict(steps=[], accuracy=[], loss=[], params=sum(p.numel() for p in model.parameters()))
    t0, losses = time.time(), []
    for step in range(1, args.steps + 1):
        gap = args.train_gaps[torch.randint(len(args.train_gaps), (), generator=gen)]
        idx, targets = make_batch(args, gen, args.batch, gap)
        _, loss = model(idx.to(args.device), targets.to(args.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            hits = sum(accuracy(model, *b) * (b[1] != -1).sum().item() for b in train_eval)
            acc = hits / sum((b[1] != -1).sum().item() for b in train_eval)
            record['steps'].append(step)
            record['accuracy'].append(acc)
            record['loss'].append(sum(losses) / len(losses))
            losses = []
            print(f'{variant:>11} step {step:5d}: accuracy {acc:.3f}, train loss {record["loss"][-1]:.3f} '
                  f'({time.time() - t0:.0f} s)', flush=True)
    record['train_seconds'] = time.time() - t0
    record['by_gap'] = {str(g): accuracy(model, *b) for g, b in held_out.items()}
    print(f'{variant:>11} by gap: ' + ', '.join(f'{g} {a:.3f}' for g, a in record['by_gap'].items()), flush=True)
    return record


# ----------------------------------------------------------------------------------------------------
# reporting

def markdown(result):
    """The two tables: accuracy at the --table_steps, and accuracy by gap after the last step (test gaps starred)."""
    args, runs = result['args'], result['variants']
    steps = args['table_steps']
    lines = ['| variant | ' + ' | '.join(f'step {s}' for s in steps) + ' | train time |',
             '|---|' + '---|' * (len(steps) + 1)]
    for name, r in runs.items():
        accs = [r['accuracy'][r['steps'].index(s)] for s in steps]
        lines.append(f'| {name} | ' + ' | '.join(f'{a:.2f}' for a in accs) + f' | {r["train_seconds"]:.0f} s |')
    gaps = list(next(iter(runs.values()))['by_gap'])
    label = {str(g): f'gap {g}' + '*' * (g in args['test_gaps']) for g in args['train_gaps'] + args['test_gaps']}
    lines += ['', '| variant | ' + ' | '.join(label[g] for g in gaps) + ' |', '|---|' + '---|' * len(gaps)]
    for name, r in runs.items():
        lines.append(f'| {name} | ' + ' | '.join(f'{r["by_gap"][g]:.2f}' for g in gaps) + ' |')
    return '\n'.join(lines) + '\n'


def plot(result, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    args, runs = result['args'], result['variants']
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.3))
    for name, r in runs.items():
        style = dict(ls='-' if name.endswith('+shift') else '--', color=f'C{list(ATTENTIONS).index(name.split("+")[0])}')
        ax1.plot(r['steps'], r['accuracy'], label=name, **style)
        ax2.plot([int(g) for g in r['by_gap']], list(r['by_gap'].values()), marker='o', label=name, **style)
    gaps = sorted(args['train_gaps'] + args['test_gaps'])
    ax1.set(xlabel='training step', ylabel='accuracy (training gaps, held out)', ylim=(-0.03, 1.05),
            title=f'MQAR, {args["pairs"]} pairs of {args["n_keys"]} keys and {args["n_values"]} values')
    ax2.axvline(max(args['train_gaps']), color='gray', ls=':', label='longest training gap')
    ax2.set_xscale('symlog', linthresh=min([g for g in gaps if g] or [1]), linscale=0.5)
    ax2.set_xticks(gaps, [str(g) for g in gaps])
    ax2.minorticks_off()
    ax2.set(xlabel='gap (filler tokens between pairs and queries)', ylabel='accuracy after training',
            ylim=(-0.03, 1.05), title=f'by gap, after {args["steps"]} steps')
    fig.legend(*ax2.get_legend_handles_labels(), loc='lower center', ncol=len(runs) + 1, fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# command line

def int_list(text):
    return [int(t) for t in text.split(',') if t.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog='python -m eval.recall', description=__doc__.split('\n\n')[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--variants', default=','.join(VARIANTS), help=f'comma-separated, of {",".join(VARIANTS)}')
    p.add_argument('--n_keys', type=int, default=32, help='key vocabulary')
    p.add_argument('--n_values', type=int, default=32, help='value vocabulary')
    p.add_argument('--n_filler', type=int, default=16, help='filler vocabulary')
    p.add_argument('--pairs', type=int, default=8, help='key-value pairs per sequence')
    p.add_argument('--train_gaps', default='0,8', help='filler tokens between pairs and queries in training')
    p.add_argument('--test_gaps', default='16,32,64,128', help='held-out gaps, each longer than every training gap')
    p.add_argument('--n_layer', type=int, default=2)
    p.add_argument('--n_embd', type=int, default=64)
    p.add_argument('--n_head', type=int, default=2)
    p.add_argument('--n_kv_head', type=int, default=0, help='0: n_head')
    p.add_argument('--steps', type=int, default=1000)
    p.add_argument('--batch', type=int, default=32)
    p.add_argument('--lr', type=float, default=3e-3)
    p.add_argument('--weight_decay', type=float, default=0.01)
    p.add_argument('--gate_lr_scale', type=float, default=1.0,
                   help="the decay gates' learning rate as a multiple of --lr (train.py's gate_lr_scale)")
    p.add_argument('--eval_every', type=int, default=50)
    p.add_argument('--eval_batch', type=int, default=128, help='held-out sequences per gap')
    p.add_argument('--table_steps', default='', help='evaluated steps shown in the table; default: those of '
                                                      '100, 200, 500, 1000, 2000, 5000, and the last')
    p.add_argument('--answers_in_input', action='store_true',
                   help="each query followed by its answer, as the study's retrieval task (default: Zoology's layout)")
    p.add_argument('--needles', action='store_true',
                   help="the study's layout in miniature (needle_batch): needles in filler, queried later; the gaps "
                        'are then the filler tokens of a sequence')
    p.add_argument('--value_tokens', type=int, default=2, help='value tokens per needle (--needles)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--attn_impl', default='auto', choices=('auto', 'reference', 'triton'),
                   help='GPTConfig.attn_impl (auto: the reference on CPU)')
    p.add_argument('--threads', type=int, default=1, help="torch CPU threads, 0: torch's default (on cores other jobs "
                                                         'share, two ran these models up to 60x slower than one)')
    p.add_argument('--out', default='out/recall', help='folder for recall.json, recall.md and recall.png')
    args = p.parse_args(argv)

    args.variants = [v.strip() for v in args.variants.split(',') if v.strip()]
    if not args.variants or not set(args.variants) <= set(VARIANTS) or len(set(args.variants)) < len(args.variants):
        p.error(f'--variants: expected distinct names from {",".join(VARIANTS)}, got {",".join(args.variants)!r}')
    for name in ('n_keys', 'n_values', 'pairs', 'n_layer', 'n_embd', 'n_head', 'steps', 'batch', 'eval_every',
                 'eval_batch'):
        if getattr(args, name) < 1:
            p.error(f'--{name}: expected a positive integer, got {getattr(args, name)}')
    for name in ('n_filler', 'n_kv_head', 'threads'):
        if getattr(args, name) < 0:
            p.error(f'--{name}: expected an integer >= 0, got {getattr(args, name)}')
    for name in ('n_keys', 'n_values'):
        if getattr(args, name) < args.pairs:
            p.error(f'--{name}: expected at least --pairs={args.pairs} (distinct per sequence), '
                    f'got {getattr(args, name)}')
    for name in ('train_gaps', 'test_gaps', 'table_steps'):
        try:
            setattr(args, name, int_list(getattr(args, name)))
        except ValueError:
            p.error(f'--{name}: expected comma-separated integers, got {getattr(args, name)!r}')
    if not args.train_gaps or min(args.train_gaps) < 0 or len(set(args.train_gaps)) < len(args.train_gaps):
        p.error(f'--train_gaps: expected distinct integers >= 0, got {args.train_gaps}')
    if any(g <= max(args.train_gaps) for g in args.test_gaps) or len(set(args.test_gaps)) < len(args.test_gaps):
        p.error(f'--test_gaps: expected distinct gaps longer than every training gap (> {max(args.train_gaps)}), '
                f'got {args.test_gaps}')
    if args.needles and args.answers_in_input:
        p.error('--needles: expected without --answers_in_input (its queries always hold their answers)')
    if args.needles and args.value_tokens < 1:
        p.error(f'--value_tokens: expected a positive integer, got {args.value_tokens}')
    if args.needles and args.n_values < args.pairs * args.value_tokens:
        p.error(f'--n_values: expected at least --pairs x --value_tokens = {args.pairs * args.value_tokens} '
                f'(distinct per sequence), got {args.n_values}')
    if args.needles and args.n_filler == 0:
        p.error('--n_filler: expected >= 1 with --needles (the cue is a filler token)')
    if args.n_filler == 0 and max(args.train_gaps + args.test_gaps) > 0:
        p.error('--n_filler: expected >= 1 when a gap is not 0')
    if not (args.lr > 0):
        p.error(f'--lr: expected a positive learning rate, got {args.lr}')
    if not (args.weight_decay >= 0):
        p.error(f'--weight_decay: expected >= 0, got {args.weight_decay}')
    if not (args.gate_lr_scale >= 0):
        p.error(f'--gate_lr_scale: expected >= 0, got {args.gate_lr_scale}')
    evaluated = set(range(args.eval_every, args.steps + 1, args.eval_every)) | {args.steps}
    if not args.table_steps:
        args.table_steps = sorted(evaluated & {100, 200, 500, 1000, 2000, 5000} | {args.steps})
    if any(s not in evaluated for s in args.table_steps):
        p.error(f'--table_steps: expected evaluated steps (multiples of --eval_every={args.eval_every} '
                f'up to --steps={args.steps}, or {args.steps}), got {args.table_steps}')
    try:
        torch.device(args.device)
    except RuntimeError:
        p.error(f"--device: expected a torch device such as 'cpu' or 'cuda', got {args.device!r}")
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        p.error(f'--device: expected cpu, there is no CUDA device here (got {args.device!r})')
    for v in args.variants:
        try:
            model_config(args, v)
        except ValueError as e:  # GPTConfig names the field, which is the option of the same name
            p.error(f'--{e}')
    return args


def cpu_name():
    try:
        with open('/proc/cpuinfo') as f:
            return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    held_out = eval_batches(args, sorted(args.train_gaps + args.test_gaps))
    t0 = time.time()
    runs = {v: train_variant(args, v, held_out) for v in args.variants}
    machine = (torch.cuda.get_device_name(args.device) if args.device.startswith('cuda') else
               f'{cpu_name()}, torch threads: {torch.get_num_threads()}')
    config = dataclasses.asdict(model_config(args, args.variants[0]))  # what the variants share
    config = {k: v for k, v in config.items() if k not in ('attention', 'kv_shift')}
    result = dict(args=vars(args), variants=runs, seconds=time.time() - t0, machine=machine, torch=torch.__version__,
                  config=config)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'recall.json'), 'w') as f:
        json.dump(result, f, indent=1)
    table = markdown(result)
    with open(os.path.join(args.out, 'recall.md'), 'w') as f:
        f.write(table)
    plot(result, os.path.join(args.out, 'recall.png'))
    print(table + f'\n{time.time() - t0:.0f} s on {machine}; wrote {args.out}/recall.{{json,md,png}}')
    return result


if __name__ == '__main__':
    main()
