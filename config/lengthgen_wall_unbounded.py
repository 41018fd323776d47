# Length-generalisation study, Wall variant: config/lengthgen_wall.py without the gates' soft bound (g_max = 0, the
# method's first published design). Chosen because the study's Wall model pushed its sharpest gates against the
# bound (-0.86 per step) in every layer and learned no retrieval where RoPE did (docs/length_generalization.md):
# this run asks whether faster forgetting is what it lacked. The kernels stay exact on steep gates, more slowly.
from config.lengthgen_wall import *  # noqa: F401,F403
g_max = 0.0
out_dir = 'out/lengthgen_wall_unbounded'
wandb_run_name = 'lengthgen_wall_unbounded'
