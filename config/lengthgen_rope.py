# Length-generalisation study, RoPE baseline: config/lengthgen_wall.py with rotary embeddings and plain softmax
# attention, nothing else changed.
from config.lengthgen_wall import *  # noqa: F401,F403
attention = 'rope'
out_dir = 'out/lengthgen_rope'
wandb_run_name = 'lengthgen_rope'
