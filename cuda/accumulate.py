"""The sum of two gradients of one tensor, which the autograd tape forms wherever a tensor feeds two ops
(the residual stream, the tied embedding, an MoE layer's input to both its gate and its dispatch):

    out = a + b

Reference: NumPy's (or CuPy's) add. GPU: cuda/accumulate.cu for float32 and bf16 arrays of one shape,
contiguous, in 16-byte vectors; anything else (broadcasting, mixed dtypes) falls back to the reference.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from minimoe.cuda import build

THREADS = 256
MAX_BLOCKS = 4096  # the threads stride on past this many blocks
build.register("accumulate.cu", *(f"add_gradients<{t}, {v}>" for t in build.KERNEL_TYPES.values()
                                  for v in ("false", "true")))


def add_gradients(a: Any, b: Any) -> Any:
    """a + b in a new array."""
    if not (build.kernel_arrays(a, b) and a.shape == b.shape):
        return a + b
    import cupy

    out = cupy.empty_like(a)
    per_vector = 16 // a.dtype.itemsize
    vectorised = a.size % per_vector == 0 and a.data.ptr % 16 == 0 and b.data.ptr % 16 == 0
    per_thread = per_vector if vectorised else 1
    blocks = min(MAX_BLOCKS, -(-a.size // (THREADS * per_thread)))
    if blocks:
        build.kernel("accumulate.cu", f"add_gradients<{build.type_name(a)}, {str(vectorised).lower()}>")(
            (blocks,), (THREADS,), (a, b, out, np.int64(a.size)))
    return out
