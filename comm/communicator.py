"""Communicators: how ranks exchange arrays, behind one small interface.

Every implementation has `rank` and `size` and these collective operations (all ranks call each one,
in the same order):
- all_reduce(array, op): the elementwise "sum" or "max" over ranks, returned on every rank;
- broadcast(array, root): root's array on every rank;
- barrier();
- all_to_all(send): send [size, ...] holds one equal-sized chunk per destination rank; returns
  [size, ...] whose chunk j came from rank j;
- all_to_all_v(send, send_counts): send [sum(send_counts), ...] holds send_counts[j] rows for rank j,
  in rank order; returns (received rows in source-rank order, received counts per source);
- split(color, key): the sub-communicator of the ranks that passed the same color, ordered by key.

LocalComm is the one-process communicator (every exchange is the identity) and the default; MPIComm
wraps an mpi4py communicator and moves NumPy arrays with its buffer (upper-case) calls.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class Communicator(Protocol):
    rank: int
    size: int

    def all_reduce(self, array: Any, op: str = "sum") -> Any: ...
    def broadcast(self, array: Any, root: int = 0) -> Any: ...
    def barrier(self) -> None: ...
    def all_to_all(self, send: Any) -> Any: ...
    def all_to_all_v(self, send: Any, send_counts: list[int]) -> tuple[Any, list[int]]: ...
    def split(self, color: int, key: int) -> Communicator: ...


REDUCE_OPS = ("sum", "max")


def _check_op(op: str) -> None:
    if op not in REDUCE_OPS:
        raise ValueError(f"all_reduce op must be one of {REDUCE_OPS}, got {op!r}")


def check_chunks(send: Any, size: int) -> None:
    if send.shape[0] != size:
        raise ValueError(f"all_to_all needs one chunk per rank: send has {send.shape[0]} chunks, size is {size}")


def _check_counts(send: Any, send_counts: list[int], size: int) -> None:
    if len(send_counts) != size or min(send_counts, default=0) < 0 or sum(send_counts) != send.shape[0]:
        raise ValueError(f"all_to_all_v needs {size} non-negative counts adding up to the {send.shape[0]} rows "
                         f"sent, got {list(send_counts)}")


class LocalComm:
    """One process: rank 0 of 1."""

    rank, size = 0, 1

    def all_reduce(self, array: Any, op: str = "sum") -> Any:
        _check_op(op)
        return array.copy()

    def broadcast(self, array: Any, root: int = 0) -> Any:
        return array.copy()

    def barrier(self) -> None:
        pass

    def all_to_all(self, send: Any) -> Any:
        check_chunks(send, 1)
        return send.copy()

    def all_to_all_v(self, send: Any, send_counts: list[int]) -> tuple[Any, list[int]]:
        _check_counts(send, send_counts, 1)
        return send.copy(), list(send_counts)

    def split(self, color: int, key: int) -> LocalComm:
        return self


class MPIComm:
    """An mpi4py communicator moving contiguous NumPy arrays (MPI.COMM_WORLD by default)."""

    def __init__(self, comm: Any = None):
        from mpi4py import MPI

        self.mpi = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    def all_reduce(self, array: Any, op: str = "sum") -> Any:
        _check_op(op)
        send = np.ascontiguousarray(array)
        out = np.empty_like(send)
        self.comm.Allreduce(send, out, op=self.mpi.SUM if op == "sum" else self.mpi.MAX)
        return out

    def broadcast(self, array: Any, root: int = 0) -> Any:
        out = np.ascontiguousarray(array).copy()
        self.comm.Bcast(out, root=root)
        return out

    def barrier(self) -> None:
        self.comm.Barrier()

    def all_to_all(self, send: Any) -> Any:
        check_chunks(send, self.size)
        send = np.ascontiguousarray(send)
        out = np.empty_like(send)
        self.comm.Alltoall(send, out)
        return out

    def all_to_all_v(self, send: Any, send_counts: list[int]) -> tuple[Any, list[int]]:
        """Counts travel first (an all-to-all of one integer per pair), then the rows."""
        _check_counts(send, send_counts, self.size)
        send = np.ascontiguousarray(send)
        received_counts = self.all_to_all(np.asarray(send_counts, dtype=np.int64)).tolist()
        row = int(np.prod(send.shape[1:], dtype=np.int64))
        out = np.empty((sum(received_counts), *send.shape[1:]), dtype=send.dtype)

        def counts_and_offsets(counts: list[int]) -> tuple[list[int], list[int]]:
            elements = [count * row for count in counts]
            return elements, [0, *np.cumsum(elements)[:-1].tolist()]

        self.comm.Alltoallv([send, counts_and_offsets(send_counts)], [out, counts_and_offsets(received_counts)])
        return out, received_counts

    def split(self, color: int, key: int) -> MPIComm:
        return MPIComm(self.comm.Split(color, key))
