"""Rows grouped by expert, for inference: every token's chosen experts run on just that token's row, and
an expert no token chose is never read (DeepSpeed-MoE sec. 5: MoE inference is bound by reading the
expert weights, so read only the active ones).

A batch of n rows with k choices each makes P = n * k (row, expert) pairs, pair p = i * k + j for choice
j of row i; expert_index = E marks a pair that is no choice at all (a padding row's).

    group_rows:      order [P]: the pairs sorted by expert, stably (pairs of expert E last);
                     rank [P]: each pair's place in that order (rank[order[r]] = r);
                     offsets [E + 1]: expert e's pairs are order[offsets[e] : offsets[e + 1]]
    grouped_linear:  y[r] = x[r] @ weight[e] (+ bias[e]) (then GELU) for every r in expert e's range:
                     one matrix product per expert over its rows only; rows past offsets[E] are left
                     unwritten
    combine_pairs:   y[i] = sum_j weight[i, j] * out[rank[i * k + j]] over the row's real choices

sparse_experts chains them: gather each pair's row, the experts' two layers, combine. grouped_linear
with E = 1 is also a plain linear layer whose rows are computed independently of each other: a decode
step's results do not depend on what else is in the batch.

Reference: NumPy. GPU: cuda/grouped.cu: group_rows in one block (a counting sort; a large prefill's pairs
sort on CuPy instead), grouped_linear one block per (expert, tile of output columns, slice of K) that
exits at once when its expert has no rows (so its weights are never read), float32 sums over bf16 or
float32 weights (bf16 on the tensor cores when the rows are whole 16-byte vectors), the slices' sums
added in a second launch; combine_pairs one block per row.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from minimoe.backend import array_module, is_gpu
from minimoe.cuda import build
from minimoe.cuda.gelu import gelu_forward

COLUMNS = 256  # output columns of one grouped_linear block (CUDA cores)
WARPS = 4  # warps of one grouped_linear block, each a quarter of every chunk of K
MMA_COLUMNS = 64  # output columns of one grouped_linear_mma block (tensor cores) ...
MMA_WARPS = 4  # ... a warp for each 16 of them
MMA_CHUNK = 64  # rows of K that grouped_linear_mma stages at a time; its slices of K are whole chunks
build.register("grouped.cu", "group_rows", "grouped_linear_mma",
               *(f"grouped_linear<{t}, {v}>" for t in ("float", "bf16") for v in ("true", "false")),
               *(f"{name}<{t}>" for name in ("grouped_linear_finish", "combine_pairs") for t in ("float", "bf16")),
               constants=dict(COLUMNS=COLUMNS, WARPS=WARPS, MMA_COLUMNS=MMA_COLUMNS, MMA_WARPS=MMA_WARPS,
                              MMA_CHUNK=MMA_CHUNK))
GROUP_THREADS = 1024  # group_rows: one block
MAX_PAIRS = 8192  # group_rows' kernel ranks in O(P^2 / threads): decode batches; more pairs sort on CuPy
BLOCKS_PER_MATRIX = 512  # grouped_linear splits K until a matrix of every expert has about this many blocks
MIN_SLICE = 64  # ... but never into slices of fewer rows of K
FINISH_THREADS = 256


def group_rows(expert_index: Any, num_experts: int, counter: Any = None) -> tuple[Any, Any, Any]:
    """(order [P], rank [P], offsets [E + 1]) of the pairs of expert_index [n, k] (values in 0..E); each
    expert's count of pairs is also added to counter [E] when one is given."""
    experts = expert_index.reshape(-1)
    if is_gpu(experts) and len(experts) <= MAX_PAIRS:
        return _gpu_group_rows(experts, num_experts, counter)
    xp = array_module(experts)
    order = xp.argsort(experts, kind="stable")
    rank = xp.empty_like(order)
    rank[order] = xp.arange(len(order))
    counts = xp.bincount(experts, minlength=num_experts + 1)[:num_experts]
    if counter is not None:
        counter += counts
    offsets = xp.concatenate([xp.zeros(1, dtype=np.int64), xp.cumsum(counts)])
    return order, rank, offsets


def grouped_linear(x: Any, offsets: Any, weight: Any, bias: Any = None, gelu: bool = False, order: Any = None,
                   choices: int = 1) -> Any:
    """y [R, N] = x[r] [K] @ weight[e] [K, N] (+ bias[e] [N]) (then GELU) for the rows r offsets[e] ..
    offsets[e + 1] - 1 of each expert e; with `order` given, row r takes x[order[r] // choices] instead of
    x[r] (the rows of group_rows' pairs, gathered on the way). Rows past offsets[E] are left as they are
    (zero here)."""
    num_experts, width, features = weight.shape
    rows = x[order // choices] if order is not None and not is_gpu(x) else x
    if x.shape[-1] != width or offsets.shape != (num_experts + 1,):
        raise ValueError(f"x {x.shape}, offsets {offsets.shape}, weight {weight.shape} do not fit")
    if is_gpu(x):
        return _gpu_grouped_linear(x, offsets, weight, bias, gelu, order, choices)
    y = np.zeros((len(rows), features), dtype=x.dtype)
    for expert in range(num_experts):
        group = slice(int(offsets[expert]), int(offsets[expert + 1]))
        if group.stop > group.start:  # an expert without rows is never read
            out = rows[group] @ weight[expert] + (0 if bias is None else bias[expert])
            y[group] = gelu_forward(out) if gelu else out
    return y


def combine_pairs(out: Any, rank: Any, expert_index: Any, weight: Any, num_experts: int) -> Any:
    """y [n, d]: each row's real choices' outputs (rows of out [P, d] in grouped order) weighted and summed."""
    if is_gpu(out):
        return _gpu_combine_pairs(out, rank, expert_index, weight, num_experts)
    rows, k = expert_index.shape
    gathered = out[rank].reshape(rows, k, out.shape[1])  # [n, k, d]: each pair's output, in pair order
    real = (expert_index < num_experts)[:, :, None]
    return (np.where(real, gathered * weight[:, :, None], 0)).sum(axis=1).astype(out.dtype)


def sparse_experts(x: Any, expert_index: Any, weight: Any, grouping: tuple[Any, Any, Any], fc_weight: Any,
                   fc_bias: Any, proj_weight: Any, proj_bias: Any) -> Any:
    """The experts' MLPs (experts.py's, gelu(x @ W1 + b1) @ W2 + b2) on the rows that chose them, combined
    with the routing weights: y [n, d] from x [n, d], expert_index [n, k] (E: none), weight [n, k] and
    their grouping (group_rows)."""
    num_experts, k = fc_weight.shape[0], expert_index.shape[1]
    order, rank, offsets = grouping
    hidden = grouped_linear(x, offsets, fc_weight, fc_bias.reshape(num_experts, -1), gelu=True, order=order,
                            choices=k)  # each pair's row, grouped by expert
    out = grouped_linear(hidden, offsets, proj_weight, proj_bias.reshape(num_experts, -1))
    return combine_pairs(out, rank, expert_index, weight, num_experts)


# ----------------------------------------------------------------------------- GPU paths


def _gpu_group_rows(experts: Any, num_experts: int, counter: Any) -> tuple[Any, Any, Any]:
    import cupy

    pairs = len(experts)
    order, rank = cupy.empty(pairs, dtype=cupy.int64), cupy.empty(pairs, dtype=cupy.int64)
    offsets = cupy.empty(num_experts + 1, dtype=cupy.int64)
    build.kernel("grouped.cu", "group_rows")(
        (1,), (GROUP_THREADS,), (cupy.ascontiguousarray(experts, dtype=cupy.int64), np.int32(pairs),
                                 np.int32(num_experts), order, rank, offsets,
                                 np.uint64(0) if counter is None else counter),
        shared_mem=8 * (num_experts + 1))
    return order, rank, offsets


def k_slices(width: int, features: int, num_experts: int, columns: int, granule: int) -> tuple[int, int]:
    """(slices, rows of K per slice) that grouped_linear cuts a product into: enough slices that the tiles
    of `columns` output columns of every expert's matrix make about BLOCKS_PER_MATRIX blocks, none thinner
    than MIN_SLICE rows, each a multiple of `granule` rows. A function of the shapes alone, so that a
    row's sums never depend on how many rows share the call."""
    tiles = -(-features // columns) * num_experts
    slices = max(1, min(-(-BLOCKS_PER_MATRIX // tiles), width // MIN_SLICE))
    slice_rows = -(-width // slices // granule) * granule
    return -(-width // slice_rows), slice_rows


def _gpu_grouped_linear(x: Any, offsets: Any, weight: Any, bias: Any, gelu: bool, order: Any,
                        choices: int) -> Any:
    import cupy

    num_experts, width, features = weight.shape
    null = np.uint64(0)
    x = cupy.ascontiguousarray(x, dtype=weight.dtype)
    rows = len(x) if order is None else len(order)
    y = cupy.empty((rows, features), dtype=weight.dtype)
    if rows == 0:
        return y
    type_name = build.type_name(weight)
    tensor_cores = type_name == "bf16" and width % 8 == 0 and features % 8 == 0  # rows of 16-byte vectors
    columns, warps = (MMA_COLUMNS, MMA_WARPS) if tensor_cores else (COLUMNS, WARPS)
    slices, slice_rows = k_slices(width, features, num_experts, columns, MMA_CHUNK if tensor_cores else 1)
    partial = cupy.empty((slices, rows, features), dtype=cupy.float32) if slices > 1 else null
    offsets = cupy.ascontiguousarray(offsets, dtype=cupy.int64)
    bias = null if bias is None else cupy.ascontiguousarray(bias, dtype=weight.dtype)
    vectors = "true" if features % 8 == 0 else "false"  # a lane's 8 columns: whole 16-byte vectors
    name = "grouped_linear_mma" if tensor_cores else f"grouped_linear<{type_name}, {vectors}>"
    build.kernel("grouped.cu", name)(
        (-(-features // columns), num_experts, slices), (32 * warps,),
        (x, null if order is None else cupy.ascontiguousarray(order, dtype=cupy.int64), np.int32(choices), offsets,
         cupy.ascontiguousarray(weight), bias, y, partial, np.int64(rows), np.int32(width), np.int32(features),
         np.int32(slice_rows), np.int32(gelu)))
    if slices > 1:
        build.kernel("grouped.cu", f"grouped_linear_finish<{type_name}>")(
            (-(-rows * features // FINISH_THREADS),), (FINISH_THREADS,),
            (partial, np.int32(slices), offsets, np.int32(num_experts), bias, y, np.int64(rows), np.int32(features),
             np.int32(gelu)))
    return y


def _gpu_combine_pairs(out: Any, rank: Any, expert_index: Any, weight: Any, num_experts: int) -> Any:
    import cupy

    rows, k = expert_index.shape
    width = out.shape[1]
    y = cupy.empty((rows, width), dtype=out.dtype)
    if rows:
        build.kernel("grouped.cu", f"combine_pairs<{build.type_name(out)}>")(
            (rows,), (min(1024, max(32, width)),),
            (cupy.ascontiguousarray(out), cupy.ascontiguousarray(rank, dtype=cupy.int64),
             cupy.ascontiguousarray(expert_index, dtype=cupy.int64), cupy.ascontiguousarray(weight, dtype=cupy.float32),
             y, np.int32(k), np.int32(width), np.int32(num_experts)))
    return y
