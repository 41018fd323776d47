"""The gates' domain, `g <= 0` and `g_scalar <= 0`, checked without stalling the GPU on every call.

The kernels are exact inside the domain and clamp exponents at 0, so a positive gate (raw logits passed where
`logsigmoid(logits)` was meant) would silently give other numbers. Each call computes the largest gate on the device
(the forward's prefix kernel reads every gate anyway) and hands it to `check_gates`, which raises a ValueError
naming the input and the value:

- mode 'auto' (the default): at once on CPUs and at the first call on each GPU (one synchronisation); on a GPU
  afterwards without synchronising: the maxima are copied to the host behind the kernels, and the first call
  (or `raise_pending()`) after they have arrived raises, so at the latest at the first call after any
  synchronisation (`loss.item()`, a log line) that follows the bad one.
- mode 'sync': every call synchronises and raises before it returns (the offending call in the traceback).
- mode 'off': no check.

Switch with `kernels.set_gate_check('sync')` or the environment variable WALL_GATE_CHECK=sync. Calls made while a
CUDA graph is being captured are not checked (a capture cannot copy to the host).
"""
import collections
import os

import torch

MODES = ('auto', 'sync', 'off')
_mode = os.environ.get('WALL_GATE_CHECK', 'auto')
_pending = collections.deque()  # (where, names, pinned host maxima, event), oldest first
_checked_devices = set()


def set_gate_check(mode):
    """'auto', 'sync' or 'off': see the module docstring."""
    global _mode
    if mode not in MODES:
        raise ValueError(f'gate check mode must be one of {MODES}, got {mode!r}')
    _mode = mode


def check_gates(where, maxima):
    """maxima: [(name, 0-dim tensor holding the largest value of that input)], all on one device."""
    if _mode not in MODES:
        raise ValueError(f'WALL_GATE_CHECK must be one of {MODES}, got {_mode!r}')
    if _mode == 'off' or not maxima:
        return
    raise_pending()
    names = [name for name, _ in maxima]
    values = torch.stack([m.float() for _, m in maxima])
    device = values.device
    if device.type == 'cuda' and torch.cuda.is_current_stream_capturing():
        return
    if _mode == 'sync' or device.type != 'cuda' or device not in _checked_devices:
        _checked_devices.add(device)
        _raise_if_positive(where, names, values.tolist(), late=False)
        return
    host = torch.empty(values.shape, dtype=torch.float32, pin_memory=True)
    host.copy_(values, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    _pending.append((where, names, host, event))


def raise_pending(wait=False):
    """Raise for an earlier call whose maxima have reached the host (all of them, waiting, when wait=True)."""
    while _pending and (wait or _pending[0][3].query()):
        where, names, host, event = _pending.popleft()
        event.synchronize()
        _raise_if_positive(where, names, host.tolist(), late=True)


def _raise_if_positive(where, names, values, late):
    for name, value in zip(names, values):
        if value > 0:
            _pending.clear()
            when = (' (found after the call returned: the check does not synchronise the GPU; '
                    "kernels.set_gate_check('sync') raises at the offending call)") if late else ''
            raise ValueError(f'{where}: `{name}` must be <= 0, a log-decay such as F.logsigmoid(logits), but its '
                             f'largest value is {value:.6g}{when}')
