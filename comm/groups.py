"""Expert-parallel and data-parallel groups (DeepSpeed-MoE sec. 5: EP x DP).

The world of P = ep_size x dp_size ranks is cut into dp_size expert-parallel groups of ep_size
consecutive ranks: rank r is EP rank r % ep_size of EP group r // ep_size and holds experts
[ep_rank * E / ep_size, (ep_rank + 1) * E / ep_size) of every MoE layer. Ranks with the same EP rank
hold the same experts: their expert gradients are averaged over the expert-data-parallel group;
dense gradients over the whole world.

local_size: ranks per node. When an EP group spans several nodes (0 < local_size < ep_size), its
all-to-alls go hierarchical (alltoall.py): the group's ranks as ep_size / local_size nodes of local_size.
"""

from __future__ import annotations

from dataclasses import dataclass

from minimoe.comm.alltoall import HierarchicalComm
from minimoe.comm.communicator import Communicator


class LayoutError(ValueError):
    """An impossible parallel layout (a user-facing, one-line error)."""


@dataclass
class ParallelGroups:
    world: Communicator
    expert_parallel: Communicator  # the ep_size ranks that share one copy of the experts between them
    expert_data_parallel: Communicator  # the dp_size ranks that hold the same experts
    ep_size: int

    @property
    def ep_rank(self) -> int:
        return self.world.rank % self.ep_size


def check_layout(world_size: int, ep_size: int, experts_per_layer: list[int], local_size: int = 0) -> int:
    """dp_size for a valid layout, or a LayoutError naming what does not divide."""
    if ep_size < 1 or world_size % ep_size:
        raise LayoutError(f"the world size {world_size} is not ep_size={ep_size} x dp_size for any whole dp_size")
    if local_size < 0 or (0 < local_size < ep_size and ep_size % local_size):
        raise LayoutError(f"local_size={local_size} ranks per node does not divide ep_size={ep_size} "
                          f"(0 keeps the all-to-all flat)")
    for experts in experts_per_layer:
        if experts % ep_size:
            raise LayoutError(f"an MoE layer has {experts} experts, which ep_size={ep_size} does not divide")
    return world_size // ep_size


def build_groups(world: Communicator, ep_size: int, experts_per_layer: list[int],
                 local_size: int = 0) -> ParallelGroups:
    check_layout(world.size, ep_size, experts_per_layer, local_size)
    expert_parallel = world.split(color=world.rank // ep_size, key=world.rank)
    if 0 < local_size < ep_size:
        expert_parallel = HierarchicalComm(expert_parallel, local_size)
    expert_data_parallel = world.split(color=world.rank % ep_size, key=world.rank)
    return ParallelGroups(world, expert_parallel, expert_data_parallel, ep_size)
