"""The MoE layer: gate -> dispatch -> experts -> combine, and Residual MoE beside it.

One token's path, with the shapes (T tokens, d wide, E experts, capacity C, k choices):

    x [T, d] --gate (Linear d -> E, no bias, float32)--> logits [T, E]
             --route (gate.py)--> table: expert_index [T, k], position [T, k], weight [T, k]
    x --dispatch--> buffer [E, C, d]  (row t copied to buffer[expert_index[t, j], position[t, j]])
      --experts--> out [E, C, d]      (expert e's MLP on buffer[e])
      --combine--> y [T, d]           (y[t] = sum_j weight[t, j] * out[expert_index[t, j], position[t, j]])

Expert parallelism (DeepSpeed-MoE sec. 5): with an expert-parallel communicator of ep ranks, each rank
holds E / ep experts; after dispatch, an all-to-all splits the [E, C, d] buffer on E so that each rank
receives [E / ep, ep * C, d], the rows of every rank for its own experts; the experts run; the reverse
all-to-all brings the outputs home before the combine. The gate is replicated: every rank routes its
own tokens. Dropless (no capacity), C differs between ranks and most of the buffer is unused: the ranks
first exchange how many rows each expert uses, and only those rows travel (all_to_all_v).

Residual MoE (DeepSpeed-MoE sec. 4.1, DeepSpeed's `use_residual`): a dense MLP runs beside the MoE on
every token, and a learned per-token 2-way softmax mixes the two: y = c0 * moe(x) + c1 * mlp(x),
c = softmax(Linear(d -> 2)(x)). The MoE then only has to learn a correction to a fixed MLP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

import minimoe.cuda.dispatch as dispatch_kernels
from minimoe import backend, ops
from minimoe.moe.experts import Experts
from minimoe.moe.gate import Gate, jitter, route
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


def to_local_experts(buffer: Any, comm: Any) -> Any:
    """[E, C, d] on every rank -> [E / ep, ep * C, d]: for each of my experts, the rows of rank 0, 1, ..."""
    ep = comm.size
    experts, capacity, width = buffer.shape
    chunks = buffer.reshape(ep, experts // ep, capacity, width)  # chunk j: the rows for rank j's experts
    received = comm.all_to_all(chunks)  # chunk i: rank i's rows for my experts
    return received.transpose(1, 0, 2, 3).reshape(experts // ep, ep * capacity, width)


def from_local_experts(rows: Any, comm: Any) -> Any:
    """The inverse of to_local_experts: [E / ep, ep * C, d] -> [E, C, d] of this rank's own tokens."""
    ep = comm.size
    local_experts, rows_per_expert, width = rows.shape
    capacity = rows_per_expert // ep
    chunks = rows.reshape(local_experts, ep, capacity, width).transpose(1, 0, 2, 3)  # chunk i: rank i's rows
    return comm.all_to_all(chunks).reshape(local_experts * ep, capacity, width)


@dataclass
class ExchangeCounts:
    """Dropless expert parallelism: which rows travel, worked out once per forward on the host and used
    by both exchanges and their backward. sent [E]: this rank's rows per expert (they fill positions
    0 .. sent[e] - 1 of the [E, C, d] buffer); received [ep, E / ep]: the rows each source rank sends
    each of my experts; R: the most rows any of my experts receives in all. Two mapping tables, in the
    (expert_index [n, 1], position [n, 1]) form dispatch and combine take, so that the same kernels move
    the rows: send_table, for each row sent in send order, its slot in the [E, C] buffer; place_table,
    for each row received in arrival order (source by source, expert by expert), its slot in the
    [E / ep, R] buffer of my experts, each expert's rows end to end from position 0."""

    sent: np.ndarray
    received: np.ndarray
    capacity: int
    rows_per_expert: int
    send_table: tuple[Any, Any]
    place_table: tuple[Any, Any]

    @property
    def rows_to_each_rank(self) -> list[int]:
        return self.sent.reshape(len(self.received), -1).sum(axis=1).tolist()

    @property
    def rows_from_each_rank(self) -> list[int]:
        return self.received.sum(axis=1).tolist()

    @staticmethod
    def exchange(tokens_per_expert: Any, capacity: int, comm: Any) -> ExchangeCounts:
        """All-to-all of the per-expert counts (one host integer per expert), before the rows travel."""
        sent = backend.to_numpy(tokens_per_expert).astype(np.int64)
        received = comm.all_to_all(sent.reshape(comm.size, -1))  # row j: the counts of rank j's experts
        rows_per_expert = int(received.sum(axis=0).max())
        send_table = _table([(expert, 0, count) for expert, count in enumerate(sent)])
        filled = np.zeros(received.shape[1], dtype=np.int64)  # rows of each local expert placed so far
        placed = []
        for source_counts in received:
            for expert, count in enumerate(source_counts):
                placed.append((expert, filled[expert], count))
                filled[expert] += count
        return ExchangeCounts(sent, received, capacity, rows_per_expert, send_table, _table(placed))


def _table(runs: list[tuple[int, int, int]]) -> tuple[Any, Any]:
    """(expert_index [n, 1], position [n, 1]) on the device for runs of (expert, first position, count)."""
    experts = np.concatenate([np.full(count, expert) for expert, _, count in runs]).astype(np.int64)
    positions = np.concatenate([first + np.arange(count) for _, first, count in runs]).astype(np.int64)
    return backend.asarray(experts[:, None]), backend.asarray(positions[:, None])


def to_local_experts_v(buffer: Any, comm: Any, counts: ExchangeCounts) -> Any:
    """Dropless: [E, C, d] -> [E / ep, R, d], only the used rows travelling (all_to_all_v): a combine
    gathers them by send_table, a dispatch places what arrives by place_table (zero-filling the rest,
    padding that from_local_experts_v never reads)."""
    send = dispatch_kernels.combine(buffer, *counts.send_table)
    received, _ = comm.all_to_all_v(send, counts.rows_to_each_rank, counts.rows_from_each_rank)
    return dispatch_kernels.dispatch(received, *counts.place_table, counts.received.shape[1],
                                     counts.rows_per_expert)


def from_local_experts_v(rows: Any, comm: Any, counts: ExchangeCounts) -> Any:
    """The adjoint of to_local_experts_v: [E / ep, R, d] -> [E, C, d], each expert's rows home to the rank
    that sent them, the unused rows of the buffer zero. The same two tables, roles swapped."""
    send = dispatch_kernels.combine(rows, *counts.place_table)
    received, _ = comm.all_to_all_v(send, counts.rows_from_each_rank, counts.rows_to_each_rank)
    return dispatch_kernels.dispatch(received, *counts.send_table, len(counts.sent), counts.capacity)


class ExpertAllToAll(Function):
    """The all-to-all of expert parallelism, in either direction: equal chunks of the [E, C, d] buffer,
    or, dropless (counts given), only the used rows. Each direction is the other's adjoint (every row
    returns to where it came from), so the backward is the reverse exchange of the gradient."""

    def forward(ctx, array, comm, to_experts, counts=None):
        ctx.comm, ctx.to_experts, ctx.counts = comm, to_experts, counts
        return _exchange(array, comm, to_experts, counts)

    def backward(ctx, grad):
        return _exchange(grad, ctx.comm, not ctx.to_experts, ctx.counts)


def _exchange(array: Any, comm: Any, to_experts: bool, counts: ExchangeCounts | None) -> Any:
    if counts is None:
        return to_local_experts(array, comm) if to_experts else from_local_experts(array, comm)
    return to_local_experts_v(array, comm, counts) if to_experts else from_local_experts_v(array, comm, counts)


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


@dataclass
class MoEStats:
    """What one MoE layer reports. The arrays stay on the device: reading them on the host would stop
    the GPU pipeline inside every forward, so the training loop reads them only when it logs."""

    aux_loss: Tensor
    z_loss: Tensor | None
    tokens_per_expert: Any  # [E] choices per expert before drops
    dropped: Any  # 0-d: fraction of the T * k choices dropped
    capacity: int


@dataclass
class MoESettings:
    """How one MoE layer routes (GPTConfig holds these for every MoE layer of a model)."""

    k: int = 1
    capacity_factor: float = 1.0
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    drop_tokens: bool = True
    use_rts: bool = False
    noisy_gate_policy: str = ""
    second_expert_sampling: bool = False
    z_loss: bool = False


class MoE(Module):
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

    def forward(self, x: Tensor) -> tuple[Tensor, MoEStats]:
        """x [..., d] -> (y [..., d], stats with the auxiliary losses to add to the training loss)."""
        settings = self.settings
        tokens = x.reshape(-1, x.shape[-1])
        gate_input = tokens
        if self.training and settings.noisy_gate_policy == "Jitter":
            gate_input = tokens * jitter(tokens.shape, tokens.dtype)
        routing = route(
            self.gate(gate_input), settings.k,
            settings.capacity_factor if self.training else settings.eval_capacity_factor,
            settings.min_capacity, settings.drop_tokens, training=self.training,
            noisy_gate_policy=settings.noisy_gate_policy, use_rts=settings.use_rts,
            second_expert_sampling=settings.second_expert_sampling, z_loss=settings.z_loss,
        )
        buffer = Dispatch.apply(tokens, routing=routing)
        if self.expert_parallel is None or self.expert_parallel.size == 1:
            out = self.experts(buffer)
        else:
            comm = self.expert_parallel
            counts = None if settings.drop_tokens else ExchangeCounts.exchange(routing.tokens_per_expert,
                                                                               routing.capacity, comm)
            local = ExpertAllToAll.apply(buffer, comm=comm, to_experts=True, counts=counts)
            out = ExpertAllToAll.apply(self.experts(local), comm=comm, to_experts=False, counts=counts)
        y = Combine.apply(out, routing.weight, routing=routing)
        if self.residual_mlp is not None:
            mix = ops.softmax(self.coefficient(tokens))
            y = y * mix[:, 0:1] + self.residual_mlp(tokens) * mix[:, 1:2]
        y = ops.dropout(y, self.dropout, self.training)
        stats = MoEStats(routing.aux_loss, routing.z_loss, routing.tokens_per_expert, routing.dropped, routing.capacity)
        return y.reshape(x.shape), stats

