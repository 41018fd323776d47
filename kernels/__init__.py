"""Wall Attention kernels: fused Triton training/prefill and decode passes, and their eager reference."""
from .cache import WallKVCache
from .decode import build_wall_kv_cache, wall_attn_decode
from .parallel import wall_attn
from .reference import wall_attn_reference

__all__ = ['wall_attn', 'wall_attn_reference', 'build_wall_kv_cache', 'wall_attn_decode', 'WallKVCache']
