"""Communicators: how ranks exchange arrays, behind one small interface.

Every implementation has `rank` and `size` and these collective operations (all ranks call each one,
in the same order):
- all_reduce(array, op): the elementwise "sum" or "max" over ranks, returned on every rank;
- broadcast(array, root): root's array on every rank;
- barrier();
- all_to_all(send): send [size, ...] holds one equal-sized chunk per destination rank; returns
  [size, ...] whose chunk j came from rank j;
- all_to_all_v(send, send_counts, received_counts=None): send [sum(send_counts), ...] holds
  send_counts[j] rows for rank j, in rank order; returns (received rows in source-rank order, received
  counts per source). A caller that already knows the received counts passes them, and the
  exchange of counts that otherwise comes first is skipped;
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
    def all_to_all_v(self, send: Any, send_counts: list[int],
                     received_counts: list[int] | None = None) -> tuple[Any, list[int]]: ...
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

    def all_to_all_v(self, send: Any, send_counts: list[int],
                     received_counts: list[int] | None = None) -> tuple[Any, list[int]]:
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

    def node_rank(self) -> int:
        """This rank's index among the ranks on the same machine (which GPU it takes)."""
        return self.comm.Split_type(self.mpi.COMM_TYPE_SHARED).Get_rank()

    def all_to_all(self, send: Any) -> Any:
        check_chunks(send, self.size)
        send = np.ascontiguousarray(send)
        out = np.empty_like(send)
        self.comm.Alltoall(send, out)
        return out

    def all_to_all_v(self, send: Any, send_counts: list[int],
                     received_counts: list[int] | None = None) -> tuple[Any, list[int]]:
        """Counts travel first (an all-to-all of one integer per pair) unless given, then the rows."""
        _check_counts(send, send_counts, self.size)
        send = np.ascontiguousarray(send)
        if received_counts is None:
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


class CommError(RuntimeError):
    """A communicator that cannot be set up (a user-facing, one-line error naming the rank)."""


# ncclDataType_t and ncclRedOp_t values from nccl.h (stable since NCCL 2.10, which added bfloat16).
NCCL_TYPES = {"int8": 0, "uint8": 1, "int32": 2, "uint32": 3, "int64": 4, "uint64": 5, "float16": 6,
              "float32": 7, "float64": 8, "bfloat16": 9}
NCCL_OPS = {"sum": 0, "max": 2}


class NCCLComm:
    """GPU (CuPy) arrays over NCCL, on the current CuPy stream; host (NumPy) arrays, such as counts, over
    MPI, with no GPU synchronisation. It is set up over an MPIComm of the same ranks: rank 0's NCCL
    unique id is broadcast over MPI, sub-groups are MPI splits with their own NCCL communicators, and
    the counts of all_to_all_v travel over MPI. Each rank must already use its own GPU (see
    minimoe/parallel.py)."""

    def __init__(self, mpi: MPIComm):
        from cupy.cuda import nccl

        self.nccl, self.mpi = nccl, mpi
        self.rank, self.size = mpi.rank, mpi.size
        unique_id = mpi.comm.bcast(nccl.get_unique_id() if mpi.rank == 0 else None, root=0)
        try:
            self.comm = nccl.NcclCommunicator(mpi.size, unique_id, mpi.rank)
        except Exception as error:  # NcclError or a CUDA error, whichever the failure raises
            raise CommError(f"NCCL set-up failed on rank {mpi.rank} of {mpi.size} "
                            f"({type(error).__name__}: {error})") from None

    @staticmethod
    def _stream() -> int:
        import cupy

        return cupy.cuda.get_current_stream().ptr

    def all_reduce(self, array: Any, op: str = "sum") -> Any:
        _check_op(op)
        if isinstance(array, np.ndarray):
            return self.mpi.all_reduce(array, op)
        send = array if array.flags.c_contiguous else array.copy()
        out = send.__class__(send.shape, send.dtype)
        self.comm.allReduce(send.data.ptr, out.data.ptr, send.size, NCCL_TYPES[send.dtype.name], NCCL_OPS[op],
                            self._stream())
        return out

    def broadcast(self, array: Any, root: int = 0) -> Any:
        if isinstance(array, np.ndarray):
            return self.mpi.broadcast(array, root)
        out = array.copy()  # contiguous
        self.comm.bcast(out.data.ptr, out.nbytes, NCCL_TYPES["uint8"], root, self._stream())
        return out

    def barrier(self) -> None:
        self.mpi.barrier()

    def all_to_all(self, send: Any) -> Any:
        check_chunks(send, self.size)
        if isinstance(send, np.ndarray):
            return self.mpi.all_to_all(send)
        send = send if send.flags.c_contiguous else send.copy()
        out = send.__class__(send.shape, send.dtype)
        chunk = send.nbytes // self.size
        self._exchange([(peer * chunk, chunk) for peer in range(self.size)],
                       [(peer * chunk, chunk) for peer in range(self.size)], send, out)
        return out

    def all_to_all_v(self, send: Any, send_counts: list[int],
                     received_counts: list[int] | None = None) -> tuple[Any, list[int]]:
        _check_counts(send, send_counts, self.size)
        if isinstance(send, np.ndarray):
            return self.mpi.all_to_all_v(send, send_counts, received_counts)
        send = send if send.flags.c_contiguous else send.copy()
        if received_counts is None:  # host integers: over MPI, no GPU synchronisation
            received_counts = self.mpi.all_to_all(np.asarray(send_counts, dtype=np.int64)).tolist()
        out = send.__class__((sum(received_counts), *send.shape[1:]), send.dtype)
        row_bytes = send.itemsize * int(np.prod(send.shape[1:], dtype=np.int64))

        def spans(counts: list[int]) -> list[tuple[int, int]]:
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
            return [(start * row_bytes, count * row_bytes) for start, count in zip(starts, counts)]

        self._exchange(spans(send_counts), spans(received_counts), send, out)
        return out, received_counts

    def _exchange(self, sends: list[tuple[int, int]], receives: list[tuple[int, int]], send: Any, out: Any) -> None:
        """One grouped round of ncclSend / ncclRecv: (byte offset, byte count) per peer, both ways. The
        block a rank keeps for itself is a plain device-to-device copy on the same stream."""
        import cupy

        uint8, stream = NCCL_TYPES["uint8"], self._stream()
        mine = sends[self.rank]
        cupy.cuda.runtime.memcpyAsync(out.data.ptr + receives[self.rank][0], send.data.ptr + mine[0], mine[1],
                                      cupy.cuda.runtime.memcpyDeviceToDevice, stream)
        self.nccl.groupStart()
        for peer in range(self.size):
            if peer == self.rank:
                continue
            if sends[peer][1]:
                self.comm.send(send.data.ptr + sends[peer][0], sends[peer][1], uint8, peer, stream)
            if receives[peer][1]:
                self.comm.recv(out.data.ptr + receives[peer][0], receives[peer][1], uint8, peer, stream)
        self.nccl.groupEnd()

    def split(self, color: int, key: int) -> NCCLComm:
        return NCCLComm(self.mpi.split(color, key))
