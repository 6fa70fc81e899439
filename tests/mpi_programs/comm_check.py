"""Run under mpiexec by tests/test_comm.py: every rank checks the collectives against a NumPy model
of the exchange and exits non-zero (failing the whole mpiexec) on a mismatch.

argv[1] is JSON: {"counts": P x P rows each rank sends each rank, "local_size": L, "ep_size": ep,
"nccl": false for MPI on NumPy arrays, true for NCCL on CuPy arrays, one GPU per rank}.
"""

import json
import sys

import numpy as np

from minimoe import backend
from minimoe.comm.alltoall import HierarchicalComm
from minimoe.comm.communicator import MPIComm, NCCLComm
from minimoe.comm.groups import build_groups

spec = json.loads(sys.argv[1])
world = MPIComm()
if spec["nccl"]:  # NCCL even for one rank (mpiexec -n 1 on a one-GPU machine)
    backend.set_device("cuda", gpu=world.node_rank())
    world = NCCLComm(world)
on_device, to_host = backend.asarray, backend.to_numpy
rank, size = world.rank, world.size
counts = np.array(spec["counts"], dtype=np.int64)
assert counts.shape == (size, size), f"counts {counts.shape} for {size} ranks"


def rows(source: int, destination: int) -> np.ndarray:
    """The rows `source` sends `destination`: each names its source, destination and index."""
    n = counts[source, destination]
    return np.stack([np.full(n, source), np.full(n, destination), np.arange(n)], axis=1).astype(np.float64)


send = np.concatenate([rows(rank, d) for d in range(size)])
expected = np.concatenate([rows(s, rank) for s in range(size)])  # the model: by source rank, in order
expected_counts = counts[:, rank].tolist()
hierarchical = HierarchicalComm(world, spec["local_size"])
for name, comm in (("flat", world), ("hierarchical", hierarchical)):
    received, received_counts = comm.all_to_all_v(on_device(send), counts[rank].tolist())
    assert received_counts == expected_counts, f"rank {rank} {name}: counts {received_counts} != {expected_counts}"
    np.testing.assert_array_equal(to_host(received), expected, err_msg=f"rank {rank} {name}")

chunks = np.arange(size * 3, dtype=np.float64).reshape(size, 3) + 100 * rank  # equal chunks
for comm, place in ((world, on_device), (hierarchical, on_device), (world, np.asarray)):  # host arrays: MPI
    received = to_host(comm.all_to_all(place(chunks)))
    np.testing.assert_array_equal(received, [np.arange(3) + 3 * rank + 100 * source for source in range(size)])
assert to_host(world.all_reduce(on_device(np.array([rank + 1.0]))))[0] == size * (size + 1) / 2
assert to_host(world.all_reduce(on_device(np.array([rank])), op="max"))[0] == size - 1
if spec["nccl"]:  # gradients travel in bf16
    summed = world.all_reduce(on_device(np.full(5, rank + 1.0)).astype(backend.bfloat16()))
    assert summed.dtype == backend.bfloat16()
    assert to_host(summed).astype(np.float64).tolist() == [size * (size + 1) / 2] * 5
assert to_host(world.broadcast(on_device(np.array([rank * 7])), root=size - 1))[0] == (size - 1) * 7

groups = build_groups(world, spec["ep_size"], [spec["ep_size"] * 2], spec["local_size"])
ep = spec["ep_size"]
members = to_host(groups.expert_parallel.all_reduce(on_device(np.array([1 << rank]))))[0]
assert members == sum(1 << r for r in range(rank // ep * ep, rank // ep * ep + ep)), f"EP group of {rank}"
members = to_host(groups.expert_data_parallel.all_reduce(on_device(np.array([1 << rank]))))[0]
assert members == sum(1 << r for r in range(rank % ep, size, ep)), f"expert-data-parallel group of {rank}"
print(f"rank {rank}: ok")
