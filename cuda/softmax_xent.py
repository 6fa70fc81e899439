"""Fused softmax + cross-entropy: the language-model loss from logits, without storing probabilities.

For logits z [N, V] and targets t [N], with rows whose target equals `ignore_index` left out:

    loss = (1 / n_valid) * sum_{valid n} (logsumexp(z_n) - z_{n, t_n})

Forward keeps only logsumexp [N]; backward rebuilds the softmax from the logits and the saved
logsumexp, so the [N, V] probabilities never exist as a second array beside the logits:

    d loss / d z_{n, v} = (softmax(z_n)_v - [v == t_n]) / n_valid     (0 for ignored rows)

A batch with every row ignored has loss 0 and zero gradient (n_valid is clamped to 1).

GPU: cuda/softmax_xent.cu, one block per row (the forward in one pass over it: an online softmax),
float32 arithmetic on bf16 or float32 logits; the count of valid rows stays on the device (no host
synchronisation).
"""

from typing import Any

import numpy as np

from minimoe.backend import array_module, is_gpu
from minimoe.cuda import build
from minimoe.cuda.softmax import logsumexp as row_logsumexp

build.register("softmax_xent.cu", *(f"cross_entropy_{d}<{t}, {v}>" for d in ("forward", "backward")
                                    for t in ("float", "bf16") for v in ("false", "true")))
THREADS = 256


def _valid_rows(targets: Any, ignore_index: int) -> tuple[Any, Any, Any]:
    xp = array_module(targets)
    valid = targets != ignore_index
    safe_targets = xp.where(valid, targets, 0)
    count = max(int(valid.sum()), 1)
    return valid, safe_targets, count


def cross_entropy_forward(logits: Any, targets: Any, ignore_index: int = -100) -> tuple[Any, Any]:
    """Returns (mean loss as a 0-d array, logsumexp [N]) for logits [N, V] and integer targets [N]."""
    if is_gpu(logits):
        return _gpu_forward(logits, targets, ignore_index)
    xp = array_module(logits)
    logsumexp = row_logsumexp(logits)
    valid, safe_targets, count = _valid_rows(targets, ignore_index)
    target_logit = xp.take_along_axis(logits, safe_targets[:, None], axis=-1)[:, 0]
    loss = (xp.where(valid, logsumexp - target_logit, 0.0).sum() / count).astype(logits.dtype)
    return loss, logsumexp


def cross_entropy_backward(
    grad_loss: Any, logits: Any, targets: Any, logsumexp: Any, ignore_index: int = -100, out: Any = None
) -> Any:
    """The logits' gradient, into `out` when given (it may be `logits` itself: a caller done with the
    logits, such as the model's loss in training, lets the gradient take their memory)."""
    if is_gpu(logits):
        return _gpu_backward(grad_loss, logits, targets, logsumexp, ignore_index, out)
    xp = array_module(logits)
    valid, safe_targets, count = _valid_rows(targets, ignore_index)
    grad_logits = xp.subtract(logits, logsumexp[:, None], out=out)
    xp.exp(grad_logits, out=grad_logits)
    grad_logits[xp.arange(len(targets)), safe_targets] -= 1.0
    grad_logits *= (valid * (grad_loss / count))[:, None].astype(logits.dtype)
    return grad_logits


def _valid_count(targets: Any, ignore_index: int) -> Any:
    """max(number of valid rows, 1) as a float32 device scalar."""
    import cupy

    return cupy.maximum((targets != ignore_index).sum(), 1).astype(cupy.float32)


def _gpu_forward(logits: Any, targets: Any, ignore_index: int) -> tuple[Any, Any]:
    import cupy

    rows, vocab = logits.shape
    logits, targets = cupy.ascontiguousarray(logits), cupy.ascontiguousarray(targets, dtype=cupy.int64)
    row_loss = cupy.empty(rows, dtype=cupy.float32)
    logsumexp = cupy.empty(rows, dtype=cupy.float32)
    build.kernel("softmax_xent.cu", f"cross_entropy_forward<{build.type_name(logits)}, {build.row_vectors(logits)}>")(
        (rows,), (THREADS,), (logits, targets, row_loss, logsumexp, np.int32(vocab), np.int64(ignore_index)))
    return row_loss.sum() / _valid_count(targets, ignore_index), logsumexp


def _gpu_backward(grad_loss: Any, logits: Any, targets: Any, logsumexp: Any, ignore_index: int, out: Any) -> Any:
    import cupy

    rows, vocab = logits.shape
    logits, targets = cupy.ascontiguousarray(logits), cupy.ascontiguousarray(targets, dtype=cupy.int64)
    scale = (cupy.asarray(grad_loss, dtype=cupy.float32) / _valid_count(targets, ignore_index)).reshape(1)
    if out is not None and (out.shape != logits.shape or out.dtype != logits.dtype or not out.flags.c_contiguous):
        raise ValueError(f"out must be a contiguous {logits.dtype} array of shape {logits.shape}, got a "
                         f"{'' if out.flags.c_contiguous else 'non-contiguous '}{out.dtype} array of shape {out.shape}")
    grad_logits = cupy.empty(logits.shape, logits.dtype) if out is None else out
    build.kernel("softmax_xent.cu", f"cross_entropy_backward<{build.type_name(logits)}, {build.row_vectors(logits)}>")(
        (rows,), (THREADS,), (logits, targets, logsumexp, scale, grad_logits, np.int32(vocab), np.int64(ignore_index)))
    return grad_logits
