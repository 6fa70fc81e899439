"""The sum of float32 partial sums over their middle axis, cast to a parameter's dtype: the second stage of
the parameter gradients that sum over every row of a batch (LayerNorm's weight and bias in
cuda/layernorm.py, the bias of a product in cuda/bias_gelu.py, the gate's weight in cuda/gating.py).
Their first stage writes one row of sums per slice of rows, [groups, slices, width]; this adds the slices:

    out[g, c] = sum_p partial[g, p, c]

Reference: NumPy's sum. GPU: cuda/partial_sums.cu, one launch that also writes the parameter's dtype
(what a CuPy sum followed by astype does in two, with a float32 array between them).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from minimoe.backend import is_gpu
from minimoe.cuda import build

WARPS = 8
build.register("partial_sums.cu", *(f"sum_partials<{t}>" for t in build.KERNEL_TYPES.values()),
               constants={"WARPS": WARPS})


def sum_partials(partial: Any, dtype: Any) -> Any:
    """partial [groups, parts, width] float32 -> [groups, width] in `dtype`: the sum over the parts."""
    if not (is_gpu(partial) and np.dtype(dtype).name in build.KERNEL_TYPES):
        return partial.sum(axis=1).astype(dtype)
    import cupy

    groups, parts, width = partial.shape
    out = cupy.empty((groups, width), dtype=dtype)
    if out.size:
        build.kernel("partial_sums.cu", f"sum_partials<{build.type_name(out)}>")(
            ((width + 31) // 32, groups), (32 * WARPS,),
            (cupy.ascontiguousarray(partial, dtype=cupy.float32), out, np.int32(parts), np.int32(width)))
    return out
