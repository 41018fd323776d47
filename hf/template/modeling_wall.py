"""A Wall Attention GPT as a transformers model (written by the wall-gpt repository's hf/export.py).

The model itself is wall_model.py (the repository's model.py), decoding is wall_generate.py (its generate.py) and the
attention kernels are wall_kernels*.py (its kernels/), copied at export time; this file only adapts them:

- forward: logits for every position. With an attention_mask, the rows' unpadded tokens are packed into one
  sequence of documents (cu_seqlens), so padding is never attended and each row gets the logits it gets alone;
  a row's ones must be one run (left or right padding).
- generate: the prompt is prefilled into the Wall cache and tokens are decoded one at a time against it, as the
  repository's sample.py does (cost per token independent of the context; CUDA graphs on a GPU). Rows of different
  lengths get a cache each per length, stepped together.
- dtype: under bf16/fp16 the decay gates and sink logits stay fp32, as model.to_inference_dtype keeps them.
"""
import copy
import os
import re

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

# transformers has imported triton (through torch._dynamo) by now, and wall_kernels.py (the repository's
# kernels/__init__.py) refuses to load on a machine without a GPU unless Triton's interpreter was chosen, as its
# tests and scripts do before importing triton. Without a GPU the model runs the eager references and never
# launches a Triton kernel (attn_impl 'auto'), and compiled Triton kernels cannot run there anyway: choose it.
if not torch.cuda.is_available():
    os.environ['TRITON_INTERPRET'] = '1'

from .configuration_wall import WallConfig  # noqa: E402
from .wall_generate import KVCache, decode, prefill  # noqa: E402
from .wall_model import GPT, GPTConfig  # noqa: E402

# generation settings the Wall decoder implements; others are refused unless they are at their defaults
UNSUPPORTED = {'num_beams': 1, 'num_return_sequences': 1, 'top_p': 1.0, 'min_p': None, 'typical_p': 1.0,
               'repetition_penalty': 1.0, 'no_repeat_ngram_size': 0, 'min_new_tokens': 0, 'min_length': 0,
               'output_scores': False, 'output_logits': False, 'return_dict_in_generate': False,
               'num_beam_groups': 1, 'penalty_alpha': None, 'assistant_model': None, 'bad_words_ids': None}


def gpt_config(config):
    """The GPTConfig of config.model_args, or a one-line ValueError naming what this folder's model cannot build."""
    args = dict(config.model_args)
    unknown = sorted(set(args) - set(GPTConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f'config.json: model_args {", ".join(unknown)} unknown to this folder\'s wall_model.py: the '
                         f'checkpoint comes from another version of the model; export it again with its own')
    try:
        return GPTConfig(**(args | {'attn_impl': 'auto'}))
    except (TypeError, ValueError) as e:
        raise ValueError(f'config.json: model_args: {e}') from None


def rows_of(attention_mask):
    """(mask as bool [B, T], tokens per row [B]), after checking that each row's ones are one run."""
    mask = attention_mask.bool()
    lengths = mask.sum(1)
    positions = torch.arange(mask.shape[1], device=mask.device)
    start = torch.where(lengths > 0, mask.int().argmax(1), 0)
    run = (positions >= start[:, None]) & (positions < (start + lengths)[:, None])
    if not torch.equal(run, mask):
        row = int((run != mask).any(1).nonzero()[0])
        raise ValueError(f'attention_mask: row {row} has padding between its tokens; only left or right padding '
                         f'(one run of ones per row) is supported')
    return mask, lengths


class WallForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = WallConfig
    base_model_prefix = 'model'
    main_input_name = 'input_ids'
    _no_split_modules = ['Block']
    _tied_weights_keys = {'model.wte.weight': 'model.lm_head.weight'}  # GPT ties them itself; the file has lm_head

    def __init__(self, config):
        super().__init__(config)
        self.model = GPT(gpt_config(config))
        # what to_inference_dtype keeps fp32, by exact name, so that from_pretrained loads it fp32 under bf16/fp16
        self._keep_in_fp32_modules_strict = [re.escape(name) + '$' for name in self.model.fp32_parameter_names()]
        # created in the dtype being loaded: the gates and sinks fp32 as in model.to_inference_dtype
        self.model.to_inference_dtype(self.model.lm_head.weight.dtype)
        if not config.tie_word_embeddings:
            self._tied_weights_keys = {}
        self.post_init()

    def _init_weights(self, module):
        pass  # GPT initialises itself, and every weight is in model.safetensors

    def set_use_kernels(self, use_kernels, *args, **kwargs):
        """Never kernelized: the Hub's `kernels` replace none of these layers (the attention is this folder's
        wall_kernels), and from_pretrained then never imports a package of that name, which may be another one."""
        return super().set_use_kernels(False, *args, **kwargs)

    def get_input_embeddings(self):
        return self.model.wte

    def get_output_embeddings(self):
        return self.model.lm_head

    def features(self, input_ids, attention_mask=None):
        """Final-norm features [B, T, C]; padded positions (attention_mask 0) get zeros."""
        if attention_mask is None or bool(attention_mask.all()):
            return self.model.hidden_states(input_ids)
        mask, lengths = rows_of(attention_mask)
        out = torch.zeros(*input_ids.shape, self.config.hidden_size, dtype=self.model.lm_head.weight.dtype,
                          device=input_ids.device)
        if int(lengths.sum()) == 0:
            return out
        cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)  # the rows as documents of one sequence
        out[mask] = self.model.hidden_states(input_ids[mask][None], cu_seqlens=cu_seqlens)[0].to(out.dtype)
        return out

    def forward(self, input_ids=None, attention_mask=None, cache=None, labels=None, use_cache=None,
                logits_to_keep=0, return_dict=None, past_key_values=None, **kwargs):
        """Logits [B, T, vocab] (the last logits_to_keep positions when > 0), and the mean next-token loss when
        labels are given (-100 ignored, shifted here). cache (or past_key_values, its older name): a
        wall_generate.KVCache (new_cache) that input_ids follow and are appended to; without one, nothing is cached
        (use_cache is ignored)."""
        past_key_values = cache if cache is not None else past_key_values
        if input_ids is None:
            raise ValueError('input_ids: required (inputs_embeds are not supported)')
        if past_key_values is not None:
            if attention_mask is not None and not bool(attention_mask.all()):
                raise ValueError('attention_mask: padding cannot be masked in a cache; decode rows of different '
                                 'lengths with generate()')
            features = self.model.hidden_states(input_ids, cache=past_key_values)
        else:
            features = self.features(input_ids, attention_mask)
        logits = self.model.lm_head(features[:, -logits_to_keep:] if logits_to_keep else features)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def new_cache(self, batch_size, max_len, chunk_size=64):
        """A Wall decoding cache for batch_size rows of at most max_len tokens, to pass as `cache` to forward."""
        return KVCache(self.model, batch_size, max_len, chunk_size=chunk_size)

    def prefill_chunk(self, device):
        """Prompt tokens per prefill forward: sample.py's default unless config.prefill_chunk says otherwise."""
        return self.config.prefill_chunk or (65536 if device.type == 'cuda' else 4096)

    def settings(self, generation_config, kwargs):
        """The generation config that generate() runs with: the model's, updated by generation_config and the
        keyword arguments; unsupported settings are refused with a one-line error."""
        config = copy.deepcopy(generation_config or self.generation_config or GenerationConfig())
        explicit = {k: v for k, v in kwargs.items() if v is not None}
        if 'max_length' in explicit and 'max_new_tokens' not in explicit:
            config.max_new_tokens = None  # an explicit max_length (lm-eval's way) wins over the file's default
        unused = config.update(**explicit)
        for key in sorted(unused):
            if key not in ('use_cache',):
                raise ValueError(f'generate: {key}={unused[key]!r} is not supported by the Wall decoder')
        for key, default in UNSUPPORTED.items():
            value = getattr(config, key, default)
            if value is not None and value != default:
                raise ValueError(f'generate: {key}={value!r} is not supported by the Wall decoder')
        return config

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, generation_config=None, stopping_criteria=None,
                 streamer=None, cuda_graph=True, **kwargs):
        """input_ids [B, T] followed by new tokens [B, T + n]: greedy (do_sample=False) or sampled with temperature
        and top_k, until max_new_tokens (or max_length), eos_token_id in every row or the stopping criteria. Rows
        that end early are filled with pad_token_id. Padding (attention_mask 0) may be on either side; the new
        tokens follow position T."""
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError('input_ids: generate expects a [batch, length] tensor of token ids')
        config = self.settings(generation_config, kwargs)
        B, T = input_ids.shape
        new = config.max_new_tokens if config.max_new_tokens is not None else (config.max_length or 20) - T
        out = input_ids.new_full((B, T + max(new, 0)), config.pad_token_id if config.pad_token_id is not None
                                 else 0)
        out[:, :T] = input_ids
        if new <= 0:
            return out[:, :T]
        mask, lengths = rows_of(attention_mask if attention_mask is not None else torch.ones_like(input_ids))
        if int(lengths.min()) == 0:
            raise ValueError(f'attention_mask: row {int((lengths == 0).nonzero()[0])} has no tokens to continue')
        eos = config.eos_token_id
        eos = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos), device=out.device)
        temperature = float(config.temperature or 1.0) if config.do_sample else 0.0
        top_k = config.top_k if config.do_sample and config.top_k else None
        chunk = self.prefill_chunk(input_ids.device)

        # rows of one length share a cache: the prompt is prefilled, then decode() yields a token per step
        groups = []
        for length in sorted(set(lengths.tolist())):
            rows = (lengths == length).nonzero()[:, 0]
            prompt = input_ids[rows][mask[rows]].view(len(rows), length)
            cache = KVCache(self.model, len(rows), length + new)
            logits = prefill(self.model, prompt, cache, chunk)
            groups.append((rows, decode(self.model, logits, cache, new, temperature, top_k, cuda_graph)))
        if streamer is not None:
            streamer.put(input_ids.cpu())
        done = torch.zeros(B, dtype=torch.bool, device=out.device)
        for step in range(new):
            for rows, tokens in groups:
                token = next(tokens)[:, 0]
                out[rows, T + step] = torch.where(done[rows], out[rows, T + step], token)
            if streamer is not None:
                streamer.put(out[:, T + step].cpu())
            done |= torch.isin(out[:, T + step], eos) & ~done
            if stopping_criteria is not None:
                stop = stopping_criteria(out[:, :T + step + 1], None)
                done |= torch.as_tensor(stop, device=out.device).bool()
            if bool(done.all()):
                out = out[:, :T + step + 1]
                break
        if streamer is not None:
            streamer.end()
        return out
