"""Matrix products for the autograd MatMul op: out = op(a) @ op(b), op = identity or transpose of the
last two axes, batched over the leading axes (equal on both sides, or one side a single matrix).

Reference: NumPy's matmul. GPU: cuBLAS `cublasGemmStridedBatchedEx`, called directly, with bf16 or
float32 operands and float32 accumulation (CUBLAS_COMPUTE_32F: bf16 products run on the tensor cores;
float32 products stay true float32, no TF32). CuPy 14.2's own matmul fails on batched bf16 operands and
computes 2-D 16-bit products through float32, hence the direct call; and through ctypes, on a handle of
our own, because CuPy's cuBLAS wrapper refuses every call while a stream is being captured into a CUDA
graph (minimoe/graphs.py), which cuBLAS itself allows given a workspace set beforehand.

cuBLAS is column-major. A row-major matrix X [r, c] is, in memory, the column-major X^T [c, r] with
leading dimension c. So the row-major out [m, n] = op(a) @ op(b) is computed as the column-major
out^T [n, m] = op(b)^T @ op(a)^T: b is cuBLAS's first operand and a its second.
"""

from __future__ import annotations

import ctypes
import functools
import math
import re
from typing import Any

import numpy as np

from minimoe.backend import is_gpu

CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUDA_R_32F, CUDA_R_16BF = 0, 14
CUDA_TYPES = {"float32": CUDA_R_32F, "bfloat16": CUDA_R_16BF}
CUBLAS_COMPUTE_32F = 68
CUBLAS_GEMM_DEFAULT = -1
# alpha and beta: host scalars for cuBLAS's default host pointer mode, their addresses read once
# (a NumPy array's .ctypes builds a new object on every access: microseconds per GEMM otherwise).
_ONE, _ZERO = np.array(1.0, np.float32), np.array(0.0, np.float32)
ONE_ADDRESS, ZERO_ADDRESS = _ONE.ctypes.data, _ZERO.ctypes.data
WORKSPACE_BYTES = 32 * 2**20  # cuBLAS's workspace on Hopper, as NVIDIA recommends; set once per handle
_GEMM_ARGUMENTS = (ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_longlong,
                   ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_int, ctypes.c_int,
                   ctypes.c_int)


def matmul(a: Any, b: Any, transpose_a: bool = False, transpose_b: bool = False) -> Any:
    if is_gpu(a):
        return _gpu_matmul(a, b, transpose_a, transpose_b)
    return _reference_matmul(a, b, transpose_a, transpose_b)


def _reference_matmul(a: Any, b: Any, transpose_a: bool, transpose_b: bool) -> Any:
    return (a.swapaxes(-1, -2) if transpose_a else a) @ (b.swapaxes(-1, -2) if transpose_b else b)


@functools.cache
def loaded_library(name: str) -> ctypes.CDLL:
    """The library `name` (libcublas, or libcublasLt, which it loads) as CuPy loaded it (found in the
    process's memory map), for calls through ctypes."""
    import cupy

    cupy.cuda.device.get_cublas_handle()  # makes sure CuPy has loaded cuBLAS
    with open("/proc/self/maps") as maps:
        paths = {match.group(0) for match in re.finditer(rf"/\S*/{name}\.so[.\d]*", maps.read())}
    if not paths:
        raise RuntimeError(f"{name} is not loaded in this process (CuPy's cuBLAS handle was created without it)")
    return ctypes.CDLL(sorted(paths)[0])


@functools.cache
def _library() -> ctypes.CDLL:
    library = loaded_library("libcublas")
    library.cublasGemmStridedBatchedEx.argtypes = _GEMM_ARGUMENTS
    return library


@functools.cache
def cublas_handle(device: int) -> tuple[int, Any]:
    """A cuBLAS handle of our own for GPU `device`, and the workspace it keeps (never freed)."""
    import cupy

    handle = ctypes.c_void_p()
    check(_library().cublasCreate_v2(ctypes.byref(handle)), "cublasCreate")
    workspace = cupy.empty(WORKSPACE_BYTES, dtype=cupy.uint8)
    check(_library().cublasSetWorkspace_v2(handle, ctypes.c_void_p(workspace.data.ptr),
                                            ctypes.c_size_t(WORKSPACE_BYTES)), "cublasSetWorkspace")
    return handle.value, workspace


def check(status: int, call: str) -> None:
    if status != 0:
        raise RuntimeError(f"{call} failed with cuBLAS status {status}")


def _operand(x: Any, transposed: bool) -> tuple[Any, bool]:
    """x as cuBLAS reads it: itself when C-contiguous; the transpose of a C-contiguous matrix (the tied
    output layer's weight.transpose()) as that matrix with the transpose flag flipped, not copied;
    anything else copied into a C-contiguous array."""
    import cupy

    if x.flags.c_contiguous:
        return x, transposed
    swapped = x.swapaxes(-1, -2)
    if swapped.flags.c_contiguous:
        return swapped, not transposed
    return cupy.ascontiguousarray(x), transposed


def _gpu_matmul(a: Any, b: Any, transpose_a: bool, transpose_b: bool) -> Any:
    import cupy

    data_type = CUDA_TYPES.get(a.dtype.name) if a.dtype == b.dtype else None
    if data_type is None:
        raise TypeError(f"GPU matmul takes two bfloat16 or two float32 operands, got {a.dtype} and {b.dtype}")
    a_batch, b_batch = a.shape[:-2], b.shape[:-2]
    if a_batch and b_batch and a_batch != b_batch:
        raise ValueError(f"GPU matmul batches must match (or one side be 2-D): {a.shape} and {b.shape}")
    (a, transpose_a), (b, transpose_b) = _operand(a, transpose_a), _operand(b, transpose_b)
    m, k = (a.shape[-1], a.shape[-2]) if transpose_a else a.shape[-2:]
    k_b, n = (b.shape[-1], b.shape[-2]) if transpose_b else b.shape[-2:]
    if k != k_b:
        raise ValueError(f"matmul inner sizes differ: op(a) is {m}x{k}, op(b) is {k_b}x{n}")
    batch_shape = a_batch or b_batch
    batch = math.prod(batch_shape)
    out = cupy.empty((*batch_shape, m, n), dtype=a.dtype)
    library, (handle, _) = _library(), cublas_handle(out.device.id)
    check(library.cublasSetStream_v2(ctypes.c_void_p(handle), ctypes.c_void_p(cupy.cuda.get_current_stream().ptr)),
           "cublasSetStream")
    check(library.cublasGemmStridedBatchedEx(
        handle, CUBLAS_OP_T if transpose_b else CUBLAS_OP_N, CUBLAS_OP_T if transpose_a else CUBLAS_OP_N,
        n, m, k, ONE_ADDRESS,
        b.data.ptr, data_type, b.shape[-1], b.shape[-1] * b.shape[-2] if b_batch else 0,
        a.data.ptr, data_type, a.shape[-1], a.shape[-1] * a.shape[-2] if a_batch else 0,
        ZERO_ADDRESS, out.data.ptr, data_type, n, m * n, batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT,
    ), "cublasGemmStridedBatchedEx")
    return out
