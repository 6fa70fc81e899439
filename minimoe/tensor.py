"""Autograd-lite: a Tensor that remembers the Function that made it, and backward() over that tape.

The whole engine fits on two screens (micrograd's idea, DeZero's names):
- a `Tensor` wraps an array (`data`, NumPy or CuPy), its gradient (`grad`) and, when it was computed
  from tensors that need gradients, the `Function` object that computed it (`creator`);
- a `Function` subclass writes `forward(ctx, *arrays)` and `backward(ctx, *grads)` side by side;
  calling it (or `apply`) runs forward on plain arrays and links the result into the tape. A forward
  that returns a tuple makes several output tensors (as DeZero's Functions do), and its backward then
  takes one gradient per output (None for an output that did not reach the loss);
- `Tensor.backward()` sorts the tape's Functions topologically and calls each one's backward once, last
  op first, summing gradients where a tensor was used more than once.
docs/autograd.md walks through one op line by line.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np

from minimoe import backend, breakdown
from minimoe.cuda.accumulate import add_gradients
from minimoe.cuda.embedding import RowGradient

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
        self.output_index = 0  # which of its creator's outputs this tensor is

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
        if self.creator is None:
            return
        self.creator.add_output_grad(self.output_index, grad)
        for function in reversed(_topological_order(self.creator)):
            # (breakdown.py: the op's backward and the sums its gradients join count in its part)
            with breakdown.timed(function.part, "backward"):
                input_grads = function.backward(*function.output_grads)
                if not isinstance(input_grads, tuple):
                    input_grads = (input_grads,)
                for parent, parent_grad in zip(function.inputs, input_grads):
                    if isinstance(parent, Tensor) and parent.requires_grad and parent_grad is not None:
                        parent_grad = unbroadcast(parent_grad, parent.shape)
                        if parent.creator is None:  # a leaf: the gradient stays on the tensor
                            parent.grad = sum_gradients(parent.grad, parent_grad)
                        else:  # an intermediate: it waits in its creator until that Function's turn
                            parent.creator.add_output_grad(parent.output_index, parent_grad)
            # The Function's saved arrays and gradients are not needed again: unlinking it from its outputs
            # frees them here, which keeps peak memory near one forward pass, as in PyTorch.
            function.release()

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
    """One op on the tape. Subclasses define forward(ctx, *arrays) and backward(ctx, *grads).

    `ctx` is the Function object itself: forward stashes what backward needs with `ctx.save(...)`, and
    backward returns one gradient per positional input of forward (None where there is none). A forward
    may return a tuple of arrays: each becomes an output tensor, and backward receives one gradient per
    output, None for an output no gradient reached.
    """

    inputs: tuple[Any, ...]
    saved: tuple[Any, ...]
    outputs: list[weakref.ref]  # weak: a Function must not keep its outputs alive
    output_grads: list[Any]

    def save(ctx, *arrays: Any) -> None:
        ctx.saved = arrays

    def forward(ctx, *arrays: Any, **options: Any) -> Any:
        raise NotImplementedError

    def backward(ctx, *grads: Any) -> Any:
        raise NotImplementedError

    def __call__(ctx, *inputs: Any, **options: Any) -> Any:
        """Run forward on the inputs' arrays; returns a Tensor, or a tuple of Tensors when forward
        returns a tuple. With gradients enabled and an input that requires one, the outputs are linked
        to this Function: that link is the tape."""
        arrays = [x.data if isinstance(x, Tensor) else x for x in inputs]
        ctx.part = breakdown.current  # where its time goes, forward and backward (breakdown.py)
        if breakdown.active is None:  # (the hot path: no context manager per op)
            result = ctx.forward(*arrays, **options)
        else:
            with breakdown.timed(ctx.part, "forward"):
                result = ctx.forward(*arrays, **options)
        outputs = tuple(Tensor(array) for array in (result if isinstance(result, tuple) else (result,)))
        if _grad_enabled and any(isinstance(x, Tensor) and x.requires_grad for x in inputs):
            ctx.inputs = inputs
            ctx.outputs = [weakref.ref(output) for output in outputs]
            ctx.output_grads = [None] * len(outputs)
            for index, output in enumerate(outputs):
                output.requires_grad, output.creator, output.output_index = True, ctx, index
        return outputs if isinstance(result, tuple) else outputs[0]

    @classmethod
    def apply(cls, *inputs: Any, **options: Any) -> Any:
        """A fresh Function of this class called on the inputs: `Mul.apply(x, w)`."""
        return cls()(*inputs, **options)

    def add_output_grad(ctx, index: int, grad: Any) -> None:
        ctx.output_grads[index] = sum_gradients(ctx.output_grads[index], grad)

    def release(ctx) -> None:
        """Unlink from the outputs and drop everything forward saved (after backward has run)."""
        for output in ctx.outputs:
            tensor = output()
            if tensor is not None:
                tensor.creator = None
        vars(ctx).clear()


def _topological_order(root: Function) -> list[Function]:
    """The Functions reachable from `root` through their inputs' creators, each after all Functions
    that made its inputs (iterative DFS, so a deep model cannot hit Python's recursion limit)."""
    order: list[Function] = []
    visited: set[int] = set()
    stack: list[tuple[Function, bool]] = [(root, False)]
    while stack:
        function, inputs_done = stack.pop()
        if inputs_done:
            order.append(function)
            continue
        if id(function) in visited:
            continue
        visited.add(id(function))
        stack.append((function, True))
        for parent in function.inputs:
            if isinstance(parent, Tensor) and parent.creator is not None and id(parent.creator) not in visited:
                stack.append((parent.creator, False))
    return order


def sum_gradients(current: Any, grad: Any) -> Any:
    """The tape's sum of two gradients of one tensor (current: None before the first). An embedding's
    comes as the rows it read (RowGradient), which add into a dense gradient without one of their own."""
    if isinstance(grad, RowGradient):
        return grad.dense() if current is None else grad.added_to(current)
    return grad if current is None else add_gradients(current, grad)


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
