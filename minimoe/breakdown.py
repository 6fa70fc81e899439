"""Where a training step's time goes, by part of the model (`minimoe bench train-step --breakdown` on a
GPU, `minimoe bench cpu-step --breakdown` on the CPU).

Inside `with breakdown.measure() as spans:`, every autograd op (tensor.Function) is timed as its forward
and its backward run, and the time goes to the part of the model that was current when the op ran
forward: a module names its part in its class (nn.Module.part, e.g. "attention"; its calls then run
inside `breakdown.part(name)`, the innermost part winning), so an op's backward counts where its
forward did, with the tape's sums of the gradients it hands on (an embedding's rows added into the tied
table's gradient, the residual stream's two gradients). Code that is no op (the optimizer's update) is timed with
`breakdown.timed(part, phase)`. On the GPU a span is two CUDA events on the current stream around the
op, so it is the GPU's time from the op's first launch to its last, waits for the host in between
included; on the CPU it is the wall clock. What no span covers (gaps between ops) is the step's time
minus the spans'. Outside measure() the hooks cost an op a few reads of this module's globals
(`current`, `active`) and a shared context that does nothing; inside, the events cost some host time per
op, so the step is a little slower than unmeasured.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

from minimoe import backend

current = "other"  # the part of the model running now (part() sets it; tensor.Function reads it)
active: Spans | None = None  # the measurement in progress, if any (measure() sets it)


@contextlib.contextmanager
def part(name: str) -> Iterator[None]:
    """Ops that run forward inside this block belong to part `name` (nested blocks: the innermost)."""
    global current
    outer, current = current, name
    try:
        yield
    finally:
        current = outer


class Spans:
    """The (part, phase) and start and end marks of every timed span of a measurement."""

    def __init__(self, gpu: bool):
        self.gpu = gpu
        self.marks: list[tuple[str, str, Any, Any]] = []

    def mark(self) -> Any:
        if not self.gpu:
            return time.perf_counter()
        import cupy

        event = cupy.cuda.Event()
        event.record()
        return event

    def seconds(self) -> dict[tuple[str, str], float]:
        """Seconds by (part, phase), summed over the spans (waits for the GPU to finish them)."""
        totals: dict[tuple[str, str], float] = defaultdict(float)
        if self.gpu and self.marks:
            import cupy

            self.marks[-1][3].synchronize()
            for name, phase, start, end in self.marks:
                totals[name, phase] += cupy.cuda.get_elapsed_time(start, end) / 1e3
        else:
            for name, phase, start, end in self.marks:
                totals[name, phase] += end - start
        return dict(totals)


@contextlib.contextmanager
def measure() -> Iterator[Spans]:
    """Time every op (and every timed() block) run inside this block."""
    global active
    active = Spans(backend.device() == "cuda")
    try:
        yield active
    finally:
        active = None


class _Span:
    def __init__(self, spans: Spans, name: str, phase: str):
        self.spans, self.name, self.phase = spans, name, phase

    def __enter__(self) -> None:
        self.start = self.spans.mark()

    def __exit__(self, *exception: Any) -> None:
        self.spans.marks.append((self.name, self.phase, self.start, self.spans.mark()))


_NOT_MEASURING = contextlib.nullcontext()


def timed(name: str, phase: str) -> contextlib.AbstractContextManager:
    """One span of part `name`, phase `phase` ("forward", "backward", "update"), when measuring; else a
    context that does nothing (one shared object: an op pays no allocation for it)."""
    return _NOT_MEASURING if active is None else _Span(active, name, phase)


def step_table(step: Callable[[], Any], steps: int) -> list[str]:
    """Lines of a table: step() run `steps` times under measure(), its spans by part (table())."""
    with measure() as spans:
        for _ in range(steps):
            with timed("step", "all"):
                step()
    seconds = {key: value / steps for key, value in spans.seconds().items()}
    return table(seconds, f"{1e3 * seconds['step', 'all']:.2f} ms, measured; spans add host time per op")


def table(seconds: dict[tuple[str, str], float], step: str) -> list[str]:
    """Lines of a table from seconds per step by (part, phase), ("step", "all") the whole step's: each
    part's forward, backward and update in milliseconds, its share of the step, and the step's time
    outside any span; `step` says what the step's time is (bench train-step --breakdown also gives it the
    PyTorch peer's kernel time by part)."""
    seconds = dict(seconds)
    total = seconds.pop(("step", "all"))
    parts = sorted({name for name, _ in seconds}, key=lambda name: -sum(v for k, v in seconds.items() if k[0] == name))
    lines = [f"{'part':<22}{'forward ms':>12}{'backward ms':>13}{'update ms':>11}{'share':>8}"]
    for name in parts:
        times = [seconds.get((name, phase), 0.0) for phase in ("forward", "backward", "update")]
        lines.append(f"{name:<22}" + "".join(f"{1e3 * t:>{w}.2f}" for t, w in zip(times, (12, 13, 11)))
                     + f"{100 * sum(times) / total:>7.1f}%")
    outside = total - sum(seconds.values())
    lines.append(f"{'outside any span':<58}{100 * outside / total:>7.1f}%   ({1e3 * outside:.2f} ms)")
    lines.append(f"{'step':<58}{'':>8}   ({step})")
    return lines
