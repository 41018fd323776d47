# Issue 6, length generalisation: train on 2048-token documents of the default corpus (`python data/prepare.py`),
# then evaluate far past 2048 (eval/length.py, eval/niah.py). config/lengthgen_rope.py and config/lengthgen_fox.py
# take everything from here but the attention. About 35M tokens (4 passes over the 8.8M-token corpus) through a
# ~30M-parameter model: a few minutes on one H100.  python train.py config/lengthgen_wall.py
out_dir = 'out/lengthgen_wall'
wandb_run_name = 'lengthgen_wall'
eval_interval = 100
eval_iters = 8                    # the whole validation split at 64k tokens per batch
log_interval = 10
always_save_checkpoint = True     # the comparison uses the models at the end of the same number of tokens
data_dir = 'data/pystdlib'
tokens_per_batch = 65536
max_doc_len = 2048
gradient_accumulation_steps = 1
max_iters = 540
lr_decay_iters = 540
warmup_iters = 50
learning_rate = 1.5e-3
min_lr = 1.5e-4
n_layer = 8
n_embd = 512
n_head = 8
n_kv_head = 8
attention = 'wall'
compile = True
