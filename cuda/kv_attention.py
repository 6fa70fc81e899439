"""Attention over a KV cache, for generation: each sequence's keys and values are written once into
its slot of the cache, and its new queries attend to everything the slot holds up to them.

The cache of one layer is two arrays [slots, H, L, D] (L = the model's context, block_size). Row i of a
call is a sequence in slot `slot[i]` that already holds `start[i]` positions; its T new tokens go to
positions start[i] .. start[i] + T - 1, and new token t sees positions 0 .. start[i] + t:

    write_cache:       cache_k[slot[i], :, start[i] + t] = k[i, :, t]       (the same for v)
    cached_attention:  scores[i, h, t, s] = q[i, h, t] . cache_k[slot[i], h, s] / sqrt(D),  s <= start[i] + t
                       out[i, h, t] = sum_s softmax_s(scores[i, h, t]) * cache_v[slot[i], h, s]

One path serves both phases of generation: prefill (start 0, T the prompt's length: causal attention
over the prompt) and decode (T = 1: one query per sequence over its own cached length, lengths
differing within the batch). Rows of a ragged prefill batch are padded to one T; a padding position
writes a key and value that no real query reads (a row's later tokens overwrite them before any query
reaches them). GPU: cuda/kv_attention.cu, float32 arithmetic over bf16 or float32 caches.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from minimoe.backend import array_module, is_gpu
from minimoe.cuda import build

build.register("kv_attention.cu", *(f"{name}<{t}>" for name in ("write_cache", "cached_attention")
                                    for t in ("float", "bf16")))
THREADS = 128  # threads of a cached_attention block: one block per (row, new token, head)


def write_cache(cache_k: Any, cache_v: Any, k: Any, v: Any, slot: Any, start: Any) -> None:
    """k, v [n, H, T, D] into positions start[i] .. start[i] + T - 1 of slot slot[i] of the caches (in place)."""
    _check(cache_k, k, slot, start)
    if is_gpu(k):
        _gpu_write(cache_k, cache_v, k, v, slot, start)
        return
    xp = array_module(k)
    positions = start[:, None] + xp.arange(k.shape[2])  # [n, T]
    rows = slot[:, None]
    # Advanced indices on axes 0 and 2 (split by a slice) put their [n, T] first: [n, T, H, D].
    cache_k[rows, :, positions] = k.transpose(0, 2, 1, 3)
    cache_v[rows, :, positions] = v.transpose(0, 2, 1, 3)


def cached_attention(q: Any, cache_k: Any, cache_v: Any, slot: Any, start: Any) -> Any:
    """q [n, H, T, D] -> out [n, H, T, D]: query t of row i over positions 0 .. start[i] + t of its slot."""
    _check(cache_k, q, slot, start)
    if is_gpu(q):
        return _gpu_attention(q, cache_k, cache_v, slot, start)
    xp = array_module(q)
    length, width = q.shape[2], q.shape[3]
    compute = np.promote_types(q.dtype, np.float32)
    keys, values = cache_k[slot].astype(compute), cache_v[slot].astype(compute)  # [n, H, L, D]
    scores = q.astype(compute) @ keys.swapaxes(-1, -2) * (1.0 / width**0.5)  # [n, H, T, L]
    last_seen = start[:, None] + xp.arange(length)  # [n, T]
    future = xp.arange(cache_k.shape[2])[None, None, :] > last_seen[:, :, None]  # [n, T, L]
    scores = xp.where(future[:, None], -xp.inf, scores)
    probs = xp.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    return (probs @ values).astype(q.dtype)


def _check(cache: Any, rows: Any, slot: Any, start: Any) -> None:
    """The shapes the kernels index by, and room in the cache for every new token."""
    slots, heads, context, width = cache.shape
    n, row_heads, length, row_width = rows.shape
    if (row_heads, row_width) != (heads, width) or slot.shape != (n,) or start.shape != (n,):
        raise ValueError(f"cache {cache.shape}, rows {rows.shape}, slot {slot.shape}, start {start.shape} do not fit")
    if length > context:
        raise ValueError(f"{length} new positions do not fit a context of {context}")


# ----------------------------------------------------------------------------- GPU paths


def _gpu_write(cache_k: Any, cache_v: Any, k: Any, v: Any, slot: Any, start: Any) -> None:
    import cupy

    n, heads, length, width = k.shape
    if n * length == 0:
        return
    k, v = cupy.ascontiguousarray(k, dtype=cache_k.dtype), cupy.ascontiguousarray(v, dtype=cache_v.dtype)
    slot, start = cupy.ascontiguousarray(slot, dtype=cupy.int64), cupy.ascontiguousarray(start, dtype=cupy.int64)
    build.kernel("kv_attention.cu", f"write_cache<{build.type_name(cache_k)}>")(
        (n * heads * length,), (min(width, 1024),),
        (cache_k, cache_v, k, v, slot, start, np.int32(heads), np.int32(length), np.int32(width),
         np.int32(cache_k.shape[2])))


def _gpu_attention(q: Any, cache_k: Any, cache_v: Any, slot: Any, start: Any) -> Any:
    import cupy

    n, heads, length, width = q.shape
    q = cupy.ascontiguousarray(q, dtype=cache_k.dtype)
    slot, start = cupy.ascontiguousarray(slot, dtype=cupy.int64), cupy.ascontiguousarray(start, dtype=cupy.int64)
    out = cupy.empty(q.shape, dtype=q.dtype)
    context = cache_k.shape[2]
    if out.size:
        build.kernel("kv_attention.cu", f"cached_attention<{build.type_name(cache_k)}>")(
            (n * length, heads), (THREADS,),
            (q, cache_k, cache_v, slot, start, out, np.int32(heads), np.int32(length), np.int32(width),
             np.int32(context), np.float32(1.0 / width**0.5)),
            shared_mem=4 * context)
    return out
