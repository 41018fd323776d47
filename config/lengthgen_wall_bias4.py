# Length-generalisation variant: config/lengthgen_wall.py with the per-channel gates starting closed enough to
# decay from the first step (logsigmoid(4) = -0.018 nats per step, instead of -3e-4 at the default bias 8): 540
# steps of AdamW barely move a bias of 8, so the default model may never learn much decay at this budget.
from config.lengthgen_wall import *  # noqa: F401,F403
gate_bias_init = 4.0
out_dir = 'out/lengthgen_wall_bias4'
wandb_run_name = 'lengthgen_wall_bias4'
