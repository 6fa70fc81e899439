"""The MoE layer: gate -> dispatch -> experts -> combine, and Residual MoE beside it.

One token's path, with the shapes (T tokens, d wide, E experts, capacity C, k choices):

    x [T, d] --gate (Linear d -> E, no bias, float32)--> logits [T, E]
             --route (gate.py)--> table: expert_index [T, k], position [T, k], weight [T, k]
    x --dispatch--> buffer [E, C, d]  (row t copied to buffer[expert_index[t, j], position[t, j]])
      --experts--> out [E, C, d]      (expert e's MLP on buffer[e])
      --combine--> y [T, d]           (y[t] = sum_j weight[t, j] * out[expert_index[t, j], position[t, j]])

With expert parallelism (DeepSpeed-MoE sec. 5) each rank holds E / ep of the experts, and the buffer's
rows travel to the ranks that hold their experts and back between dispatch and combine (exchange.py).

Residual MoE (DeepSpeed-MoE sec. 4.1): a dense MLP runs beside the MoE on every token, and the two are
mixed per token by a learned 2-way coefficient: y = c0 * moe(x) + c1 * mlp(x). The paper describes a
fixed MLP that the MoE corrects; the mix is DeepSpeed's code (`use_residual`), c = softmax(Linear(d -> 2)(x)).
"""

from __future__ import annotations

from typing import Any

import numpy as np

import minimoe.cuda.dispatch as dispatch_kernels
from minimoe import ops
from minimoe.moe.exchange import run_experts_across_ranks
from minimoe.moe.experts import Experts
from minimoe.moe.gate import Gate, MoESettings, Routing, jitter, route
from minimoe.nn import MLP, Linear, Module
from minimoe.tensor import Function, Tensor


class Dispatch(Function):
    """x [T, d] -> buffer [E, C, d]; backward gathers the buffer gradient back (combine, unit weights)."""

    def forward(ctx, x, routing):
        ctx.routing = routing
        return dispatch_kernels.dispatch(x, routing.expert_index, routing.position, routing.num_experts,
                                         routing.capacity, source_token=routing.source_token)

    def backward(ctx, grad_buffer):
        routing = ctx.routing
        return dispatch_kernels.combine(grad_buffer, routing.expert_index, routing.position)


class Combine(Function):
    """(out [E, C, d], weight [T, k]) -> y [T, d]; backward scatters weight * grad_y back by the same
    table and dots grad_y with the rows each weight scaled."""

    def forward(ctx, out, weight, routing):
        ctx.routing = routing
        ctx.save(out, weight)
        return dispatch_kernels.combine(out, routing.expert_index, routing.position, weight)

    def backward(ctx, grad_y):
        out, weight = ctx.saved
        return dispatch_kernels.combine_backward(grad_y, out, ctx.routing.expert_index, ctx.routing.position,
                                                 weight)


class MoE(Module):
    part = "moe"

    def __init__(self, width: int, hidden: int, num_experts: int, settings: MoESettings, rng: np.random.Generator,
                 output_std: float, residual: bool = False, dropout: float = 0.0, expert_parallel: Any = None):
        """expert_parallel: a Communicator over the ranks that share the experts (None: one process)."""
        self.settings = settings
        self.expert_parallel = expert_parallel
        ep_size = 1 if expert_parallel is None else expert_parallel.size
        if num_experts % ep_size:
            raise ValueError(f"{num_experts} experts cannot be split over ep_size={ep_size} ranks")
        self.gate = Gate(width, num_experts, rng)
        # All E experts are drawn, so that every layout starts from the same weights; this rank keeps its own.
        self.experts = Experts(num_experts, width, hidden, rng, output_std)
        if ep_size > 1:
            self.experts.keep_slice(expert_parallel.rank * num_experts // ep_size, num_experts // ep_size)
        self.residual_mlp = MLP(width, hidden, rng, output_std) if residual else None
        self.coefficient = Linear(width, 2, rng) if residual else None
        self.dropout = dropout

    def forward(self, x: Tensor, token_mask: Any = None) -> tuple[Tensor, Routing]:
        """x [..., d] -> (y [..., d], the routing, with the auxiliary losses to add to the training loss).
        token_mask [...] (bool): padding tokens, False, are routed nowhere and come out as 0 (plus the
        residual MLP's output in Residual MoE)."""
        tokens = x.reshape(-1, x.shape[-1])
        gate_input = tokens
        if self.training and self.settings.noisy_gate_policy == "Jitter":  # in the gate's float32, as DeepSpeed
            gate_dtype = self.gate.weight.dtype
            gate_input = ops.cast(tokens, gate_dtype) * jitter(tokens.shape, gate_dtype)
        mask = None if token_mask is None else token_mask.reshape(-1)
        routing = route(self.gate(gate_input), self.settings, self.training, mask)
        buffer = Dispatch.apply(tokens, routing=routing)
        if self.expert_parallel is None or self.expert_parallel.size == 1:
            out = self.experts(buffer)
        else:
            out = run_experts_across_ranks(self.experts, buffer, self.expert_parallel, routing.tokens_per_expert,
                                           routing.capacity, dropless=not self.settings.drop_tokens)
        y = Combine.apply(out, routing.weight, routing=routing)
        if self.residual_mlp is not None:
            mix = ops.softmax(self.coefficient(tokens))
            y = y * mix[:, 0:1] + self.residual_mlp(tokens) * mix[:, 1:2]
        y = ops.dropout(y, self.dropout, self.training)
        return y.reshape(x.shape), routing
