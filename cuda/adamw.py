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
chunk table maps blocks to tensors), and one more for the global gradient norm. The learning rate and the
bias corrections come as one small array (`hyperparameters`), on the GPU in device memory, and the
gradients' scale as a number or a 0-d array: a CUDA graph of the update then replays each step with that
step's values. A non-finite scale leaves everything as it was (how a step with a non-finite loss or
gradient norm is refused without the host reading either first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from minimoe.backend import array_module, is_gpu
from minimoe.cuda import build

CHUNK = 65536  # elements per block of the multi-tensor kernels
THREADS = 512


def hyperparameters(lr: float, beta1: float, beta2: float, step: int) -> np.ndarray:
    """[lr, 1 - beta1^t, 1 - beta2^t] for step t (1-based), float32: what adamw_update reads."""
    return np.array([lr, 1.0 - beta1**step, 1.0 - beta2**step], dtype=np.float32)


def adamw_step(
    param: Any, grad: Any, exp_avg: Any, exp_avg_sq: Any, *, lr: float, beta1: float, beta2: float,
    eps: float, weight_decay: float, bias_correction1: float, bias_correction2: float, grad_scale: float = 1.0,
) -> None:
    """The update above for one tensor, in place; bias_correction1 = 1 - beta1^t, bias_correction2 =
    1 - beta2^t."""
    xp = array_module(param)
    scaled_grad = grad * grad_scale if grad_scale != 1.0 else grad
    exp_avg *= beta1
    exp_avg += (1.0 - beta1) * scaled_grad
    exp_avg_sq *= beta2
    exp_avg_sq += (1.0 - beta2) * scaled_grad * scaled_grad
    denominator = xp.sqrt(exp_avg_sq / bias_correction2) + eps
    param *= 1.0 - lr * weight_decay
    param -= (lr / bias_correction1) * exp_avg / denominator


@dataclass
class Tables:
    """What the multi-tensor kernels read about a list of tensors, in device memory: the sizes, the chunk
    of each block (its tensor and first element), the tensors' pointers by role (0 where a tensor has no
    array in that role), the gradients' dtypes and the weight decays. Built once for a set of arrays and
    reused while they stay where they are (an optimizer's state never moves; gradients move when they are
    allocated anew, but not in a CUDA graph's replays)."""

    key: tuple[Any, ...]
    chunks: int
    sizes: Any
    chunk_tensor: Any
    chunk_start: Any
    grads: Any
    grad_is_bf16: Any
    values: Any = None
    exp_avgs: Any = None
    exp_avg_sqs: Any = None
    working: Any = None
    weight_decay: Any = None


def tables_key(*arrays: list[Any]) -> tuple[Any, ...]:
    """What the tables of these lists of arrays depend on: each array's address, size and dtype."""
    return tuple(None if a is None else (a.data.ptr, a.size, a.dtype.name) for role in arrays for a in role)


def tables(grads: list[Any], values: list[Any] | None = None, exp_avgs: list[Any] | None = None,
           exp_avg_sqs: list[Any] | None = None, working: list[Any] | None = None,
           weight_decays: list[float] | None = None) -> Tables:
    """The device tables of one multi-tensor launch over `grads` (and, for the update, the other roles)."""
    import cupy

    for g in grads:
        if g.dtype.name not in ("float32", "bfloat16") or not g.flags.c_contiguous:
            raise TypeError(f"fused AdamW takes contiguous float32 or bf16 gradients, got {g.dtype}")
    chunk_tensor, chunk_start = [], []
    for tensor, g in enumerate(grads):
        for start in range(0, g.size, CHUNK):
            chunk_tensor.append(tensor)
            chunk_start.append(start)

    def pointers(arrays: list[Any] | None) -> Any:
        if arrays is None:
            return None
        return cupy.asarray(np.array([0 if a is None else a.data.ptr for a in arrays], np.uint64))

    roles = (grads, values, exp_avgs, exp_avg_sqs, working)
    return Tables(
        key=tables_key(*(role or [] for role in roles)) + tuple(weight_decays or ()), chunks=len(chunk_tensor),
        sizes=cupy.asarray(np.array([g.size for g in grads], np.int64)),
        chunk_tensor=cupy.asarray(np.array(chunk_tensor, np.int32)),
        chunk_start=cupy.asarray(np.array(chunk_start, np.int64)), grads=pointers(grads),
        grad_is_bf16=cupy.asarray(np.array([g.dtype.name == "bfloat16" for g in grads], np.int32)),
        values=pointers(values), exp_avgs=pointers(exp_avgs), exp_avg_sqs=pointers(exp_avg_sqs),
        working=pointers(working),
        weight_decay=None if weight_decays is None else cupy.asarray(np.array(weight_decays, np.float32)))


def adamw_update(values: list[Any], grads: list[Any], exp_avgs: list[Any], exp_avg_sqs: list[Any],
                 working: list[Any], weight_decays: list[float], *, hyper: Any, beta1: float, beta2: float,
                 eps: float, grad_scale: Any = 1.0, launch_tables: Tables | None = None) -> None:
    """adamw_step on every tensor i (values[i] the float32 master, or the parameter itself), then
    working[i][...] = values[i] where a working copy is given (None otherwise); nothing at all when
    grad_scale is not finite. hyper: hyperparameters(...), on the values' device. grad_scale may be a
    device scalar (no host synchronisation on the GPU). launch_tables: tables(...) of these arrays, built
    here when not given."""
    if is_gpu(values[0]) and all(v.dtype == np.float32 for v in values):
        import cupy

        launch_tables = launch_tables or tables(grads, values, exp_avgs, exp_avg_sqs, working, weight_decays)
        scale = cupy.asarray(grad_scale, dtype=cupy.float32).reshape(1)
        build.kernel("adamw.cu", "adamw_multi_tensor")(
            (launch_tables.chunks,), (THREADS,),
            (launch_tables.values, launch_tables.exp_avgs, launch_tables.exp_avg_sqs, launch_tables.grads,
             launch_tables.working, launch_tables.grad_is_bf16, launch_tables.weight_decay, launch_tables.sizes,
             launch_tables.chunk_tensor, launch_tables.chunk_start, np.int32(CHUNK), np.float32(beta1),
             np.float32(beta2), np.float32(eps), hyper, scale))
        return
    scale = float(grad_scale)
    if not math.isfinite(scale):
        return
    lr, bias_correction1, bias_correction2 = hyper.tolist()
    for value, grad, exp_avg, exp_avg_sq, copy, decay in zip(values, grads, exp_avgs, exp_avg_sqs, working,
                                                               weight_decays):
        adamw_step(value, grad.astype(value.dtype), exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                   weight_decay=decay, bias_correction1=bias_correction1, bias_correction2=bias_correction2,
                   grad_scale=scale)
        if copy is not None:
            copy[...] = value.astype(copy.dtype)


def sum_of_squares(grads: list[Any], launch_tables: Tables | None = None) -> Any:
    """sum over every element of every gradient of g^2, accumulated in float32 at least (a 0-d array).
    launch_tables: tables(grads, ...), built here when not given (GPU)."""
    if is_gpu(grads[0]):
        import cupy

        launch_tables = launch_tables or tables(grads)
        partial = cupy.empty(launch_tables.chunks, dtype=cupy.float32)
        build.kernel("adamw.cu", "sum_of_squares_multi_tensor")(
            (launch_tables.chunks,), (THREADS,),
            (launch_tables.grads, launch_tables.grad_is_bf16, launch_tables.sizes, launch_tables.chunk_tensor,
             launch_tables.chunk_start, np.int32(CHUNK), partial))
        return partial.sum()
    accumulate = np.promote_types(grads[0].dtype, np.float32)
    return sum((g.astype(accumulate) ** 2).sum() for g in grads)
