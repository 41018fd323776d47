# Length-generalisation study, FoX baseline (one scalar forget gate per head, no per-channel decay):
# config/lengthgen_wall.py with this attention, nothing else changed.
from config.lengthgen_wall import *  # noqa: F401,F403
attention = 'fox'
out_dir = 'out/lengthgen_fox'
wandb_run_name = 'lengthgen_fox'
