"""Test setup: Triton's CPU interpreter when there is no GPU, IEEE fp32 dots, NaN-filled fresh tensors, and the
fixtures several test files share."""
import os

import numpy as np
import torch

if not torch.cuda.is_available():
    # Must be set before triton decorates any kernel, i.e. before `kernels` is imported.
    os.environ.setdefault('TRITON_INTERPRET', '1')
# TF32 dots hide and cause errors in decay arithmetic: compare in true fp32.
os.environ.setdefault('TRITON_F32_DEFAULT', 'ieee')
torch.backends.cuda.matmul.allow_tf32 = False

import pytest  # noqa: E402

from data.prepare import main as prepare_main  # noqa: E402

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'


def exit_message(main, argv):
    """The message of the SystemExit that main(argv) raises, checked to be one line that starts with 'error: '."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    message = str(e.value)
    assert message.startswith('error: ') and '\n' not in message
    return message


def pytest_configure(config):
    config.addinivalue_line('markers', 'gpu: needs a CUDA GPU (run with `pytest -m gpu` on a GPU machine)')


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs a CUDA GPU')
    for item in items:
        if 'gpu' in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _poison_empty(monkeypatch):
    """Every fresh torch.empty is NaN-filled, so an element a kernel forgot to write shows up."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            with torch.no_grad():
                t.fill_(float('nan'))
        return t

    monkeypatch.setattr(torch, 'empty', lambda *a, **kw: poison(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, 'empty_like', lambda *a, **kw: poison(real_empty_like(*a, **kw)))
    torch.manual_seed(0)


PROGRAM = '''import os


class Point{i}:
    """A point."""

    def __init__(self, x, y):
        self.x = x + {i}
        self.y = y * {j}


def area_{i}(width, height):
    return width * height - {j}


LIMIT_{i} = {k}
'''


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    """A prepared corpus of small Python files."""
    src = tmp_path_factory.mktemp('programs')
    rng = np.random.default_rng(0)
    for i in range(40):
        text = ''.join(PROGRAM.format(i=i, j=rng.integers(100), k=rng.integers(100000)) for _ in range(3))
        (src / f'prog{i:02d}.py').write_text(text)
    out = tmp_path_factory.mktemp('prepared') / 'programs'
    prepare_main([f'--source={src}', f'--out={out}', '--vocab_size=400', '--val_fraction=0.25'])
    return str(out)
