"""The gate: the router's logits (Gate, a float32 Linear d -> E), and from logits [T, E] to a Routing,
the mapping table every later step reads.

`route` decides the capacity, draws the training-time noise DeepSpeed's gates use, calls the gating
kernel family (minimoe.cuda.gating: its docstring states every rule with its formula), and wraps the two
differentiable results, the combine weights and the load-balancing loss (and optionally the router
z-loss), as tensors on the tape. The integer table (expert_index, position) carries no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

import minimoe.cuda.gating as gating_kernels
from minimoe import backend
from minimoe.nn import Module, Parameter, normal_init
from minimoe.tensor import Function, Tensor

NOISY_GATE_POLICIES = ("", "Jitter", "RSample")
JITTER_EPS = 1e-2  # DeepSpeed's multiplicative_jitter epsilon


@dataclass
class Routing:
    expert_index: Any  # [T, k] array: the experts each token chose (distinct)
    position: Any  # [T, k] array: slot in the expert's buffer, -1 where dropped
    weight: Tensor  # [T, k]: combine weights, 0 where dropped; differentiable
    capacity: int  # C
    tokens_per_expert: Any  # [E] array: choices per expert before drops
    dropped: Any  # 0-d array: fraction of the T * k choices dropped
    aux_loss: Tensor  # load-balancing loss, differentiable
    z_loss: Tensor | None  # router z-loss when asked for
    source_token: Any = None  # [E * C] array: the token in each buffer slot, -1 where none; None: not computed

    @property
    def num_experts(self) -> int:
        return len(self.tokens_per_expert)


class GateLogits(Function):
    """x [T, d] (any float dtype) -> the logits x @ weight [T, E] in the weight's dtype."""

    def forward(ctx, x, weight):
        ctx.save(x, weight)
        return gating_kernels.gate_logits(x, weight)

    def backward(ctx, grad):
        return gating_kernels.gate_logits_backward(grad, *ctx.saved)


class Gate(Module):
    """The router's Linear(d -> E) without bias. DeepSpeed's TopKGate keeps its weight and computes the
    logits in float32 whatever the model's precision: routing decisions and the softmax are too
    sensitive for bf16. So the weight stays float32 when the model is cast to bf16 (keep_float32)."""

    def __init__(self, width: int, num_experts: int, rng: np.random.Generator):
        self.weight = Parameter(normal_init((width, num_experts), 0.02, rng), keep_float32=True)

    def forward(self, x: Tensor) -> Tensor:
        return GateLogits.apply(x, self.weight)


class GateWeights(Function):
    """logits -> the combine weights gating computed; backward through the kept (renormalised) probs."""

    def forward(ctx, logits, gating):
        ctx.gating = gating
        return gating.weight

    def backward(ctx, grad):
        return gating_kernels.gate_weight_backward(grad, ctx.gating)


class LoadBalanceLoss(Function):
    def forward(ctx, logits, gating):
        ctx.gating = gating
        return gating.aux_loss

    def backward(ctx, grad):
        return gating_kernels.aux_loss_backward(grad, ctx.gating)


class RouterZLoss(Function):
    def forward(ctx, logits):
        loss, row_logsumexp = gating_kernels.z_loss_forward(logits)
        ctx.save(logits, row_logsumexp)
        return loss

    def backward(ctx, grad):
        return gating_kernels.z_loss_backward(grad, *ctx.saved)


def jitter(shape: tuple[int, ...], dtype: Any) -> Any:
    """Uniform(1 - eps, 1 + eps) factors for the gate input (DeepSpeed's multiplicative_jitter)."""
    return (1.0 - JITTER_EPS + 2.0 * JITTER_EPS * backend.random_uniform(shape)).astype(dtype)


def route(logits: Tensor | Any, k: int, capacity_factor: float, min_capacity: int, drop_tokens: bool = True, *,
          training: bool = False, noisy_gate_policy: str = "", use_rts: bool = False,
          second_expert_sampling: bool = False, z_loss: bool = False) -> Routing:
    """Route T tokens by their gate logits [T, E] to k in {1, 2} experts each (see minimoe.cuda.gating).

    Training-only randomness, each as DeepSpeed applies it: `noisy_gate_policy="RSample"` (top-1) adds
    Gumbel noise to the logits that pick the first expert; `use_rts` (top-1) lets a random priority,
    not token order, decide which tokens an over-full expert keeps; `second_expert_sampling` (top-2)
    picks the second expert from Gumbel-noised logits. ("Jitter" acts on the gate's input, in the layer.)
    The capacity is max(min_capacity, ceil(T / E * capacity_factor * k)), or dropless when drop_tokens
    is False."""
    if not isinstance(logits, Tensor):
        logits = Tensor(logits)
    if noisy_gate_policy not in NOISY_GATE_POLICIES:
        raise ValueError(f"noisy_gate_policy must be one of {NOISY_GATE_POLICIES}, got {noisy_gate_policy!r}")
    if k == 2 and (use_rts or noisy_gate_policy == "RSample"):
        raise ValueError("use_rts and noisy_gate_policy='RSample' apply to top-1 gating only (as in DeepSpeed)")
    num_tokens, num_experts = logits.shape
    data = logits.data
    first_scores = second_scores = priority = None
    if training and noisy_gate_policy == "RSample":
        first_scores = gating_kernels.gumbel_scores(data)
    if training and second_expert_sampling and k == 2:
        second_scores = gating_kernels.gumbel_scores(data)
    if training and use_rts:
        priority = backend.random_uniform((num_tokens,), data.dtype)
    capacity = (gating_kernels.expert_capacity(num_tokens, num_experts, k, capacity_factor, min_capacity)
                if drop_tokens else None)
    gating = gating_kernels.topk_gating(data, k, capacity, first_scores, second_scores, priority)
    return Routing(
        expert_index=gating.expert_index, position=gating.position, weight=GateWeights.apply(logits, gating=gating),
        capacity=gating.capacity, tokens_per_expert=gating.tokens_per_expert, dropped=gating.dropped,
        aux_loss=LoadBalanceLoss.apply(logits, gating=gating), z_loss=RouterZLoss.apply(logits) if z_loss else None,
        source_token=gating.source_token,
    )

