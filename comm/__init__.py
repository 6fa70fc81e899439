"""minimoe.comm: communicators and the all-to-all exchanges of expert parallelism.

communicator.py: one interface (rank, size, all_reduce, broadcast, barrier, all_to_all, all_to_all_v,
split) with LocalComm (one process) and MPIComm (mpi4py, host arrays). alltoall.py: the flat and the
hierarchical (nodes x local ranks) all-to-all over any communicator.
"""
