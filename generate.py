"""
Cached decoding for model.py's GPT: one cache per layer, a decode step that replays as a CUDA graph, sampling.

    cache = KVCache(model, batch_size, max_len)
    logits = prefill(model, idx, cache)                      # the prompt, into the cache
    for token in decode(model, logits, cache, 100): ...      # one token per step (DecodeStep)

The engine imports the model's code, never the reverse: model.py knows only that a layer cache, when given, has
`update`.

Every layer cache has one method that attention calls, `update(q, k, v, g, g_scalar, sink_bias)`: it appends the
new tokens and returns their attention output over everything cached. Wall and FoX layers keep kernels.WallKVCache's
chunk-anchored keys (FoX with g = 0 and its scalar gate); RoPE layers keep plain keys and values (StaticKVCache).
With the key/value shift, attention also calls `carry_last_token` (LayerCache), which hands it the raw k and v of
the token before the new ones.
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import kernels
from model import FoxAttention, RopeAttention, WallAttention

APPEND_ROWS = 1024  # tokens per append of a prefill: bounds the float64 prefixes a Wall cache keeps for raw rows
# Query rows x query heads per gate head in one call of the decode kernel: 16 is its smallest tile, so 16 rows cost
# what one does, and its registers grow with more. RoPE takes as many query rows per masked SDPA call.
ATTEND_ROWS = 16


def row_pieces(n, largest):
    """Cover rows [0, n) with slices of power-of-two lengths <= largest, longest first. The decode kernel is
    compiled once per number of query rows: this keeps that to a handful of variants."""
    start = 0
    while start < n:
        size = min(largest, 1 << (n - start).bit_length() - 1)
        yield slice(start, start + size)
        start += size


def take_rows(tensors, rows):
    return [None if t is None else t[:, rows] for t in tensors]


class LayerCache:
    """The protocol of one layer's cache, and what every layer cache shares.

    Attention calls `update(q, k, v, g, g_scalar, sink_bias)` (append the new tokens, return their attention output)
    and, with the key/value shift, `carry_last_token`. The engine reads `length` (tokens cached, on the host) and
    `position` (the same on the device, which a replayed step reads), calls `advance(n)` after n replayed steps and
    `reset()` to forget every sequence. `replayable`: whether a decode step can replay from a CUDA graph. Subclasses
    are built as `(attn, batch_size, max_len, chunk_size, dtype, device)`."""
    replayable = True

    def __init__(self, attn, batch_size, device):
        self.window_size, self.attend_fresh = attn.window_size, attn.attend
        shape = (2, batch_size, 1, attn.n_kv_head, attn.head_dim)  # k and v
        # fp32 holds any model dtype's k and v exactly; on the device, so that a replayed decode step updates it
        self.last_token = torch.zeros(shape, device=device) if attn.config.kv_shift else None

    def carry_last_token(self, k, v):
        """The last cached token's raw k and v, each [B, 1, H, D] (zeros in an empty cache); keeps those of the new
        tokens k, v [B, T, H, D] in their place."""
        previous = self.last_token.clone()
        self.last_token[0].copy_(k[:, -1:])
        self.last_token[1].copy_(v[:, -1:])
        return previous.unbind(0)

    def forget_last_token(self):
        if self.last_token is not None:
            self.last_token.zero_()


class WallLayerCache(LayerCache, kernels.WallKVCache):
    """The cache of one Wall or FoX layer (`attn`, a model.Attention): FoX keeps the same cache with g = 0, its keys
    stay raw and the scalar gate decays."""

    def __init__(self, attn, batch_size, max_len, chunk_size, dtype, device):
        LayerCache.__init__(self, attn, batch_size, device)
        # Wall keys are never fp16 (a key may grow by its chunk's decay, docs/operator.md): an fp16 model keeps them
        # in fp32, which holds its keys and values exactly
        kernels.WallKVCache.__init__(self, batch_size, max_len, attn.n_head, attn.n_kv_head, attn.head_dim,
                                     shared_gate=attn.gate_heads == attn.n_kv_head,
                                     scalar_gate=hasattr(attn, 'scalar_gate'), chunk_size=chunk_size,
                                     dtype=torch.float32 if dtype == torch.float16 else dtype, device=device)

    def reset(self):
        kernels.WallKVCache.reset(self)
        self.forget_last_token()

    def update(self, q, k, v, g, g_scalar, sink_bias):
        """Append T new tokens (k, v [B, T, H, D] and their gates); their queries q [B, T, HQ, D] attend to the
        cache, themselves included: returns [B, T, HQ, D]."""
        if not self.length:  # into an empty cache, the chunk attends as in training (fused kernel) first
            y = self.attend_fresh(q, k, v, g, g_scalar, sink_bias)
            for rows in row_pieces(q.shape[1], APPEND_ROWS):
                self.append(*take_rows((k, v, g, g_scalar), rows))
            return y
        if q.shape[1] == 1:  # a decode step: every index on the device, so a CUDA graph replays it
            # index_copy_ does not cast as append's slice assignment does: an fp16 model has an fp32 cache
            self.append_token(k.to(self.k_tilde.dtype), v.to(self.v.dtype), g, g_scalar)
            return self.attend_token(q, sink_bias=sink_bias, window_size=self.window_size)[0]
        # Long chunks go in pieces of ATTEND_ROWS; each piece sees its own keys exactly (causally, with their decay)
        ys = []
        for rows in row_pieces(q.shape[1], max(1, ATTEND_ROWS * self.num_gate_heads // self.num_heads)):
            self.append(*take_rows((k, v, g, g_scalar), rows))
            ys.append(self.attend(q[:, rows], sink_bias=sink_bias, window_size=self.window_size)[0])
        return ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)


DECODE_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def cached_sdpa(q, k, v, mask):
    """SDPA of q [B, T_q, HQ, D] over cached k, v [B, T, H, D]. enable_gqa only under GQA: with it, a masked call on
    the GPU falls back to the math backend. No cuDNN: it builds a new graph for every new cache length."""
    with sdpa_kernel(DECODE_SDPA_BACKENDS):
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                           enable_gqa=q.shape[2] != k.shape[2])
    return y.transpose(1, 2)


class StaticKVCache(LayerCache):
    """Keys and values of one RoPE layer in preallocated buffers [B, max_len, H, D], attended with SDPA.

    Its steps are not replayed from a CUDA graph: SDPA's FlashAttention takes the cache length from the shape of the
    keys it is given, and the kernels that could take it from the device (a mask over the whole buffer) are many
    times slower (bench/results_generate.md)."""
    replayable = False

    def __init__(self, attn, batch_size, max_len, chunk_size, dtype, device):
        super().__init__(attn, batch_size, device)
        self.k = torch.empty(batch_size, max_len, attn.n_kv_head, attn.head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.position = torch.zeros(1, dtype=torch.long, device=device)  # `length` on the device, as WallKVCache's
        self.length = 0

    def reset(self):
        self.length = 0
        self.position.zero_()
        self.forget_last_token()

    def update(self, q, k, v, g=None, g_scalar=None, sink_bias=None):
        """WallLayerCache.update for RoPE (no gates, no sink): q [B, T, HQ, D] rotated, k and v [B, T, H, D]."""
        if not self.length:
            y = self.attend_fresh(q, k, v, g, g_scalar, sink_bias)
            for rows in row_pieces(q.shape[1], APPEND_ROWS):
                self.append(k[:, rows], v[:, rows])
            return y
        ys = []
        for rows in row_pieces(q.shape[1], ATTEND_ROWS):
            self.append(k[:, rows], v[:, rows])
            ys.append(self.attend(q[:, rows], window_size=self.window_size))
        return ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)

    def append(self, k, v):
        start, self.length = self.length, self.length + k.shape[1]
        self.k[:, start:self.length] = k
        self.v[:, start:self.length] = v
        self.position.fill_(self.length)

    def attend(self, q, window_size=None):
        """Attend the last T_q cached positions, q [B, T_q, HQ, D], causally to the cache."""
        T_q, end = q.shape[1], self.length
        lo = 0 if window_size is None else max(0, end - T_q - window_size + 1)
        mask = None
        if T_q > 1:  # a single query sees every key from lo on; several need the causal (and window) rule
            i = torch.arange(end - T_q, end, device=q.device)[:, None]
            j = torch.arange(lo, end, device=q.device)[None, :]
            mask = (j <= i) & (i - j < (window_size or end))
        return cached_sdpa(q, self.k[:, lo:end], self.v[:, lo:end], mask)


LAYER_CACHES = {WallAttention: WallLayerCache, FoxAttention: WallLayerCache, RopeAttention: StaticKVCache}


class KVCache:
    """Decoding state of a GPT for batch_size sequences of at most max_len tokens: one cache per layer, in `layers`,
    of the class LAYER_CACHES gives its attention. The cache dtype defaults to the model's."""

    def __init__(self, model, batch_size, max_len, *, dtype=None, device=None, chunk_size=64):
        dtype = dtype or model.lm_head.weight.dtype
        device = device or model.lm_head.weight.device
        self.max_len = max_len
        self.layers = [LAYER_CACHES[type(block.attn)](block.attn, batch_size, max_len, chunk_size, dtype, device)
                       for block in model.blocks]
        self.replayable = all(layer.replayable for layer in self.layers)  # whether a decode step can be a graph

    @property
    def length(self):
        return self.layers[0].length

    def check_room(self, n):
        if self.length + n > self.max_len:
            raise ValueError(f'{n} new tokens after the {self.length} cached exceed the cache (max_len={self.max_len})')

    @property
    def position(self):
        """The length as a device tensor [1]: what a replayed decode step reads instead of `length`."""
        return self.layers[0].position

    def advance(self, n):
        """Move the host's view of every layer on by n single-token steps that ran on the device."""
        for layer in self.layers:
            layer.advance(n)

    def reset(self):
        for layer in self.layers:
            layer.reset()


class DecodeStep:
    """The forward of one new token per sequence against a KVCache, returning its logits [B, 1, vocab].

    On a GPU the first call runs eagerly (compiling kernels, and bringing the cache to its steady state), the second
    captures the step in a CUDA graph, and every later call replays it: an eager step of a small model at batch 1 is
    bound by Python and kernel launches. Every position the step uses is read from the device (KVCache.position), so
    one graph serves every step; the host's view is advanced after each replay. RoPE steps run eagerly
    (StaticKVCache says why).
    """

    def __init__(self, model, cache, cuda_graph=True):
        self.model, self.cache, self.cuda_graph = model, cache, cuda_graph
        self.graph, self.calls = None, 0

    def __call__(self, idx):
        self.cache.check_room(idx.shape[1])  # a replay runs no Python of the model's: check here
        self.calls += 1
        if not (idx.is_cuda and self.cuda_graph and self.cache.replayable):
            return self.model(idx, cache=self.cache)[0]
        if self.calls == 1:  # warm up on a side stream, as CUDA graph capture asks
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                logits = self.model(idx, cache=self.cache)[0]
            torch.cuda.current_stream().wait_stream(side)
            return logits
        if self.graph is None:
            self.idx = idx.clone()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self.model(self.idx, cache=self.cache)[0]
            self.cache.advance(-1)  # the capture ran the host's bookkeeping but none of the kernels
        self.idx.copy_(idx)
        self.graph.replay()
        self.cache.advance(1)
        return self.logits


def sample_next(logits, temperature=1.0, top_k=None):
    """One token [B, 1] per row of logits [B, vocab]: the argmax when temperature == 0, else a sample from
    softmax(logits / temperature) restricted to the top_k most likely tokens."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float('inf')
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)


@torch.no_grad()
def prefill(model, idx, cache, chunk_size=None):
    """Append idx [B, T] (T >= 1) to cache, chunk_size tokens per forward (default: all at once); returns the logits
    [B, 1, vocab] after its last token. The first chunk into an empty cache runs the training kernel."""
    if idx.dim() != 2 or idx.shape[1] < 1:
        raise ValueError(f'idx: prefill expects [B, T] with T >= 1, got shape {tuple(idx.shape)}')
    chunk_size = chunk_size or idx.shape[1]
    for start in range(0, idx.shape[1], chunk_size):
        logits, _ = model(idx[:, start:start + chunk_size], cache=cache)
    return logits


@torch.no_grad()
def decode(model, logits, cache, max_new_tokens, temperature=1.0, top_k=None, cuda_graph=True):
    """Yield max_new_tokens tokens [B, 1], sampled one at a time starting from `logits` (of the last cached position,
    e.g. from prefill); each yielded token but the last is then appended to the cache. On a GPU Wall and FoX steps
    replay a CUDA graph unless cuda_graph=False."""
    step = DecodeStep(model, cache, cuda_graph)
    for i in range(max_new_tokens):
        idx_next = sample_next(logits[:, -1, :], temperature, top_k)
        yield idx_next
        if i < max_new_tokens - 1:
            logits = step(idx_next)


@torch.no_grad()
def generate_uncached(model, idx, max_new_tokens, temperature=1.0, top_k=None):
    """Append max_new_tokens sampled tokens to idx [B, T], recomputing the whole context every step: the oracle that
    cached decoding is tested against."""
    for _ in range(max_new_tokens):
        logits, _ = model(idx)
        idx = torch.cat((idx, sample_next(logits[:, -1, :], temperature, top_k)), dim=1)
    return idx
