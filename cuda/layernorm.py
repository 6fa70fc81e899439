"""LayerNorm over the last axis (Ba et al., 2016): y = (x - mean) * rstd * weight + bias,
rstd = 1 / sqrt(var + eps), with the biased variance over the d features of each row.

Forward keeps (mean, rstd) per row for the backward. With xhat = (x - mean) * rstd and
g = grad_y * weight, the input gradient is

    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))          (means over the d features)

and the parameter gradients sum over every leading axis: dweight = sum(grad_y * xhat), dbias = sum(grad_y).

GPU: cuda/layernorm.cu: one warp per row, float32 statistics for bf16 or float32 rows; the parameter
gradients as per-slice column sums added up afterwards (deterministic, no atomics).
"""

from typing import Any

import numpy as np

from minimoe.backend import array_module, is_gpu
from minimoe.cuda import build

build.register("layernorm.cu", *(f"layernorm_{kind}<{t}, {v}>" for kind in ("forward", "backward_input")
                                 for t in ("float", "bf16") for v in ("true", "false")),
               "layernorm_backward_params<float>", "layernorm_backward_params<bf16>")
WARPS_PER_BLOCK = 8
PARAMETER_SLICES = 64  # row slices of the parameter-gradient kernel


def layernorm_forward(x: Any, weight: Any, bias: Any, eps: float = 1e-5) -> tuple[Any, Any, Any]:
    """(y, mean, rstd); mean and rstd have shape [..., 1] (float32 on the GPU)."""
    if is_gpu(x):
        return _gpu_forward(x, weight, bias, eps)
    xp = array_module(x)
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    rstd = 1.0 / xp.sqrt((centered * centered).mean(axis=-1, keepdims=True) + eps)
    return centered * rstd * weight + bias, mean, rstd


def layernorm_backward(
    grad_y: Any, x: Any, weight: Any, mean: Any, rstd: Any
) -> tuple[Any, Any, Any]:
    if is_gpu(x):
        return _gpu_backward(grad_y, x, weight, mean, rstd)
    xhat = (x - mean) * rstd
    g = grad_y * weight
    grad_x = rstd * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    leading = tuple(range(x.ndim - 1))
    return grad_x, (grad_y * xhat).sum(axis=leading), grad_y.sum(axis=leading)


def _gpu_forward(x: Any, weight: Any, bias: Any, eps: float) -> tuple[Any, Any, Any]:
    import cupy

    width = x.shape[-1]
    rows = x.size // width
    x, weight, bias = (cupy.ascontiguousarray(a) for a in (x, weight.astype(x.dtype), bias.astype(x.dtype)))
    y = cupy.empty(x.shape, x.dtype)
    mean = cupy.empty((*x.shape[:-1], 1), dtype=cupy.float32)
    rstd = cupy.empty(mean.shape, mean.dtype)
    type_name, vectorised = build.type_name(x), build.row_vectors(x)
    build.kernel("layernorm.cu", f"layernorm_forward<{type_name}, {vectorised}>")(
        ((rows + WARPS_PER_BLOCK - 1) // WARPS_PER_BLOCK,), (32 * WARPS_PER_BLOCK,),
        (x, weight, bias, y, mean, rstd, np.int32(rows), np.int32(width), np.float32(eps)))
    return y, mean, rstd


def _gpu_backward(grad_y: Any, x: Any, weight: Any, mean: Any, rstd: Any) -> tuple[Any, Any, Any]:
    import cupy

    width = x.shape[-1]
    rows = x.size // width
    grad_y, x = cupy.ascontiguousarray(grad_y), cupy.ascontiguousarray(x)
    grad_x = cupy.empty(x.shape, x.dtype)
    type_name, vectorised = build.type_name(x), build.row_vectors(x)
    build.kernel("layernorm.cu", f"layernorm_backward_input<{type_name}, {vectorised}>")(
        ((rows + WARPS_PER_BLOCK - 1) // WARPS_PER_BLOCK,), (32 * WARPS_PER_BLOCK,),
        (grad_y, x, cupy.ascontiguousarray(weight.astype(x.dtype)), mean, rstd, grad_x, np.int32(rows),
         np.int32(width)))
    slices = min(PARAMETER_SLICES, max(rows, 1))
    partial_weight = cupy.empty((slices, width), dtype=cupy.float32)
    partial_bias = cupy.empty(partial_weight.shape, partial_weight.dtype)
    build.kernel("layernorm.cu", f"layernorm_backward_params<{type_name}>")(
        ((width + 255) // 256, slices), (256,),
        (grad_y, x, mean, rstd, partial_weight, partial_bias, np.int32(rows), np.int32(width)))
    return grad_x, partial_weight.sum(axis=0).astype(weight.dtype), partial_bias.sum(axis=0).astype(weight.dtype)
