"""Hierarchical all-to-all for expert parallelism, as a communicator that wraps another.

The flat exchange is any communicator's own all_to_all_v: one exchange among all P ranks, P - 1
messages per rank.

Hierarchical (DeepSpeed-MoE sec. 5, Tutel's 2DH): ranks are numbered node * L + local for N nodes of
L local ranks. Step 1, inside each node: every rank sends local peer l everything bound for local rank
l of *any* node, so that afterwards rank (node, l) holds all of its node's data bound for local rank l
everywhere. Step 2, across nodes among the ranks with the same local index: every rank sends node n
what is bound for (n, l). A rank sends (L - 1) + (N - 1) messages instead of P - 1, each larger, which
is what makes slow inter-node links affordable. The result equals the flat exchange row for row:
docs/comm.md draws who sends what.

Counts: send holds send_counts[d] rows for destination rank d, in rank order; the result holds the
rows from every source rank in rank order, with the counts received from each.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from minimoe import backend
from minimoe.comm.communicator import Communicator, check_chunks


class HierarchicalComm:
    """`world` (all P ranks) with hierarchical all-to-alls over nodes of `local_size` consecutive ranks;
    the other collectives are the world's own. The node and cross-node sub-communicators are made once."""

    def __init__(self, world: Communicator, local_size: int):
        if local_size < 1 or world.size % local_size:
            raise ValueError(f"local_size={local_size} must divide the world size {world.size}")
        self.world, self.rank, self.size = world, world.rank, world.size
        self.local_size, self.nodes = local_size, world.size // local_size
        node, local_rank = divmod(world.rank, local_size)
        self.intra = world.split(color=node, key=local_rank)  # the ranks of this node
        self.inter = world.split(color=local_rank, key=node)  # one rank per node, same local index

    def all_reduce(self, array: Any, op: str = "sum") -> Any:
        return self.world.all_reduce(array, op)

    def broadcast(self, array: Any, root: int = 0) -> Any:
        return self.world.broadcast(array, root)

    def barrier(self) -> None:
        self.world.barrier()

    def split(self, color: int, key: int) -> Communicator:
        return self.world.split(color, key)

    def all_to_all(self, send: Any) -> Any:
        """Equal chunks: chunk j of send [P, ...] goes to rank j. The same two steps as all_to_all_v, with
        every size known in advance, so no counts travel: chunks are reordered by transposes."""
        check_chunks(send, self.size)
        nodes, local, chunk = self.nodes, self.local_size, send.shape[1:]
        by_local = send.reshape(nodes, local, *chunk).swapaxes(0, 1)  # [l][n]: bound for (n, l)
        gathered = self.intra.all_to_all(by_local)  # [s][n]: from (node, s), bound for (n, my local rank)
        received = self.inter.all_to_all(gathered.swapaxes(0, 1))  # [m][s]: from (m, s), bound for me
        return received.reshape(self.size, *chunk)

    def all_to_all_v(self, send: Any, send_counts: list[int],
                     received_counts: list[int] | None = None) -> tuple[Any, list[int]]:
        """received_counts is not needed here: the sizes of the intermediate step travel anyway (as host
        arrays: over MPI when the rows go by NCCL)."""
        nodes, local = self.nodes, self.local_size
        blocks = _blocks(send, list(send_counts))

        # Step 1, inside the node: to local peer l, the blocks for ranks (0, l), (1, l), ... in node order,
        # with the sizes of those blocks so that the receiver can cut them apart again.
        step1_counts = [[send_counts[n * local + l] for n in range(nodes)] for l in range(local)]
        received_sizes = self.intra.all_to_all(np.asarray(step1_counts, dtype=np.int64)).tolist()
        step1 = [blocks[n * local + l] for l in range(local) for n in range(nodes)]
        gathered, _ = self.intra.all_to_all_v(_concat(step1, send), [sum(row) for row in step1_counts])

        # gathered holds, for each local source s and node n, the rows from (node, s) bound for (n, l).
        by_source_and_node = _blocks(gathered, [size for row in received_sizes for size in row])
        step2_counts = [[received_sizes[s][n] for s in range(local)] for n in range(nodes)]
        final_sizes = self.inter.all_to_all(np.asarray(step2_counts, dtype=np.int64)).tolist()
        step2 = [by_source_and_node[s * nodes + n] for n in range(nodes) for s in range(local)]
        received, _ = self.inter.all_to_all_v(_concat(step2, send), [sum(row) for row in step2_counts])
        # Rows arrive node by node and, within a node, local source by local source: rank order.
        return received, [size for row in final_sizes for size in row]


def _blocks(rows: Any, counts: list[int]) -> list[Any]:
    starts = [0]
    for count in counts:
        starts.append(starts[-1] + count)
    return [rows[start:end] for start, end in zip(starts[:-1], starts[1:])]


def _concat(blocks: list[Any], like: Any) -> Any:
    return backend.array_module(like).concatenate(blocks) if blocks else like[:0]
