# The CPU quick start on the Python stdlib corpus (`python data/prepare.py` first): prepare + train + sample in under
# 5 minutes on 2 cores. Wall Attention runs on the eager reference here (attn_impl 'auto' on CPU), which computes a
# document's logits as one product while no channel decays by more than 124 nats over it (late in training a few
# documents decay by up to 135, and their batches take its blocks).
# 580 steps of 2,048 tokens (1.2M tokens, 0.13 epochs): about 0.43 s a step on 2 idle cores.
out_dir = 'out/tiny'
eval_interval = 290
eval_iters = 16                   # 32k validation tokens: 4 batches were a few files and moved by +-0.3
log_interval = 20
tokens_per_batch = 2048
max_doc_len = 256                 # long enough that attention has a context to use
gradient_accumulation_steps = 1
n_layer = 4
n_head = 4
n_kv_head = 2
n_embd = 64                       # head_dim 16: the smallest the decode cache takes
learning_rate = 5e-3
max_iters = 580
warmup_iters = 29
lr_decay_iters = 580
min_lr = 5e-4
device = 'cpu'
dtype = 'float32'
compile = False
