"""Top-k gating with expert capacity: which expert each token goes to, where in that expert's buffer,
and with what weight. The semantics are DeepSpeed's (deepspeed/moe/sharded_moe.py, version 0.19.8):
`top1gating` and `top2gating` (GShard, Lepikhin et al., 2020, Algorithm 1) for k = 1 and 2, and
`topkgating` for k >= 3.

For gate logits z = x @ W_gate [T, E] (float32, from `gate_logits`), a capacity C, and a token mask
(padding tokens masked out; none: every token is used):

    p = softmax(z)                                   probabilities over the E experts

k = 1 and 2 (GShard):
    first[t]  = argmax_e first_scores[t, e]          first_scores = z, or z + Gumbel noise (RSample)
    second[t] = argmax_{e != first[t]} second_scores[t, e]   (k = 2; z, or z + Gumbel noise)
  Positions in an expert's buffer (DeepSpeed's `locations = cumsum(mask) - 1`):
    - first choices queue in token order; with random token selection (top-1, `priority` given) the
      first C tokens by priority (smallest first) are the ones kept, and they are then numbered in
      token order as DeepSpeed numbers them;
    - every second choice queues after *all* first choices of its expert (dropped ones included):
      position = (number of first choices of e) + (rank among second choices of e, in token order).
  ce_e = the fraction of the used tokens whose *first* choice is e (before drops); aux_loss = E sum_e me_e ce_e.

k >= 3 (DeepSpeed's topkgating):
    choices[t] = the k experts of largest p[t, :], largest first
  All of a token's choices queue together in token order (one cumsum over the [T, E] choice mask);
  drop_policy "position" keeps the first C of each expert in that order, "probs" (DeepSpeed's default)
  keeps the C choices of each expert with the largest p[t, e] (ties: the earlier token) and numbers the
  kept ones in token order. ce_e = the fraction of the used tokens that chose e (any choice), and
  aux_loss = (E / k) sum_e me_e ce_e (DeepSpeed: mean(me * ce) * E * E / k).

For every k:
    - a choice whose position is >= C is dropped: position -1, weight 0;
    - top-1 weight w = p[t, first] for a kept choice; k >= 2 renormalises the kept probabilities,
      w_j = p[t, e_j] kept_j / max(sum_j p[t, e_j] kept_j, eps) (DeepSpeed's `denom_s` clamp);
    - me_e = mean over the used tokens of p[t, e] (GShard Algorithm 1, Switch Transformer eq. 4), so a
      balanced layer has aux_loss 1;
    - a masked token (token_mask false) takes no position, no capacity and no weight, and has no part
      in me, ce or the aux loss, whose means run over the used tokens: routing a padded batch equals
      routing its used tokens alone at the same capacity. (DeepSpeed's `used_token` exists in top1gating
      only, and there still averages the padding tokens' probabilities into me and divides ce by all
      tokens; minimoe applies the mask for every k and leaves padding out entirely.)

Gradients reach the logits through the kept weights and through me (ce counts integers); the routing
itself is piecewise constant. `capacity=None` is dropless: C = the largest number of choices any expert
received, so nothing is dropped.

Three rungs, each the specification of the next (the tests compare them):
    route_token_by_token   the rules above one token at a time, loops and counters (read this first)
    topk_gating (NumPy)    the same, vectorised: the reference for the kernel
    gating.cu's gate_route k <= 2 in one cooperative launch on the GPU (k >= 3 runs the vectorised
                           reference on CuPy arrays)
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np

from minimoe import backend
from minimoe.backend import array_module, is_gpu
from minimoe.cuda import build, philox
from minimoe.cuda.gemm import matmul
from minimoe.cuda.partial_sums import sum_partials
from minimoe.cuda.softmax import logsumexp, softmax_backward, softmax_forward

WARP = 32
LOGITS_THREADS = 256  # threads of one gate_logits block
MIN_TILE = 64  # tokens per block at least: small T takes fewer blocks
# Constants that gating.cu shares with the launchers below: defined here once, given to the compiler as
# -D defines (build.register); gating.cu explains each where it uses it.
GATE_TOKENS, EXPERTS_PER_PASS = 4, 8  # gate_logits: tokens per block, experts per pass over x
GRAD_TOKENS, GRAD_TILE = 8, 64  # tokens per block of gate_logits_grad_x and gate_logits_grad_weight
ROUTE_THREADS = 512  # threads of one gate_route block: 16 warps (its launch bound)
PER_LANE = 16  # experts per lane in gate_route: E up to 16 * 32
STAGE_ENTRIES = 1024  # choices per tile that gate_route parks in shared memory
CHUNKS = 8  # chunks of 32 tiles that one warp of gate_route's tile_offsets scans
MAX_TILES = WARP * CHUNKS  # gate_route's blocks at most
build.register("gating.cu", *(f"{name}<{t}>" for t in ("float", "bf16")
                               for name in ("gate_logits", "gate_logits_grad_x", "gate_logits_grad_weight")),
               constants=dict(GATE_TOKENS=GATE_TOKENS, LOGITS_THREADS=LOGITS_THREADS, EXPERTS_PER_PASS=EXPERTS_PER_PASS,
                              GRAD_TOKENS=GRAD_TOKENS, GRAD_TILE=GRAD_TILE, ROUTE_THREADS=ROUTE_THREADS,
                              PER_LANE=PER_LANE, STAGE_ENTRIES=STAGE_ENTRIES, CHUNKS=CHUNKS))
DROP_POLICIES = ("probs", "position")  # k >= 3: which choices an over-full expert keeps


class Gating(NamedTuple):
    probs: Any  # [T, E] softmax of the logits
    expert_index: Any  # [T, k] int64: each token's choices, distinct experts
    position: Any  # [T, k] int64: slot in the expert's buffer, -1 where dropped (always for a masked token)
    weight: Any  # [T, k] combine weights, 0 where dropped
    capacity: int  # C: the buffer length of every expert
    tokens_per_expert: Any  # [E] int64: choices each expert received from the used tokens, before drops
    choice_fraction: Any  # [E] ce: fraction of the used tokens whose first (k <= 2) or any (k >= 3) choice is e
    aux_loss: Any  # 0-d: aux_weight(k, E) * sum_e me_e * ce_e
    dropped: Any  # 0-d: fraction of the used tokens' choices dropped
    used_tokens: Any  # 0-d: how many tokens the mask kept (T without a mask)
    token_mask: Any = None  # [T] bool, or None: every token used
    source_token: Any = None  # [E * C]: the token in each buffer slot, -1 where none (GPU, fixed capacity)


def expert_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float, min_capacity: int) -> int:
    """C = max(min_capacity, ceil(T / E * capacity_factor * k)), rounded as DeepSpeed's `_capacity`
    rounds it: its factor (capacity_factor * k) is a float32 tensor, so T / E is multiplied by it in
    float32, and the ceiling is taken of that float32 product. In float64 the two differ by one for many
    (T, E, factor) triples: T=100, E=2, factor 1.1 gives 55 in float32 and 56 in float64."""
    product = np.float32(num_tokens / num_experts) * np.float32(capacity_factor * k)
    return max(min_capacity, int(np.ceil(product)))


def aux_weight(k: int, num_experts: int) -> float:
    """The factor of sum_e me_e ce_e in the aux loss: E (GShard, top-1 and top-2), E / k for k >= 3, whose
    ce counts all k choices (DeepSpeed's topkgating)."""
    return num_experts if k <= 2 else num_experts / k


def route_token_by_token(logits: np.ndarray, k: int, capacity: int | None, first_scores: np.ndarray | None = None,
                         second_scores: np.ndarray | None = None, priority: np.ndarray | None = None,
                         token_mask: np.ndarray | None = None, drop_policy: str = "probs") -> Gating:
    """The rules of this module's docstring one token at a time, with a counter per expert: slow, and
    written to be read line by line against the docstring. Host arrays only."""
    num_tokens, num_experts = logits.shape
    used = np.ones(num_tokens, bool) if token_mask is None else np.asarray(token_mask, bool)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    first_scores = logits if first_scores is None else first_scores
    second_scores = logits if second_scores is None else second_scores
    choices = []
    for t in range(num_tokens):
        if k >= 3:  # the k largest probabilities, largest first (ties: the lower expert index)
            choices.append(sorted(range(num_experts), key=lambda e: (-probs[t, e], e))[:k])
            continue
        first = max(range(num_experts), key=lambda e: (first_scores[t, e], -e))  # argmax, lowest index on ties
        row = [first]
        if k == 2:
            row.append(max((e for e in range(num_experts) if e != first), key=lambda e: (second_scores[t, e], -e)))
        choices.append(row)
    loads = np.zeros(num_experts, np.int64)
    for t in range(num_tokens):
        for e in choices[t]:
            loads[e] += used[t]
    if capacity is None:
        capacity = max(int(loads.max()), 1)

    # kept[t][j]: does choice j of token t keep a place? Then the kept choices are numbered in token
    # order, one counter per expert; a second choice (k = 2) instead takes its place in a queue that
    # starts behind all of its expert's first choices, dropped ones included.
    kept = np.zeros((num_tokens, k), bool)
    position = -np.ones((num_tokens, k), np.int64)
    if k <= 2:
        claimed = np.zeros(num_experts, np.int64)  # first choices: per expert, the first C in priority order
        for t in range(num_tokens) if priority is None else np.argsort(priority, kind="stable"):
            if used[t]:
                kept[t, 0] = claimed[choices[t][0]] < capacity
                claimed[choices[t][0]] += 1
        filled = np.zeros(num_experts, np.int64)
        for t in range(num_tokens):
            if kept[t, 0]:
                position[t, 0] = filled[choices[t][0]]
                filled[choices[t][0]] += 1
        if k == 2:
            queue = claimed.copy()  # every first choice of the expert, kept or not
            for t in range(num_tokens):
                if used[t]:
                    e = choices[t][1]
                    if queue[e] < capacity:
                        kept[t, 1], position[t, 1] = True, queue[e]
                    queue[e] += 1
    else:
        for e in range(num_experts):
            entries = [(t, j) for t in range(num_tokens) for j in range(k) if used[t] and choices[t][j] == e]
            if drop_policy == "probs":  # the C largest probabilities; ties to the earlier token
                entries.sort(key=lambda entry: (-probs[entry[0], e], entry[0]))
            for t, j in entries[:capacity]:
                kept[t, j] = True
        filled = np.zeros(num_experts, np.int64)
        for t in range(num_tokens):
            for j in range(k):
                if kept[t, j]:
                    position[t, j] = filled[choices[t][j]]
                    filled[choices[t][j]] += 1

    expert_index = np.array(choices, dtype=np.int64).reshape(num_tokens, k)
    chosen = np.take_along_axis(probs, expert_index, axis=1) * (position >= 0)
    weight = chosen if k == 1 else chosen / np.maximum(chosen.sum(axis=1, keepdims=True), np.finfo(probs.dtype).eps)
    used_count = max(int(used.sum()), 1)
    counted = expert_index[:, :1] if k <= 2 else expert_index  # ce's choices
    fraction = np.zeros(num_experts)
    for t in np.flatnonzero(used):
        for e in counted[t]:
            fraction[e] += 1 / used_count
    me = probs[used].sum(axis=0) / used_count
    aux_loss = aux_weight(k, num_experts) * np.sum(me * fraction)
    dropped = 1.0 - (position[used] >= 0).sum() / max(used.sum() * k, 1)
    return Gating(probs, expert_index, position, weight, capacity, loads, fraction, aux_loss, dropped, used.sum(),
                  token_mask)


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


def _rank_within_expert(choice: Any, order: Any, num_experts: int) -> Any:
    """rank[i] = how many entries before i in `order` (a permutation of the entries) chose the same
    expert: DeepSpeed's `cumsum(one_hot(choice), dim=0) - 1`, taken in the given order. An entry whose
    choice is num_experts (an "expert" past the last: masked or not kept) is ranked in a column of its
    own that nothing reads."""
    xp = array_module(choice)
    in_order = choice[order]
    one_hot = in_order[:, None] == xp.arange(num_experts + 1)[None, :]
    rank_in_order = (xp.cumsum(one_hot, axis=0) - 1)[xp.arange(len(order)), in_order]
    rank = xp.empty_like(rank_in_order)
    rank[order] = rank_in_order
    return rank


def topk_gating(logits: Any, k: int, capacity: int | None, first_scores: Any = None, second_scores: Any = None,
                priority: Any = None, token_mask: Any = None, drop_policy: str = "probs") -> Gating:
    """Route T tokens to k of E experts each. `first_scores` / `second_scores` default to the logits
    (pass logits + Gumbel noise for RSample / second-expert sampling); `priority` [T] (top-1 only:
    random token selection) decides which tokens an over-full expert keeps, smallest first;
    `token_mask` [T] (bool, None: all) leaves padding tokens out; `drop_policy` (k >= 3) as above."""
    num_tokens, num_experts = logits.shape
    if k < 1 or k > num_experts:
        raise ValueError(f"k must lie in 1..E={num_experts} (experts per token), got {k}")
    if k >= 3 and (first_scores is not None or second_scores is not None or priority is not None):
        raise ValueError("noisy scores and random token selection are defined for k <= 2 only (DeepSpeed's "
                         "topkgating has neither)")
    if k == 2 and priority is not None:
        raise ValueError("random token selection (priority) is defined for top-1 gating only")
    if drop_policy not in DROP_POLICIES:
        raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {drop_policy!r}")
    if is_gpu(logits) and k <= 2:
        return _gpu_topk_gating(logits, k, capacity, first_scores, second_scores, priority, token_mask)
    xp = array_module(logits)
    tokens = xp.arange(num_tokens)
    probs = softmax_forward(logits)
    used = xp.ones(num_tokens, dtype=bool) if token_mask is None else xp.asarray(token_mask, dtype=bool)
    used_count = used.sum()

    if k <= 2:
        first = xp.argmax(logits if first_scores is None else first_scores, axis=1)
        choices = [first]
        if k == 2:
            scores = (logits if second_scores is None else second_scores).copy()
            scores[tokens, first] = -xp.inf
            choices.append(xp.argmax(scores, axis=1))
        expert_index = xp.stack(choices, axis=1)
    else:  # the k largest probabilities, largest first; ties to the lower expert (a stable sort)
        expert_index = xp.argsort(-probs, axis=1, kind="stable")[:, :k]
    # A masked token's choices count as the extra expert E: they take no rank, load or capacity.
    counted = xp.where(used[:, None], expert_index, num_experts)
    tokens_per_expert = xp.bincount(counted.reshape(-1), minlength=num_experts + 1)[:num_experts]
    if capacity is None:
        capacity = max(int(tokens_per_expert.max()), 1)

    if k <= 2:
        # First choices: the first C by priority are kept, then numbered in token order.
        if priority is None:
            position_first = _rank_within_expert(counted[:, 0], tokens, num_experts)
            kept_first = position_first < capacity
        else:
            kept_first = _rank_within_expert(counted[:, 0], xp.argsort(priority, kind="stable"), num_experts) < capacity
            position_first = _rank_within_expert(xp.where(kept_first, counted[:, 0], num_experts), tokens, num_experts)
        positions = [position_first]
        if k == 2:  # second choices queue behind all first choices of their expert
            first_counts = xp.bincount(counted[:, 0], minlength=num_experts + 1)
            positions.append(first_counts[counted[:, 1]] + _rank_within_expert(counted[:, 1], tokens, num_experts))
        position = xp.stack(positions, axis=1)
        kept = (position < capacity) & used[:, None]
        kept[:, 0] &= kept_first
    else:
        entries = counted.reshape(-1)  # entry t * k + j: choice j of token t, in token order
        if drop_policy == "position":
            kept = _rank_within_expert(entries, xp.arange(len(entries)), num_experts) < capacity
        else:  # per expert, the C largest probabilities; ties to the earlier token (stable sort)
            entry_probs = xp.take_along_axis(probs, expert_index, axis=1).reshape(-1)
            by_probability = xp.argsort(-entry_probs, kind="stable")
            kept = _rank_within_expert(entries, by_probability, num_experts) < capacity
        kept &= entries < num_experts
        position = _rank_within_expert(xp.where(kept, entries, num_experts), xp.arange(len(entries)), num_experts)
        position, kept = position.reshape(num_tokens, k), kept.reshape(num_tokens, k)
    position = xp.where(kept, position, -1)

    chosen_probs = xp.take_along_axis(probs, expert_index, axis=1) * kept
    if k == 1:
        weight = chosen_probs
    else:
        weight = chosen_probs / xp.maximum(chosen_probs.sum(axis=1, keepdims=True), np.finfo(probs.dtype).eps)

    denominator = xp.maximum(used_count, 1).astype(probs.dtype)
    ce_choices = counted[:, :1] if k <= 2 else counted
    choice_fraction = (xp.bincount(ce_choices.reshape(-1), minlength=num_experts + 1)[:num_experts]
                       / denominator).astype(probs.dtype)
    me = (probs * used[:, None]).sum(axis=0) / denominator
    aux_loss = aux_weight(k, num_experts) * (me * choice_fraction).sum()
    dropped = 1.0 - kept.sum(dtype=probs.dtype) / (denominator * k)
    return Gating(probs, expert_index, position, weight, capacity, tokens_per_expert, choice_fraction, aux_loss,
                  dropped, used_count, token_mask)


def dropless_choices(logits: Any, k: int, token_mask: Any = None) -> tuple[Any, Any]:
    """(expert_index [T, k], weight [T, k]): every token's k experts and combine weights with nothing
    dropped, topk_gating's rules without a capacity or noise (inference routes deterministically); a
    masked token's choices are E (no expert) with weight 0. GPU: gating.cu's dropless_choices, a warp per
    token, one launch and no host read (it runs inside captured decode steps)."""
    num_tokens, num_experts = logits.shape
    if not 1 <= k <= num_experts:
        raise ValueError(f"k must lie in 1..E={num_experts} (experts per token), got {k}")
    if is_gpu(logits):
        return _gpu_dropless_choices(logits, k, token_mask)
    xp = array_module(logits)
    gating = topk_gating(logits, k, None, token_mask=token_mask)
    used = xp.ones(num_tokens, dtype=bool) if token_mask is None else xp.asarray(token_mask, dtype=bool)
    return xp.where(used[:, None], gating.expert_index, num_experts), gating.weight


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
    """d loss / d logits [T, E] from d loss / d weight [T, k], through the (renormalised) kept probs.
    GPU: gating.cu's gate_weight_backward for k <= 2; k >= 3 runs this reference on CuPy arrays."""
    if is_gpu(grad_weight) and gating.expert_index.shape[1] <= 2:
        return _gpu_gate_weight_backward(grad_weight, None, gating)
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


def aux_loss_backward(grad_loss: Any, gating: Gating) -> Any:
    """d aux_loss / d logits: aux = w sum_e ce_e me_e with me_e = sum over the U used tokens of
    p[t, e] / U (w = aux_weight), so dL/dp[t, e] = g w ce_e / U for every used token t, 0 for a masked one."""
    probs = gating.probs
    xp = array_module(probs)
    num_experts = probs.shape[1]
    scale = grad_loss * aux_weight(gating.expert_index.shape[1], num_experts) / xp.maximum(gating.used_tokens, 1)
    grad_probs = xp.broadcast_to(scale * gating.choice_fraction, probs.shape)
    if gating.token_mask is not None:
        grad_probs = grad_probs * xp.asarray(gating.token_mask, dtype=probs.dtype)[:, None]
    return softmax_backward(grad_probs, probs)


def gate_route_backward(grad_weight: Any, grad_aux_loss: Any, gating: Gating) -> Any:
    """d loss / d logits through both results of the routing: the combine weights (grad_weight [T, k]) and
    the load-balancing loss (grad_aux_loss, 0-d); either None where that result did not reach the loss (both
    None: 0). The sum of gate_weight_backward and aux_loss_backward; GPU (k <= 2): one launch of gating.cu's
    gate_weight_backward for both, where the two and their sum took ten."""
    if grad_weight is None and grad_aux_loss is None:
        return 0.0
    if is_gpu(gating.probs) and gating.expert_index.shape[1] <= 2:
        return _gpu_gate_weight_backward(grad_weight, grad_aux_loss, gating)
    through_weights = 0.0 if grad_weight is None else gate_weight_backward(grad_weight, gating)
    return through_weights + (0.0 if grad_aux_loss is None else aux_loss_backward(grad_aux_loss, gating))


def z_loss_forward(logits: Any, token_mask: Any = None) -> tuple[Any, Any]:
    """Router z-loss (ST-MoE, Zoph et al., 2022, sec. 3.3): the mean over the U used tokens of
    logsumexp(z_t)^2; returns (loss, lse [T])."""
    row_logsumexp = logsumexp(logits)
    used = _used(logits, token_mask)
    return (row_logsumexp**2 * used).sum() / used.sum().clip(1), row_logsumexp


def z_loss_backward(grad_loss: Any, logits: Any, row_logsumexp: Any, token_mask: Any = None) -> Any:
    """d/dz_te of the mean over U used tokens of lse_t^2 = 2 lse_t softmax(z_t)_e / U (0 for a masked token)."""
    probs = array_module(logits).exp(logits - row_logsumexp[:, None])
    used = _used(logits, token_mask)
    return probs * (grad_loss * 2.0 / used.sum().clip(1) * row_logsumexp * used)[:, None]


def _used(logits: Any, token_mask: Any) -> Any:
    """[T] of 1 for a used token, 0 for a masked one, in the logits' dtype."""
    xp = array_module(logits)
    return xp.ones(len(logits), logits.dtype) if token_mask is None else xp.asarray(token_mask, dtype=logits.dtype)


# ----------------------------------------------------------------------------- GPU paths


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
    partial = cupy.empty((1, tiles, width * num_experts), dtype=cupy.float32)
    if num_tokens and width:
        sizes = (np.int32(num_tokens), np.int32(width), np.int32(num_experts))
        build.kernel("gating.cu", f"gate_logits_grad_x<{build.type_name(x)}>")(
            (-(-num_tokens // GRAD_TOKENS),), (LOGITS_THREADS,), (grad_logits, weight, grad_x, *sizes))
        build.kernel("gating.cu", f"gate_logits_grad_weight<{build.type_name(x)}>")(
            (tiles, -(-width // LOGITS_THREADS)), (LOGITS_THREADS,), (x, grad_logits, partial, *sizes))
    return grad_x, sum_partials(partial, np.float32).reshape(width, num_experts)


def _gpu_gate_logits(x: Any, weight: Any) -> Any:
    import cupy

    num_tokens, width = x.shape
    num_experts = weight.shape[1]
    x, weight = cupy.ascontiguousarray(x), cupy.ascontiguousarray(weight)
    logits = cupy.empty((num_tokens, num_experts), dtype=cupy.float32)
    if num_tokens == 0:
        return logits
    vector = num_experts % 4 == 0 and weight.data.ptr % 16 == 0
    build.kernel("gating.cu", f"gate_logits<{build.type_name(x)}>")(
        (-(-num_tokens // GATE_TOKENS),), (LOGITS_THREADS,),
        (x, weight, logits, np.int32(num_tokens), np.int32(width), np.int32(num_experts), np.int32(vector)))
    return logits


def _mask_bytes(token_mask: Any) -> Any:
    """The token mask as the kernels read it, a byte per token: a bool mask as it is (a view), else a copy;
    a null pointer when there is none (every token real)."""
    import cupy

    if token_mask is None:
        return np.uint64(0)
    mask = cupy.ascontiguousarray(token_mask)
    return mask.view(cupy.uint8) if mask.dtype == cupy.bool_ else mask.astype(cupy.uint8)


def _gpu_dropless_choices(logits: Any, k: int, token_mask: Any) -> tuple[Any, Any]:
    import cupy

    num_tokens, num_experts = logits.shape
    expert_index = cupy.empty((num_tokens, k), dtype=cupy.int64)
    weight = cupy.empty((num_tokens, k), dtype=cupy.float32)
    if num_tokens:
        warps_per_block = 8
        mask = _mask_bytes(token_mask)
        build.kernel("gating.cu", "dropless_choices")(
            (-(-num_tokens // warps_per_block),), (WARP * warps_per_block,),
            (cupy.ascontiguousarray(logits, dtype=cupy.float32), mask, np.int32(num_tokens), np.int32(num_experts),
             np.int32(k), expert_index, weight))
    return expert_index, weight


def _gpu_topk_gating(logits: Any, k: int, capacity: int | None, first_scores: Any, second_scores: Any,
                     priority: Any, token_mask: Any) -> Gating:
    """cuda/gating.cu's gate_route: everything in one cooperative launch. Float32 throughout."""
    import cupy

    null = np.uint64(0)  # a null pointer argument: "not given"
    num_tokens, num_experts = logits.shape
    if num_experts > WARP * PER_LANE:
        raise ValueError(f"the GPU gating kernel handles at most {WARP * PER_LANE} experts, got {num_experts}")

    def as_float(array: Any) -> Any:
        return null if array is None else cupy.ascontiguousarray(array, dtype=cupy.float32)

    launch = _route_launch(num_experts, cupy.cuda.runtime.getDevice())
    if launch.most_blocks == 0:
        raise RuntimeError(f"the GPU gating kernel does not fit on this GPU for {num_experts} experts "
                           f"({launch.shared_bytes} bytes of shared memory per block)")
    tiles = min(launch.most_blocks, MAX_TILES, -(-num_tokens // MIN_TILE))
    logits, first_scores, second_scores = (as_float(a) for a in (logits, first_scores, second_scores))
    # 16-byte loads need rows that start 16-byte aligned: E a multiple of 4 and aligned arrays.
    vector = num_experts % 4 == 0 and all(a is null or a.data.ptr % 16 == 0 for a in (logits, first_scores,
                                                                                      second_scores))
    probs = cupy.empty((num_tokens, num_experts), dtype=cupy.float32)
    expert_index = cupy.empty((num_tokens, k), dtype=cupy.int64)
    position = cupy.empty((num_tokens, k), dtype=cupy.int64)
    weight = cupy.empty((num_tokens, k), dtype=cupy.float32)
    workspace_size, statistics_size = route_buffer_sizes(k, num_experts, tiles)
    workspace = cupy.empty(workspace_size, dtype=cupy.int32)
    tokens_per_expert = cupy.empty(num_experts, dtype=cupy.int64)
    statistics = cupy.empty(statistics_size, dtype=cupy.float32)
    mask = _mask_bytes(token_mask)
    # Fixed capacity: the kernel also writes dispatch's inverse table (dropless: C is known only after it).
    source_token = null if capacity is None else cupy.empty(num_experts * capacity, dtype=cupy.int64)
    order = keep = null
    if priority is not None:  # random token selection: the smallest priorities are kept first
        order = cupy.argsort(priority).astype(cupy.int64)
        keep = cupy.empty(num_tokens, dtype=cupy.uint8)
    # A cooperative launch: all `tiles` blocks resident at once, as the kernel's grid barrier needs.
    launch.kernel.kernel((tiles,), (ROUTE_THREADS,), (
        logits, first_scores, second_scores, order, mask, np.int32(num_tokens), np.int32(num_experts),
        np.int32(launch.lanes), np.int32(vector), np.int32(k), np.int64(-1 if capacity is None else capacity), probs,
        expert_index, position, weight, keep, workspace, tokens_per_expert, statistics, source_token),
        shared_mem=launch.shared_bytes, enable_cooperative_groups=True)
    if capacity is None:
        capacity = int(workspace[0])  # the kernel's dropless capacity: one read of the device
        source_token = None
    read = RouteStatistics.of(statistics, num_experts)
    return Gating(probs, expert_index, position, weight, capacity, tokens_per_expert, read.first_fraction,
                  read.aux_loss, read.dropped, read.used_tokens, token_mask, source_token)


def route_buffer_sizes(k: int, num_experts: int, tiles: int) -> tuple[int, int]:
    """Elements of gate_route's two packed buffers (gating.cu's RouteArgs comment lays them out):
    workspace (int32): the capacity used, counts [k + 1][E][tiles], totals [k + 1][E];
    statistics (float32): first_fraction [E], aux_loss, dropped, used_tokens, prob_totals [E + 1],
    prob_sums [E + 1][tiles]."""
    return 1 + (k + 1) * (tiles + 1) * num_experts, 2 * num_experts + 4 + (num_experts + 1) * tiles


class RouteStatistics(NamedTuple):
    """The named fields at the front of gate_route's statistics buffer (views, no copies)."""

    first_fraction: Any  # [E]
    aux_loss: Any  # 0-d
    dropped: Any  # 0-d
    used_tokens: Any  # 0-d

    @staticmethod
    def of(statistics: Any, num_experts: int) -> RouteStatistics:
        return RouteStatistics(statistics[:num_experts], statistics[num_experts], statistics[num_experts + 1],
                               statistics[num_experts + 2])


class RouteLaunch(NamedTuple):
    kernel: Any  # gate_route
    lanes: int  # lanes per token in phase 1
    shared_bytes: int  # dynamic shared memory per block
    most_blocks: int  # blocks resident at once on the GPU: the cooperative launch's limit


def route_shared_bytes(num_experts: int) -> int:
    """gate_route's dynamic shared memory (gating.cu's RouteShared): the stage (int64 experts and ranks,
    float32 probabilities, STAGE_ENTRIES each), then warp_offsets [warps][2][E], scan [warps][E], running
    [E], before [2][E], total [2][E] and warp_used [warps], int32."""
    warps = ROUTE_THREADS // WARP
    return (8 + 8 + 4) * STAGE_ENTRIES + 4 * ((2 * warps + warps + 1 + 2 + 2) * num_experts + warps)


@functools.cache
def _route_launch(num_experts: int, device: int) -> RouteLaunch:
    """How to launch gate_route for E experts on GPU `device`; worked out once per E and device."""
    import cupy

    # A token's scores spread over `lanes` lanes, PER_LANE each: the fewest lanes, so that a warp routes
    # as many tokens at once as it can (E = 64: 4 lanes, 8 tokens; E <= 16: 1 lane, 32 tokens).
    lanes = 1 << (-(-num_experts // PER_LANE) - 1).bit_length()
    kernel = build.kernel("gating.cu", "gate_route")
    shared_bytes = route_shared_bytes(num_experts)
    if shared_bytes > kernel.max_dynamic_shared_size_bytes:  # above 48 KiB (E > 135) a launch must opt in
        kernel.max_dynamic_shared_size_bytes = shared_bytes
    runtime = cupy.cuda.runtime
    per_multiprocessor = cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(
        kernel.kernel.ptr, ROUTE_THREADS, shared_bytes)
    return RouteLaunch(kernel, lanes, shared_bytes, per_multiprocessor * runtime.deviceGetAttribute(
        runtime.cudaDevAttrMultiProcessorCount, device))


def _gpu_gate_weight_backward(grad_weight: Any, grad_aux_loss: Any, gating: Gating) -> Any:
    """gating.cu's gate_weight_backward: the combine weights' gradient (or None) and the load-balancing
    loss's (or None) to the logits in one launch."""
    import cupy

    num_tokens, num_experts = gating.probs.shape
    k = gating.expert_index.shape[1]
    grad_logits = cupy.empty(gating.probs.shape, gating.probs.dtype)
    balancing = grad_aux_loss is not None  # the kernel reads these three only for the balancing loss
    grad_aux_loss, used_tokens, choice_fraction = (build.optional_array(a if balancing else None, cupy.float32)
                                                   for a in (grad_aux_loss, gating.used_tokens, gating.choice_fraction))
    warps_per_block = 8
    build.kernel("gating.cu", "gate_weight_backward")(
        ((num_tokens + warps_per_block - 1) // warps_per_block,), (WARP * warps_per_block,),
        (build.optional_array(grad_weight, cupy.float32), gating.probs, gating.expert_index, gating.position,
         gating.weight, grad_aux_loss, np.float32(aux_weight(k, num_experts)), used_tokens, choice_fraction,
         _mask_bytes(gating.token_mask), grad_logits, np.int32(num_tokens), np.int32(num_experts), np.int32(k)))
    return grad_logits
