"""The knowledge-distillation loss of Mixture-of-Students (DeepSpeed-MoE sec. 4.2; Hinton, Vinyals and
Dean, 2015): how far the student's softened distribution is from the teacher's.

For student logits s [N, V], teacher logits t [N, V] and a temperature T:

    p = softmax(t / T),  q = softmax(s / T)
    loss = T^2 / N * sum_n KL(p_n || q_n) = T^2 / N * sum_n sum_v p_nv (log p_nv - log q_nv)
    d loss / d s_nv = T / N * (q_nv - p_nv)

(T^2 keeps the gradient's size independent of T, as Hinton et al. scale it.) The teacher's logits are
a constant: no gradient flows into the teacher. As in softmax_xent.py, the forward keeps only each row's
two logsumexps (of s / T and of t / T) and the backward rebuilds q and p from the logits, so no [N, V]
array is stored beside them. One row's KL needs one pass over the row once the maxima are known, since
the p_nv sum to 1:

    KL(p_n || q_n) = sum_v p_nv (t_nv - s_nv) / T - lse(t_n / T) + lse(s_n / T)

Arithmetic in float32 at least (float64 stays float64), whatever the logits' dtype; the loss and the
gradient come back in the student logits' dtype.

GPU: cuda/distillation.cu, one block per row for each direction, float32 arithmetic on bf16 or float32
logits; the loss's sum and scale stay on the device (no host synchronisation).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from minimoe.backend import array_module, is_gpu
from minimoe.cuda import build
from minimoe.cuda.softmax import logsumexp as row_logsumexp

build.register("distillation.cu", *(f"distillation_{d}<{t}>" for d in ("forward", "backward")
                                    for t in ("float", "bf16")))
THREADS = 256


def _check(student: Any, teacher: Any) -> None:
    if student.shape != teacher.shape or student.ndim != 2:
        raise ValueError(f"distillation needs student and teacher logits of one shape [N, V], got {student.shape} "
                         f"and {teacher.shape}")


def distillation_forward(student: Any, teacher: Any, temperature: float) -> tuple[Any, Any, Any]:
    """(loss as a 0-d array, lse(student / T) [N], lse(teacher / T) [N]) for logits [N, V]; the two
    logsumexps are what the backward needs."""
    _check(student, teacher)
    if is_gpu(student):
        return _gpu_forward(student, teacher, temperature)
    compute = np.promote_types(student.dtype, np.float32)
    s, t = student.astype(compute) / temperature, teacher.astype(compute) / temperature
    student_lse, teacher_lse = row_logsumexp(s), row_logsumexp(t)
    p = array_module(student).exp(t - teacher_lse[:, None])
    row_kl = (p * (t - s)).sum(axis=-1) - teacher_lse + student_lse
    loss = row_kl.sum() * (temperature**2 / max(len(student), 1))
    return loss.astype(student.dtype), student_lse, teacher_lse


def distillation_backward(grad_loss: Any, student: Any, teacher: Any, student_lse: Any, teacher_lse: Any,
                          temperature: float) -> Any:
    """d loss / d student logits [N, V], in the student's dtype."""
    if is_gpu(student):
        return _gpu_backward(grad_loss, student, teacher, student_lse, teacher_lse, temperature)
    xp = array_module(student)
    compute = np.promote_types(student.dtype, np.float32)
    q = xp.exp(student.astype(compute) / temperature - student_lse[:, None])
    p = xp.exp(teacher.astype(compute) / temperature - teacher_lse[:, None])
    return (grad_loss * (temperature / max(len(student), 1)) * (q - p)).astype(student.dtype)


def _gpu_forward(student: Any, teacher: Any, temperature: float) -> tuple[Any, Any, Any]:
    import cupy

    rows, vocab = student.shape
    student = cupy.ascontiguousarray(student)
    teacher = cupy.ascontiguousarray(teacher, dtype=student.dtype)
    row_kl, student_lse, teacher_lse = (cupy.empty(rows, dtype=cupy.float32) for _ in range(3))
    build.kernel("distillation.cu", f"distillation_forward<{build.type_name(student)}>")(
        (rows,), (THREADS,), (student, teacher, np.float32(1.0 / temperature), row_kl, student_lse, teacher_lse,
                              np.int32(vocab)))
    loss = row_kl.sum() * np.float32(temperature**2 / max(rows, 1))
    return loss.astype(student.dtype), student_lse, teacher_lse


def _gpu_backward(grad_loss: Any, student: Any, teacher: Any, student_lse: Any, teacher_lse: Any,
                  temperature: float) -> Any:
    import cupy

    rows, vocab = student.shape
    student = cupy.ascontiguousarray(student)
    teacher = cupy.ascontiguousarray(teacher, dtype=student.dtype)
    scale = (cupy.asarray(grad_loss, dtype=cupy.float32) * np.float32(temperature / max(rows, 1))).reshape(1)
    grad_student = cupy.empty(student.shape, student.dtype)
    build.kernel("distillation.cu", f"distillation_backward<{build.type_name(student)}>")(
        (rows,), (THREADS,), (student, teacher, student_lse, teacher_lse, np.float32(1.0 / temperature), scale,
                              grad_student, np.int32(vocab)))
    return grad_student
