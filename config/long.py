# A long-context pretraining run: a ~120M-parameter Wall Attention GPT on PG-19 books, documents up to 16k
# tokens packed into 64k-token micro-batches. One GPU: python train.py config/long.py; a node of 8:
# torchrun --standalone --nproc_per_node=8 train.py config/long.py (the same 512k tokens per step either way).
# Data first (needs the Hugging Face Hub; ~20k books, about 2B tokens, held in memory while preparing):
#   python data/prepare.py --source=emozilla/pg19 --out=data/pg19 --vocab_size=32768 --max_docs=20000
out_dir = 'out/long'
eval_interval = 500
eval_iters = 32
log_interval = 10
wandb_run_name = 'long'
data_dir = 'data/pg19'
tokens_per_batch = 65536
max_doc_len = 16384
gradient_accumulation_steps = 8
# 5000 steps x 512k tokens = 2.6B tokens, about 20 per parameter, a little over one pass over the books
max_iters = 5000
lr_decay_iters = 5000
warmup_iters = 200
learning_rate = 6e-4
min_lr = 6e-5
# 12 layers of width 768 as GPT-2 small; 128-channel heads, the shape the attention kernels are tuned for
n_layer = 12
n_embd = 768
n_head = 6
n_kv_head = 6
attention = 'wall'
compile = True
