"""Wall Attention kernels: fused Triton training/prefill and decode passes, and their eager reference."""
import os
import sys

import torch

# Without a GPU the Triton kernels run in Triton's interpreter, which must be chosen before triton is imported:
# triton decorates its own library functions (tl.cumsum, ...) at import.
if not torch.cuda.is_available():
    if 'triton' in sys.modules and os.environ.get('TRITON_INTERPRET') != '1':
        raise ImportError('triton was imported before `kernels` on a machine without a GPU, so its kernels cannot '
                          'run in the interpreter: import kernels (or model) first, or set TRITON_INTERPRET=1')
    os.environ['TRITON_INTERPRET'] = '1'

from .cache import WallKVCache  # noqa: E402
from .decode import build_wall_kv_cache, wall_attn_decode  # noqa: E402
from .documents import DocumentLayout, document_layout  # noqa: E402
from .domain import set_gate_check  # noqa: E402
from .parallel import wall_attn  # noqa: E402
from .reference import wall_attn_decode_reference, wall_attn_reference  # noqa: E402

__all__ = ['wall_attn', 'wall_attn_reference', 'build_wall_kv_cache', 'wall_attn_decode', 'WallKVCache',
           'wall_attn_decode_reference', 'set_gate_check', 'document_layout', 'DocumentLayout']
