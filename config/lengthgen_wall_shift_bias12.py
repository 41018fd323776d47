# Length-generalisation study, second edition: config/lengthgen_wall_shift.py with the decay gates starting at bias
# 12 (a per-step decay of 6e-6, not 3.4e-4): in the third calibration it kept half its retrieval at 2x the training
# length, where bias 8 kept none (docs/length_generalization.md).
from config.lengthgen_wall_shift import *  # noqa: F401,F403
gate_bias_init = 12.0
out_dir = 'out/lengthgen_wall_shift_bias12'
wandb_run_name = 'lengthgen_wall_shift_bias12'
