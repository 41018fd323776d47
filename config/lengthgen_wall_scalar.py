# Length-generalisation variant: config/lengthgen_wall.py plus FoX's scalar forget gate on top of the per-channel
# decay (the method's optional scalar gate), nothing else changed.
from config.lengthgen_wall import *  # noqa: F401,F403
scalar_gate = True
out_dir = 'out/lengthgen_wall_scalar'
wandb_run_name = 'lengthgen_wall_scalar'
