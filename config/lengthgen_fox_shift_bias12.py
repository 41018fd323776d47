# Length-generalisation study, second edition: config/lengthgen_fox_shift.py with the forget gates starting at bias
# 12 (a per-step decay of 6e-6, not 3.4e-4), as config/lengthgen_wall_shift_bias12.py starts Wall's: the fair
# comparison for Wall's retrieval at 3x from that start (docs/length_generalization.md).
from config.lengthgen_fox_shift import *  # noqa: F401,F403
gate_bias_init = 12.0
out_dir = 'out/lengthgen_fox_shift_bias12'
wandb_run_name = 'lengthgen_fox_shift_bias12'
