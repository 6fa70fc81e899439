"""LayerNorm over the last axis (Ba et al., 2016): y = (x - mean) * rstd * weight + bias,
rstd = 1 / sqrt(var + eps), with the biased variance over the d features of each row.

Forward keeps (mean, rstd) per row for the backward. With xhat = (x - mean) * rstd and
g = grad_y * weight, the input gradient is

    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))          (means over the d features)

and the parameter gradients sum over every leading axis: dweight = sum(grad_y * xhat), dbias = sum(grad_y).

The residual stream's add and the LayerNorm that reads it can run as one: add_layernorm_forward returns
sum = x + addend beside LN(sum), and layernorm_backward adds `grad_sum`, the gradient that the sum's other
uses sent it, into dx (the gradient of both x and addend).

GPU: cuda/layernorm.cu: one warp per row (held in registers when it is short enough, so that it crosses
memory once), float32 statistics for bf16 or float32 rows. The parameter gradients are column sums over
the rows, taken in two stages (deterministic, no atomics): per-block partial sums, which the backward
kernel writes beside dx while it holds the rows in registers (a kernel of their own reads rows too wide
to hold again), then their sum (cuda/partial_sums.py).
"""

from typing import Any

import numpy as np

from minimoe.backend import array_module, is_gpu
from minimoe.cuda import build
from minimoe.cuda.partial_sums import sum_partials

MAX_HELD = 4  # a lane holds up to this many pieces of its row in registers (cuda/layernorm.cu's Walk)
WARPS_PER_BLOCK = 8
build.register("layernorm.cu", *(f"layernorm_{kind}<{t}, {v}, {held}>" for kind in ("forward", "backward")
                                 for t in ("float", "bf16") for v in ("true", "false")
                                 for held in range(MAX_HELD + 1)),
               "layernorm_backward_params<float>", "layernorm_backward_params<bf16>",
               constants={"WARPS_PER_BLOCK": WARPS_PER_BLOCK})
# Rows each warp of the backward walks where it sums the parameter gradients (rows held in registers):
# enough that the blocks' partial sums stay small beside dy and x, few enough that the blocks fill the GPU
# (8192 rows: 256 blocks).
ROWS_PER_WARP = 4
# Rows per slice of the parameter-gradient kernel: short enough that its blocks fill the GPU (64 slices of
# 8192 rows, 128 rows each, left most SMs idle: 56 us a LayerNorm), long enough that the slices' float32
# partial sums stay small beside the input.
ROWS_PER_SLICE = 32
MAX_SLICES = 1024


def layernorm_forward(x: Any, weight: Any, bias: Any, eps: float = 1e-5) -> tuple[Any, Any, Any]:
    """(y, mean, rstd); mean and rstd have shape [..., 1] (float32 on the GPU)."""
    if is_gpu(x):
        return _gpu_forward(x, None, weight, bias, eps)[:3]
    xp = array_module(x)
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    rstd = 1.0 / xp.sqrt((centered * centered).mean(axis=-1, keepdims=True) + eps)
    return centered * rstd * weight + bias, mean, rstd


def add_layernorm_forward(x: Any, addend: Any, weight: Any, bias: Any, eps: float = 1e-5) -> tuple[Any, Any, Any, Any]:
    """(sum, y, mean, rstd) with sum = x + addend (same shapes) and y, mean, rstd its layernorm_forward."""
    if x.shape != addend.shape:
        raise ValueError(f"the residual add needs equal shapes, got {x.shape} and {addend.shape}")
    if is_gpu(x):
        y, mean, rstd, total = _gpu_forward(x, addend, weight, bias, eps)
        return total, y, mean, rstd
    total = x + addend
    return (total, *layernorm_forward(total, weight, bias, eps))


def layernorm_backward(
    grad_y: Any, x: Any, weight: Any, mean: Any, rstd: Any, grad_sum: Any = None
) -> tuple[Any, Any, Any]:
    """(grad_x, grad_weight, grad_bias); grad_sum (optional, x's shape) is added into grad_x."""
    if is_gpu(x):
        return _gpu_backward(grad_y, x, weight, mean, rstd, grad_sum)
    xhat = (x - mean) * rstd
    g = grad_y * weight
    grad_x = rstd * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    if grad_sum is not None:
        grad_x = grad_x + grad_sum
    leading = tuple(range(x.ndim - 1))
    return grad_x, (grad_y * xhat).sum(axis=leading), grad_y.sum(axis=leading)


def _held_pieces(x: Any) -> int:
    """The pieces of a row each lane holds in registers (cuda/layernorm.cu's Walk): 0 where the row is too
    wide to hold."""
    pieces = -(-x.shape[-1] // (32 * build.per_load(x)))
    return pieces if pieces <= MAX_HELD else 0


def _row_kernel(kind: str, x: Any) -> str:
    """The name of layernorm_<kind> for x's rows: its type, whether its rows are read in 16-byte vectors,
    and the pieces of a row a lane holds in registers."""
    return f"layernorm_{kind}<{build.type_name(x)}, {build.row_vectors(x)}, {_held_pieces(x)}>"


def _gpu_forward(x: Any, addend: Any, weight: Any, bias: Any, eps: float) -> tuple[Any, Any, Any, Any]:
    """(y, mean, rstd, sum): with addend None the kernel normalises x itself (sum is None)."""
    import cupy

    width = x.shape[-1]
    rows = x.size // width
    x, weight, bias = (cupy.ascontiguousarray(a, dtype=x.dtype) for a in (x, weight, bias))  # no copy when they fit
    y = cupy.empty(x.shape, x.dtype)
    total = None if addend is None else cupy.empty(x.shape, x.dtype)
    mean = cupy.empty((*x.shape[:-1], 1), dtype=cupy.float32)
    rstd = cupy.empty(mean.shape, mean.dtype)
    build.kernel("layernorm.cu", _row_kernel("forward", x))(
        ((rows + WARPS_PER_BLOCK - 1) // WARPS_PER_BLOCK,), (32 * WARPS_PER_BLOCK,),
        (x, build.optional_array(addend, x.dtype), weight, bias, y, build.optional_array(total, x.dtype), mean, rstd,
         np.int32(rows), np.int32(width), np.float32(eps)))
    return y, mean, rstd, total


def _gpu_backward(grad_y: Any, x: Any, weight: Any, mean: Any, rstd: Any, grad_sum: Any) -> tuple[Any, Any, Any]:
    import cupy

    width = x.shape[-1]
    rows = x.size // width
    grad_y, x = cupy.ascontiguousarray(grad_y), cupy.ascontiguousarray(x)
    grad_x = cupy.empty(x.shape, x.dtype)
    held = _held_pieces(x) > 0
    blocks = -(-rows // (WARPS_PER_BLOCK * (ROWS_PER_WARP if held else 1)))
    slices = blocks if held else min(MAX_SLICES, max(-(-rows // ROWS_PER_SLICE), 1))
    partials = cupy.empty((2, slices, width), dtype=cupy.float32)  # [weight, bias]
    build.kernel("layernorm.cu", _row_kernel("backward", x))(
        (blocks,), (32 * WARPS_PER_BLOCK,),
        (grad_y, x, cupy.ascontiguousarray(weight, dtype=x.dtype), mean, rstd, build.optional_array(grad_sum, x.dtype),
         grad_x, partials[0], partials[1], np.int32(rows), np.int32(width)))
    if not held:
        build.kernel("layernorm.cu", f"layernorm_backward_params<{build.type_name(x)}>")(
            ((width + 255) // 256, slices), (256,),
            (grad_y, x, mean, rstd, partials[0], partials[1], np.int32(rows), np.int32(width)))
    grad_weight, grad_bias = sum_partials(partials, weight.dtype)
    return grad_x, grad_weight, grad_bias
