"""A dense layer with its bias, and GELU, applied where the product is written: y = x @ weight + bias,
or y = gelu(x @ weight + bias) (GELU's formula: cuda/gelu.py), for x [rows, in], weight [in, out],
bias [out]; and its backward,

    grad_pre  = grad_y * gelu'(pre)   (grad_y itself without GELU),   pre = x @ weight + bias
    grad_x    = grad_pre @ weight^T,   grad_weight = x^T @ grad_pre,   grad_bias = sum over rows of grad_pre

Reference: cuda/gemm.py's products and cuda/bias_gelu.py's kernels, one after the other (the forward
keeps the product without its bias; the backward recomputes pre from it). GPU: cuBLASLt's epilogues,
where cuBLASLt has an algorithm for the shapes: the forward's product writes y with the bias added (and
GELU applied: CUBLASLT_EPILOGUE_GELU_AUX_BIAS, which also writes pre, the backward's input); the
weight's gradient product also sums grad_pre's rows into the bias gradient (CUBLASLT_EPILOGUE_BGRADA).
Each saves a pass of its own over a [rows, out] array and a launch. cuBLASLt sums in float32 and rounds
once: y = round(gelu(x @ weight + bias)) rather than the reference's round(gelu(round(x @ weight) + bias)).

cuBLASLt is called through ctypes, as cuda/gemm.py calls cuBLAS, with the same column-major reading of
row-major arrays: y [rows, out] is the column-major y^T [out, rows] = weight^T [out, in] @ x^T [in, rows],
so weight is cuBLASLt's A and x its B; out is "m", rows "n", in "k", and the bias runs along m. The
weight's gradient [in, out] is the column-major [out, in] = grad_pre^T [out, rows] @ x [rows, in]: A is
grad_pre (m = out), B is x transposed, and BGRADA sums A over k (the rows).
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

from minimoe.backend import is_gpu
from minimoe.cuda import bias_gelu, gemm

# cublasLt.h's values
CUBLAS_COMPUTE_32F = 68
DESC_TRANSA, DESC_TRANSB, DESC_EPILOGUE, DESC_BIAS_POINTER, DESC_AUX_POINTER, DESC_AUX_LD = 3, 4, 7, 8, 11, 12
PREFERENCE_MAX_WORKSPACE_BYTES = 1
EPILOGUE_BIAS, EPILOGUE_GELU_AUX_BIAS, EPILOGUE_BGRADA = 4, 164, 256
HEURISTIC_RESULT_BYTES = 96  # cublasLtMatmulHeuristicResult_t: the algorithm (64 bytes) first


def linear_forward(x: Any, weight: Any, bias: Any, gelu: bool) -> tuple[Any, Any, bool]:
    """(y, saved, saved_has_bias): y, and what linear_backward needs besides x and weight: with GELU the
    product before the activation (with the bias when the epilogue added it, else without), else None."""
    if _fits(x, weight, bias):
        out = _empty((x.shape[0], weight.shape[1]), x.dtype)
        pre = _empty(out.shape, out.dtype) if gelu else None
        if _matmul(_plan(weight, x, out, EPILOGUE_GELU_AUX_BIAS if gelu else EPILOGUE_BIAS, forward=True),
                   weight, x, out, bias, pre):
            return out, pre, True
    product = gemm.matmul(x, weight)
    if gelu:
        return bias_gelu.bias_gelu_forward(product, bias), product, False
    return bias_gelu.bias_add_forward(product, bias), None, False


def linear_backward(grad_y: Any, x: Any, weight: Any, bias: Any, saved: Any, saved_has_bias: bool,
                    gelu: bool) -> tuple[Any, Any, Any]:
    """(grad_x, grad_weight, grad_bias) from linear_forward's y gradient and what it saved."""
    if gelu:
        grad_pre, grad_bias = bias_gelu.bias_gelu_backward(grad_y, saved, bias, biased=saved_has_bias)
    else:
        grad_pre, grad_bias = grad_y, None
    grad_x = gemm.matmul(grad_pre, weight, transpose_b=True)
    if grad_bias is None and _fits(x, weight, bias) and grad_pre.flags.c_contiguous:
        grad_weight = _empty(weight.shape, weight.dtype)
        grad_bias = _empty(bias.shape, bias.dtype)
        if _matmul(_plan(grad_pre, x, grad_weight, EPILOGUE_BGRADA, forward=False), grad_pre, x, grad_weight,
                   grad_bias, None):
            return grad_x, grad_weight, grad_bias
    grad_weight = gemm.matmul(x, grad_pre, transpose_a=True)
    if grad_bias is None:
        grad_bias = bias_gelu.bias_add_backward(grad_pre, bias)[1]
    return grad_x, grad_weight, grad_bias


# ----------------------------------------------------------------------------- GPU: cuBLASLt


def _fits(x: Any, weight: Any, bias: Any) -> bool:
    """cuBLASLt's epilogues take these operands: on the GPU, one dtype (bf16 or float32), C-contiguous 2-D
    x and weight, a 1-D bias, rows of whole 16-byte vectors (in and out)."""
    return (is_gpu(x) and x.dtype == weight.dtype == bias.dtype and x.dtype.name in gemm.CUDA_TYPES
            and x.ndim == 2 and weight.ndim == 2 and bias.ndim == 1 and x.flags.c_contiguous
            and weight.flags.c_contiguous and all(size * x.dtype.itemsize % 16 == 0 for size in weight.shape))


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
    descriptor's bias and aux pointers are set by each call (_matmul)."""
    device, data_type, m, n, k, transpose_b, epilogue = key
    library = _library()
    descriptor = ctypes.c_void_p()
    gemm.check(library.cublasLtMatmulDescCreate(ctypes.byref(descriptor), CUBLAS_COMPUTE_32F, gemm.CUDA_R_32F),
               "cublasLtMatmulDescCreate")
    for attribute, value in ((DESC_TRANSA, gemm.CUBLAS_OP_N), (DESC_TRANSB, gemm.CUBLAS_OP_T if transpose_b
                                                                else gemm.CUBLAS_OP_N), (DESC_EPILOGUE, epilogue)):
        _set(library.cublasLtMatmulDescSetAttribute, descriptor.value, attribute, ctypes.c_int32(value))
    if epilogue == EPILOGUE_GELU_AUX_BIAS:
        _set(library.cublasLtMatmulDescSetAttribute, descriptor.value, DESC_AUX_LD, ctypes.c_int64(m))
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
    both as they are; the weight gradient's (grad_pre, x), B transposed."""
    m = a.shape[1]
    n, k = (b.shape[0], b.shape[1]) if forward else (b.shape[1], b.shape[0])
    return _cached_plan((out.device.id, gemm.CUDA_TYPES[a.dtype.name], m, n, k, int(not forward), epilogue))


def _matmul(plan: tuple[Any, ...] | None, a: Any, b: Any, out: Any, bias: Any, aux: Any) -> bool:
    """Run a plan: out = A @ B with its epilogue, the bias (or the bias gradient) at `bias` and, for GELU,
    pre at `aux`. False (nothing run) when the plan is None."""
    if plan is None:
        return False
    import cupy

    descriptor, layout_a, layout_b, layout_d, algorithm = plan
    library = _library()
    _set(library.cublasLtMatmulDescSetAttribute, descriptor, DESC_BIAS_POINTER, ctypes.c_void_p(bias.data.ptr))
    if aux is not None:
        _set(library.cublasLtMatmulDescSetAttribute, descriptor, DESC_AUX_POINTER, ctypes.c_void_p(aux.data.ptr))
    _, workspace = gemm.cublas_handle(out.device.id)
    gemm.check(library.cublasLtMatmul(
        ctypes.c_void_p(_handle(out.device.id)), ctypes.c_void_p(descriptor), ctypes.c_void_p(gemm.ONE_ADDRESS),
        ctypes.c_void_p(a.data.ptr), ctypes.c_void_p(layout_a), ctypes.c_void_p(b.data.ptr), ctypes.c_void_p(layout_b),
        ctypes.c_void_p(gemm.ZERO_ADDRESS), ctypes.c_void_p(out.data.ptr), ctypes.c_void_p(layout_d),
        ctypes.c_void_p(out.data.ptr), ctypes.c_void_p(layout_d), algorithm, ctypes.c_void_p(workspace.data.ptr),
        ctypes.c_size_t(gemm.WORKSPACE_BYTES), ctypes.c_void_p(cupy.cuda.get_current_stream().ptr)), "cublasLtMatmul")
    return True
