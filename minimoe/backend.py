"""Where arrays live: NumPy on the CPU or CuPy on a GPU, chosen by one switch.

Everything else in minimoe asks this module for `xp` (the array module in use) or inspects an array
with `array_module(x)`, so one line of user configuration (`device = "cpu" | "cuda" | "auto"`) moves the
whole engine, as in DeZero. The random generator lives here too: one per process, reseeded by the
training loop from (seed, step) so that a resumed run draws exactly the numbers an uninterrupted one
would.
"""

from __future__ import annotations

import logging
import math
from types import ModuleType
from typing import Any

import numpy as np

from minimoe.cuda import philox

log = logging.getLogger("minimoe")

DEVICES = ("cpu", "cuda", "auto")


class DeviceError(RuntimeError):
    """The device asked for cannot be used (a user-facing, one-line error)."""


_device = "cpu"
xp: ModuleType = np
_rng: Any = np.random.default_rng(0)  # the CPU's generator
# The GPU's: Philox4x32-10 (cuda/philox.py), a 64-bit key from the seed, kept in device memory (a CUDA graph
# of a training step reads the key of the step it replays), and the next unused counter.
_philox_key: Any = None
_philox_counter = 0


def cupy_or_reason(gpu: int = 0) -> tuple[ModuleType | None, str]:
    """Import CuPy, make GPU `gpu` (modulo the count) current and touch it; return (cupy, "") or
    (None, why it is unusable)."""
    try:
        import cupy
    except ImportError as error:
        return None, f"CuPy is not installed ({error})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
        if count < 1:
            return None, "CuPy found no CUDA device"
        cupy.cuda.Device(gpu % count).use()
        cupy.zeros(1).sum().item()
    except Exception as error:  # a broken driver raises many kinds of errors; report whichever it is
        return None, f"CuPy cannot use the GPU ({type(error).__name__}: {error})"
    return cupy, ""


def set_device(device: str, gpu: int = 0) -> str:
    """Select "cpu", "cuda" or "auto" for everything created from now on; returns the device chosen.
    gpu: which GPU of this machine (each rank of an MPI job takes its own: its rank on the node)."""
    global _device, xp
    if device not in DEVICES:
        raise DeviceError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        _device, xp = "cpu", np
        manual_seed(0)
        return _device
    cupy, reason = cupy_or_reason(gpu)
    if cupy is None:
        if device == "cuda":
            raise DeviceError(f"device 'cuda' was asked for but {reason}")
        log.info("device auto: using the CPU (NumPy) because %s", reason)
        _device, xp = "cpu", np
        manual_seed(0)
        return _device
    _device, xp = "cuda", cupy
    manual_seed(0)  # the generator lives on the device the arrays live on
    log.info("device %s: using the GPU (CuPy %s, %s)", device, cupy.__version__, gpu_name())
    return _device


def device() -> str:
    return _device


def gpu_name() -> str:
    import cupy

    properties = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    return properties["name"].decode()


def array_module(array: Any) -> ModuleType:
    """NumPy or CuPy, whichever owns `array` (NumPy for scalars and lists)."""
    if type(array).__module__.startswith("cupy"):
        import cupy

        return cupy
    return np


def is_gpu(array: Any) -> bool:
    return type(array).__module__.startswith("cupy")


def to_numpy(array: Any) -> np.ndarray:
    """A host copy of any array (a no-op view for NumPy arrays)."""
    if is_gpu(array):
        return array.get()
    return np.asarray(array)


def asarray(array: Any, dtype: Any = None) -> Any:
    """`array` on the current device (copying between host and GPU when needed)."""
    if xp is np:
        return np.asarray(to_numpy(array), dtype=dtype)
    return xp.asarray(array, dtype=dtype)


def write_into(target: Any, values: Any) -> None:
    """`values` (host numbers, or an array on target's device) copied into the existing array `target`,
    in place and in stream order on the GPU: an array a CUDA graph reads keeps its address."""
    if is_gpu(target) and not is_gpu(values):
        target.set(np.ascontiguousarray(values, dtype=target.dtype).reshape(target.shape))
    else:
        target[...] = values


def manual_seed(*seed: int) -> None:
    """Reseed the device's generator from one or more integers, e.g. manual_seed(run_seed, step)."""
    global _rng, _philox_key, _philox_counter
    if xp is np:
        _rng = np.random.default_rng(list(seed))
    else:
        # Philox's key from the whole seed sequence through NumPy's mixer, written into the device's key slot
        # in stream order (no host synchronisation); its counters start again at 0.
        key = np.random.SeedSequence(list(seed)).generate_state(1, np.uint64)[0]
        if _philox_key is None or _philox_key.device.id != xp.cuda.Device().id:
            _philox_key = philox.key_slot(key)
        else:
            _philox_key.fill(key)
        _philox_counter = 0


def philox_draw(size: int) -> tuple[Any, int]:
    """The GPU generator's (key slot, first counter) for a draw of `size` numbers (cuda/philox.py); its
    next draw starts past the counters this one uses."""
    global _philox_counter
    counter = _philox_counter
    _philox_counter += philox.counters_used(size)
    return _philox_key, counter


def philox_counter() -> int:
    """The GPU generator's next unused counter."""
    return _philox_counter


def rewind_philox(counter: int) -> None:
    """Set the GPU generator's next counter back to `counter` (a CUDA graph's capture repeats the draws of
    the eager warm-up before it, so that the graph draws what an eager step would)."""
    global _philox_counter
    _philox_counter = counter


def random_uniform(shape: tuple[int, ...], dtype: Any = np.float32) -> Any:
    """Uniform [0, 1) numbers on the current device from the seeded generator, cast to `dtype` (so bf16
    works too). CPU: NumPy's generator, in float64 for float64. GPU: a Philox draw (cuda/philox.py), always
    24 random bits (float32), one launch: CuPy's cuRAND RandomState took 30-60 us of host time a draw."""
    if xp is np:
        numbers = _rng.random(shape, dtype=np.float64 if np.dtype(dtype) == np.float64 else np.float32)
    else:
        numbers = philox.uniform(shape, *philox_draw(math.prod(shape)))
    return numbers if numbers.dtype == dtype else numbers.astype(dtype)


def bfloat16() -> np.dtype:
    """The bf16 dtype (ml_dtypes' NumPy extension, which CuPy 14 understands)."""
    try:
        import ml_dtypes
    except ImportError:
        raise DeviceError("bfloat16 needs the ml_dtypes package (it comes with the cuda12 / cuda13 extras)") from None
    return np.dtype(ml_dtypes.bfloat16)
