"""Data and expert parallelism in training: the communicators, where gradients add up, and how the
expert weights are written to a checkpoint in parts and split again when one is loaded.

Launched with `mpirun -n P minimoe train ...`, the P ranks form ep_size x dp_size (comm/groups.py).
Every rank trains on its own micro-batches; the loss of each is divided by the number of micro-batches
in the whole step (P x grad_accum_steps), so adding the gradients up gives the gradient of the mean:
dense gradients add up over all P ranks, expert gradients over the ranks that hold the same experts
(their all-to-all backward has already brought in the contributions of the whole EP group).
A checkpoint holds every expert under its global index (the EP group's slices as part files, joined
again on load), so a run saved with one ep_size resumes or generates with any other.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from minimoe import backend
from minimoe.checkpoint import part_path, save_part
from minimoe.comm.alltoall import HierarchicalComm
from minimoe.comm.communicator import Communicator, LocalComm, MPIComm, NCCLComm
from minimoe.comm.groups import ParallelGroups, build_groups
from minimoe.cuda.adamw import sum_of_squares
from minimoe.moe.experts import Experts
from minimoe.nn import Module
from minimoe.optim import AdamW


def launched_ranks() -> int:
    """How many ranks mpirun / mpiexec started (1 without it), read from the launcher's environment."""
    return max(int(os.environ.get(name, "1")) for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))


def world_communicator() -> Communicator:
    """MPI's world when this process was started by mpirun / mpiexec with more than one rank."""
    return MPIComm() if launched_ranks() > 1 else LocalComm()


def start_world(device: str) -> tuple[Communicator, str]:
    """(world communicator, device chosen) for a training job: on GPUs every rank takes the GPU of its
    rank on the node and the world talks NCCL; on CPUs, MPI (or no one, in a single process)."""
    world = world_communicator()
    chosen = backend.set_device(device, gpu=world.node_rank() if isinstance(world, MPIComm) else 0)
    if chosen == "cuda" and isinstance(world, MPIComm):
        world = NCCLComm(world)
    return world, chosen


def abort_world(code: int) -> None:
    """End every rank of an MPI job (MPI_Abort) after a failure on this one: the others would otherwise
    wait forever in their next collective. Does nothing in a single process."""
    if launched_ranks() > 1:
        from mpi4py import MPI

        sys.stdout.flush()
        sys.stderr.flush()
        # The launcher forwards a rank's output from a pipe and stops forwarding when the abort kills the
        # job: a moment's pause lets it pass on the failing rank's message first.
        time.sleep(0.5)
        MPI.COMM_WORLD.Abort(code)


def rank_prefix() -> str:
    """"rank R: " for messages of a multi-rank job, so the failing rank is named; "" otherwise."""
    return f"rank {os.environ.get('PMI_RANK', os.environ.get('OMPI_COMM_WORLD_RANK', '?'))}: " \
        if launched_ranks() > 1 else ""


class Parallel:
    def __init__(self, groups: ParallelGroups):
        self.groups = groups
        self.world = groups.world

    @property
    def is_main(self) -> bool:
        return self.world.rank == 0

    @staticmethod
    def build(world: Communicator, ep_size: int, experts_per_layer: list[int], local_size: int = 0) -> Parallel:
        return Parallel(build_groups(world, ep_size, experts_per_layer or [ep_size], local_size))

    def describe_all_to_all(self) -> str:
        comm = self.groups.expert_parallel
        if isinstance(comm, HierarchicalComm):
            return f"hierarchical all-to-all over {comm.nodes} nodes x {comm.local_size}"
        return "flat all-to-all"

    @staticmethod
    def expert_parameters(model: Module) -> set[int]:
        return {id(p) for module in model.modules() if isinstance(module, Experts) for p in module.parameters()}

    def describe_parameters(self, model: Module) -> str:
        """The model's size in parameters, and this rank's share when the experts are split."""
        here = sum(p.size for p in model.parameters())
        if self.groups.ep_size == 1:
            return f"{here:,} parameters"
        experts = sum(p.size for p in model.parameters() if id(p) in self.expert_parameters(model))
        return f"{here + experts * (self.groups.ep_size - 1):,} parameters ({here:,} on each rank)"

    def sync_gradients(self, model: Module) -> None:
        experts = self.expert_parameters(model)
        for parameter in model.parameters():
            comm = self.groups.expert_data_parallel if id(parameter) in experts else self.world
            if comm.size > 1 and parameter.grad is not None:
                parameter.grad = comm.all_reduce(parameter.grad)

    def grad_norm(self, model: Module) -> Any:
        """The global gradient norm of the whole model (a 0-d array on the gradients' device): the dense
        part is the same on every rank, the expert part is spread over the EP group."""
        experts = self.expert_parameters(model)
        dense = [p.grad for p in model.parameters() if id(p) not in experts and p.grad is not None]
        local_experts = [p.grad for p in model.parameters() if id(p) in experts and p.grad is not None]
        xp = backend.array_module((dense + local_experts)[0])

        def squares(some: list[Any]) -> Any:
            return xp.reshape(sum_of_squares(some) if some else xp.zeros((), xp.float32), (1,))

        expert_squares = squares(local_experts)
        if self.groups.ep_size > 1:
            expert_squares = self.groups.expert_parallel.all_reduce(expert_squares)
        return xp.sqrt(squares(dense) + expert_squares)[0]

    def mean_and_any(self, value: float, flag: bool) -> tuple[float, bool]:
        """(the mean over all ranks of `value`, whether any rank raised `flag`), in one collective of host
        numbers (over MPI under NCCL too). The training loop ends a step with it: the logged loss, and a
        Ctrl-C that reached the ranks at different steps stops them all after the same step."""
        summed = self.world.all_reduce(np.array([value, float(flag)]))
        return float(summed[0]) / self.world.size, bool(summed[1] > 0)

    def save_expert_parts(self, path: Path, step: int, arrays: dict[str, np.ndarray],
                          expert_names: set[str]) -> tuple[dict[str, np.ndarray], list[str]]:
        """Each rank of the first expert-parallel group writes its slice of the expert arrays as one part
        file (checkpoint.py); returns the dense arrays, for the manifest, and the names of the parts.
        Every rank calls it; it returns once every part is on disk."""
        ep = self.groups.ep_size
        if ep == 1:
            return arrays, []
        if self.world.rank < ep:  # EP group 0 is ranks 0 .. ep-1; the other replicas hold the same experts
            save_part(path, step, self.world.rank, ep, {name: arrays[name] for name in expert_names})
        self.world.barrier()
        dense = {name: value for name, value in arrays.items() if name not in expert_names}
        return dense, [part_path(path, step, part, ep).name for part in range(ep)]


def local_experts(arrays: dict[str, np.ndarray], expert_names: set[str],
                  expert_parallel: Communicator | None) -> dict[str, np.ndarray]:
    """Of a loaded checkpoint's arrays (every expert), this rank's slice of each expert array named in
    `expert_names`, the experts being split over `expert_parallel` (None: all of them stay here)."""
    if expert_parallel is None or expert_parallel.size == 1:
        return arrays
    rank, ep = expert_parallel.rank, expert_parallel.size
    local = dict(arrays)
    for name in expert_names:
        count = arrays[name].shape[0] // ep
        local[name] = arrays[name][rank * count:(rank + 1) * count]
    return local


def expert_array_names(model: Module, optimizer: AdamW) -> set[str]:
    """Checkpoint names of the arrays that hold experts: model.<name>, and the optimizer's moments (and
    master weights) of the expert parameters, optim.<kind>.<index in the parameter list>."""
    experts = Parallel.expert_parameters(model)
    names = {f"model.{name}" for name, p in model.named_parameters() if id(p) in experts}
    expert_indices = {str(index) for index, p in enumerate(optimizer.parameters) if id(p) in experts}
    return names | {f"optim.{key}" for key in optimizer.state_dict() if key.rpartition(".")[2] in expert_indices}
