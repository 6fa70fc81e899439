"""Embedding lookup: out[..., :] = weight[indices[...], :].

Backward is the transpose, a scatter-add of the output gradient rows into the rows they were read
from; an index that occurs several times in the batch receives the sum of its rows' gradients. The
backward gives that as a RowGradient, the rows and their indices, which the autograd tape adds into
the table's gradient (a tied output layer's, there before it) without forming a dense one of its own:
at GPT-2's vocabulary the dense [V, d] float32 sums, their cast and the tape's add of two [V, d]
gradients moved 0.6 GB a step to add 8192 rows.

Reference: NumPy's (or CuPy's) add.at in float32. GPU: cuda/embedding.cu, three launches over the
rows (not the table) for float32 and bf16 gradients.

A GPT's input, the token embedding plus the learned position embedding of positions 0 .. T-1
(token_and_position_forward), is one launch on the GPU where the two lookups and their add took three;
the position table's gradient is the output gradient summed over the batch (position_table_gradient).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from minimoe.backend import array_module
from minimoe.cuda import build

THREADS = 256
MAX_BLOCKS = 4096  # the threads stride on past this many blocks
build.register("embedding.cu", *(f"{kernel}<{t}>" for kernel in ("scatter_row_sums", "add_row_sums")
                                 for t in build.KERNEL_TYPES.values()),  # (and zero_row_sums, extern "C")
               *(f"{kernel}<{t}, {v}>" for kernel in ("embed_tokens_and_positions", "sum_position_gradients")
                 for t in build.KERNEL_TYPES.values() for v in ("true", "false")))


def embedding_forward(weight: Any, indices: Any) -> Any:
    return weight[indices]


class RowGradient:
    """The gradient of a table [num_embeddings, width] that a lookup read: row indices[i] gets rows[i]
    (rows [n, width] in the gradient's dtype), the sum where an index repeats, zero elsewhere."""

    def __init__(self, rows: Any, indices: Any, num_embeddings: int):
        self.rows, self.indices = rows.reshape(-1, rows.shape[-1]), indices.reshape(-1)
        self.shape = (num_embeddings, rows.shape[-1])
        self.dtype = rows.dtype

    def dense(self) -> Any:
        """The gradient as an array in the rows' dtype."""
        return self._sums().astype(self.dtype)

    def added_to(self, grad: Any) -> Any:
        """grad + this gradient in a new array: each row's sum in float32 added to grad's row, one rounding."""
        if not (build.kernel_arrays(grad) and grad.dtype == self.dtype and grad.shape == self.shape):
            sums = self._sums()
            return (grad.astype(sums.dtype) + sums).astype(grad.dtype)
        import cupy

        # A copy (grad may be another tensor's gradient too: the tape hands arrays on), by the copy engine:
        # CuPy's copy of a bf16 array is an elementwise kernel at a fifth of the copy rate.
        out = cupy.empty_like(grad)
        out.data.copy_from_device_async(grad.data, grad.nbytes)
        sums = cupy.empty(self.shape, dtype=cupy.float32)  # only the rows the indices name are read
        indices, rows = cupy.ascontiguousarray(self.indices, dtype=cupy.int64), cupy.ascontiguousarray(self.rows)
        size, width = np.int64(rows.size), np.int32(self.shape[1])
        if size:
            launch = ((min(MAX_BLOCKS, -(-int(size) // THREADS)),), (THREADS,))
            name = f"<{build.type_name(out)}>"
            build.kernel("embedding.cu", "zero_row_sums")(*launch, (sums, indices, size, width))
            build.kernel("embedding.cu", "scatter_row_sums" + name)(*launch, (rows, indices, sums, size, width))
            build.kernel("embedding.cu", "add_row_sums" + name)(*launch, (out, indices, sums, size, width))
        return out

    def _sums(self) -> Any:
        """The dense gradient in at least float32 (a bf16 sum of many rows would lose the small ones)."""
        xp = array_module(self.rows)
        accumulate = np.promote_types(self.dtype, np.float32)
        sums = xp.zeros(self.shape, dtype=accumulate)
        xp.add.at(sums, self.indices, self.rows.astype(accumulate))
        return sums


def embedding_backward(grad: Any, indices: Any, num_embeddings: int) -> RowGradient:
    return RowGradient(grad, indices, num_embeddings)


def token_and_position_forward(token_table: Any, position_table: Any, tokens: Any) -> Any:
    """token_table[tokens] + position_table[:T] for tokens [B, T] (T at most the position table's rows):
    [B, T, width], the sum rounded once to the tables' dtype."""
    length = tokens.shape[-1]
    if length > position_table.shape[0] or token_table.shape[1] != position_table.shape[1]:
        raise ValueError(f"tokens {tokens.shape} need a position table of at least {length} rows as wide as the "
                         f"token table {token_table.shape}, got {position_table.shape}")
    if not build.kernel_arrays(token_table, position_table):
        return token_table[tokens] + position_table[:length]
    import cupy

    out = cupy.empty((*tokens.shape, token_table.shape[1]), dtype=token_table.dtype)
    rows, width = tokens.size, token_table.shape[1]
    if out.size:
        build.kernel("embedding.cu", f"embed_tokens_and_positions<{build.type_name(out)}, {build.row_vectors(out)}>")(
            (-(-rows * (width // build.per_load(out)) // THREADS),), (THREADS,),
            (token_table, position_table, cupy.ascontiguousarray(tokens, dtype=cupy.int64), out, np.int64(rows),
             np.int32(length), np.int32(width)))
    return out


def position_table_gradient(grad: Any, table_rows: int) -> Any:
    """The position table's gradient [table_rows, width] from the output gradient [B, T, width]: row t < T
    the sum over the batch of grad[:, t] (in float32, rounded once), the other rows 0."""
    batch, length, width = grad.shape
    if not build.kernel_arrays(grad):
        sums = grad.astype(np.promote_types(grad.dtype, np.float32)).sum(axis=0)
        table = array_module(grad).zeros((table_rows, width), dtype=sums.dtype)
        table[:length] = sums
        return table.astype(grad.dtype)
    import cupy

    table = cupy.empty((table_rows, width), dtype=grad.dtype)
    if table.size:
        build.kernel("embedding.cu", f"sum_position_gradients<{build.type_name(grad)}, {build.row_vectors(grad)}>")(
            (-(-table_rows * (width // build.per_load(grad)) // THREADS),), (THREADS,),
            (grad, table, np.int32(batch), np.int32(length), np.int32(table_rows), np.int32(width)))
    return table

