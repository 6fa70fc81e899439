"""Softmax and log-softmax over the last axis, numerically stable (shift by the row maximum).

    softmax(x)_i     = exp(x_i - m) / sum_j exp(x_j - m),    m = max_j x_j
    log_softmax(x)_i = x_i - m - log sum_j exp(x_j - m)

Backward uses only the output y: for softmax dx = y * (g - sum_j g_j y_j); for log-softmax
dx = g - exp(y) * sum_j g_j.
"""

from typing import Any

from minimoe.backend import array_module


def softmax_forward(x: Any) -> Any:
    xp = array_module(x)
    shifted = xp.exp(x - x.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def softmax_backward(grad: Any, y: Any) -> Any:
    return y * (grad - (grad * y).sum(axis=-1, keepdims=True))


def logsumexp(x: Any) -> Any:
    """log sum_j exp(x_j) over the last axis, computed as m + log sum_j exp(x_j - m)."""
    xp = array_module(x)
    row_max = x.max(axis=-1, keepdims=True)
    return (row_max + xp.log(xp.exp(x - row_max).sum(axis=-1, keepdims=True)))[..., 0]


def log_softmax_forward(x: Any) -> Any:
    xp = array_module(x)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))


def log_softmax_backward(grad: Any, y: Any) -> Any:
    xp = array_module(y)
    return grad - xp.exp(y) * grad.sum(axis=-1, keepdims=True)
