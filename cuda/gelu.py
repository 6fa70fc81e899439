"""GELU, the tanh approximation GPT-2 uses (Hendrycks and Gimpel, 2016, sec. 2):

    gelu(x) = 0.5 * x * (1 + tanh(u)),   u = sqrt(2/pi) * (x + 0.044715 * x^3)

Used after the first matmul of every MLP and every expert. Backward needs only x: it recomputes tanh(u)
rather than storing it, trading one tanh for a saved activation.
"""

from typing import Any

import numpy as np

from minimoe.backend import array_module

SQRT_2_OVER_PI = float(np.sqrt(2.0 / np.pi))
CUBIC = 0.044715


def gelu_forward(x: Any) -> Any:
    xp = array_module(x)
    return 0.5 * x * (1.0 + xp.tanh(SQRT_2_OVER_PI * (x + CUBIC * x * x * x)))


def gelu_backward(grad: Any, x: Any) -> Any:
    """d gelu / dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) du/dx,  du/dx = sqrt(2/pi)(1 + 3 * 0.044715 x^2)."""
    xp = array_module(x)
    tanh_u = xp.tanh(SQRT_2_OVER_PI * (x + CUBIC * x * x * x))
    du_dx = SQRT_2_OVER_PI * (1.0 + 3.0 * CUBIC * x * x)
    return grad * (0.5 * (1.0 + tanh_u) + 0.5 * x * (1.0 - tanh_u * tanh_u) * du_dx)
