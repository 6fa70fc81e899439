"""Fused bias + GELU: y = gelu(x + bias), the activation of every MLP and expert (GELU's formula and
derivative are in cuda/gelu.py); and the bias add alone, y = x + bias, the second layer's.

x is [..., rows, features] with bias [features] (a dense layer) or x [groups, rows, features] with bias
[groups, 1, features] (the experts: one bias row per expert). Backward gives grad_x (grad_y * gelu'(x +
bias) with GELU, grad_y itself without) and grad_bias, grad_x summed over the rows (accumulated in at
least float32). GPU: cuda/bias_gelu.cu, one pass over the data each way: the add, the GELU and the
bias gradient's row sums never take passes of their own.

Two variants serve ops.MLP, which keeps the product before GELU and not the activation: x that already
holds its bias (cuBLASLt added it, cuda/epilogue.py: bias None in the forward, biased=True in the
backward), and a backward that also writes y = gelu(x + bias) again, the bits the forward wrote.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from minimoe.backend import is_gpu
from minimoe.cuda import build
from minimoe.cuda.gelu import gelu_backward, gelu_forward
from minimoe.cuda.partial_sums import sum_partials

THREADS = 128  # the forward's threads per block
ROWS = 4  # rows per block in the forward
TILE = 64  # rows per block in the backward
WARPS = 8  # the backward's warps per block, each on every WARPS-th row of the block's tile
build.register("bias_gelu.cu", *(f"bias_{direction}<{t}, {v}, {g}>" for direction in ("forward", "backward")
                                 for t in ("float", "bf16") for v in ("true", "false") for g in ("true", "false")),
               constants={"TILE": TILE, "WARPS": WARPS, "ROWS": ROWS})


def bias_gelu_forward(x: Any, bias: Any | None) -> Any:
    """gelu(x + bias); with bias None, gelu(x) (x already holds a sum with its bias: cuda/epilogue.py)."""
    if bias is None:
        return _gpu_forward(x, None, gelu=True) if is_gpu(x) and x.dtype.name in build.KERNEL_TYPES else gelu_forward(x)
    if _on_gpu(x, bias):
        return _gpu_forward(x, bias, gelu=True)
    return gelu_forward(x + bias)


def bias_gelu_backward(grad_y: Any, x: Any, bias: Any) -> tuple[Any, Any]:
    """(grad_x, grad_bias) with grad_bias summed over the rows in float32, then cast to bias's dtype."""
    return _gelu_backward(grad_y, x, bias, biased=False, recompute=False)


def bias_gelu_backward_recomputing(grad_y: Any, x: Any, bias: Any, biased: bool = False) -> tuple[Any, Any, Any]:
    """(grad_x, grad_bias, y): bias_gelu_backward's two, and y = gelu(x + bias) recomputed in the same pass
    (one more write, no more reads): for an MLP that keeps x, not y, from its forward (ops.MLP). biased:
    x already holds x + bias (a product's epilogue added it: cuda/epilogue.py)."""
    return _gelu_backward(grad_y, x, bias, biased, recompute=True)


def _gelu_backward(grad_y: Any, x: Any, bias: Any, biased: bool, recompute: bool) -> tuple[Any, ...]:
    if _on_gpu(x, bias):
        return _gpu_backward(grad_y, x, bias, gelu=True, biased=biased, recompute=recompute)
    pre = x if biased else x + bias
    grad_pre = gelu_backward(grad_y, pre)
    return (grad_pre, _bias_gradient(grad_pre, bias)) + ((gelu_forward(pre),) if recompute else ())


def bias_add_forward(x: Any, bias: Any) -> Any:
    if _on_gpu(x, bias):
        return _gpu_forward(x, bias, gelu=False)
    return x + bias


def bias_add_backward(grad_y: Any, bias: Any) -> tuple[Any, Any]:
    """(grad_x, grad_bias): grad_x is grad_y; grad_bias its sum over the rows, as in bias_gelu_backward."""
    if _on_gpu(grad_y, bias):
        return _gpu_backward(grad_y, grad_y, bias, gelu=False)
    return grad_y, _bias_gradient(grad_y, bias)


def _bias_gradient(grad_pre: Any, bias: Any) -> Any:
    features = grad_pre.shape[-1]
    accumulate = np.promote_types(grad_pre.dtype, np.float32)  # float32 at least, float64 in gradient checks
    if bias.ndim == 1:
        grad_bias = grad_pre.reshape(-1, features).sum(axis=0, dtype=accumulate)
    else:
        grad_bias = grad_pre.sum(axis=-2, keepdims=True, dtype=accumulate)
    return grad_bias.astype(bias.dtype)


def _on_gpu(x: Any, bias: Any) -> bool:
    """The kernels take x and bias of one dtype, float32 or bf16 (after the shapes are checked: the
    kernels index the bias by x's shape, so a mismatch would read past it)."""
    _check_shapes(x, bias)
    return is_gpu(x) and x.dtype == bias.dtype and x.dtype.name in build.KERNEL_TYPES


def _check_shapes(x: Any, bias: Any) -> None:
    if bias.shape == (x.shape[-1],) or (x.ndim == 3 and bias.shape == (x.shape[0], 1, x.shape[2])):
        return
    raise ValueError(f"bias of shape {bias.shape} does not fit x of shape {x.shape}: expected ({x.shape[-1]},)"
                     + (f" or ({x.shape[0]}, 1, {x.shape[2]})" if x.ndim == 3 else ""))


def _layout(x: Any, bias: Any) -> tuple[int, int, int, str, str]:
    """(groups, rows per group, features, kernel type name, vectorised) for x and its bias (or None)."""
    features = x.shape[-1]
    rows = x.size // features
    groups = 1 if bias is None or bias.ndim == 1 else bias.shape[0]
    return groups, rows // groups, features, build.type_name(x), build.row_vectors(x)


def _gpu_forward(x: Any, bias: Any, gelu: bool) -> Any:
    import cupy

    groups, rows_per_group, features, type_name, vectorised = _layout(x, bias)
    x = cupy.ascontiguousarray(x)
    y = cupy.empty(x.shape, x.dtype)
    rows = groups * rows_per_group
    if y.size:
        build.kernel("bias_gelu.cu", f"bias_forward<{type_name}, {vectorised}, {str(gelu).lower()}>")(
            (-(-rows // ROWS),), (THREADS,),
            (x, build.optional_array(bias, x.dtype), y, np.int32(rows), np.int32(rows_per_group), np.int32(features)))
    return y


def _gpu_backward(grad_y: Any, x: Any, bias: Any, gelu: bool, biased: bool = False,
                  recompute: bool = False) -> tuple[Any, ...]:
    """(grad_x, grad_bias), and with recompute gelu(x + bias) too. Without GELU, x is not read and grad_y
    is returned as grad_x. biased: x holds x + bias (the kernel is given no bias to add)."""
    import cupy

    groups, rows_per_group, features, type_name, vectorised = _layout(grad_y, bias)
    grad_y, x, bias = (cupy.ascontiguousarray(a) for a in (grad_y, x, bias))
    tiles = (rows_per_group + TILE - 1) // TILE
    grad_pre = cupy.empty(grad_y.shape, grad_y.dtype) if gelu else grad_y
    hidden = cupy.empty(x.shape, x.dtype) if recompute else None
    partial = cupy.empty((groups, tiles, features), dtype=cupy.float32)
    if partial.size:
        build.kernel("bias_gelu.cu", f"bias_backward<{type_name}, {vectorised}, {str(gelu).lower()}>")(
            (tiles, (features // build.per_load(grad_y) + 31) // 32, groups), (32 * WARPS,),
            (grad_y, x, build.optional_array(None if biased else bias, bias.dtype), grad_pre,
             build.optional_array(hidden, x.dtype), partial, np.int32(rows_per_group), np.int32(features)))
    grad_bias = sum_partials(partial, bias.dtype).reshape(bias.shape)
    return (grad_pre, grad_bias) + ((hidden,) if recompute else ())
