"""Top-k gating with expert capacity: which expert each token goes to, where in that expert's buffer,
and with what weight. The semantics are GShard's (Lepikhin et al., 2020, Algorithm 1) as DeepSpeed's
`top1gating` / `top2gating` (deepspeed/moe/sharded_moe.py) define them.

For gate logits z = x @ W_gate [T, E] (float32, from `gate_logits`) and a capacity C:

    p = softmax(z)                                   probabilities over the E experts
    first[t]  = argmax_e first_scores[t, e]          first_scores = z, or z + Gumbel noise (RSample)
    second[t] = argmax_{e != first[t]} second_scores[t, e]   (k = 2; z, or z + Gumbel noise)

Positions in an expert's buffer (DeepSpeed's `locations = cumsum(mask) - 1`):
    - first choices queue in token order; with random token selection (top-1, `priority` given) the
      first C tokens by priority (smallest first) are the ones kept, and they are then numbered in
      token order as DeepSpeed numbers them;
    - every second choice queues after *all* first choices of its expert (dropped ones included):
      position = (number of first choices of e) + (rank among second choices of e, in token order);
    - a choice whose position is >= C is dropped: position -1, weight 0.

Weights: top-1 uses w = p[t, first] for a kept choice. Top-2 uses the kept probabilities renormalised,
w_j = p[t, e_j] kept_j / max(sum_j p[t, e_j] kept_j, eps) (DeepSpeed's `denom_s` clamp).

Load balancing (GShard Algorithm 1, Switch Transformer eq. 4): with me_e = mean_t p[t, e] and ce_e
the fraction of tokens whose *first* choice is e (before drops),

    aux_loss = E * E * mean_e(me_e * ce_e) = E * sum_e me_e * ce_e          (1 when perfectly balanced)

Gradients reach the logits through the kept weights and through me (ce counts integers); the routing
itself is piecewise constant. `capacity=None` is dropless: C = the largest number of choices any expert
received, so nothing is dropped.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np

from minimoe import backend
from minimoe.backend import array_module, is_gpu
from minimoe.cuda import build, philox
from minimoe.cuda.gemm import matmul
from minimoe.cuda.softmax import logsumexp, softmax_backward, softmax_forward

build.register("gating.cu", *(f"{name}<{t}>" for t in ("float", "bf16")
                               for name in ("gate_logits", "gate_logits_grad_x", "gate_logits_grad_weight")))
WARP = 32
LOGITS_THREADS = 256  # threads of one gate_logits block
TOKENS_PER_WARP = 4  # gate_logits' constant of the same name
GRAD_TOKENS, GRAD_TILE = 8, 64  # tokens per block of gate_logits_grad_x and gate_logits_grad_weight
ROUTE_THREADS = 512  # threads of one gate_route block: 16 warps (its launch bound, a constant there too)
PER_LANE = 16  # experts per lane in gate_route (its constant of the same name): E up to 16 * 32
STAGE_ENTRIES = 1024  # gate_route's constant of the same name: choices per tile parked in shared memory
MIN_TILE = 64  # tokens per block at least: small T takes fewer blocks
MAX_TILES = 32 * 8  # blocks at most: gate_route's tile_offsets holds 32 * CHUNKS tiles per warp


class Gating(NamedTuple):
    probs: Any  # [T, E] softmax of the logits
    expert_index: Any  # [T, k] int64: each token's choices, distinct experts
    position: Any  # [T, k] int64: slot in the expert's buffer, -1 where dropped
    weight: Any  # [T, k] combine weights, 0 where dropped
    capacity: int  # C: the buffer length of every expert
    tokens_per_expert: Any  # [E] int64: choices each expert received, before drops
    first_choice_fraction: Any  # [E] ce: fraction of tokens whose first choice is e
    aux_loss: Any  # 0-d: E * sum_e mean_t(p[:, e]) * ce_e
    dropped: Any  # 0-d: fraction of the T * k choices dropped
    source_token: Any = None  # [E * C]: the token in each buffer slot, -1 where none (GPU, fixed capacity)


def expert_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float, min_capacity: int) -> int:
    """C = max(min_capacity, ceil(T / E * capacity_factor * k)) (DeepSpeed's `_capacity`; top-2 passes
    capacity_factor * 2)."""
    return max(min_capacity, int(np.ceil(num_tokens / num_experts * capacity_factor * k)))


def gate_logits(x: Any, weight: Any) -> Any:
    """The gate's logits [T, E] = x [T, d] @ weight [d, E] in the weight's dtype (float32; float64 in
    gradient checks), whatever x's dtype (DeepSpeed's gate casts its input to float32). GPU: gating.cu's
    gate_logits, which casts x in registers instead of writing a float32 copy of it."""
    if _gate_logits_on_gpu(x, weight):
        return _gpu_gate_logits(x, weight)
    return matmul(x.astype(weight.dtype, copy=False), weight)


def gate_logits_backward(grad_logits: Any, x: Any, weight: Any) -> tuple[Any, Any]:
    """(d loss / d x in x's dtype, d loss / d weight): the two GEMMs of a product, in the weight's dtype.
    GPU: gating.cu's gate_logits_grad_x and gate_logits_grad_weight (x read as it is, never copied)."""
    if _gate_logits_on_gpu(x, weight):
        return _gpu_gate_logits_backward(grad_logits, x, weight)
    return (matmul(grad_logits, weight, transpose_b=True).astype(x.dtype, copy=False),
            matmul(x.astype(weight.dtype, copy=False), grad_logits, transpose_a=True))


def _gate_logits_on_gpu(x: Any, weight: Any) -> bool:
    """After the shapes are checked (the kernels index x and the weight by each other's sizes)."""
    if x.ndim != 2 or weight.ndim != 2 or x.shape[1] != weight.shape[0]:
        raise ValueError(f"gate logits need x [T, d] and weight [d, E], got {x.shape} and {weight.shape}")
    return is_gpu(x) and weight.dtype == np.float32 and x.dtype.name in build.KERNEL_TYPES


def _gpu_gate_logits_backward(grad_logits: Any, x: Any, weight: Any) -> tuple[Any, Any]:
    import cupy

    num_tokens, width = x.shape
    num_experts = weight.shape[1]
    grad_logits = cupy.ascontiguousarray(grad_logits, dtype=cupy.float32)
    x, weight = cupy.ascontiguousarray(x), cupy.ascontiguousarray(weight)
    grad_x = cupy.empty(x.shape, x.dtype)
    tiles = -(-num_tokens // GRAD_TILE)
    partial = cupy.empty((tiles, width, num_experts), dtype=cupy.float32)
    if num_tokens and width:
        sizes = (np.int32(num_tokens), np.int32(width), np.int32(num_experts))
        build.kernel("gating.cu", f"gate_logits_grad_x<{build.type_name(x)}>")(
            (-(-num_tokens // GRAD_TOKENS),), (LOGITS_THREADS,), (grad_logits, weight, grad_x, *sizes))
        build.kernel("gating.cu", f"gate_logits_grad_weight<{build.type_name(x)}>")(
            (tiles, -(-width // LOGITS_THREADS)), (LOGITS_THREADS,), (x, grad_logits, partial, *sizes))
    return grad_x, partial.sum(axis=0)


def _gpu_gate_logits(x: Any, weight: Any) -> Any:
    import cupy

    num_tokens, width = x.shape
    num_experts = weight.shape[1]
    x, weight = cupy.ascontiguousarray(x), cupy.ascontiguousarray(weight)
    logits = cupy.empty((num_tokens, num_experts), dtype=cupy.float32)
    if num_tokens == 0:
        return logits
    tokens_per_block = LOGITS_THREADS // WARP * TOKENS_PER_WARP
    vector = num_experts % 4 == 0 and weight.data.ptr % 16 == 0
    build.kernel("gating.cu", f"gate_logits<{build.type_name(x)}>")(
        (-(-num_tokens // tokens_per_block),), (LOGITS_THREADS,),
        (x, weight, logits, np.int32(num_tokens), np.int32(width), np.int32(num_experts), np.int32(vector)))
    return logits


def _rank_within_expert(choice: Any, order: Any, num_experts: int) -> Any:
    """rank[t] = how many tokens before t in `order` (a permutation of the tokens) chose the same
    expert: DeepSpeed's `cumsum(one_hot(choice), dim=0) - 1`, taken in the given order."""
    xp = array_module(choice)
    in_order = choice[order]
    one_hot = in_order[:, None] == xp.arange(num_experts)[None, :]
    rank_in_order = (xp.cumsum(one_hot, axis=0) - 1)[xp.arange(len(order)), in_order]
    rank = xp.empty_like(rank_in_order)
    rank[order] = rank_in_order
    return rank


def topk_gating(logits: Any, k: int, capacity: int | None, first_scores: Any = None, second_scores: Any = None,
                priority: Any = None) -> Gating:
    """Route T tokens to k of E experts each. `first_scores` / `second_scores` default to the logits
    (pass logits + Gumbel noise for RSample / second-expert sampling); `priority` [T] (top-1 only:
    random token selection) decides which tokens an over-full expert keeps, smallest first."""
    num_tokens, num_experts = logits.shape
    if k not in (1, 2):
        raise ValueError(f"k must be 1 or 2 (DeepSpeed's top1gating / top2gating), got {k}")
    if k == 2 and num_experts < 2:
        raise ValueError(f"top-2 gating needs at least 2 experts, got {num_experts}")
    if k == 2 and priority is not None:
        raise ValueError("random token selection (priority) is defined for top-1 gating only")
    if is_gpu(logits):
        return _gpu_topk_gating(logits, k, capacity, first_scores, second_scores, priority)
    xp = array_module(logits)
    tokens = xp.arange(num_tokens)
    probs = softmax_forward(logits)

    first = xp.argmax(logits if first_scores is None else first_scores, axis=1)
    first_counts = xp.bincount(first, minlength=num_experts)
    choices = [first]
    if k == 2:
        scores = (logits if second_scores is None else second_scores).copy()
        scores[tokens, first] = -xp.inf
        choices.append(xp.argmax(scores, axis=1))
    expert_index = xp.stack(choices, axis=1)
    tokens_per_expert = xp.bincount(expert_index.reshape(-1), minlength=num_experts)
    if capacity is None:
        capacity = max(int(tokens_per_expert.max()), 1)

    # First choices: the first C by priority are kept, then numbered in token order.
    if priority is None:
        rank = _rank_within_expert(first, tokens, num_experts)
        kept_first = rank < capacity
        position_first = rank
    else:
        kept_first = _rank_within_expert(first, xp.argsort(priority, kind="stable"), num_experts) < capacity
        position_first = _rank_within_expert(xp.where(kept_first, first, num_experts), tokens, num_experts + 1)
    positions = [position_first]
    if k == 2:  # second choices queue behind all first choices of their expert
        positions.append(first_counts[choices[1]] + _rank_within_expert(choices[1], tokens, num_experts))
    position = xp.stack(positions, axis=1)
    kept = position < capacity
    kept[:, 0] &= kept_first
    position = xp.where(kept, position, -1)

    chosen_probs = xp.take_along_axis(probs, expert_index, axis=1) * kept
    if k == 1:
        weight = chosen_probs
    else:
        weight = chosen_probs / xp.maximum(chosen_probs.sum(axis=1, keepdims=True), np.finfo(probs.dtype).eps)

    first_choice_fraction = (first_counts / num_tokens).astype(probs.dtype)
    aux_loss = num_experts * (probs.mean(axis=0) * first_choice_fraction).sum()
    return Gating(probs, expert_index, position, weight, capacity, tokens_per_expert, first_choice_fraction,
                  aux_loss, (position < 0).mean(dtype=probs.dtype))


def _gpu_topk_gating(logits: Any, k: int, capacity: int | None, first_scores: Any, second_scores: Any,
                     priority: Any) -> Gating:
    """cuda/gating.cu's gate_route: everything in one cooperative launch. Float32 throughout."""
    import cupy

    null = np.uint64(0)  # a null pointer argument: "not given"
    num_tokens, num_experts = logits.shape
    if num_experts > WARP * PER_LANE:
        raise ValueError(f"the GPU gating kernel handles at most {WARP * PER_LANE} experts, got {num_experts}")

    def as_float(array: Any) -> Any:
        return null if array is None else cupy.ascontiguousarray(array, dtype=cupy.float32)

    kernel, lanes, shared_mem, most_blocks = _route_launch(num_experts, cupy.cuda.runtime.getDevice())
    if most_blocks == 0:
        raise RuntimeError(f"the GPU gating kernel does not fit on this GPU for {num_experts} experts "
                           f"({shared_mem} bytes of shared memory per block)")
    tiles = min(most_blocks, MAX_TILES, -(-num_tokens // MIN_TILE))
    logits, first_scores, second_scores = (as_float(a) for a in (logits, first_scores, second_scores))
    # 16-byte loads need rows that start 16-byte aligned: E a multiple of 4 and aligned arrays.
    vector = num_experts % 4 == 0 and all(a is null or a.data.ptr % 16 == 0 for a in (logits, first_scores,
                                                                                      second_scores))
    probs = cupy.empty((num_tokens, num_experts), dtype=cupy.float32)
    expert_index = cupy.empty((num_tokens, k), dtype=cupy.int64)
    position = cupy.empty((num_tokens, k), dtype=cupy.int64)
    weight = cupy.empty((num_tokens, k), dtype=cupy.float32)
    workspace = cupy.empty(1 + (k + 1) * (tiles + 1) * num_experts, dtype=cupy.int32)  # see gate_route's comment
    tokens_per_expert = cupy.empty(num_experts, dtype=cupy.int64)
    statistics = cupy.empty((tiles + 2) * num_experts + 2, dtype=cupy.float32)
    # Fixed capacity: the kernel also writes dispatch's inverse table (dropless: C is known only after it).
    source_token = null if capacity is None else cupy.empty(num_experts * capacity, dtype=cupy.int64)
    order = keep = null
    if priority is not None:  # random token selection: the smallest priorities are kept first
        order = cupy.argsort(priority).astype(cupy.int64)
        keep = cupy.empty(num_tokens, dtype=cupy.uint8)
    # A cooperative launch: all `tiles` blocks resident at once, as the kernel's grid barrier needs.
    kernel.kernel((tiles,), (ROUTE_THREADS,), (
        logits, first_scores, second_scores, order, np.int32(num_tokens), np.int32(num_experts), np.int32(lanes),
        np.int32(vector), np.int32(k), np.int64(-1 if capacity is None else capacity), probs,
        expert_index, position, weight, keep, workspace, tokens_per_expert, statistics, source_token),
        shared_mem=shared_mem, enable_cooperative_groups=True)
    if capacity is None:
        capacity = int(workspace[0])  # the kernel's dropless capacity: one read of the device
        source_token = None
    return Gating(probs, expert_index, position, weight, capacity, tokens_per_expert, statistics[:num_experts],
                  statistics[num_experts], statistics[num_experts + 1], source_token)


@functools.cache
def _route_launch(num_experts: int, device: int) -> tuple[Any, int, int, int]:
    """(kernel, lanes per token, shared memory bytes, the most blocks resident at once on GPU `device`:
    the cooperative launch limit) for E experts; worked out once per E and device."""
    import cupy

    # A token's scores spread over `lanes` lanes, PER_LANE each: the fewest lanes, so that a warp routes
    # as many tokens at once as it can (E = 64: 4 lanes, 8 tokens; E <= 16: 1 lane, 32 tokens).
    lanes = 1 << (-(-num_experts // PER_LANE) - 1).bit_length()
    kernel = build.kernel("gating.cu", "gate_route")
    # The stage (int64 experts and ranks, float32 probabilities), then warp_offsets [warps][2][E], scan
    # [warps][E], running [E], before [2][E], total [2][E]: gate_route's comment.
    shared_mem = (8 + 8 + 4) * STAGE_ENTRIES + 4 * (3 * ROUTE_THREADS // WARP + 5) * num_experts
    if shared_mem > kernel.max_dynamic_shared_size_bytes:  # above 48 KiB (E > 135) a launch must opt in
        kernel.max_dynamic_shared_size_bytes = shared_mem
    runtime = cupy.cuda.runtime
    per_multiprocessor = cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(
        kernel.kernel.ptr, ROUTE_THREADS, shared_mem)
    return kernel, lanes, shared_mem, per_multiprocessor * runtime.deviceGetAttribute(
        runtime.cudaDevAttrMultiProcessorCount, device)


def add_gumbel_noise(logits: Any, uniform: Any) -> Any:
    """logits - log(-log(u)) for u ~ Uniform(0, 1) (clamped away from 0): argmax of the result samples
    from softmax(logits), DeepSpeed's gumbel_rsample."""
    xp = array_module(logits)
    return logits - xp.log(-xp.log(xp.maximum(uniform, philox.TINY)))


def gumbel_scores(logits: Any) -> Any:
    """The logits plus Gumbel noise from the device's seeded generator (add_gumbel_noise). GPU, float32:
    cuda/philox.py's gumbel_noisy draws and adds in one launch, without an array of uniform numbers (a
    launch and an allocation less of host time per forward)."""
    if is_gpu(logits) and logits.dtype == np.float32:
        return philox.gumbel_noisy(logits, *backend.philox_draw(logits.size))
    return add_gumbel_noise(logits, backend.random_uniform(logits.shape, logits.dtype))


def gate_weight_backward(grad_weight: Any, gating: Gating) -> Any:
    """d loss / d logits [T, E] from d loss / d weight [T, k], through the (renormalised) kept probs."""
    if is_gpu(grad_weight):
        return _gpu_gate_weight_backward(grad_weight, gating)
    xp = array_module(grad_weight)
    probs, expert_index, weight = gating.probs, gating.expert_index, gating.weight
    kept = gating.position >= 0
    k = expert_index.shape[1]
    if k == 1:
        grad_chosen = grad_weight * kept
    else:
        # w_j = a_j / s with a_j = p_j kept_j, s = max(sum a, eps): dL/da_j = (g_j - sum_i g_i w_i) / s.
        chosen = xp.take_along_axis(probs, expert_index, axis=1) * kept
        total = chosen.sum(axis=1, keepdims=True)
        clamped = total < np.finfo(probs.dtype).eps
        denominator = xp.where(clamped, np.finfo(probs.dtype).eps, total)
        grad_chosen = (grad_weight - (grad_weight * weight).sum(axis=1, keepdims=True)) / denominator
        grad_chosen = xp.where(clamped, grad_weight / denominator, grad_chosen) * kept
    grad_probs = xp.zeros_like(probs)
    for choice in range(k):
        grad_probs[xp.arange(len(probs)), expert_index[:, choice]] += grad_chosen[:, choice]
    return softmax_backward(grad_probs, probs)


def _gpu_gate_weight_backward(grad_weight: Any, gating: Gating) -> Any:
    import cupy

    num_tokens, num_experts = gating.probs.shape
    k = gating.expert_index.shape[1]
    grad_logits = cupy.empty(gating.probs.shape, gating.probs.dtype)
    warps_per_block = 8
    build.kernel("gating.cu", "gate_weight_backward")(
        ((num_tokens + warps_per_block - 1) // warps_per_block,), (WARP * warps_per_block,),
        (cupy.ascontiguousarray(grad_weight, dtype=cupy.float32), gating.probs, gating.expert_index, gating.position,
         gating.weight, grad_logits, np.int32(num_tokens), np.int32(num_experts), np.int32(k)))
    return grad_logits


def aux_loss_backward(grad_loss: Any, gating: Gating) -> Any:
    """d aux_loss / d logits: aux = E * sum_e ce_e * mean_t p[t, e], so dL/dp[t, e] = g * E * ce_e / T
    for every token t."""
    probs = gating.probs
    num_tokens, num_experts = probs.shape
    grad_probs = array_module(probs).broadcast_to(
        (grad_loss * num_experts / num_tokens) * gating.first_choice_fraction, probs.shape)
    return softmax_backward(grad_probs, probs)


def z_loss_forward(logits: Any) -> tuple[Any, Any]:
    """Router z-loss (ST-MoE, Zoph et al., 2022, sec. 3.3): mean_t logsumexp(z_t)^2; returns (loss, lse [T])."""
    row_logsumexp = logsumexp(logits)
    return (row_logsumexp**2).mean(), row_logsumexp


def z_loss_backward(grad_loss: Any, logits: Any, row_logsumexp: Any) -> Any:
    """d/dz_te of mean_t lse_t^2 = 2 lse_t softmax(z_t)_e / T."""
    probs = array_module(logits).exp(logits - row_logsumexp[:, None])
    return probs * (grad_loss * 2.0 / len(logits) * row_logsumexp)[:, None]
