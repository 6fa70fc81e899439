"""minimoe.cuda: the kernel families, one module per family.

Each module exposes plain functions on arrays (never Tensors). Its NumPy reference is the
specification: vectorised, commented with the math, written against the array module of its inputs
so that it also runs, unfused, on CuPy arrays. The GPU kernels (CuPy RawKernels and Numba CUDA)
sit beside their references and are checked against them by tests/test_<family>.py.
"""
