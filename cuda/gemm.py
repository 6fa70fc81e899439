"""Matrix products for the autograd MatMul op: out = op(a) @ op(b), op = identity or transpose of the
last two axes, batched over the leading axes (equal on both sides, or one side a single matrix).

Reference: NumPy's matmul. GPU: cuBLAS `gemmStridedBatchedEx`, called directly, with bf16 or float32
operands and float32 accumulation (CUBLAS_COMPUTE_32F: bf16 products run on the tensor cores; float32
products stay true float32, no TF32). CuPy 14.2's own matmul fails on batched bf16 operands and
computes 2-D 16-bit products through float32, hence the direct call.

cuBLAS is column-major. A row-major matrix X [r, c] is, in memory, the column-major X^T [c, r] with
leading dimension c. So the row-major out [m, n] = op(a) @ op(b) is computed as the column-major
out^T [n, m] = op(b)^T @ op(a)^T: b is cuBLAS's first operand and a its second.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from minimoe.backend import is_gpu

CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUDA_R_32F, CUDA_R_16BF = 0, 14
_CUDA_TYPES = {"float32": CUDA_R_32F, "bfloat16": CUDA_R_16BF}
CUBLAS_COMPUTE_32F = 68
CUBLAS_GEMM_DEFAULT = -1
# alpha and beta: host scalars for cuBLAS's default host pointer mode, their addresses read once
# (a NumPy array's .ctypes builds a new object on every access: microseconds per GEMM otherwise).
_ONE, _ZERO = np.array(1.0, np.float32), np.array(0.0, np.float32)
_ONE_ADDRESS, _ZERO_ADDRESS = _ONE.ctypes.data, _ZERO.ctypes.data


def matmul(a: Any, b: Any, transpose_a: bool = False, transpose_b: bool = False) -> Any:
    if is_gpu(a):
        return _gpu_matmul(a, b, transpose_a, transpose_b)
    return _reference_matmul(a, b, transpose_a, transpose_b)


def _reference_matmul(a: Any, b: Any, transpose_a: bool, transpose_b: bool) -> Any:
    return (a.swapaxes(-1, -2) if transpose_a else a) @ (b.swapaxes(-1, -2) if transpose_b else b)


def _gpu_matmul(a: Any, b: Any, transpose_a: bool, transpose_b: bool) -> Any:
    import cupy
    from cupy_backends.cuda.libs import cublas

    data_type = _CUDA_TYPES.get(a.dtype.name) if a.dtype == b.dtype else None
    if data_type is None:
        raise TypeError(f"GPU matmul takes two bfloat16 or two float32 operands, got {a.dtype} and {b.dtype}")
    a_batch, b_batch = a.shape[:-2], b.shape[:-2]
    if a_batch and b_batch and a_batch != b_batch:
        raise ValueError(f"GPU matmul batches must match (or one side be 2-D): {a.shape} and {b.shape}")
    a, b = cupy.ascontiguousarray(a), cupy.ascontiguousarray(b)
    m, k = (a.shape[-1], a.shape[-2]) if transpose_a else a.shape[-2:]
    k_b, n = (b.shape[-1], b.shape[-2]) if transpose_b else b.shape[-2:]
    if k != k_b:
        raise ValueError(f"matmul inner sizes differ: op(a) is {m}x{k}, op(b) is {k_b}x{n}")
    batch_shape = a_batch or b_batch
    batch = math.prod(batch_shape)
    out = cupy.empty((*batch_shape, m, n), dtype=a.dtype)
    cublas.gemmStridedBatchedEx(
        cupy.cuda.device.get_cublas_handle(),
        CUBLAS_OP_T if transpose_b else CUBLAS_OP_N, CUBLAS_OP_T if transpose_a else CUBLAS_OP_N,
        n, m, k, _ONE_ADDRESS,
        b.data.ptr, data_type, b.shape[-1], b.shape[-1] * b.shape[-2] if b_batch else 0,
        a.data.ptr, data_type, a.shape[-1], a.shape[-1] * a.shape[-2] if a_batch else 0,
        _ZERO_ADDRESS, out.data.ptr, data_type, n, m * n, batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT,
    )
    return out
