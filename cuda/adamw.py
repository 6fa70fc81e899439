"""AdamW (Loshchilov and Hutter, 2019, Algorithm 2): Adam with decoupled weight decay.

For one parameter p with gradient g (already multiplied by `grad_scale`, which is how global-norm
clipping enters), at step t = 1, 2, ...:

    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g^2
    p = p - lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps) - lr * weight_decay * p

The decay term uses p before this step's Adam update, as PyTorch's AdamW does. Updates p, m and v in
place.
"""

from typing import Any

from minimoe.backend import array_module


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
