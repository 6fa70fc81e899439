"""Causal scaled dot-product attention (Vaswani et al., 2017, eq. 1) with the GPT decoder mask.

For q, k, v of shape [B, H, T, D] (batch, heads, time, head width):

    scores = q @ k^T / sqrt(D),   scores[t, s] = -inf for s > t      (a token sees only its past)
    probs  = softmax(scores),     out = probs @ v

The reference keeps probs [B, H, T, T] for the backward:

    dv = probs^T @ dout,   dprobs = dout @ v^T,
    dscores = probs * (dprobs - sum_s dprobs * probs),   dq = dscores @ k / sqrt(D),   dk = dscores^T @ q / sqrt(D)

GPU: the four matmuls through cuBLAS (cuda/gemm.py) and the masked softmax and its backward as one
kernel each (cuda/attention.cu, one warp per row, float32 arithmetic). The [B, H, T, T] probabilities
are materialised: this is the path for float32 and for head widths that cuda/flash_attention.py's
kernels (which never hold them) are not built for; ops.CausalAttention picks.
"""

from typing import Any

import numpy as np

from minimoe.backend import array_module, is_gpu
from minimoe.cuda import build
from minimoe.cuda.gemm import matmul

build.register("attention.cu", *(f"causal_softmax_{d}<{t}>" for d in ("forward", "backward")
                                 for t in ("float", "bf16")))
WARPS_PER_BLOCK = 8


def causal_attention_forward(q: Any, k: Any, v: Any) -> tuple[Any, Any]:
    """Returns (out [B, H, T, D], probs [B, H, T, T]). The matmuls run in the inputs' dtype (bf16 on
    the GPU, through cuBLAS); the masked softmax in float32 at least."""
    xp = array_module(q)
    length, width = q.shape[-2], q.shape[-1]
    if is_gpu(q):
        probs = _gpu_softmax("forward", matmul(q, k, transpose_b=True), length, 1.0 / width**0.5)
        return matmul(probs, v), probs
    compute = np.promote_types(q.dtype, np.float32)
    scores = matmul(q, k, transpose_b=True).astype(compute) * (1.0 / width**0.5)
    future = xp.triu(xp.ones((length, length), dtype=bool), k=1)
    scores = xp.where(future, -xp.inf, scores)
    scores = xp.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = (scores / scores.sum(axis=-1, keepdims=True)).astype(q.dtype)
    return matmul(probs, v), probs


def causal_attention_backward(
    grad_out: Any, q: Any, k: Any, v: Any, probs: Any
) -> tuple[Any, Any, Any]:
    compute = np.promote_types(q.dtype, np.float32)
    scale = 1.0 / q.shape[-1] ** 0.5
    grad_v = matmul(probs, grad_out, transpose_a=True)
    grad_probs = matmul(grad_out, v, transpose_b=True)
    if is_gpu(q):
        grad_scores = _gpu_softmax("backward", grad_probs, q.shape[-2], scale, probs)
    else:
        grad_probs = grad_probs.astype(compute)
        probs_compute = probs.astype(compute)
        grad_scores = probs_compute * (grad_probs - (grad_probs * probs_compute).sum(axis=-1, keepdims=True)) * scale
        grad_scores = grad_scores.astype(q.dtype)
    return matmul(grad_scores, k), matmul(grad_scores, q, transpose_a=True), grad_v


def _gpu_softmax(direction: str, values: Any, length: int, scale: float, probs: Any = None) -> Any:
    """forward: probs from scores; backward: grad scores from (grad probs, probs). [..., T, T] arrays."""
    import cupy

    values = cupy.ascontiguousarray(values)
    out = cupy.empty(values.shape, values.dtype)
    rows = values.size // length
    type_name = build.type_name(values)
    inputs = (values,) if probs is None else (values, cupy.ascontiguousarray(probs))
    build.kernel("attention.cu", f"causal_softmax_{direction}<{type_name}>")(
        ((rows + WARPS_PER_BLOCK - 1) // WARPS_PER_BLOCK,), (32 * WARPS_PER_BLOCK,),
        (*inputs, out, np.int64(rows), np.int32(length), np.float32(scale)))
    return out
