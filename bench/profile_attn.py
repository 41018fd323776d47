"""Where the time goes: CUDA kernel times of forward+backward of `wall_attn`, and the PyTorch operators around them.

    python -m bench.profile_attn [--B 2 --T 8192 --HQ 16 --H 16 --K 128]
"""
import argparse

import torch
import torch.nn.functional as F

from kernels import wall_attn

parser = argparse.ArgumentParser()
for name, default in (('B', 2), ('T', 8192), ('HQ', 16), ('H', 16), ('K', 128)):
    parser.add_argument(f'--{name}', type=int, default=default)
args = parser.parse_args()
bf16 = dict(device='cuda', dtype=torch.bfloat16, requires_grad=True)
q = torch.randn(args.B, args.T, args.HQ, args.K, **bf16)
k, v = (torch.randn(args.B, args.T, args.H, args.K, **bf16) for _ in range(2))
g = F.logsigmoid(4 + torch.randn(args.B, args.T, args.HQ, args.K, device='cuda')).requires_grad_()
do = torch.randn_like(q)
for _ in range(3):
    wall_attn(q, k, v, g).backward(do)
torch.cuda.synchronize()
activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
    for _ in range(5):
        wall_attn(q, k, v, g).backward(do)
    torch.cuda.synchronize()
# kernels by their own time, then the PyTorch operators (with input shapes) that launched the non-Triton ones
print(prof.key_averages().table(sort_by='self_cuda_time_total', row_limit=25, max_name_column_width=60))
print(prof.key_averages(group_by_input_shape=True).table(sort_by='cuda_time_total', row_limit=40,
                                                         max_name_column_width=40, max_shapes_column_width=70))
