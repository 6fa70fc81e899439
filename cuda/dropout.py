"""Inverted dropout (Srivastava et al., 2014): keep each element with probability 1 - p and scale
the kept ones by 1 / (1 - p), so that evaluation (no dropout) needs no rescaling.

The mask comes from the backend's seeded generator, which the training loop reseeds from
(seed, step): a resumed run draws the same masks as an uninterrupted one.
"""

from typing import Any

from minimoe import backend


def dropout_forward(x: Any, p: float) -> tuple[Any, Any]:
    """Returns (y, scaled_mask) with y = x * scaled_mask; scaled_mask is 0 or 1 / (1 - p)."""
    keep = backend.random_uniform(x.shape, x.dtype) >= p
    scaled_mask = keep.astype(x.dtype) * (1.0 / (1.0 - p))
    return x * scaled_mask, scaled_mask


def dropout_backward(grad: Any, scaled_mask: Any) -> Any:
    return grad * scaled_mask
