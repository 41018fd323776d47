"""Load a kernel file (kernels/parallel.py, or a variant of it anywhere) as a module of its own.

The file is loaded as a submodule of a stand-in package over kernels/, so that its relative imports
(`.triton_helpers`, `.domain`, ...) find the package's other files, while kernels/__init__.py is not run: on a
machine without a GPU it would switch Triton to its CPU interpreter, and bench/registers.py compiles for a GPU.
"""
import importlib.util
import os
import sys
import types

PACKAGE = 'wall_kernels'
KERNELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'kernels')


def load_kernel_file(path, name):
    """The module that the file at `path` defines, as PACKAGE.name (its own kernels and autotune caches)."""
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [os.path.abspath(KERNELS)]
        sys.modules[PACKAGE] = package
    spec = importlib.util.spec_from_file_location(f'{PACKAGE}.{name}', path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
