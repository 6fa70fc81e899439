"""AdamW with decoupled weight decay, a cosine learning-rate schedule with linear warm-up, and
global-norm gradient clipping: the GPT-2 / nanoGPT training recipe.

The update itself is the kernel family minimoe.cuda.adamw; this file holds the state (first and second
moments per parameter, the step count) and the bookkeeping around it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from minimoe import backend
from minimoe.cuda.adamw import adamw_step
from minimoe.nn import Parameter


def cosine_lr(step: int, max_lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """Learning rate for `step` (0-based): linear warm-up to max_lr over warmup_steps, then cosine decay
    to min_lr at decay_steps, then min_lr (Loshchilov and Hutter, 2017; GPT-3 appendix B)."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def global_grad_norm(parameters: list[Parameter]) -> float:
    """sqrt of the sum of squares of every gradient element (parameters without a gradient skipped)."""
    total = 0.0
    for parameter in parameters:
        if parameter.grad is not None:
            total += float((parameter.grad.astype(np.float32) ** 2).sum())
    return math.sqrt(total)


def clip_scale(grad_norm: float, max_norm: float) -> float:
    """The factor that brings the global gradient norm down to max_norm (1 when it is already below,
    or when clipping is off with max_norm <= 0)."""
    if max_norm <= 0 or grad_norm <= max_norm:
        return 1.0
    return max_norm / (grad_norm + 1e-6)


class AdamW:
    def __init__(self, parameters: list[Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.1):
        self.parameters = parameters
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.step_count = 0
        self.exp_avg = [backend.array_module(p.data).zeros_like(p.data) for p in parameters]
        self.exp_avg_sq = [backend.array_module(p.data).zeros_like(p.data) for p in parameters]

    def step(self, grad_scale: float = 1.0) -> None:
        """One update of every parameter that has a gradient; `grad_scale` multiplies the gradients
        first (global-norm clipping)."""
        self.step_count += 1
        beta1, beta2 = self.betas
        for parameter, exp_avg, exp_avg_sq in zip(self.parameters, self.exp_avg, self.exp_avg_sq):
            if parameter.grad is None:
                continue
            adamw_step(parameter.data, parameter.grad, exp_avg, exp_avg_sq, lr=self.lr, beta1=beta1,
                       beta2=beta2, eps=self.eps, weight_decay=self.weight_decay if parameter.decay else 0.0,
                       step=self.step_count, grad_scale=grad_scale)

    def state_dict(self) -> dict[str, Any]:
        """Moments as host arrays, indexed like the parameter list, plus the step count."""
        state: dict[str, Any] = {"step_count": self.step_count}
        for index, (exp_avg, exp_avg_sq) in enumerate(zip(self.exp_avg, self.exp_avg_sq)):
            state[f"exp_avg.{index}"] = backend.to_numpy(exp_avg)
            state[f"exp_avg_sq.{index}"] = backend.to_numpy(exp_avg_sq)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for index, parameter in enumerate(self.parameters):
            for name, moments in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
                saved = state.get(f"{name}.{index}")
                if saved is None or tuple(saved.shape) != parameter.shape:
                    raise ValueError(f"optimizer state {name}.{index} is missing or does not fit "
                                     f"parameter shape {parameter.shape}")
                moments[index] = backend.asarray(saved).astype(parameter.dtype)
        self.step_count = int(state["step_count"])
