"""AdamW (Loshchilov and Hutter, 2019, Algorithm 2): Adam with decoupled weight decay.

For one parameter p with gradient g (already multiplied by `grad_scale`, which is how global-norm
clipping enters), at step t = 1, 2, ...:

    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g^2
    p = p - lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps) - lr * weight_decay * p

The decay term uses p before this step's Adam update, as PyTorch's AdamW does. Updates p, m and v in
place.

Mixed precision: p, m and v are float32 (the master weights); the model computes with a bf16 working
copy, which receives p rounded to bf16 after every update, and produces bf16 gradients.
`adamw_update` does the whole model: on the GPU one launch of cuda/adamw.cu over every tensor (a
chunk table maps blocks to tensors), and one more for the global gradient norm.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from minimoe.backend import array_module, is_gpu
from minimoe.cuda import build

CHUNK = 65536  # elements per block of the multi-tensor kernels
THREADS = 512


def adamw_step(
    param: Any, grad: Any, exp_avg: Any, exp_avg_sq: Any, *, lr: float, beta1: float, beta2: float,
    eps: float, weight_decay: float, step: int, grad_scale: float = 1.0,
) -> None:
    xp = array_module(param)
    scaled_grad = grad * grad_scale if grad_scale != 1.0 else grad
    exp_avg *= beta1
    exp_avg += (1.0 - beta1) * scaled_grad
    exp_avg_sq *= beta2
    exp_avg_sq += (1.0 - beta2) * scaled_grad * scaled_grad
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    denominator = xp.sqrt(exp_avg_sq / bias_correction2) + eps
    param *= 1.0 - lr * weight_decay
    param -= (lr / bias_correction1) * exp_avg / denominator


def adamw_update(values: list[Any], grads: list[Any], exp_avgs: list[Any], exp_avg_sqs: list[Any],
                 working: list[Any], weight_decays: list[float], *, lr: float, beta1: float, beta2: float,
                 eps: float, step: int, grad_scale: Any = 1.0) -> None:
    """adamw_step on every tensor i (values[i] the float32 master, or the parameter itself), then
    working[i][...] = values[i] where a working copy is given (None otherwise). grad_scale may be a
    device scalar (no host synchronisation on the GPU)."""
    if is_gpu(values[0]) and all(v.dtype == np.float32 for v in values):
        _gpu_adamw_update(values, grads, exp_avgs, exp_avg_sqs, working, weight_decays, lr, beta1, beta2, eps,
                          step, grad_scale)
        return
    for value, grad, exp_avg, exp_avg_sq, copy, decay in zip(values, grads, exp_avgs, exp_avg_sqs, working,
                                                               weight_decays):
        adamw_step(value, grad.astype(value.dtype), exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                   weight_decay=decay, step=step, grad_scale=float(grad_scale))
        if copy is not None:
            copy[...] = value.astype(copy.dtype)


def sum_of_squares(grads: list[Any]) -> Any:
    """sum over every element of every gradient of g^2, accumulated in float32 at least (a 0-d array)."""
    if is_gpu(grads[0]):
        return _gpu_sum_of_squares(grads)
    accumulate = np.promote_types(grads[0].dtype, np.float32)
    return sum((g.astype(accumulate) ** 2).sum() for g in grads)


def _tables(sizes: list[int]) -> tuple[Any, Any, Any, int]:
    """(sizes, chunk_tensor, chunk_start) as device arrays, and the number of chunks."""
    import cupy

    chunk_tensor, chunk_start = [], []
    for tensor, size in enumerate(sizes):
        for start in range(0, size, CHUNK):
            chunk_tensor.append(tensor)
            chunk_start.append(start)
    return (cupy.asarray(np.array(sizes, np.int64)), cupy.asarray(np.array(chunk_tensor, np.int32)),
            cupy.asarray(np.array(chunk_start, np.int64)), len(chunk_tensor))


def _pointers(arrays: list[Any]) -> Any:
    import cupy

    return cupy.asarray(np.array([0 if a is None else a.data.ptr for a in arrays], np.uint64))


def _grad_flags(grads: list[Any]) -> Any:
    import cupy

    for g in grads:
        if g.dtype.name not in ("float32", "bfloat16") or not g.flags.c_contiguous:
            raise TypeError(f"fused AdamW takes contiguous float32 or bf16 gradients, got {g.dtype}")
    return cupy.asarray(np.array([g.dtype.name == "bfloat16" for g in grads], np.int32))


def _gpu_adamw_update(values, grads, exp_avgs, exp_avg_sqs, working, weight_decays, lr, beta1, beta2, eps, step,
                      grad_scale) -> None:
    import cupy

    sizes, chunk_tensor, chunk_start, chunks = _tables([v.size for v in values])
    scale = cupy.asarray(grad_scale, dtype=cupy.float32).reshape(1)
    build.kernel("adamw.cu", "adamw_multi_tensor")(
        (chunks,), (THREADS,),
        (_pointers(values), _pointers(exp_avgs), _pointers(exp_avg_sqs), _pointers(grads), _pointers(working),
         _grad_flags(grads), cupy.asarray(np.array(weight_decays, np.float32)), sizes, chunk_tensor, chunk_start,
         np.int32(CHUNK), np.float32(lr), np.float32(beta1), np.float32(beta2), np.float32(eps),
         np.float32(1.0 - beta1**step), np.float32(1.0 - beta2**step), scale))


def _gpu_sum_of_squares(grads: list[Any]) -> Any:
    import cupy

    sizes, chunk_tensor, chunk_start, chunks = _tables([g.size for g in grads])
    partial = cupy.empty(chunks, dtype=cupy.float32)
    build.kernel("adamw.cu", "sum_of_squares_multi_tensor")(
        (chunks,), (THREADS,), (_pointers(grads), _grad_flags(grads), sizes, chunk_tensor, chunk_start,
                                np.int32(CHUNK), partial))
    return partial.sum()
