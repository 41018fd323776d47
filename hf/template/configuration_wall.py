"""The Hugging Face config of an exported Wall model (written by the wall-gpt repository's hf/export.py).

`model_args` is the checkpoint's GPTConfig, field for field, as train.py saved it; the other fields are the names
transformers and lm-eval read. `max_position_embeddings` is the context the export was made for (what lm-eval
takes as the model's length), not a limit: Wall Attention has no position embeddings.
"""
from transformers import PretrainedConfig


class WallConfig(PretrainedConfig):
    model_type = 'wall_gpt'

    def __init__(self, model_args=None, vocab_size=None, hidden_size=None, num_hidden_layers=None,
                 num_attention_heads=None, num_key_value_heads=None, max_position_embeddings=4096,
                 prefill_chunk=None, training=None, **kwargs):
        self.model_args = dict(model_args or {})
        self.vocab_size = vocab_size if vocab_size is not None else self.model_args.get('vocab_size')
        self.hidden_size = hidden_size if hidden_size is not None else self.model_args.get('n_embd')
        self.num_hidden_layers = num_hidden_layers if num_hidden_layers is not None else self.model_args.get('n_layer')
        self.num_attention_heads = (num_attention_heads if num_attention_heads is not None
                                    else self.model_args.get('n_head'))
        self.num_key_value_heads = (num_key_value_heads if num_key_value_heads is not None
                                    else self.model_args.get('n_kv_head'))
        self.max_position_embeddings = max_position_embeddings
        self.prefill_chunk = prefill_chunk  # prompt tokens per prefill forward; None: sample.py's default
        self.training = training or {}  # train.py's iter_num, best_val_loss and config, for the record
        kwargs.setdefault('tie_word_embeddings', self.model_args.get('tie_embeddings', True))
        super().__init__(**kwargs)
