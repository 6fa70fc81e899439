"""Embedding lookup: out[..., :] = weight[indices[...], :].

Backward is the transpose, a scatter-add of the output gradient rows into the rows they were read
from; an index that occurs several times in the batch receives the sum of its rows' gradients.
"""

from typing import Any

import numpy as np

from minimoe.backend import array_module


def embedding_forward(weight: Any, indices: Any) -> Any:
    return weight[indices]


def embedding_backward(grad: Any, indices: Any, num_embeddings: int) -> Any:
    """Scatter-add in at least float32 (a bf16 sum of many rows would lose the small ones), returned
    in the gradient's dtype."""
    xp = array_module(grad)
    width = grad.shape[-1]
    accumulate = np.promote_types(grad.dtype, np.float32)
    grad_weight = xp.zeros((num_embeddings, width), dtype=accumulate)
    xp.add.at(grad_weight, indices.reshape(-1), grad.reshape(-1, width).astype(accumulate))
    return grad_weight.astype(grad.dtype)
