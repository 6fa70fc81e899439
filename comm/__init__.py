"""minimoe.comm: communicators and the all-to-all exchanges of expert parallelism.

communicator.py: one interface (rank, size, all_reduce, broadcast, barrier, all_to_all, all_to_all_v,
split) with LocalComm (one process) and MPIComm (mpi4py, host arrays). alltoall.py: HierarchicalComm,
any communicator with its all-to-alls done in two steps over nodes x local ranks. groups.py: the
EP x DP layout.
"""
