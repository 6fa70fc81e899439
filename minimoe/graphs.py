"""CUDA graphs: the launches of one call recorded once, then replayed by a single launch.

A training step of the model in Python launches several hundred kernels (about 700 for bench
train-step's), each costing the host tens of microseconds of interpreter and driver time; wherever the
GPU is faster than the host, it waits. Stream capture records
what one call of a function launches, without running it, into a graph that later runs as one launch.
Only the GPU's work is recorded, never the host's, so code that runs under a capture keeps three rules:

- Whatever changes between replays lives in device memory and is written there, in place, before each
  launch (the batch, the learning rate, the random generator's key): a kernel's scalar arguments and
  pointers are frozen at capture.
- It never reads the GPU from the host (no `.item()`, no synchronisation): during a capture nothing runs.
- Its memory comes from a pool of the graph's own, which nothing else draws from. An array freed during
  the capture may be reused by a later one in the same capture (the graph keeps the order); arrays still
  referenced when the capture ends are the graph's outputs, rewritten by every replay.

Before the capture the function runs once for real (its warm-up), which compiles its kernels and fills
the pool with the blocks the capture will ask for. CuPy captures in relaxed mode, which allows the
allocator and the compiler to do their host work during a capture.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class CaptureError(RuntimeError):
    """A function could not be recorded as a CUDA graph (it read the GPU from the host, for instance)."""


class Graph:
    """fn's launches as a CUDA graph: `warmup()` (default: fn itself) runs first, then fn() is captured;
    `output` is what the captured call returned, whose arrays every launch() rewrites."""

    def __init__(self, fn: Callable[[], Any], warmup: Callable[[], Any] | None = None, name: str = "graph"):
        import cupy

        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.pool = cupy.cuda.MemoryPool()  # the graph's own: its intermediates are never handed to others
        cupy.cuda.Device().synchronize()  # what other streams wrote (fn's inputs) is there before the warm-up reads it
        with self.stream, cupy.cuda.using_allocator(self.pool.malloc):
            (warmup or fn)()
            self.stream.synchronize()
            self.stream.begin_capture()
            try:
                self.output = fn()
            except Exception as error:
                _end_broken_capture(self.stream)
                raise CaptureError(f"{name} cannot be captured as a CUDA graph: {type(error).__name__}: "
                                   f"{error}") from error
            try:
                self.graph = self.stream.end_capture()
            except Exception as error:  # CUDA invalidated the capture: something in fn synchronised
                raise CaptureError(f"{name} cannot be captured as a CUDA graph: {type(error).__name__}: "
                                   f"{error}") from error

    def launch(self) -> None:
        """Replay the graph on the current stream (after the work queued there before)."""
        self.graph.launch()

    def memory_bytes(self) -> int:
        """Bytes the graph's pool holds: its intermediates at their peak and its outputs."""
        return self.pool.total_bytes()


def _end_broken_capture(stream: Any) -> None:
    """End a capture that an exception interrupted, so that the stream is usable again; CUDA reports an
    invalidated capture as an error here, which adds nothing to the exception being raised."""
    try:
        stream.end_capture()
    except Exception:  # noqa: BLE001 (the first error is the one raised)
        pass
