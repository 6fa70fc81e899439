"""The knowledge-distillation loss of Mixture-of-Students (DeepSpeed-MoE sec. 4.2; Hinton, Vinyals and
Dean, 2015): how far the student's softened distribution is from the teacher's.

For student logits s [N, V], teacher logits t [N, V] and a temperature T:

    p = softmax(t / T),  q = softmax(s / T)
    loss = T^2 / N * sum_n KL(p_n || q_n) = T^2 / N * sum_n sum_v p_nv (log p_nv - log q_nv)
    d loss / d s_nv = T / N * (q_nv - p_nv)

(T^2 keeps the gradient's size independent of T, as Hinton et al. scale it.) The teacher's logits are
a constant: no gradient flows into the teacher. Arithmetic in float32 at least (float64 stays float64),
whatever the logits' dtype; the loss and gradient are returned in the student logits' dtype.

Reference: NumPy, written against the array module of its inputs, so on a GPU it runs as it is on
CuPy arrays (unfused: several passes over [N, V]; the byte vocabularies keep V at 256).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from minimoe.backend import array_module
from minimoe.cuda.softmax import log_softmax_forward


def distillation_forward(student: Any, teacher: Any, temperature: float) -> tuple[Any, Any, Any]:
    """(loss as a 0-d array, q [N, V], p [N, V]) for student and teacher logits [N, V]; q and p are what
    the backward needs."""
    if student.shape != teacher.shape or student.ndim != 2:
        raise ValueError(f"distillation needs student and teacher logits of one shape [N, V], got {student.shape} "
                         f"and {teacher.shape}")
    xp = array_module(student)
    compute = np.promote_types(student.dtype, np.float32)
    log_q = log_softmax_forward(student.astype(compute) / temperature)
    log_p = log_softmax_forward(teacher.astype(compute) / temperature)
    p = xp.exp(log_p)
    loss = (p * (log_p - log_q)).sum() * (temperature**2 / max(len(student), 1))
    return loss.astype(student.dtype), xp.exp(log_q), p


def distillation_backward(grad_loss: Any, q: Any, p: Any, temperature: float, dtype: Any) -> Any:
    """d loss / d student logits [N, V], in `dtype`."""
    return (grad_loss * (temperature / max(len(q), 1)) * (q - p)).astype(dtype)
