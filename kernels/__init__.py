"""Wall Attention kernels: fused Triton training/prefill and decode passes, and their eager reference."""
import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter, which must be chosen before they are decorated.
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')

from .cache import WallKVCache  # noqa: E402
from .decode import build_wall_kv_cache, wall_attn_decode  # noqa: E402
from .parallel import wall_attn  # noqa: E402
from .reference import wall_attn_reference  # noqa: E402

__all__ = ['wall_attn', 'wall_attn_reference', 'build_wall_kv_cache', 'wall_attn_decode', 'WallKVCache']
