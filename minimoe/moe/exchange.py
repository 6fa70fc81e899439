"""The all-to-all of expert parallelism (DeepSpeed-MoE sec. 5): how the rows of the [E, C, d] dispatch
buffer reach the ranks that hold their experts, and come back.

With an expert-parallel communicator of ep ranks, rank r holds experts r * E / ep .. (r + 1) * E / ep - 1.
Every rank routes its own tokens and fills its own [E, C, d] buffer; the exchange splits that buffer on
E, so that each rank receives [E / ep, ep * C, d]: for each of its experts, the rows of rank 0, 1, ... in
turn. The experts run on those rows, and the reverse exchange brings each row home before the combine.

Dropless routing has no fixed C: a rank's buffer is as long as its fullest expert, the lengths differ
between ranks, and most rows of it are unused. Then the ranks first exchange how many rows each expert
uses (ExchangeCounts), and only those rows travel (all_to_all_v), moved in and out of the buffers by the
same dispatch and combine kernels that the layer uses, over two mapping tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

import minimoe.cuda.dispatch as dispatch_kernels
from minimoe import backend
from minimoe.tensor import Function


def rows_to_expert_ranks(buffer: Any, comm: Any) -> Any:
    """[E, C, d] on every rank -> [E / ep, ep * C, d]: for each of my experts, the rows of rank 0, 1, ..."""
    ep = comm.size
    experts, capacity, width = buffer.shape
    chunks = buffer.reshape(ep, experts // ep, capacity, width)  # chunk j: the rows for rank j's experts
    received = comm.all_to_all(chunks)  # chunk i: rank i's rows for my experts
    return received.transpose(1, 0, 2, 3).reshape(experts // ep, ep * capacity, width)


def rows_back_home(rows: Any, comm: Any) -> Any:
    """The inverse of rows_to_expert_ranks: [E / ep, ep * C, d] -> [E, C, d] of this rank's own tokens."""
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
        send_table = slot_table([(expert, 0, count) for expert, count in enumerate(sent)])
        filled = np.zeros(received.shape[1], dtype=np.int64)  # rows of each local expert placed so far
        placed = []
        for source_counts in received:
            for expert, count in enumerate(source_counts):
                placed.append((expert, filled[expert], count))
                filled[expert] += count
        return ExchangeCounts(sent, received, capacity, rows_per_expert, send_table, slot_table(placed))


def slot_table(runs: list[tuple[int, int, int]]) -> tuple[Any, Any]:
    """(expert_index [n, 1], position [n, 1]) on the device for runs of (expert, first position, count)."""
    experts = np.concatenate([np.full(count, expert) for expert, _, count in runs]).astype(np.int64)
    positions = np.concatenate([first + np.arange(count) for _, first, count in runs]).astype(np.int64)
    return backend.asarray(experts[:, None]), backend.asarray(positions[:, None])


def used_rows_to_expert_ranks(buffer: Any, comm: Any, counts: ExchangeCounts) -> Any:
    """Dropless: [E, C, d] -> [E / ep, R, d], only the used rows travelling (all_to_all_v): a combine
    gathers them by send_table, a dispatch places what arrives by place_table (zero-filling the rest,
    padding that used_rows_back_home never reads)."""
    send = dispatch_kernels.combine(buffer, *counts.send_table)
    received, _ = comm.all_to_all_v(send, counts.rows_to_each_rank, counts.rows_from_each_rank)
    return dispatch_kernels.dispatch(received, *counts.place_table, counts.received.shape[1],
                                     counts.rows_per_expert)


def used_rows_back_home(rows: Any, comm: Any, counts: ExchangeCounts) -> Any:
    """The adjoint of used_rows_to_expert_ranks: [E / ep, R, d] -> [E, C, d], each expert's rows home to
    the rank that sent them, the unused rows of the buffer zero. The same two tables, roles swapped."""
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
        return rows_to_expert_ranks(array, comm) if to_experts else rows_back_home(array, comm)
    return used_rows_to_expert_ranks(array, comm, counts) if to_experts else used_rows_back_home(array, comm, counts)


def run_experts_across_ranks(experts: Any, buffer: Any, comm: Any, tokens_per_expert: Any, capacity: int,
                             dropless: bool) -> Any:
    """The experts' outputs [E, C, d] for this rank's buffer [E, C, d], each row computed on the rank
    that holds its expert (a Tensor in, a Tensor out: both exchanges are on the tape)."""
    counts = ExchangeCounts.exchange(tokens_per_expert, capacity, comm) if dropless else None
    local = ExpertAllToAll.apply(buffer, comm=comm, to_experts=True, counts=counts)
    return ExpertAllToAll.apply(experts(local), comm=comm, to_experts=False, counts=counts)
