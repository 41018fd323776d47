"""
A GPT language model with Wall Attention, in one file.

Wall Attention is causal softmax attention whose query-key product is multiplied, channel by channel,
by a learned decay: logit(i, j) = scale * sum_d q[i,d] k[j,d] exp(g[j+1,d] + ... + g[i,d]), with
g = logsigmoid(Linear(x)) <= 0 (docs/operator.md). The decay is the only positional signal: no RoPE.
Two baselines share everything else and sit behind `attention`:
  'rope': rotary position embeddings + plain softmax attention,
  'fox':  the Forgetting Transformer, one scalar forget gate per head instead of one per channel.
Packed batches: B == 1 and cu_seqlens marks the documents; no token ever attends across documents.
The key/value shift (`kv_shift`, the Forgetting Transformer's "Pro" block) mixes each key and value with the previous
token's, k_t <- a_t k_{t-1} + (1 - a_t) k_t with a_t = sigmoid(Linear(x_t)) per kv head: a value then carries the
token before it, so one layer can answer a lookup (an induction head without a previous-token head).
"""
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels


@dataclass
class GPTConfig:
    vocab_size: int = 4096
    n_layer: int = 12
    n_head: int = 12                # query heads
    n_kv_head: int = 12             # key/value heads; fewer than n_head is GQA
    n_embd: int = 768
    attention: str = 'wall'         # 'wall' | 'rope' | 'fox'
    attn_impl: str = 'auto'         # kernel for wall/fox: 'triton' | 'reference' | 'auto' (triton on GPU, reference on CPU)
    gate_per_kv_head: bool = False  # one per-channel gate per kv head, shared by its query group (smaller decode cache)
    gate_bias_init: float = 8.0     # logsigmoid(8) = -3e-4 per step: gates start open, attention starts near vanilla
    g_max: float = 0.86             # soft bound g -> g_max * expm1(g / g_max) > -g_max keeps kernel exponents in range; 0 = off
    scalar_gate: bool = False       # add FoX's scalar forget gate to wall ('fox' always has it)
    sink: bool = False              # learned attention-sink logit per head (wall/fox only)
    qk_norm: bool = False           # RMSNorm on q and k of every head
    output_gate: bool = False       # attention output times sigmoid(Linear(x)), per channel
    kv_shift: bool = False          # mix k and v with the previous token's by a learned gate per kv head (FoX Pro)
    window_size: int = 4096         # sliding window of the local layers
    window_pattern: str = 'G'       # layer kinds, repeated over depth: 'L' local (window_size), 'G' global; e.g. 'LLLG'
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    loss_chunk_rows: int = 4096     # lm head + cross-entropy this many tokens at a time
    activation_checkpointing: bool = False  # recompute each block in backward instead of storing its activations

    def __post_init__(self):
        """Refuse a config the model cannot be built from, naming the field."""
        def check(ok, field, expected):
            if not ok:
                raise ValueError(f'{field}={getattr(self, field)!r}: expected {expected}')
        for field in ('vocab_size', 'n_layer', 'n_head', 'n_kv_head', 'n_embd', 'window_size', 'loss_chunk_rows'):
            check(type(getattr(self, field)) is int and getattr(self, field) >= 1, field, 'a positive integer')
        check(self.attention in ATTENTIONS, 'attention', "'wall', 'rope' or 'fox'")
        check(self.attn_impl in ('auto', 'triton', 'reference'), 'attn_impl', "'auto', 'triton' or 'reference'")
        check(self.n_embd % self.n_head == 0, 'n_embd', f'a multiple of n_head={self.n_head}')
        check(self.n_head % self.n_kv_head == 0, 'n_head', f'a multiple of n_kv_head={self.n_kv_head}')
        check(self.attention != 'rope' or self.n_embd // self.n_head % 2 == 0, 'n_embd',
              f'an even head dimension n_embd / n_head for RoPE (n_head={self.n_head})')
        check(isinstance(self.window_pattern, str) and self.window_pattern and set(self.window_pattern) <= {'L', 'G'},
              'window_pattern', "letters L (local) and G (global), e.g. 'LLLG'")
        check(self.g_max >= 0, 'g_max', 'a bound >= 0 (0 = off)')
        check(not (self.sink and self.attention == 'rope'), 'sink', "False with attention='rope' (wall or fox only)")


# ----------------------------------------------------------------------------------------------------
# attention

def document_ids(cu_seqlens, T):
    """Index of the document each of the T packed positions belongs to."""
    return torch.searchsorted(cu_seqlens[1:], torch.arange(T, device=cu_seqlens.device), right=True)


@torch.compiler.disable  # the attention kernels stay out of torch.compile's graphs
def wall_attention(impl, q, k, v, g, **kwargs):
    if impl == 'auto':
        impl = 'triton' if q.is_cuda else 'reference'
    attend = kernels.wall_attn if impl == 'triton' else kernels.wall_attn_reference
    return attend(q, k, v, g, **kwargs)


@torch.compiler.disable
def softmax_attention(q, k, v, cu_seqlens, window_size, layout=None):
    """Document-causal softmax attention; q [B, T, HQ, D], k and v [B, T, H, D], cu_seqlens requires B == 1 (layout:
    kernels.document_layout(cu_seqlens), whose max_seqlen spares FlashAttention's launch a device-to-host read)."""
    B, T = q.shape[:2]
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):  # FlashAttention's varlen kernel: no mask in memory
        from torch.nn.attention.varlen import varlen_attn
        max_len = None if layout is None else layout.max_seqlen
        if cu_seqlens is None:  # every row is one document: pack the rows
            cu_seqlens = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=q.device)
            q, k, v = (t.reshape(1, B * T, *t.shape[2:]) for t in (q, k, v))
            max_len = T
        max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if max_len is None else max_len
        left = -1 if window_size is None else window_size - 1  # flash counts keys strictly left of the query
        gqa = {}
        if k.shape[2] != q.shape[2]:
            if 'enable_gqa' in inspect.signature(varlen_attn).parameters:
                gqa = dict(enable_gqa=True)
            else:  # torch < 2.12 has no GQA flag here: widen the kv heads
                k, v = (t.repeat_interleave(q.shape[2] // k.shape[2], dim=2) for t in (k, v))
        y = varlen_attn(q[0], k[0], v[0], cu_seqlens, cu_seqlens, max_len, max_len, window_size=(left, 0), **gqa)[None]
    else:  # on CPU (or fp32, which FlashAttention refuses), a boolean [T, T] mask built from the same rule
        i = torch.arange(T, device=q.device)
        visible = i[None, :] <= i[:, None]
        if cu_seqlens is not None:
            doc = document_ids(cu_seqlens, T)
            visible &= doc[None, :] == doc[:, None]
        if window_size is not None:
            visible &= i[:, None] - i[None, :] < window_size
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=visible, enable_gqa=True).transpose(1, 2)
    return y.reshape(B, T, *y.shape[2:])


def rotary(positions, head_dim, base):
    """cos and sin of RoPE angles for integer positions [B or 1, T], shaped [B or 1, T, 1, head_dim / 2]."""
    inv_freq = base ** -(torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None, None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


def document_starts(cu_seqlens, T):
    """Whether each of the T packed positions is the first token of its document (bool [T])."""
    doc = document_ids(cu_seqlens, T)
    return torch.cat([doc.new_ones(1, dtype=torch.bool), doc[1:] != doc[:-1]])


def shift_tokens(x, starts=None, previous=None):
    """x [B, T, ...] one step later: row t holds x[t - 1]; row 0 holds `previous` [B, 1, ...] (a cache's last
    token) or zeros, and so does every position where `starts` (document_starts) is True."""
    first = torch.zeros_like(x[:, :1]) if previous is None else previous.to(x.dtype)
    shifted = torch.cat([first, x[:, :-1]], dim=1)
    if starts is not None:
        shifted = shifted.masked_fill(starts.view(1, -1, *[1] * (x.dim() - 2)), 0)
    return shifted


class DecayGate(nn.Linear):
    """A Linear whose outputs are log-decays after logsigmoid: its bias starts at gate_bias_init (GPT's init) and it
    stays fp32 in inference (GPT.to_inference_dtype), since the gates are summed into exponents."""


def log_gate(linear, x):
    """logsigmoid(linear(x)) in fp32 even under autocast: the gates are summed into exponents."""
    with torch.autocast(x.device.type, enabled=False):
        return F.logsigmoid(linear(x.float()))


def soft_bound(g, g_max):
    """g -> g_max * expm1(g / g_max) > -g_max (identity for g_max = 0): keeps the kernels' exponents in range."""
    return g_max * torch.expm1(g / g_max) if g_max else g


class Attention(nn.Module):
    """What every attention variant shares: the q, k, v projection (with the key/value shift and QK-norm), the sink,
    the output gate and projection, and the call into a layer cache. A variant adds its own parameters, and says how
    q and k carry position (`rotate`), what decays (`gates`) and how a chunk attends in training (`attend`)."""

    def __init__(self, config, window_size):
        super().__init__()
        self.config, self.window_size = config, window_size
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        self.c_attn = nn.Linear(config.n_embd, q_dim + 2 * kv_dim, bias=False)
        self.c_proj = nn.Linear(q_dim, config.n_embd, bias=False)
        if config.kv_shift:  # bias 0: each key starts as the mean of its own token's and the previous one's
            self.kv_shift_gate = nn.Linear(config.n_embd, self.n_kv_head)
        if config.sink:
            self.sink_bias = nn.Parameter(torch.zeros(self.n_head))
        if config.qk_norm:
            self.q_norm, self.k_norm = nn.RMSNorm(self.head_dim), nn.RMSNorm(self.head_dim)
        if config.output_gate:
            self.out_gate = nn.Linear(config.n_embd, q_dim, bias=False)

    def project(self, x, cu_seqlens=None, cache=None):
        """q, k, v and the log-decays of x [B, T, C], the same in training and decoding (with the key/value shift,
        a layer cache carries each sequence's last raw k and v to the next call).

        Returns (q, k, v, g, g_scalar): q [B, T, HQ, D], k and v [B, T, H, D], and the variant's `gates`.
        """
        B, T, _ = x.shape
        # Training and prefill: one GEMM per row block of c_attn's weight, so that q, k and v come out contiguous
        # for the training kernels; a decoding step keeps the one GEMM, whose strided split the decode kernels read
        # (both measured faster, bench/results_train.md, bench/results_generate.md).
        sizes = [self.n_head * self.head_dim] + 2 * [self.n_kv_head * self.head_dim]
        if T == 1:
            q, k, v = self.c_attn(x).split(sizes, dim=-1)
        else:
            q, k, v = (F.linear(x, w) for w in self.c_attn.weight.split(sizes))
        q = q.view(B, T, self.n_head, self.head_dim)
        k, v = (t.view(B, T, self.n_kv_head, self.head_dim) for t in (k, v))
        if self.config.kv_shift:  # k and v each by itself: the kernels take them contiguous, as they come here
            mix = torch.sigmoid(self.kv_shift_gate(x))[..., None]
            starts = None if cu_seqlens is None else document_starts(cu_seqlens, T)
            previous = (None, None) if cache is None else cache.carry_last_token(k, v)
            k, v = (torch.lerp(t, shift_tokens(t, starts, before), mix) for t, before in zip((k, v), previous))
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotate(q, k, cu_seqlens, cache)
        return (q, k, v) + self.gates(x)

    def rotate(self, q, k, cu_seqlens, cache):
        """q and k with their positions applied (RoPE); decay variants carry position in their gates instead."""
        return q, k

    def gates(self, x):
        """(g, g_scalar): the per-channel log-decay g [B, T, gate heads, D] and the scalar one [B, T, HQ] or None,
        both fp32; (None, None) for a variant that does not decay."""
        return None, None

    def forward(self, x, cu_seqlens=None, cache=None, layout=None):
        """Attention within x (training; layout: kernels.document_layout(cu_seqlens), computed once per batch). With
        `cache` (this layer's, see generate.py), x holds the tokens that follow the cached ones: the cache appends
        them and attends them to everything it holds."""
        B, T, _ = x.shape
        q, k, v, g, g_scalar = self.project(x, cu_seqlens, cache)
        sink_bias = self.sink_bias if self.config.sink else None
        if cache is None:
            y = self.attend(q, k, v, g, g_scalar, sink_bias, cu_seqlens, layout)
        else:
            y = cache.update(q, k, v, g, g_scalar, sink_bias)
        y = y.reshape(B, T, -1)
        if self.config.output_gate:
            y = y * torch.sigmoid(self.out_gate(x))
        return self.c_proj(y)

    def attend(self, q, k, v, g, g_scalar, sink_bias, cu_seqlens=None, layout=None):
        """Causal attention within one chunk of tokens (per document with cu_seqlens), as in training."""
        raise NotImplementedError


class WallAttention(Attention):
    """Wall Attention: a per-channel decay gate per query head (or per kv head), optionally FoX's scalar gate too."""

    def __init__(self, config, window_size):
        super().__init__(config, window_size)
        self.gate_heads = self.n_kv_head if config.gate_per_kv_head else self.n_head
        self.gate = DecayGate(config.n_embd, self.gate_heads * self.head_dim)
        if config.scalar_gate:
            self.scalar_gate = DecayGate(config.n_embd, self.n_head)

    def gates(self, x):
        g = soft_bound(log_gate(self.gate, x).unflatten(-1, (self.gate_heads, self.head_dim)), self.config.g_max)
        return g, log_gate(self.scalar_gate, x) if self.config.scalar_gate else None

    def attend(self, q, k, v, g, g_scalar, sink_bias, cu_seqlens=None, layout=None):
        return wall_attention(self.config.attn_impl, q, k, v, g, g_scalar=g_scalar, sink_bias=sink_bias,
                              window_size=self.window_size, cu_seqlens=cu_seqlens, layout=layout)


class FoxAttention(Attention):
    """The Forgetting Transformer: one scalar forget gate per head. It runs on the Wall kernels with g = 0 (no
    per-channel decay), one zero gate per kv head."""

    def __init__(self, config, window_size):
        super().__init__(config, window_size)
        self.gate_heads = self.n_kv_head
        self.scalar_gate = DecayGate(config.n_embd, self.n_head)

    def gates(self, x):
        B, T, _ = x.shape
        return torch.zeros(B, T, self.n_kv_head, self.head_dim, device=x.device), log_gate(self.scalar_gate, x)

    attend = WallAttention.attend


class RopeAttention(Attention):
    """The RoPE baseline: rotary position embeddings and plain softmax attention, no decay."""

    def rotate(self, q, k, cu_seqlens, cache):
        T = q.shape[1]
        start = 0 if cache is None else cache.length  # RoPE steps are never replayed from a graph
        positions = torch.arange(start, start + T, device=q.device)[None]
        if cu_seqlens is not None:  # positions restart at every document
            positions = positions - cu_seqlens.long()[document_ids(cu_seqlens, T)]
        cos, sin = rotary(positions, self.head_dim, self.config.rope_base)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def attend(self, q, k, v, g, g_scalar, sink_bias, cu_seqlens=None, layout=None):
        return softmax_attention(q, k, v, cu_seqlens, self.window_size, layout)


ATTENTIONS = {'wall': WallAttention, 'fox': FoxAttention, 'rope': RopeAttention}  # GPTConfig.attention


# ----------------------------------------------------------------------------------------------------
# the rest of the transformer

class MLP(nn.Module):  # SwiGLU

    def __init__(self, config):
        super().__init__()
        hidden = 64 * math.ceil(8 * config.n_embd / 3 / 64)  # 8/3 keeps the parameter count of a 4x GELU MLP
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden, bias=False)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=False)

    def forward(self, x):
        gate, up = self.c_fc(x).chunk(2, dim=-1)
        return self.c_proj(F.silu(gate) * up)


class Block(nn.Module):

    def __init__(self, config, window_size):
        super().__init__()
        self.norm_1 = nn.RMSNorm(config.n_embd)
        self.attn = ATTENTIONS[config.attention](config, window_size)
        self.norm_2 = nn.RMSNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, cu_seqlens=None, cache=None, layout=None):
        x = x + self.attn(self.norm_1(x), cu_seqlens, cache, layout)
        return x + self.mlp(self.norm_2(x))


def upcast_logits(x, weight):
    logits = x @ weight.T
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits = x @ weight.T over the rows whose target is not -1.

    The fp32 logits exist one chunk of rows at a time, in forward and again in backward (recomputed
    from the saved per-row logsumexp), never for the whole batch: 64k tokens x 50k vocab would be 13 GB.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_rows):
        valid = targets != -1
        count = valid.sum().clamp(min=1)
        losses, lses = [], []
        for rows in torch.arange(len(x), device=x.device).split(chunk_rows):
            logits = upcast_logits(x[rows], weight)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, targets[rows].clamp(min=0)[:, None])[:, 0]
            losses.append(((lse - picked) * valid[rows]).sum())
            lses.append(lse)
        ctx.save_for_backward(x, weight, targets, torch.cat(lses), count)
        ctx.chunk_rows = chunk_rows
        return torch.stack(losses).sum() / count

    @staticmethod
    def backward(ctx, grad_loss):
        x, weight, targets, lse, count = ctx.saved_tensors
        grad_x, grad_weight = [], torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device)
        for rows in torch.arange(len(x), device=x.device).split(ctx.chunk_rows):
            # d loss / d logits = (softmax - onehot(target)) / count on valid rows, 0 elsewhere
            grad_logits = torch.exp(upcast_logits(x[rows], weight) - lse[rows, None])
            grad_logits.scatter_add_(1, targets[rows].clamp(min=0)[:, None], -torch.ones_like(grad_logits[:, :1]))
            grad_logits = (grad_logits * ((targets[rows] != -1) * grad_loss / count)[:, None]).to(x.dtype)
            grad_x.append(grad_logits @ weight)
            grad_weight += grad_logits.T @ x[rows]
        return torch.cat(grad_x), grad_weight.to(weight.dtype), None, None


def chunked_cross_entropy(x, weight, targets, chunk_rows):
    """x [N, C], weight [V, C], targets [N] with -1 = ignore. Under autocast the matmuls run in its dtype."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    if len(x) <= chunk_rows:  # one chunk: keeping its logits for backward saves recomputing them
        count = (targets != -1).sum().clamp(min=1)
        return F.cross_entropy(upcast_logits(x, weight), targets, ignore_index=-1, reduction='sum') / count
    return ChunkedCrossEntropy.apply(x, weight, targets, chunk_rows)


# peak dense bf16 FLOP/s by substring of torch.cuda.get_device_name(); the first match wins
PEAK_FLOPS = [('H100 PCIe', 756e12), ('H100', 989e12), ('H200', 989e12), ('H800', 989e12), ('B200', 2250e12),
              ('A100', 312e12), ('A800', 312e12), ('L40S', 362e12), ('L4', 121e12), ('A10', 125e12),
              ('RTX 4090', 165e12), ('RTX 3090', 71e12)]


def visible_pairs(doc_len, window_size):
    """Query-key pairs that causal attention with this window computes inside one document."""
    w = doc_len if window_size is None else min(window_size, doc_len)
    return w * (w + 1) // 2 + (doc_len - w) * w


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.windows = [config.window_size if config.window_pattern[i % len(config.window_pattern)] == 'L' else None
                        for i in range(config.n_layer)]
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, w) for w in self.windows)
        self.norm_f = nn.RMSNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith('c_proj.weight'):  # GPT-2: residual branches shrink with depth
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        for module in self.modules():
            if isinstance(module, DecayGate):  # per-channel and scalar gates start nearly open
                torch.nn.init.constant_(module.bias, config.gate_bias_init)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    def get_num_params(self):
        """Parameters that cost FLOPs: the untied input embedding is a lookup, not a matmul."""
        n_params = sum(p.numel() for p in self.parameters())
        return n_params if self.config.tie_embeddings else n_params - self.wte.weight.numel()

    def hidden_states(self, idx, cu_seqlens=None, cache=None):
        """Final-norm features [B, T, n_embd]; the logits are lm_head of these. With a KVCache, idx holds the tokens
        that follow the cached ones, and they are appended to it."""
        B, T = idx.shape
        if cu_seqlens is not None and B != 1:
            raise ValueError(f'cu_seqlens: packed documents need idx of batch 1, got batch {B}')
        if cu_seqlens is not None and cache is not None:
            raise ValueError('cu_seqlens: a cache holds one document per row, so it takes no cu_seqlens')
        if cache is not None:
            cache.check_room(T)
        # the documents on the host, read once for every layer (and its recomputation under checkpointing)
        layout = None if cu_seqlens is None else kernels.document_layout(cu_seqlens)
        x = self.wte(idx)
        for i, block in enumerate(self.blocks):
            if self.config.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, cu_seqlens, layout=layout, use_reentrant=False)
            else:
                x = block(x, cu_seqlens, None if cache is None else cache.layers[i], layout)
        return self.norm_f(x)

    def forward(self, idx, targets=None, cu_seqlens=None, cache=None):
        """Training (targets given): (None, mean loss over targets != -1). Inference: (logits of the last position,
        None); with a KVCache (see hidden_states) that is the logits after the new tokens."""
        x = self.hidden_states(idx, cu_seqlens, cache)
        if targets is None:
            return self.lm_head(x[:, -1:, :]), None
        return None, chunked_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten(),
                                           self.config.loss_chunk_rows)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, gate_lr_scale=None):
        """AdamW. With gate_lr_scale, the decay gates get groups of their own, marked decay_gates, whose lr_scale the
        trainer's schedule multiplies in (0 keeps the gates at gate_bias_init: attention without learned decay, a
        diagnostic); without, they share the other groups, as in checkpoints from before gate_lr_scale."""
        if gate_lr_scale is not None and not gate_lr_scale >= 0:
            raise ValueError(f'gate_lr_scale={gate_lr_scale!r}: expected a number >= 0')
        gate = {id(p) for p in self.decay_gate_parameters()}
        params = [p for p in self.parameters() if p.requires_grad]
        sets = [(1.0, False, params)] if gate_lr_scale is None else [
            (1.0, False, [p for p in params if id(p) not in gate]),
            (gate_lr_scale, True, [p for p in params if id(p) in gate])]
        groups = []
        for scale, gates, members in sets:  # matrices and embeddings decay; norms, biases, sink logits do not
            groups += [dict(params=[p for p in members if p.dim() >= 2], weight_decay=weight_decay, lr_scale=scale,
                            decay_gates=gates),
                       dict(params=[p for p in members if p.dim() < 2], weight_decay=0.0, lr_scale=scale,
                            decay_gates=gates)]
        groups = [g for g in groups if g['params']]
        fused = device_type == 'cuda' and 'fused' in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({'fused': True} if fused else {}))

    def flops(self, doc_lengths):
        """Training FLOPs (forward + backward) for one pass over documents of these lengths: 6 per parameter
        and token, plus 12 per head channel per visible query-key pair in every layer (PaLM's count, causal)."""
        head_dim = self.config.n_embd // self.config.n_head
        pairs = sum(visible_pairs(n, w) for w in self.windows for n in doc_lengths)
        return 6 * self.get_num_params() * sum(doc_lengths) + 12 * self.config.n_head * head_dim * pairs

    def estimate_mfu(self, flops, dt):
        """Model FLOPs utilisation: flops done in dt seconds over the GPU's bf16 peak; None when it is unknown."""
        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name()
        peak = next((peak for key, peak in PEAK_FLOPS if key in name), None)
        return None if peak is None else flops / dt / peak

    def decay_gate_parameters(self):
        """The parameters of every DecayGate: what gate_lr_scale trains at its own rate and inference keeps fp32."""
        return [p for m in self.modules() if isinstance(m, DecayGate) for p in m.parameters()]

    def fp32_parameter_names(self):
        """The parameters that stay fp32 in inference (to_inference_dtype, the HF export): the decay gates', which are
        summed into exponents over the whole context, and the sink logits."""
        keep = {id(p) for p in self.decay_gate_parameters()}
        keep |= {id(block.attn.sink_bias) for block in self.blocks if self.config.sink}
        return [name for name, p in self.named_parameters() if id(p) in keep]

    def to_inference_dtype(self, dtype):
        """Cast the weights to dtype, to run without autocast, all but fp32_parameter_names (as under autocast in
        training)."""
        keep_fp32 = set(self.fp32_parameter_names())
        for name, p in self.named_parameters():
            p.data = p.data.to(torch.float32 if name in keep_fp32 else dtype)
        return self
