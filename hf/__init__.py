"""Hugging Face export of this repository's checkpoints, and lm-evaluation-harness tasks (docs/hf.md).

    python -m hf.export --ckpt out/long/ckpt.pt --out hf_out/wall-125m
    python -m hf.tasks.make --ckpt out/long/ckpt.pt --out hf_out/tasks

transformers (>= 5) imports the Hub's `kernels` package when it loads; a process that has this repository on
sys.path first (its working directory, PYTHONPATH, pytest) finds this repository's kernels/ under that name instead,
and transformers fails to import. `import_transformers()` imports it with the Hub's package, then gives the name
back: call it before importing transformers in such a process. Exported folders never import `kernels`.
"""
import importlib
import importlib.machinery
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ours(entry):
    """Whether a sys.path entry is this checkout (where `kernels` is ours)."""
    return os.path.abspath(entry or os.getcwd()) == REPO


def import_transformers():
    """Import transformers' model loading with the Hub's `kernels` package (if installed) bound to that name, and
    leave sys.modules['kernels'] as it was (this repository's, if it was imported). Returns transformers."""
    if 'transformers.modeling_utils' in sys.modules:
        return sys.modules['transformers']
    ours = {k: v for k, v in sys.modules.items() if k == 'kernels' or k.startswith('kernels.')}
    for name in ours:
        del sys.modules[name]
    path = sys.path[:]
    try:
        sys.path[:] = [p for p in path if not _ours(p)]
        importlib.invalidate_caches()
        import transformers.modeling_utils  # noqa: F401 (imports the Hub's kernels, when installed)
        import transformers.generation  # noqa: F401
        transformers.AutoModelForCausalLM, transformers.AutoTokenizer  # resolve the lazy names now
    finally:
        sys.path[:] = path
        for name in [k for k in sys.modules if k == 'kernels' or k.startswith('kernels.')]:
            del sys.modules[name]  # the Hub's: transformers keeps its own references
        sys.modules.update(ours)
        importlib.invalidate_caches()
    return transformers
