"""Dispatch and combine through the mapping table: the data-layout idea of the DeepSpeed-MoE
paper's inference design (Rajbhandari et al., 2022, sec. 5): never build GShard's one-hot dispatch and combine
tensors [T, E, C] or the einsums over them; move rows by the table instead. Memory stays
O(T * k + E * C * d) rather than O(T * E * C).

The table is gating's (expert_index [T, k], position [T, k]): choice j of token t lives in slot
position[t, j] of expert expert_index[t, j]'s buffer, or nowhere when position is -1 (dropped).

    dispatch: buffer[e, c] = scale[t, j] * x[t]   for the (t, j) with (expert, position) = (e, c);
              0 in slots no token fills
    combine:  y[t] = sum_j weight[t, j] * buffer[expert_index[t, j], position[t, j]]   (kept choices)

The two are each other's adjoints over the same table: <dispatch(x), B> = <x, combine(B)> with unit
weights. So the backward of dispatch is a combine with unit weights, and the backward of combine is a
dispatch of the output gradient scaled by the weights (plus the weights' own gradient, a row-wise dot).

GPU: dispatch is a Numba CUDA kernel (cuda/dispatch_numba.py) that fills the buffer slot by slot from
the inverse table (slot -> token), each word written once, zeros included, in the widest words the row
length allows (complex128 words for bf16 rows of a multiple of 8; Numba's PTX moves each as two 8-byte
loads, not one 16-byte load); combine and combine's backward are CUDA C in cuda/dispatch.cu (one block
per token, 16-byte vectors, float32 sums).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from minimoe.backend import array_module, is_gpu
from minimoe.cuda import build

build.register("dispatch.cu", *(f"{name}<{t}, {v}>" for name in ("combine_rows", "combine_backward")
                                for t in ("float", "bf16") for v in ("true", "false")))
THREADS = 128


def _kept_slots(expert_index: Any, position: Any, capacity: int, choice: int) -> tuple[Any, Any]:
    """(mask of tokens whose choice `choice` was kept, their flat slots e * C + position in [E * C])."""
    kept = position[:, choice] >= 0
    return kept, expert_index[kept, choice] * capacity + position[kept, choice]


def dispatch(x: Any, expert_index: Any, position: Any, num_experts: int, capacity: int,
             scale: Any = None, source_token: Any = None) -> Any:
    """Scatter the rows of x [T, d] into a zero-filled buffer [E, C, d] by the table; `scale` [T, k]
    multiplies each choice's row (None: 1). `source_token`: the table's inverse (source_tokens) where the
    caller has it already (the GPU gating kernel writes it); the GPU path works it out otherwise."""
    if is_gpu(x) and scale is None:
        return _gpu_dispatch(x, expert_index, position, num_experts, capacity, source_token)
    xp = array_module(x)
    width = x.shape[1]
    buffer = xp.zeros((num_experts * capacity, width), dtype=x.dtype)
    for choice in range(expert_index.shape[1]):
        kept, slots = _kept_slots(expert_index, position, capacity, choice)
        # Kept (expert, position) pairs are distinct, so plain assignment never collides.
        buffer[slots] = x[kept] if scale is None else x[kept] * scale[kept, choice][:, None]
    return buffer.reshape(num_experts, capacity, width)


def combine(buffer: Any, expert_index: Any, position: Any, weight: Any = None) -> Any:
    """y [T, d] = sum over each token's kept choices of weight * the buffer row it points at
    (weight None: 1). Also the backward of dispatch (unit weights)."""
    if is_gpu(buffer):
        return _gpu_combine(buffer, expert_index, position, weight)
    xp = array_module(buffer)
    num_experts, capacity, width = buffer.shape
    rows = buffer.reshape(num_experts * capacity, width)
    y = xp.zeros((expert_index.shape[0], width), dtype=buffer.dtype)
    for choice in range(expert_index.shape[1]):
        kept, slots = _kept_slots(expert_index, position, capacity, choice)
        gathered = rows[slots]
        y[kept] += gathered if weight is None else gathered * weight[kept, choice][:, None]
    return y


def combine_weight_grad(grad_y: Any, buffer: Any, expert_index: Any, position: Any) -> Any:
    """d loss / d weight [T, k]: the dot product of grad_y[t] with the buffer row choice j read (0 where
    dropped)."""
    xp = array_module(buffer)
    num_experts, capacity, width = buffer.shape
    rows = buffer.reshape(num_experts * capacity, width)
    grad_weight = xp.zeros(expert_index.shape, dtype=buffer.dtype)
    for choice in range(expert_index.shape[1]):
        kept, slots = _kept_slots(expert_index, position, capacity, choice)
        grad_weight[kept, choice] = (grad_y[kept] * rows[slots]).sum(axis=1)
    return grad_weight


def combine_backward(grad_y: Any, buffer: Any, expert_index: Any, position: Any, weight: Any) -> tuple[Any, Any]:
    """(d loss / d buffer [E, C, d], d loss / d weight [T, k]) of y = combine(buffer, table, weight)."""
    if is_gpu(grad_y):
        return _gpu_combine_backward(grad_y, buffer, expert_index, position, weight)
    num_experts, capacity, _ = buffer.shape
    return (dispatch(grad_y, expert_index, position, num_experts, capacity, scale=weight),
            combine_weight_grad(grad_y, buffer, expert_index, position))


# ----------------------------------------------------------------------------- GPU paths


def row_words(rows: Any) -> Any:
    """rows [N, d] viewed as [N, W] words of the widest type (16, 8, 4 or 2 bytes) dividing a row."""
    row_bytes = rows.shape[1] * rows.dtype.itemsize
    word = next(w for w in (np.complex128, np.float64, np.float32, np.uint16, np.uint8)
                if row_bytes % np.dtype(w).itemsize == 0)
    return rows.view(word)


def source_tokens(expert_index: Any, position: Any, num_experts: int, capacity: int) -> Any:
    """The inverse table: for each of the E * C slots, the token whose kept choice sits there, or -1.
    Reference: dropped choices all write into one extra slot past the end, which is cut off.
    GPU: dispatch.cu's invert_table."""
    xp = array_module(position)
    tokens, k = position.shape
    if is_gpu(position):
        source = xp.full(num_experts * capacity, -1, dtype=xp.int64)
        if tokens * k == 0:  # nothing to place (a rank may receive no rows in a dropless exchange)
            return source
        build.kernel("dispatch.cu", "invert_table")(
            ((tokens * k + 255) // 256,), (256,), (expert_index, position, source, np.int32(tokens * k),
                                                   np.int32(k), np.int64(capacity)))
        return source
    slot = xp.where(position >= 0, expert_index * capacity + position, num_experts * capacity)
    source = xp.full(num_experts * capacity + 1, -1, dtype=xp.int64)
    source[slot.reshape(-1)] = xp.repeat(xp.arange(tokens, dtype=xp.int64), k)
    return source[:-1]


def launch_fill_slots(x: Any, source: Any, buffer_rows: Any) -> None:
    """Run the Numba kernel: buffer_rows [E * C, d] from x [T, d] and the inverse table. Host arrays
    go through Numba's own launcher (the CUDA simulator in CI); CuPy arrays through CuPy (below)."""
    x_words, buffer_words = row_words(x), row_words(buffer_rows)
    if buffer_words.shape[0] == 0:
        return
    if is_gpu(x):
        _fill_slots_through_cupy(x_words.dtype.str)((buffer_words.shape[0],), (THREADS,), (
            *_numba_array_arguments(x_words), *_numba_array_arguments(source), *_numba_array_arguments(buffer_words)))
        return
    from minimoe.cuda.dispatch_numba import fill_slots

    fill_slots[buffer_words.shape[0], THREADS](x_words, source, buffer_words)


@functools.cache
def _fill_slots_through_cupy(word_dtype: str) -> Any:
    """The Numba kernel compiled by Numba to PTX for this word type, loaded and launched by CuPy.
    Numba's own launcher spends a few hundred microseconds per call on argument handling; CuPy's
    spends a few. The kernel is the same Python function the simulator runs."""
    import re

    import cupy
    from numba import cuda, from_dtype, types

    from minimoe.cuda.dispatch_numba import fill_slots

    word = from_dtype(np.dtype(word_dtype))
    signature = (types.Array(word, 2, "C"), types.Array(types.int64, 1, "C"), types.Array(word, 2, "C"))
    capability = cupy.cuda.Device().compute_capability  # e.g. "90"
    ptx, _ = cuda.compile_ptx(fill_slots.py_func, signature, cc=(int(capability[:-1]), int(capability[-1])))
    module = cupy.cuda.function.Module()
    module.load(ptx.encode())
    return module.get_function(re.search(r"\.entry\s+(\S+)\(", ptx).group(1))


def _numba_array_arguments(array: Any) -> tuple[Any, ...]:
    """A C-contiguous CuPy array as Numba passes an array to a kernel: meminfo and parent (unused,
    null), the element count, the item size, the data pointer, then the shape and the strides in bytes."""
    return (np.uint64(0), np.uint64(0), np.int64(array.size), np.int64(array.dtype.itemsize),
            np.uint64(array.data.ptr), *(np.int64(n) for n in array.shape), *(np.int64(n) for n in array.strides))


def _gpu_dispatch(x: Any, expert_index: Any, position: Any, num_experts: int, capacity: int,
                  source_token: Any) -> Any:
    import cupy

    x = cupy.ascontiguousarray(x)
    buffer = cupy.empty((num_experts * capacity, x.shape[1]), dtype=x.dtype)
    if buffer.size:
        if source_token is None:
            source_token = source_tokens(expert_index, position, num_experts, capacity)
        launch_fill_slots(x, source_token, buffer)
    return buffer.reshape(num_experts, capacity, x.shape[1])


def _gpu_combine(buffer: Any, expert_index: Any, position: Any, weight: Any) -> Any:
    import cupy

    num_experts, capacity, width = buffer.shape
    tokens, k = position.shape
    y = cupy.empty((tokens, width), dtype=buffer.dtype)
    if tokens == 0:
        return y
    type_name, vectorised = build.type_name(buffer), build.row_vectors(buffer)
    # A null weight pointer means unit weights (the backward of dispatch).
    weight = build.optional_array(weight, cupy.float32)
    build.kernel("dispatch.cu", f"combine_rows<{type_name}, {vectorised}>")(
        (tokens,), (THREADS,),
        (cupy.ascontiguousarray(buffer), expert_index, position, weight, y, np.int32(k), np.int32(capacity),
         np.int32(width)))
    return y


def _gpu_combine_backward(grad_y: Any, buffer: Any, expert_index: Any, position: Any,
                          weight: Any) -> tuple[Any, Any]:
    import cupy

    num_experts, capacity, width = buffer.shape
    tokens, k = position.shape
    grad_buffer = cupy.zeros_like(buffer)
    grad_weight = cupy.empty((tokens, k), dtype=cupy.float32)
    if tokens == 0:
        return grad_buffer, grad_weight.astype(weight.dtype, copy=False)
    type_name, vectorised = build.type_name(buffer), build.row_vectors(buffer)
    build.kernel("dispatch.cu", f"combine_backward<{type_name}, {vectorised}>")(
        (tokens,), (THREADS,),
        (cupy.ascontiguousarray(grad_y), cupy.ascontiguousarray(buffer), expert_index, position,
         cupy.ascontiguousarray(weight, dtype=cupy.float32), grad_buffer, grad_weight, np.int32(k),
         np.int32(capacity), np.int32(width)))
    return grad_buffer, grad_weight.astype(weight.dtype, copy=False)
