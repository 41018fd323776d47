# Length-generalisation study, second edition: config/lengthgen_wall.py with the key/value shift (model.py's
# kv_shift, the Forgetting Transformer's "Pro" shift), which lets decay models learn lookups (docs/recall.md).
from config.lengthgen_wall import *  # noqa: F401,F403
kv_shift = True
gate_lr_scale = 0.1               # at the common rate the decay gates kept the lookup from forming (docs)
out_dir = 'out/lengthgen_wall_shift'
wandb_run_name = 'lengthgen_wall_shift'
