# Length-generalisation study, second edition: config/lengthgen_fox.py with the key/value shift (model.py's
# kv_shift, the Forgetting Transformer's "Pro" shift), which lets decay models learn lookups (docs/recall.md).
from config.lengthgen_fox import *  # noqa: F401,F403
kv_shift = True
gate_lr_scale = 0.1               # as config/lengthgen_wall_shift.py's, so both decays learn at one rate
out_dir = 'out/lengthgen_fox_shift'
wandb_run_name = 'lengthgen_fox_shift'
