"""All-to-all for expert parallelism: flat, and hierarchical over nodes x local ranks.

Flat: one exchange among all P ranks, P - 1 messages per rank (comm.all_to_all_v).

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

from minimoe.comm.communicator import Communicator


def flat_all_to_all_v(comm: Communicator, send: Any, send_counts: list[int]) -> tuple[Any, list[int]]:
    return comm.all_to_all_v(send, send_counts)


def _blocks(rows: Any, counts: list[int]) -> list[Any]:
    return np.split(rows, np.cumsum(counts)[:-1].tolist()) if counts else []


def hierarchical_all_to_all_v(world: Communicator, local_size: int, send: Any,
                              send_counts: list[int]) -> tuple[Any, list[int]]:
    if local_size < 1 or world.size % local_size:
        raise ValueError(f"local_size={local_size} must divide the world size {world.size}")
    nodes, local = world.size // local_size, local_size
    node, local_rank = divmod(world.rank, local)
    intra = world.split(color=node, key=local_rank)  # the ranks of this node
    inter = world.split(color=local_rank, key=node)  # one rank per node, same local index
    blocks = _blocks(send, list(send_counts))

    # Step 1, inside the node: to local peer l, the blocks for ranks (0, l), (1, l), ... in node order,
    # with the sizes of those blocks so that the receiver can cut them apart again.
    step1_counts = [[send_counts[n * local + l] for n in range(nodes)] for l in range(local)]
    received_sizes = intra.all_to_all(np.asarray(step1_counts, dtype=np.int64)).tolist()  # [source s][node n]
    step1 = [blocks[n * local + l] for l in range(local) for n in range(nodes)]
    gathered, _ = intra.all_to_all_v(_concat(step1, send), [sum(row) for row in step1_counts])

    # gathered holds, for each local source s and node n, the rows from (node, s) bound for (n, local_rank).
    by_source_and_node = _blocks(gathered, [size for row in received_sizes for size in row])
    step2_counts = [[received_sizes[s][n] for s in range(local)] for n in range(nodes)]
    final_sizes = inter.all_to_all(np.asarray(step2_counts, dtype=np.int64)).tolist()  # [source node m][s]
    step2 = [by_source_and_node[s * nodes + n] for n in range(nodes) for s in range(local)]
    received, _ = inter.all_to_all_v(_concat(step2, send), [sum(row) for row in step2_counts])
    # Rows arrive node by node and, within a node, local source by local source: rank order.
    return received, [size for row in final_sizes for size in row]


def _concat(blocks: list[Any], like: Any) -> Any:
    return np.concatenate(blocks) if blocks else like[:0]
