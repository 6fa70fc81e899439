"""Causal attention without the [T, T] matrix: FlashAttention (Dao et al., 2022), with the split of work of
FlashAttention-2 (Dao, 2023). The same function as cuda/attention.py, in blocks of keys:

For q, k, v of shape [..., T, D] and scale = 1 / sqrt(D), a query row keeps a running max m, a running
sum l and a running output acc, and meets the keys a block of BLOCK at a time:

    s      = scale * q @ k_block^T          (s = -inf where the key is past the query)
    m_new  = max(m, max_s s)
    p      = exp(s - m_new)
    l      = l * exp(m - m_new) + sum_s p
    acc    = acc * exp(m - m_new) + p @ v_block
    m      = m_new
    out    = acc / l,   lse = m + log(l)    (the log-sum-exp of the row's scores)

Each row's softmax is never held whole: only one block of scores at a time (on the GPU, in registers).
The backward recomputes each block's probabilities from lse, p = exp(s - lse), and with
delta = sum_d dout * out (which equals sum_s p * dp, the softmax backward's row term):

    dv_block += p^T @ dout,   dp = dout @ v_block^T,   ds = p * (dp - delta)
    dq += scale * ds @ k_block,   dk_block += scale * ds^T @ q

Reference: NumPy, those loops (any float dtype; float64 sums at least float32). GPU: cuda/flash_attention.cu
for bf16 with D in HEAD_WIDTHS: a forward kernel (a block per BLOCK queries of one head) and two backward
kernels, one per BLOCK queries (delta, which it writes, and dq) and then one per BLOCK keys (dk, dv), every
product on the tensor cores with float32 sums (on Hopper as wgmma: build.py compiles the file for sm_90a
there). Training's attention (ops.CausalAttention) and the engine's prefill (inference.forward_cached) use
them where they apply.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from minimoe.backend import array_module, is_gpu
from minimoe.cuda import build

BLOCK = 64  # queries (or keys) of one block of the kernels; the keys of one step of the recurrence
WARPS = 4  # 16 rows of the block per warp
HEAD_WIDTHS = (16, 32, 48, 64)  # the head widths the kernels are built for
build.register("flash_attention.cu",
               *(f"{kernel}<{width}>" for kernel in ("flash_attention_forward",
                 "flash_attention_backward_keys", "flash_attention_backward_queries") for width in HEAD_WIDTHS),
               constants=dict(BLOCK=BLOCK, WARPS=WARPS), architecture_specific=True)  # wgmma on Hopper


def runs_on_kernels(q: Any) -> bool:
    """Whether flash_attention's GPU kernels take q (and k, v of its shape), or a packed qkv [B, T, 3, H, D]:
    bf16 on the GPU, D (the last axis) in HEAD_WIDTHS."""
    return is_gpu(q) and build.KERNEL_TYPES.get(q.dtype.name) == "bf16" and q.shape[-1] in HEAD_WIDTHS


def heads_of(qkv: Any) -> tuple[Any, Any, Any]:
    """q, k, v [B, H, T, D] of a packed qkv [B, T, 3, H, D] (the attention's projection, reshaped), as views."""
    return tuple(qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))


def packed_attention_forward(qkv: Any) -> tuple[Any, Any]:
    """(out [B, T, H, D], lse [B, H, T]) of causal attention over a packed qkv [B, T, 3, H, D], read in
    place; out holds the heads side by side ([B, T, H * D] without a copy)."""
    batch, length, _, heads, width = qkv.shape
    out = array_module(qkv).empty((batch, length, heads, width), dtype=qkv.dtype)
    out_heads = out.transpose(0, 2, 1, 3)
    heads_out, lse = flash_attention_forward(*heads_of(qkv), out=out_heads)
    if heads_out is not out_heads:  # the reference returns arrays of its own
        out_heads[...] = heads_out
    return out, lse


def flash_attention_forward(q: Any, k: Any, v: Any, out: Any = None) -> tuple[Any, Any]:
    """(out [..., T, D], lse [..., T], float32 at least) of causal attention over q, k, v [..., T, D]. On
    the GPU, `out` (optional) is the array to write, and q, k, v and out may be strided views, read and
    written in place: q, k, v of one packed qkv [B, T, 3, H, D] as [B, H, T, D], out of a [B, T, H, D]."""
    if is_gpu(q):
        return _gpu_forward(q, k, v, out)
    xp = array_module(q)
    length, width = q.shape[-2:]
    dtype, compute = q.dtype, np.promote_types(q.dtype, np.float32)
    q, k, v = (a.astype(compute) for a in (q, k, v))
    scale = 1.0 / width**0.5
    queries = xp.arange(length)
    row_max = xp.full(q.shape[:-1], -xp.inf, dtype=compute)
    row_sum = xp.zeros(q.shape[:-1], dtype=compute)
    acc = xp.zeros(q.shape, dtype=compute)
    for first in range(0, length, BLOCK):
        keys = slice(first, min(first + BLOCK, length))
        scores = scale * q @ xp.swapaxes(k[..., keys, :], -1, -2)
        scores = xp.where(queries[:, None] >= xp.arange(keys.start, keys.stop), scores, -xp.inf)
        new_max = xp.maximum(row_max, scores.max(axis=-1))  # finite from the first block on: key 0 is seen
        rescale = xp.exp(row_max - new_max)
        p = xp.exp(scores - new_max[..., None])
        row_sum = row_sum * rescale + p.sum(axis=-1)
        acc = acc * rescale[..., None] + p @ v[..., keys, :]
        row_max = new_max
    return (acc / row_sum[..., None]).astype(dtype), row_max + xp.log(row_sum)


def flash_attention_backward(grad_out: Any, q: Any, k: Any, v: Any, out: Any, lse: Any,
                             grads: tuple[Any, Any, Any] | None = None) -> tuple[Any, Any, Any]:
    """(grad q, grad k, grad v) from the output's gradient, the inputs, and the forward's out and lse. On the
    GPU, `grads` (optional) are the three arrays to write, e.g. views of one packed [B, T, 3, H, D]."""
    if is_gpu(q):
        return _gpu_backward(grad_out, q, k, v, out, lse, grads)
    xp = array_module(q)
    length, width = q.shape[-2:]
    dtype, compute = q.dtype, np.promote_types(q.dtype, np.float32)
    grad_out, q, k, v, out = (a.astype(compute) for a in (grad_out, q, k, v, out))
    scale = 1.0 / width**0.5
    delta = (grad_out * out).sum(axis=-1)
    queries = xp.arange(length)
    grad_q, grad_k, grad_v = xp.zeros_like(q), xp.zeros_like(k), xp.zeros_like(v)
    for first in range(0, length, BLOCK):
        keys = slice(first, min(first + BLOCK, length))
        scores = scale * q @ xp.swapaxes(k[..., keys, :], -1, -2)
        visible = queries[:, None] >= xp.arange(keys.start, keys.stop)
        p = xp.where(visible, xp.exp(scores - lse[..., None]), 0.0)
        grad_v[..., keys, :] = xp.swapaxes(p, -1, -2) @ grad_out
        grad_scores = p * (grad_out @ xp.swapaxes(v[..., keys, :], -1, -2) - delta[..., None])
        grad_q += scale * grad_scores @ k[..., keys, :]
        grad_k[..., keys, :] = scale * xp.swapaxes(grad_scores, -1, -2) @ q
    return tuple(a.astype(dtype) for a in (grad_q, grad_k, grad_v))


# ----------------------------------------------------------------------------- GPU paths


def _layout(a: Any) -> tuple[int, int, int, int] | None:
    """(row, head, batch, heads): where the kernels find the [T, D] matrices of a [B, H, T, D] or [N, T, D]
    array, in elements (flash_attention.cu's Layout), when they can read it in place: unit stride along D
    and every row 16 bytes aligned. Else None."""
    strides = a.strides
    if a.ndim not in (3, 4) or strides[-1] != a.itemsize or a.data.ptr % 16 or any(s % 16 for s in strides[:-1]):
        return None
    row, head, batch = strides[-2], strides[1] if a.ndim == 4 else 0, strides[0]
    return row // a.itemsize, head // a.itemsize, batch // a.itemsize, a.shape[1] if a.ndim == 4 else 1


def _in_place(*arrays: Any) -> tuple[list[Any], tuple[int, int, int, int]]:
    """The arrays as the kernels take them, all in one layout: as they are where they share one the kernels
    can read (views of one packed qkv [B, T, 3, H, D] do), else contiguous copies [N, T, D]; and the layout."""
    import cupy

    layouts = {_layout(a) for a in arrays}
    if len(layouts) == 1 and None not in layouts:
        return list(arrays), layouts.pop()
    copies = [cupy.ascontiguousarray(a).reshape(-1, *a.shape[-2:]) for a in arrays]
    return copies, _layout(copies[0])


def _launch_layouts(*layouts: tuple[int, int, int, int]) -> tuple[Any, ...]:
    """The kernels' LAYOUT_ARGUMENTS: the inputs' layout, then the outputs'."""
    return tuple(cast(value) for layout in layouts for value, cast in zip(layout, (np.int64,) * 3 + (np.int32,)))


def _write_back(targets: Any, written: list[Any]) -> None:
    """Copy what the kernels wrote into copies (when a target's layout was not theirs) into the targets."""
    for target, result in zip(targets, written):
        if result is not target:
            target[...] = result.reshape(target.shape)


def _gpu_forward(q: Any, k: Any, v: Any, out: Any) -> tuple[Any, Any]:
    import cupy

    if not runs_on_kernels(q):
        raise ValueError(f"flash attention's kernels take bf16 with a head width in {HEAD_WIDTHS}, "
                         f"got {q.dtype} and {q.shape[-1]}")
    length, width = q.shape[-2:]
    heads = q.size // (length * width)
    out = cupy.empty(q.shape, dtype=q.dtype) if out is None else out
    (q3, k3, v3), inputs = _in_place(q, k, v)
    (out3,), outputs = _in_place(out)
    lse = cupy.empty((heads, length), dtype=cupy.float32)
    if heads and length:
        build.kernel("flash_attention.cu", f"flash_attention_forward<{width}>")(
            (heads, -(-length // BLOCK)), (32 * WARPS,),
            (q3, k3, v3, out3, lse, np.int32(length), np.float32(1.0 / width**0.5), *_launch_layouts(inputs, outputs)))
    _write_back([out], [out3])
    return out, lse.reshape(q.shape[:-1])


def _gpu_backward(grad_out: Any, q: Any, k: Any, v: Any, out: Any, lse: Any, grads: Any) -> tuple[Any, Any, Any]:
    import cupy

    length, width = q.shape[-2:]
    heads = q.size // (length * width)
    if grads is None:  # gradients of their own, contiguous, and q, k, v read in that layout too
        q, k, v = (cupy.ascontiguousarray(a) for a in (q, k, v))
        grads = tuple(cupy.empty(q.shape, dtype=q.dtype) for _ in range(3))
    (q3, k3, v3, grad_q, grad_k, grad_v), inputs = _in_place(q, k, v, *grads)
    (grad_out3, out3), outputs = _in_place(grad_out.astype(q.dtype, copy=False), out)
    lse = cupy.ascontiguousarray(lse, dtype=cupy.float32)
    if heads and length:
        rows = heads * length
        layouts = _launch_layouts(inputs, outputs)
        delta = cupy.empty(rows, dtype=cupy.float32)  # written by the query side, read by the key side
        grid, scale = (heads, -(-length // BLOCK)), np.float32(1.0 / width**0.5)
        build.kernel("flash_attention.cu", f"flash_attention_backward_queries<{width}>")(
            grid, (32 * WARPS,), (q3, k3, v3, grad_out3, out3, lse, delta, grad_q, np.int32(length), scale, *layouts))
        build.kernel("flash_attention.cu", f"flash_attention_backward_keys<{width}>")(
            grid, (32 * WARPS,), (q3, k3, v3, grad_out3, lse, delta, grad_k, grad_v, np.int32(length), scale, *layouts))
    _write_back(grads, [grad_q, grad_k, grad_v])
    return tuple(grads)
