# A CPU smoke run on the Python stdlib corpus (`python data/prepare.py` first): a few minutes on 2 cores.
# Wall Attention runs on the eager reference here (attn_impl 'auto' on CPU); documents are cut into 64-token
# pieces because the reference's cost grows with the square of the document length.
out_dir = 'out/tiny'
eval_interval = 60
eval_iters = 4
log_interval = 10
tokens_per_batch = 1024
max_doc_len = 64
gradient_accumulation_steps = 1
n_layer = 4
n_head = 4
n_kv_head = 2
n_embd = 64
learning_rate = 2e-3
max_iters = 120
warmup_iters = 10
lr_decay_iters = 120
min_lr = 2e-4
device = 'cpu'
dtype = 'float32'
compile = False
