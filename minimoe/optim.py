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
from minimoe.cuda.adamw import Tables, adamw_update, hyperparameters, sum_of_squares, tables, tables_key
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


def global_grad_norm(parameters: list[Parameter], launch_tables: Tables | None = None) -> Any:
    """sqrt of the sum of squares of every gradient element (parameters without a gradient skipped),
    as a 0-d array on the parameters' device: reading it is the caller's choice (a host sync on a GPU).
    launch_tables: the GPU kernel's tables of these gradients, when the caller keeps them (AdamW)."""
    grads = [parameter.grad for parameter in parameters if parameter.grad is not None]
    return backend.array_module(grads[0]).sqrt(sum_of_squares(grads, launch_tables))


def clip_scale(grad_norm: Any, max_norm: float, loss: Any = None) -> Any:
    """The factor the update multiplies the gradients by: max_norm / norm when the global gradient norm
    is above max_norm (clipping), else 1 (and always 1 with clipping off, max_norm <= 0); NaN when the
    norm, or the loss if given, is not finite, which AdamW reads as "change nothing". A 0-d array like
    grad_norm: no host synchronisation on the GPU."""
    xp = backend.array_module(grad_norm)
    scale = xp.where(grad_norm > max_norm, max_norm / (grad_norm + 1e-6), 1.0) if max_norm > 0 else 1.0
    finite = xp.isfinite(grad_norm) if loss is None else xp.isfinite(grad_norm) & xp.isfinite(loss)
    return xp.where(finite, scale, xp.nan)


class AdamW:
    """AdamW over a model's parameters. A parameter kept in bf16 (the GPU's working copy) gets a float32
    master weight here: the update happens on the master, and the working copy receives it rounded."""

    def __init__(self, parameters: list[Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.1):
        self.parameters = parameters
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.step_count = 0
        self.master = [p.data.astype(np.float32) if p.data.dtype.itemsize < 4 else None for p in parameters]
        self.exp_avg = [backend.array_module(v).zeros_like(v) for v in self.values()]
        self.exp_avg_sq = [backend.array_module(v).zeros_like(v) for v in self.values()]
        # [lr, 1 - beta1^t, 1 - beta2^t] of the coming update, where the update kernel reads it: written in
        # place by advance(), so that a CUDA graph of update() replays with each step's values.
        self.hyper = backend.array_module(parameters[0].data).zeros(3, dtype=np.float32)
        self._tables: Tables | None = None

    def values(self) -> list[Any]:
        """The arrays the update acts on: the float32 master where there is one, else the parameter."""
        return [p.data if master is None else master for p, master in zip(self.parameters, self.master)]

    def step(self, grad_scale: Any = 1.0) -> None:
        """One update of every parameter that has a gradient; `grad_scale` (a number or a 0-d array)
        multiplies the gradients first (global-norm clipping; see clip_scale)."""
        self.advance()
        self.update(grad_scale)

    def advance(self) -> None:
        """Count the coming step and write its learning rate and bias corrections for update()."""
        self.step_count += 1
        backend.write_into(self.hyper, hyperparameters(self.lr, *self.betas, self.step_count))

    def update(self, grad_scale: Any = 1.0) -> None:
        """The update of the step advance() counted, from the gradients the parameters hold now: only
        launches on a GPU, so it can be captured in a CUDA graph."""
        active = self._active()
        values = self.values()
        beta1, beta2 = self.betas
        adamw_update([values[i] for i in active], [self.parameters[i].grad for i in active],
                     [self.exp_avg[i] for i in active], [self.exp_avg_sq[i] for i in active],
                     [None if self.master[i] is None else self.parameters[i].data for i in active],
                     [self.weight_decay if self.parameters[i].decay else 0.0 for i in active],
                     hyper=self.hyper, beta1=beta1, beta2=beta2, eps=self.eps, grad_scale=grad_scale,
                     launch_tables=self.launch_tables())

    def grad_norm(self) -> Any:
        """The global gradient norm of the parameters' gradients, through the update's tables."""
        return global_grad_norm(self.parameters, self.launch_tables())

    def launch_tables(self) -> Tables | None:
        """The device tables of the update's launch over the present gradients (None off the GPU): built
        when the gradients or the state moved since the last call, else the same ones again, uploaded
        once (a CUDA graph of update() keeps reading the tables of its capture)."""
        roles, decays = self.launch_roles()
        if not (roles[0] and backend.is_gpu(roles[1][0])):
            return None
        if self._tables is None or self._tables.key != tables_key(*roles) + tuple(decays):
            self._tables = tables(*roles, weight_decays=decays)
        return self._tables

    def launch_roles(self) -> tuple[tuple[list[Any], ...], list[float]]:
        """What the update's launch acts on, for the parameters with a gradient: their arrays by role
        (gradients, values, the two moments, the working copies where the values are float32 masters, else
        None) and their weight decays."""
        active = self._active()
        values = self.values()
        roles = ([self.parameters[i].grad for i in active], [values[i] for i in active],
                 [self.exp_avg[i] for i in active], [self.exp_avg_sq[i] for i in active],
                 [None if self.master[i] is None else self.parameters[i].data for i in active])
        return roles, [self.weight_decay if self.parameters[i].decay else 0.0 for i in active]

    def _active(self) -> list[int]:
        return [i for i, p in enumerate(self.parameters) if p.grad is not None]

    def state_dict(self) -> dict[str, Any]:
        """Moments (and master weights) as host arrays, indexed like the parameter list, plus the step."""
        state: dict[str, Any] = {"step_count": self.step_count}
        for index, (exp_avg, exp_avg_sq, master) in enumerate(zip(self.exp_avg, self.exp_avg_sq, self.master)):
            state[f"exp_avg.{index}"] = backend.to_numpy(exp_avg)
            state[f"exp_avg_sq.{index}"] = backend.to_numpy(exp_avg_sq)
            if master is not None:
                state[f"master.{index}"] = backend.to_numpy(master)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for index, value in enumerate(self.values()):
            names = [("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)]
            if self.master[index] is not None:
                names.append(("master", self.master))
            for name, arrays in names:
                saved = state.get(f"{name}.{index}")
                if saved is None or tuple(saved.shape) != value.shape:
                    raise ValueError(f"optimizer state {name}.{index} is missing or does not fit "
                                     f"parameter shape {value.shape}")
                arrays[index] = backend.asarray(saved).astype(value.dtype)
        for parameter, master in zip(self.parameters, self.master):
            if master is not None:
                parameter.data[...] = master.astype(parameter.dtype)
        self.step_count = int(state["step_count"])
