"""LayerNorm over the last axis (Ba et al., 2016): y = (x - mean) * rstd * weight + bias,
rstd = 1 / sqrt(var + eps), with the biased variance over the d features of each row.

Forward keeps (mean, rstd) per row for the backward. With xhat = (x - mean) * rstd and
g = grad_y * weight, the input gradient is

    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))          (means over the d features)

and the parameter gradients sum over every leading axis: dweight = sum(grad_y * xhat), dbias = sum(grad_y).
"""

from typing import Any

from minimoe.backend import array_module


def layernorm_forward(x: Any, weight: Any, bias: Any, eps: float = 1e-5) -> tuple[Any, Any, Any]:
    xp = array_module(x)
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    rstd = 1.0 / xp.sqrt((centered * centered).mean(axis=-1, keepdims=True) + eps)
    return centered * rstd * weight + bias, mean, rstd


def layernorm_backward(
    grad_y: Any, x: Any, weight: Any, mean: Any, rstd: Any
) -> tuple[Any, Any, Any]:
    xhat = (x - mean) * rstd
    g = grad_y * weight
    grad_x = rstd * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    leading = tuple(range(x.ndim - 1))
    return grad_x, (grad_y * xhat).sum(axis=leading), grad_y.sum(axis=leading)
