"""Dispatch and combine through the mapping table: the data-layout idea of the DeepSpeed-MoE
inference paper (Rajbhandari et al., 2022, sec. 5.3): never build GShard's one-hot dispatch and combine
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
"""

from __future__ import annotations

from typing import Any

from minimoe.backend import array_module


def _kept_slots(expert_index: Any, position: Any, capacity: int, choice: int) -> tuple[Any, Any]:
    """(mask of tokens whose choice `choice` was kept, their flat slots e * C + position in [E * C])."""
    kept = position[:, choice] >= 0
    return kept, expert_index[kept, choice] * capacity + position[kept, choice]


def dispatch(x: Any, expert_index: Any, position: Any, num_experts: int, capacity: int,
             scale: Any = None) -> Any:
    """Scatter the rows of x [T, d] into a zero-filled buffer [E, C, d] by the table; `scale` [T, k]
    multiplies each choice's row (None: 1)."""
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
    (weight None: 1)."""
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
