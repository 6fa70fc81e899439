"""A product with its bias added where the product is written: y = x @ weight + bias, for x [rows, in],
weight [in, out], bias [out]; and its backward,

    grad_x = grad_y @ weight^T,   grad_weight = x^T @ grad_y,   grad_bias = sum over rows of grad_y

Reference: cuda/gemm.py's products and cuda/bias_gelu.py's bias kernels, one after the other; also
what runs for batched products (x [E, C, in], weight [E, in, out], bias [E, 1, out]: the experts). GPU:
cuBLASLt's epilogues, where cuBLASLt has an algorithm for the shapes: the product writes y with the bias
added (CUBLASLT_EPILOGUE_BIAS), and the weight's gradient product also sums grad_y's rows into the bias
gradient (CUBLASLT_EPILOGUE_BGRADA). The first saves a pass over a [rows, out] array and a launch; the
second runs as a kernel of cuBLASLt's own after the product, about as fast as cuda/bias_gelu.py's.
cuBLASLt adds the bias to the float32 sums and rounds once: round(x @ weight + bias), not the
reference's round(round(x @ weight) + bias).

cuBLASLt is called through ctypes, as cuda/gemm.py calls cuBLAS, with the same column-major reading of
row-major arrays: y [rows, out] is the column-major y^T [out, rows] = weight^T [out, in] @ x^T [in, rows],
so weight is cuBLASLt's A and x its B; out is "m", rows "n", in "k", and the bias runs along m. The
weight's gradient [in, out] is the column-major [out, in] = grad_y^T [out, rows] @ x [rows, in]: A is
grad_y (m = out), B is x transposed, and BGRADA sums A over k (the rows).
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

from minimoe.backend import is_gpu
from minimoe.cuda import bias_gelu, gemm

# cublasLt.h's values
CUBLAS_COMPUTE_32F = 68
DESC_TRANSA, DESC_TRANSB, DESC_EPILOGUE, DESC_BIAS_POINTER = 3, 4, 7, 8
PREFERENCE_MAX_WORKSPACE_BYTES = 1
EPILOGUE_BIAS, EPILOGUE_BGRADA = 4, 256
HEURISTIC_RESULT_BYTES = 96  # cublasLtMatmulHeuristicResult_t: the algorithm (64 bytes) first


def biased_product(x: Any, weight: Any, bias: Any) -> tuple[Any, bool]:
    """(x @ weight + bias, True) where cuBLASLt adds the bias in the product's epilogue; else (x @ weight,
    False), the bias left to the caller (which may add it in a kernel of its own: ops.MLP's GELU)."""
    if _fits(x, weight, bias):
        out = _empty((x.shape[0], weight.shape[1]), x.dtype)
        if _matmul(_plan(weight, x, out, EPILOGUE_BIAS, forward=True), weight, x, out, bias):
            return out, True
    return gemm.matmul(x, weight), False


def linear_forward(x: Any, weight: Any, bias: Any) -> Any:
    """x @ weight + bias."""
    product, has_bias = biased_product(x, weight, bias)
    return product if has_bias else bias_gelu.bias_add_forward(product, bias)


def weight_gradients(x: Any, grad_y: Any, bias: Any) -> tuple[Any, Any]:
    """(grad_weight, grad_bias) = (x^T @ grad_y, grad_y summed over its rows)."""
    if _fits(x, grad_y, bias):
        grad_weight = _empty((x.shape[1], grad_y.shape[1]), x.dtype)
        grad_bias = _empty(bias.shape, bias.dtype)
        if _matmul(_plan(grad_y, x, grad_weight, EPILOGUE_BGRADA, forward=False), grad_y, x, grad_weight, grad_bias):
            return grad_weight, grad_bias
    return gemm.matmul(x, grad_y, transpose_a=True), bias_gelu.bias_add_backward(grad_y, bias)[1]


def linear_backward(grad_y: Any, x: Any, weight: Any, bias: Any) -> tuple[Any, Any, Any]:
    """(grad_x, grad_weight, grad_bias) of linear_forward."""
    return gemm.matmul(grad_y, weight, transpose_b=True), *weight_gradients(x, grad_y, bias)


# ----------------------------------------------------------------------------- GPU: cuBLASLt


def _fits(x: Any, other: Any, bias: Any) -> bool:
    """cuBLASLt's epilogues take these operands (other: the weight, or grad_y): on the GPU, one dtype
    (bf16 or float32), C-contiguous 2-D arrays, a 1-D bias, rows of whole 16-byte vectors (in and out)."""
    return (is_gpu(x) and x.dtype == other.dtype == bias.dtype and x.dtype.name in gemm.CUDA_TYPES
            and x.ndim == 2 and other.ndim == 2 and bias.ndim == 1 and x.flags.c_contiguous
            and other.flags.c_contiguous and all(size * x.dtype.itemsize % 16 == 0 for size in (x.shape[1], bias.size)))


def _empty(shape: tuple[int, ...], dtype: Any) -> Any:
    import cupy

    return cupy.empty(shape, dtype)


def _library() -> ctypes.CDLL:
    return gemm.loaded_library("libcublasLt")


@functools.cache
def _handle(device: int) -> int:
    handle = ctypes.c_void_p()
    gemm.check(_library().cublasLtCreate(ctypes.byref(handle)), "cublasLtCreate")
    return handle.value


def _set(setter: Any, owner: int, attribute: int, value: Any) -> None:
    gemm.check(setter(ctypes.c_void_p(owner), attribute, ctypes.byref(value), ctypes.c_size_t(ctypes.sizeof(value))),
               setter.__name__)


def _layout(data_type: int, rows: int, columns: int, leading: int) -> int:
    layout = ctypes.c_void_p()
    gemm.check(_library().cublasLtMatrixLayoutCreate(ctypes.byref(layout), data_type, ctypes.c_uint64(rows),
                                                     ctypes.c_uint64(columns), ctypes.c_int64(leading)),
               "cublasLtMatrixLayoutCreate")
    return layout.value


@functools.cache
def _cached_plan(key: tuple[int, ...]) -> tuple[Any, ...] | None:
    """(descriptor, layouts A, B, D, algorithm) of one product and epilogue, or None when cuBLASLt has no
    algorithm for it. key: (device, data type, m, n, k, whether B is transposed, epilogue). The
    descriptor's bias pointer is set by each call (_matmul)."""
    device, data_type, m, n, k, transpose_b, epilogue = key
    library = _library()
    descriptor = ctypes.c_void_p()
    gemm.check(library.cublasLtMatmulDescCreate(ctypes.byref(descriptor), CUBLAS_COMPUTE_32F, gemm.CUDA_R_32F),
               "cublasLtMatmulDescCreate")
    for attribute, value in ((DESC_TRANSA, gemm.CUBLAS_OP_N), (DESC_TRANSB, gemm.CUBLAS_OP_T if transpose_b
                                                                else gemm.CUBLAS_OP_N), (DESC_EPILOGUE, epilogue)):
        _set(library.cublasLtMatmulDescSetAttribute, descriptor.value, attribute, ctypes.c_int32(value))
    layouts = (_layout(data_type, m, k, m), _layout(data_type, n, k, n) if transpose_b else _layout(data_type, k, n, k),
               _layout(data_type, m, n, m))
    preference = ctypes.c_void_p()
    gemm.check(library.cublasLtMatmulPreferenceCreate(ctypes.byref(preference)), "cublasLtMatmulPreferenceCreate")
    _set(library.cublasLtMatmulPreferenceSetAttribute, preference.value, PREFERENCE_MAX_WORKSPACE_BYTES,
         ctypes.c_uint64(gemm.WORKSPACE_BYTES))
    result, found = (ctypes.c_ubyte * HEURISTIC_RESULT_BYTES)(), ctypes.c_int(0)
    status = library.cublasLtMatmulAlgoGetHeuristic(
        ctypes.c_void_p(_handle(device)), descriptor, *(ctypes.c_void_p(layout) for layout in
                                                       (layouts[0], layouts[1], layouts[2], layouts[2])),
        preference, 1, result, ctypes.byref(found))
    library.cublasLtMatmulPreferenceDestroy(preference)
    if status != 0 or found.value == 0:
        return None
    return descriptor.value, *layouts, result


def _plan(a: Any, b: Any, out: Any, epilogue: int, forward: bool) -> tuple[Any, ...] | None:
    """The plan of out = a-and-b's product with `epilogue`: the forward's (weight, x) as cuBLASLt's (A, B),
    both as they are; the weight gradient's (grad_y, x), B transposed."""
    m = a.shape[1]
    n, k = (b.shape[0], b.shape[1]) if forward else (b.shape[1], b.shape[0])
    return _cached_plan((out.device.id, gemm.CUDA_TYPES[a.dtype.name], m, n, k, int(not forward), epilogue))


def _matmul(plan: tuple[Any, ...] | None, a: Any, b: Any, out: Any, bias: Any) -> bool:
    """Run a plan: out = A @ B with its epilogue, the bias (or the bias gradient) at `bias`. False (nothing
    run) when the plan is None."""
    if plan is None:
        return False
    import cupy

    descriptor, layout_a, layout_b, layout_d, algorithm = plan
    library = _library()
    _set(library.cublasLtMatmulDescSetAttribute, descriptor, DESC_BIAS_POINTER, ctypes.c_void_p(bias.data.ptr))
    _, workspace = gemm.cublas_handle(out.device.id)  # shared: both libraries run on the caller's stream, in turn
    gemm.check(library.cublasLtMatmul(
        ctypes.c_void_p(_handle(out.device.id)), ctypes.c_void_p(descriptor), ctypes.c_void_p(gemm.ONE_ADDRESS),
        ctypes.c_void_p(a.data.ptr), ctypes.c_void_p(layout_a), ctypes.c_void_p(b.data.ptr), ctypes.c_void_p(layout_b),
        ctypes.c_void_p(gemm.ZERO_ADDRESS), ctypes.c_void_p(out.data.ptr), ctypes.c_void_p(layout_d),
        ctypes.c_void_p(out.data.ptr), ctypes.c_void_p(layout_d), algorithm, ctypes.c_void_p(workspace.data.ptr),
        ctypes.c_size_t(gemm.WORKSPACE_BYTES), ctypes.c_void_p(cupy.cuda.get_current_stream().ptr)), "cublasLtMatmul")
    return True
