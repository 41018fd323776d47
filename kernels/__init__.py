"""Wall Attention kernels: fused Triton training/prefill and decode passes, and their eager reference."""
from .reference import wall_attn_reference

__all__ = ['wall_attn_reference']
