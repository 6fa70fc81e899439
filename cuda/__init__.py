"""minimoe.cuda: the kernel families, one module per family.

Each module exposes plain functions on arrays (never Tensors). Its NumPy reference is the
specification: vectorised, commented with the math, written against the array module of its inputs
so that it also runs, unfused, on CuPy arrays. The GPU kernels (CuPy RawKernels and Numba CUDA)
sit beside their references and are checked against them by tests/test_<family>.py.
"""

import pkgutil

# Run from the repository root (python -m pytest, python -c), this folder is also importable as the
# top-level name `cuda`, which NVIDIA's CUDA Python (cuda.bindings, cuda.pathfinder: used by CuPy and
# Numba) owns as a namespace package. Extending __path__ with every other `cuda` folder on sys.path
# keeps `import cuda.bindings` working there; as minimoe.cuda it finds nothing else and changes nothing.
__path__ = pkgutil.extend_path(__path__, __name__)
