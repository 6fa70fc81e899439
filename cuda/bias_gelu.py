"""Fused bias + GELU: y = gelu(x + bias), the activation of every MLP and expert (GELU's formula and
derivative are in cuda/gelu.py).

x is [..., rows, features] with bias [features] (a dense MLP) or x [groups, rows, features] with bias
[groups, 1, features] (the experts: one bias row per expert). Backward returns (grad_x, grad_bias) with
grad_x = grad_y * gelu'(x + bias) and grad_bias its sum over the rows (in float32, then cast).
GPU: cuda/bias_gelu.cu, one pass over the data each way instead of three (add, GELU, and GELU's
backward reading the sum back).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from minimoe.cuda import build
from minimoe.cuda.gelu import gelu_backward, gelu_forward

from minimoe.backend import is_gpu

build.register("bias_gelu.cu", "bias_gelu_forward<float>", "bias_gelu_forward<bf16>",
               "bias_gelu_backward<float>", "bias_gelu_backward<bf16>")
THREADS = 256


def bias_gelu_forward(x: Any, bias: Any) -> Any:
    if is_gpu(x):
        return _gpu_launch("bias_gelu_forward", x, bias, (x,))
    return gelu_forward(x + bias)


def bias_gelu_backward(grad_y: Any, x: Any, bias: Any) -> tuple[Any, Any]:
    if is_gpu(x):
        grad_pre = _gpu_launch("bias_gelu_backward", x, bias, (grad_y, x))
    else:
        grad_pre = gelu_backward(grad_y, x + bias)
    return grad_pre, _sum_to_bias(grad_pre, bias)


def _sum_to_bias(grad_pre: Any, bias: Any) -> Any:
    """Sum over every axis the bias was broadcast along, accumulating in float32."""
    features = grad_pre.shape[-1]
    if bias.ndim == 1:
        rows = grad_pre.reshape(-1, features)
        return rows.sum(axis=0, dtype=np.float32).astype(bias.dtype)
    return grad_pre.sum(axis=-2, keepdims=True, dtype=np.float32).astype(bias.dtype)


def _gpu_launch(name: str, x: Any, bias: Any, inputs: tuple[Any, ...]) -> Any:
    import cupy

    type_name = {"float32": "float", "bfloat16": "bf16"}[x.dtype.name]
    features = x.shape[-1]
    rows_times_features = x.size if bias.ndim == 1 else x.shape[-2] * features
    inputs = tuple(cupy.ascontiguousarray(array) for array in inputs)
    out = cupy.empty_like(inputs[0])
    blocks = min(65535, (x.size + THREADS - 1) // THREADS)
    build.kernel("bias_gelu.cu", f"{name}<{type_name}>")(
        (max(blocks, 1),), (THREADS,),
        (*inputs, cupy.ascontiguousarray(bias), out, np.int64(x.size), np.int64(rows_times_features),
         np.int32(features)))
    return out
