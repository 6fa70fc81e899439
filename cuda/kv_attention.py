"""Attention over a KV cache, for generation: each sequence's keys and values are written once into
its slot of the cache, and its new queries attend to everything the slot holds up to them.

The cache of one layer is two arrays [slots, H, L, D] (L = the model's context, block_size). The new
tokens come as the attention's one projection, qkv [n, T, 3, H, D] (q, k and v of every head, as the
model's Linear(d -> 3d) lays them out). Row i of a call is a sequence in slot `slot[i]` that already
holds `start[i]` positions; its T new tokens go to positions start[i] .. start[i] + T - 1, and new token
t sees positions 0 .. start[i] + t:

    write_cache:       cache_k[slot[i], h, start[i] + t] = qkv[i, t, 1, h]   (v: qkv[i, t, 2, h])
    cached_attention:  scores[i, t, h, s] = qkv[i, t, 0, h] . cache_k[slot[i], h, s] / sqrt(D),  s <= start[i] + t
                       out[i, t, h] = sum_s softmax_s(scores[i, t, h]) * cache_v[slot[i], h, s]

out is [n, T, H, D], which reshapes to [n, T, d] without a copy. One path serves both phases of
generation: prefill (start 0, T the prompt's length: causal attention over the prompt) and decode
(T = 1: one query per sequence over its own cached length, lengths differing within the batch). Rows
of a ragged prefill batch are padded to one T; a padding position writes a key and value that no real
query reads (a row's later tokens overwrite them before any query reaches them).

GPU: cuda/kv_attention.cu, float32 arithmetic over bf16 or float32 caches; one block per (row, new
token, head), each thread scoring whole positions (16-byte loads along D).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from minimoe.backend import array_module, is_gpu
from minimoe.cuda import build

build.register("kv_attention.cu", *(f"{name}<{t}, {v}>" for name in ("write_cache", "cached_attention")
                                    for t in ("float", "bf16") for v in ("true", "false")))
THREADS = 128  # threads of a cached_attention block


def write_cache(cache_k: Any, cache_v: Any, qkv: Any, slot: Any, start: Any) -> None:
    """The keys and values of qkv [n, T, 3, H, D] into positions start[i] .. start[i] + T - 1 of slot
    slot[i] of the caches (in place)."""
    _check(cache_k, qkv, slot, start)
    if is_gpu(qkv):
        _gpu_launch("write_cache", cache_k, cache_v, qkv, slot, start)
        return
    xp = array_module(qkv)
    positions = start[:, None] + xp.arange(qkv.shape[1])  # [n, T]
    rows = slot[:, None]
    # Advanced indices on axes 0 and 2 (split by a slice) put their [n, T] first: [n, T, H, D].
    cache_k[rows, :, positions] = qkv[:, :, 1]
    cache_v[rows, :, positions] = qkv[:, :, 2]


def cached_attention(qkv: Any, cache_k: Any, cache_v: Any, slot: Any, start: Any) -> Any:
    """out [n, T, H, D]: query t of row i (qkv[i, t, 0]) over positions 0 .. start[i] + t of its slot."""
    _check(cache_k, qkv, slot, start)
    if is_gpu(qkv):
        return _gpu_launch("cached_attention", cache_k, cache_v, qkv, slot, start)
    xp = array_module(qkv)
    length, width = qkv.shape[1], qkv.shape[4]
    compute = np.promote_types(qkv.dtype, np.float32)
    q = qkv[:, :, 0].transpose(0, 2, 1, 3).astype(compute)  # [n, H, T, D]
    keys, values = cache_k[slot].astype(compute), cache_v[slot].astype(compute)  # [n, H, L, D]
    scores = q @ keys.swapaxes(-1, -2) * (1.0 / width**0.5)  # [n, H, T, L]
    last_seen = start[:, None] + xp.arange(length)  # [n, T]
    future = xp.arange(cache_k.shape[2])[None, None, :] > last_seen[:, :, None]  # [n, T, L]
    scores = xp.where(future[:, None], -xp.inf, scores)
    probs = xp.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    return (probs @ values).transpose(0, 2, 1, 3).astype(qkv.dtype)


def _check(cache: Any, qkv: Any, slot: Any, start: Any) -> None:
    """The shapes the kernels index by, and room in the cache for every new token."""
    slots, heads, context, width = cache.shape
    n, length, three, qkv_heads, qkv_width = qkv.shape
    if (three, qkv_heads, qkv_width) != (3, heads, width) or slot.shape != (n,) or start.shape != (n,):
        raise ValueError(f"cache {cache.shape}, qkv {qkv.shape}, slot {slot.shape}, start {start.shape} do not fit")
    if length > context:
        raise ValueError(f"{length} new positions do not fit a context of {context}")


def _gpu_launch(name: str, cache_k: Any, cache_v: Any, qkv: Any, slot: Any, start: Any) -> Any:
    """write_cache (returns None) or cached_attention (returns out): one block per (row, token, head)."""
    import cupy

    n, length, _, heads, width = qkv.shape
    qkv = cupy.ascontiguousarray(qkv, dtype=cache_k.dtype)
    slot, start = cupy.ascontiguousarray(slot, dtype=cupy.int64), cupy.ascontiguousarray(start, dtype=cupy.int64)
    out = cupy.empty((n, length, heads, width), dtype=qkv.dtype) if name == "cached_attention" else None
    context = cache_k.shape[2]
    if n * length:
        kernel = build.kernel("kv_attention.cu", f"{name}<{build.type_name(qkv)}, {build.row_vectors(qkv)}>")
        sizes = (np.int32(length), np.int32(heads), np.int32(width), np.int32(context))
        if out is None:
            kernel((n * length, heads), (min(width, THREADS),), (cache_k, cache_v, qkv, slot, start, *sizes))
        else:  # shared memory: scores [L], the query [D], the thread groups' sums [parts][D]
            parts = THREADS // min(-(-width // build.per_load(qkv)), THREADS)
            kernel((n * length, heads), (THREADS,), (cache_k, cache_v, qkv, slot, start, out, *sizes,
                                                     np.float32(1.0 / width**0.5)),
                   shared_mem=4 * (context + width + parts * width))
    return out
