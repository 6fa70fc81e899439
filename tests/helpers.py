"""Test helpers: finite-difference gradient checks, small generated text, the MPI launcher."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from minimoe.tensor import Tensor, no_grad


def numeric_gradient(scalar_fn: Callable[[], float], array: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences of scalar_fn with respect to every element of `array` (changed in place
    and restored)."""
    grad = np.zeros_like(array)
    for index in np.ndindex(array.shape):
        original = array[index]
        array[index] = original + eps
        plus = scalar_fn()
        array[index] = original - eps
        minus = scalar_fn()
        array[index] = original
        grad[index] = (plus - minus) / (2 * eps)
    return grad


def check_gradients(function: Callable[..., Tensor], inputs: list[np.ndarray], seed: int = 0,
                    rtol: float = 1e-5, atol: float = 1e-7, before_each_call: Callable[[], None] = lambda: None,
                    ) -> None:
    """Backward of sum(function(*inputs) * w), w random, against float64 central differences for every
    element of every input. Inputs must be float64 arrays (small: the check costs 2 calls an element)."""
    assert all(x.dtype == np.float64 for x in inputs), "gradient checks run in float64"
    tensors = [Tensor(x.copy(), requires_grad=True) for x in inputs]
    before_each_call()
    output = function(*tensors)
    weights = np.random.default_rng(seed).standard_normal(output.shape)
    (output * weights).sum().backward()

    def weighted_output() -> float:
        before_each_call()
        with no_grad():
            return float((function(*[Tensor(x) for x in inputs]).data * weights).sum())

    for position, (tensor, array) in enumerate(zip(tensors, inputs)):
        numeric = numeric_gradient(weighted_output, array)
        assert tensor.grad is not None, f"input {position} received no gradient"
        np.testing.assert_allclose(tensor.grad, numeric, rtol=rtol, atol=atol,
                                   err_msg=f"gradient of input {position} (shape {array.shape})")


WORDS = ("the king queen knight speaks rides sleeps castle forest river gold silver "
         "and of to a in my thy good night day sword crown").split()


def generated_text(n_lines: int = 400, seed: int = 0) -> str:
    """Lines of words drawn from a small vocabulary with a fixed sentence shape: learnable structure
    (spaces, capitals, line ends, repeated words) a tiny model picks up in a few dozen steps."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n_lines):
        words = [WORDS[i] for i in rng.integers(0, len(WORDS), rng.integers(3, 9))]
        lines.append(" ".join(words).capitalize() + ".")
    return "\n".join(lines) + "\n"


# The launcher of the MPI that mpi4py was built against: the one installed beside this Python by the
# mpi extra, else the system's (Open MPI on the GPU machine).
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
