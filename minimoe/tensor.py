"""Autograd-lite: a Tensor that remembers the Function that made it, and backward() over that tape.

The whole engine fits on two screens (micrograd's idea, DeZero's names):
- a `Tensor` wraps an array (`data`, NumPy or CuPy), its gradient (`grad`) and, when it was computed
  from tensors that need gradients, the `Function` object that computed it (`creator`);
- a `Function` subclass writes `forward(ctx, *arrays)` and `backward(ctx, grad)` side by side; `apply`
  runs forward on plain arrays and links the result into the tape;
- `Tensor.backward()` sorts the tape topologically and calls each Function's backward once, last op
  first, summing gradients where a tensor was used more than once.
docs/autograd.md walks through one op line by line.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from minimoe import backend

_grad_enabled = True


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Inside this block no tape is recorded (evaluation, generation, optimizer updates)."""
    global _grad_enabled
    previous = _grad_enabled
    _grad_enabled = False
    try:
        yield
    finally:
        _grad_enabled = previous


def is_grad_enabled() -> bool:
    return _grad_enabled


class Tensor:
    # Makes `ndarray + Tensor` call Tensor.__radd__ instead of NumPy broadcasting over the object.
    __array_priority__ = 1000

    def __init__(self, data: Any, requires_grad: bool = False):
        if isinstance(data, Tensor):
            raise TypeError("Tensor(data) takes an array, not a Tensor")
        self.data = data if isinstance(data, np.ndarray) or backend.is_gpu(data) else backend.asarray(data)
        self.grad: Any = None
        self.requires_grad = requires_grad
        self.creator: Function | None = None

    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}{grad})"

    def item(self) -> float:
        return float(self.data.item())

    def numpy(self) -> Any:
        return backend.to_numpy(self.data)

    def backward(self, grad: Any = None) -> None:
        """Fill `.grad` of every leaf that requires it with d(self)/d(leaf), then free the tape."""
        if grad is None:
            if self.size != 1:
                raise ValueError(f"backward() without a gradient needs a single-element tensor, got {self.shape}")
            grad = backend.array_module(self.data).ones_like(self.data)
        self.grad = grad
        for tensor in reversed(_topological_order(self)):
            ctx = tensor.creator
            input_grads = ctx.backward(tensor.grad)
            if not isinstance(input_grads, tuple):
                input_grads = (input_grads,)
            for parent, parent_grad in zip(ctx.inputs, input_grads):
                if isinstance(parent, Tensor) and parent.requires_grad and parent_grad is not None:
                    parent_grad = unbroadcast(parent_grad, parent.shape)
                    parent.grad = parent_grad if parent.grad is None else parent.grad + parent_grad
            # An intermediate's gradient and its Function's saved arrays are not needed again:
            # dropping them here keeps peak memory near one forward pass, as in PyTorch.
            tensor.grad = None if tensor is not self else tensor.grad
            tensor.creator = None

    # Operators, so that model code reads like math. Each one is an op from minimoe.ops.
    def __add__(self, other: Any) -> Tensor:
        return ops.add(self, other)

    def __radd__(self, other: Any) -> Tensor:
        return ops.add(other, self)

    def __sub__(self, other: Any) -> Tensor:
        return ops.sub(self, other)

    def __rsub__(self, other: Any) -> Tensor:
        return ops.sub(other, self)

    def __mul__(self, other: Any) -> Tensor:
        return ops.mul(self, other)

    def __rmul__(self, other: Any) -> Tensor:
        return ops.mul(other, self)

    def __truediv__(self, other: Any) -> Tensor:
        return ops.div(self, other)

    def __rtruediv__(self, other: Any) -> Tensor:
        return ops.div(other, self)

    def __neg__(self) -> Tensor:
        return ops.neg(self)

    def __matmul__(self, other: Any) -> Tensor:
        return ops.matmul(self, other)

    def __getitem__(self, index: Any) -> Tensor:
        return ops.getitem(self, index)

    def reshape(self, *shape: Any) -> Tensor:
        return ops.reshape(self, shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape)

    def transpose(self, *axes: int) -> Tensor:
        return ops.transpose(self, axes or None)

    def sum(self, axis: Any = None, keepdims: bool = False) -> Tensor:
        return ops.sum(self, axis, keepdims)

    def mean(self, axis: Any = None, keepdims: bool = False) -> Tensor:
        return ops.mean(self, axis, keepdims)


class Function:
    """One op on the tape. Subclasses define forward(ctx, *arrays) and backward(ctx, grad).

    `ctx` is the Function object itself: forward stashes what backward needs with `ctx.save(...)`, and
    backward returns one gradient per positional input of forward (None where there is none).
    """

    inputs: tuple[Any, ...]
    saved: tuple[Any, ...]

    def save(ctx, *arrays: Any) -> None:
        ctx.saved = arrays

    def forward(ctx, *arrays: Any, **options: Any) -> Any:
        raise NotImplementedError

    def backward(ctx, grad: Any) -> Any:
        raise NotImplementedError

    @classmethod
    def apply(cls, *inputs: Any, **options: Any) -> Tensor:
        ctx = cls()
        arrays = [x.data if isinstance(x, Tensor) else x for x in inputs]
        output = Tensor(ctx.forward(*arrays, **options))
        if _grad_enabled and any(isinstance(x, Tensor) and x.requires_grad for x in inputs):
            output.requires_grad = True
            output.creator = ctx
            ctx.inputs = inputs
        return output


def _topological_order(root: Tensor) -> list[Tensor]:
    """Tensors reachable from `root` through creators, each after all of its inputs (iterative DFS,
    so a deep model cannot hit Python's recursion limit)."""
    order: list[Tensor] = []
    visited: set[int] = set()
    stack: list[tuple[Tensor, bool]] = [(root, False)]
    while stack:
        tensor, inputs_done = stack.pop()
        if inputs_done:
            order.append(tensor)
            continue
        if id(tensor) in visited or tensor.creator is None:
            continue
        visited.add(id(tensor))
        stack.append((tensor, True))
        for parent in tensor.creator.inputs:
            if isinstance(parent, Tensor) and parent.creator is not None and id(parent) not in visited:
                stack.append((parent, False))
    return order


def unbroadcast(grad: Any, shape: tuple[int, ...]) -> Any:
    """Sum `grad` down to `shape`: the adjoint of NumPy broadcasting `shape` up to grad.shape."""
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(axis for axis, size in enumerate(shape) if size == 1 and grad.shape[axis] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    return grad.reshape(shape)


from minimoe import ops  # noqa: E402  (ops builds on Tensor and Function, defined above)
