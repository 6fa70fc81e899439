"""The gate: the router's logits (Gate, a float32 Linear d -> E), and from logits [T, E] to a Routing,
the mapping table every later step reads.

`route` decides the capacity, draws the noise DeepSpeed's gates use, and runs one tape node, GateRoute,
whose forward is the gating kernel family (minimoe.cuda.gating: its docstring states every rule with
its formula) and whose two differentiable outputs are the combine weights and the load-balancing loss;
the router z-loss is a node of its own. The integer table (expert_index, position) carries no gradient.

Settings and their defaults live in one place, MoESettings; GPTConfig takes its MoE keys' defaults
from it. Where minimoe and DeepSpeed 0.19.8 differ, it is said at the setting.
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
class MoESettings:
    """How an MoE layer routes and weighs its auxiliary losses: DeepSpeed's TopKGate arguments, with its
    defaults where it has one (min_capacity: DeepSpeed's is 8; minimoe's small test batches take 4)."""

    k: int = 1  # experts per token: 1 (top1gating), 2 (top2gating) or more (topkgating)
    capacity_factor: float = 1.0  # training capacity C = max(min_capacity, ceil(T / E * capacity_factor * k))
    eval_capacity_factor: float = 1.0  # the same in evaluation and generation
    min_capacity: int = 4
    drop_tokens: bool = True  # false: dropless, C = the fullest expert's load
    drop_policy: str = "probs"  # k >= 3: an over-full expert keeps its "probs"-largest or first-by-"position" choices
    use_rts: bool = True  # random token selection (top-1 only, as in DeepSpeed; ignored for k >= 2)
    noisy_gate_policy: str = ""  # "", "Jitter" (gate input x U(0.99, 1.01), training) or "RSample" (top-1)
    second_expert_sampling: bool = True  # top-2: second expert from Gumbel-noised logits (k = 2 only)
    # Random token selection and second-expert sampling in evaluation too: DeepSpeed keeps both on when its
    # gate is not training (its evaluated outputs change from call to call); minimoe evaluates
    # deterministically unless this is set.
    eval_randomness: bool = False
    aux_loss_coef: float = 0.01  # weight of the load-balancing loss, summed over MoE layers
    z_loss_coef: float = 0.0  # weight of the router z-loss (ST-MoE); 0 leaves it out


@dataclass
class Routing:
    """One MoE layer's routing of T tokens: the table dispatch and combine read, the differentiable
    weights and losses, and what the training log reports. Arrays stay on the device: reading them on
    the host would stop the GPU pipeline inside every forward, so the log reads them only when it logs."""

    expert_index: Any  # [T, k] array: the experts each token chose (distinct)
    position: Any  # [T, k] array: slot in the expert's buffer, -1 where dropped (or the token is masked)
    weight: Tensor  # [T, k]: combine weights, 0 where dropped; differentiable
    capacity: int  # C
    tokens_per_expert: Any  # [E] array: choices per expert before drops
    dropped: Any  # 0-d array: fraction of the used tokens' choices dropped
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


class GateRoute(Function):
    """logits [T, E] -> (combine weights [T, k], load-balancing loss): the gating decision and its two
    differentiable results in one node. The integer table it decided stays in ctx.gating for `route`."""

    def forward(ctx, logits, k, capacity, first_scores, second_scores, priority, token_mask, drop_policy):
        ctx.gating = gating_kernels.topk_gating(logits, k, capacity, first_scores, second_scores, priority,
                                                token_mask, drop_policy)
        return ctx.gating.weight, ctx.gating.aux_loss

    def backward(ctx, grad_weight, grad_aux_loss):
        # each output's gradient is None when that output did not reach the loss
        return gating_kernels.gate_route_backward(grad_weight, grad_aux_loss, ctx.gating)


class RouterZLoss(Function):
    def forward(ctx, logits, token_mask):
        loss, row_logsumexp = gating_kernels.z_loss_forward(logits, token_mask)
        ctx.save(logits, row_logsumexp, token_mask)
        return loss

    def backward(ctx, grad):
        return gating_kernels.z_loss_backward(grad, *ctx.saved)


def jitter(shape: tuple[int, ...], dtype: Any) -> Any:
    """Uniform(1 - eps, 1 + eps) factors for the gate input in the gate's dtype, float32 (DeepSpeed's
    multiplicative_jitter, applied after the input's cast to float32: in bf16 the factors would collapse
    to a handful of values, about 30% of them exactly 1)."""
    return (1.0 - JITTER_EPS + 2.0 * JITTER_EPS * backend.random_uniform(shape, dtype)).astype(dtype, copy=False)


def route(logits: Tensor | Any, settings: MoESettings, training: bool = False, token_mask: Any = None) -> Routing:
    """Route T tokens by their gate logits [T, E] to settings.k experts each (see minimoe.cuda.gating).

    Randomness, each as DeepSpeed applies it, in training (and, with settings.eval_randomness, in
    evaluation too, except RSample): `noisy_gate_policy="RSample"` (top-1) adds Gumbel noise to the logits
    that pick the first expert; `use_rts` (top-1) lets a random priority, not token order, decide which
    tokens an over-full expert keeps; `second_expert_sampling` (top-2) picks the second expert from
    Gumbel-noised logits. ("Jitter" acts on the gate's input, in the layer.) The capacity is
    max(min_capacity, ceil(T / E * capacity_factor * k)) with the evaluation factor outside training, or
    dropless when settings.drop_tokens is false. token_mask [T] (bool): padding tokens, False, take no
    part in the routing."""
    if not isinstance(logits, Tensor):
        logits = Tensor(logits)
    k = settings.k
    num_tokens, num_experts = logits.shape
    data = logits.data
    sampling = training or settings.eval_randomness
    first_scores = second_scores = priority = None
    if training and settings.noisy_gate_policy == "RSample" and k == 1:  # DeepSpeed: training only
        first_scores = gating_kernels.gumbel_scores(data)
    if sampling and settings.second_expert_sampling and k == 2:
        second_scores = gating_kernels.gumbel_scores(data)
    if sampling and settings.use_rts and k == 1:
        priority = backend.random_uniform((num_tokens,), data.dtype)
    capacity_factor = settings.capacity_factor if training else settings.eval_capacity_factor
    capacity = (gating_kernels.expert_capacity(num_tokens, num_experts, k, capacity_factor, settings.min_capacity)
                if settings.drop_tokens else None)
    node = GateRoute()
    weight, aux_loss = node(logits, k=k, capacity=capacity, first_scores=first_scores, second_scores=second_scores,
                            priority=priority, token_mask=token_mask, drop_policy=settings.drop_policy)
    gating = node.gating
    z_loss = RouterZLoss.apply(logits, token_mask=token_mask) if settings.z_loss_coef > 0 else None
    return Routing(gating.expert_index, gating.position, weight, gating.capacity, gating.tokens_per_expert,
                   gating.dropped, aux_loss, z_loss, gating.source_token)
