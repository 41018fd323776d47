# Length-generalisation study, Wall variant: config/lengthgen_wall.py plus FoX's scalar forget gate on top of the
# per-channel decay. Chosen from the first, smaller study, where it was the Wall model closest to FoX past the
# training length (docs/length_generalization.md, first study).
from config.lengthgen_wall import *  # noqa: F401,F403
scalar_gate = True
out_dir = 'out/lengthgen_wall_scalar'
wandb_run_name = 'lengthgen_wall_scalar'
