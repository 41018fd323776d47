# Length-generalisation study (docs/length_generalization.md): a 34M-parameter Wall model trained on 4096-token
# documents of the installed-source corpus (python data/prepare.py --source=installed --vocab_size=16384), 30% of
# its tokens synthetic key-value retrieval (data/retrieval.py), 151M tokens. The other lengthgen configs change
# the attention only. One command trains and evaluates it to 16x the training length: bash eval/lengthgen.sh wall
out_dir = 'out/lengthgen_wall'
wandb_run_name = 'lengthgen_wall'
eval_interval = 500
eval_iters = 16                   # 1M validation tokens
log_interval = 50
always_save_checkpoint = True     # the comparison uses the models at the end of the same number of tokens
data_dir = 'data/installed'
tokens_per_batch = 65536
max_doc_len = 4096
retrieval_mix = 0.3               # 0.1 taught a study model no retrieval; 0.3 taught a small one (docs)
gradient_accumulation_steps = 1
max_iters = 2300                  # 2300 x 65536 = 151M tokens
lr_decay_iters = 2300
warmup_iters = 100
learning_rate = 1.5e-3
min_lr = 1.5e-4
n_layer = 8
n_embd = 512
n_head = 8
n_kv_head = 8
attention = 'wall'
compile = True
