"""Gating: the vectorised reference (cuda/gating.py) against a token-by-token loop written from the
rules in its docstring, the properties DeepSpeed's gates promise, and float64 gradients."""

import numpy as np
import pytest
from helpers import check_gradients
from hypothesis import given
from hypothesis import strategies as st

from minimoe import backend
from minimoe.cuda.gating import expert_capacity, topk_gating
from minimoe.moe.gate import GateLogits, route
from minimoe.tensor import Tensor

seeds = st.integers(0, 2**32 - 1)


@st.composite
def gating_cases(draw, k=None, max_experts=64, max_tokens=80):
    """Random logits [T, E] with E in 1..64 (2..64 for top-2) and a capacity below or above demand."""
    k = draw(st.sampled_from([1, 2])) if k is None else k
    num_experts = draw(st.integers(k, max_experts))
    num_tokens = draw(st.integers(1, max_tokens))
    logits = np.random.default_rng(draw(seeds)).standard_normal((num_tokens, num_experts)) * draw(
        st.sampled_from([0.5, 1.0, 4.0]))
    capacity = draw(st.one_of(st.none(), st.integers(1, num_tokens + 1)))
    return logits, k, capacity


def loop_gating(logits, k, capacity, priority=None):
    """The rules, one token at a time: a counter per expert, first choices before second choices."""
    num_tokens, num_experts = logits.shape
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    first = [int(np.argmax(logits[t])) for t in range(num_tokens)]
    second = [int(np.argmax(np.where(np.arange(num_experts) == first[t], -np.inf, logits[t])))
              for t in range(num_tokens)] if k == 2 else []
    choices = [first, second][:k]
    loads = np.bincount(np.concatenate([np.array(c, dtype=np.int64) for c in choices]), minlength=num_experts)
    if capacity is None:
        capacity = max(int(loads.max()), 1)
    # Which first choices are kept: per expert, the first `capacity` tokens in priority order.
    order = range(num_tokens) if priority is None else np.argsort(priority, kind="stable")
    claimed = np.zeros(num_experts, int)
    kept_first = np.zeros(num_tokens, bool)
    for t in order:
        if claimed[first[t]] < capacity:
            kept_first[t] = True
        claimed[first[t]] += 1
    position = -np.ones((num_tokens, k), int)
    filled = np.zeros(num_experts, int)
    for t in range(num_tokens):  # kept first choices are numbered in token order
        if kept_first[t]:
            position[t, 0] = filled[first[t]]
            filled[first[t]] += 1
    if k == 2:
        queue = np.bincount(first, minlength=num_experts)  # second choices wait behind every first choice
        for t in range(num_tokens):
            if queue[second[t]] < capacity:
                position[t, 1] = queue[second[t]]
            queue[second[t]] += 1
    expert_index = np.array(choices).T
    chosen = np.take_along_axis(probs, expert_index, 1) * (position >= 0)
    weight = chosen if k == 1 else chosen / np.maximum(chosen.sum(1, keepdims=True), np.finfo(float).eps)
    first_fraction = np.bincount(first, minlength=num_experts) / num_tokens
    aux = num_experts * num_experts * np.mean(probs.mean(0) * first_fraction)
    return expert_index, position, weight, capacity, loads, aux


@given(case=gating_cases())
def test_reference_matches_token_by_token_rules(case):
    logits, k, capacity = case
    gating = topk_gating(logits, k, capacity)
    expert_index, position, weight, expected_capacity, loads, aux = loop_gating(logits, k, capacity)
    np.testing.assert_array_equal(gating.expert_index, expert_index)
    np.testing.assert_array_equal(gating.position, position)
    np.testing.assert_allclose(gating.weight, weight, rtol=1e-12)
    assert gating.capacity == expected_capacity
    np.testing.assert_array_equal(gating.tokens_per_expert, loads)
    np.testing.assert_allclose(gating.aux_loss, aux, rtol=1e-12)


@given(case=gating_cases(k=1), seed=seeds)
def test_random_token_selection_keeps_each_experts_first_c_by_priority(case, seed):
    logits, _, capacity = case
    priority = np.random.default_rng(seed).random(len(logits))
    gating = topk_gating(logits, 1, capacity, priority=priority)
    expert_index, position, weight, _, _, _ = loop_gating(logits, 1, capacity, priority)
    np.testing.assert_array_equal(gating.position, position)
    np.testing.assert_allclose(gating.weight, weight, rtol=1e-12)
    for expert in range(logits.shape[1]):
        mine = np.flatnonzero(gating.expert_index[:, 0] == expert)
        by_priority = mine[np.argsort(priority[mine], kind="stable")]
        kept = set(np.flatnonzero((gating.position[:, 0] >= 0) & (gating.expert_index[:, 0] == expert)))
        assert kept == set(by_priority[: gating.capacity])


@given(case=gating_cases())
def test_capacity_and_table_invariants(case):
    logits, k, capacity = case
    gating = topk_gating(logits, k, capacity)
    kept = gating.position >= 0
    assert gating.position.max(initial=-1) < gating.capacity
    if k == 2:
        assert np.all(gating.expert_index[:, 0] != gating.expert_index[:, 1])
    for expert in range(logits.shape[1]):
        slots = np.sort(gating.position[kept & (gating.expert_index == expert)])
        np.testing.assert_array_equal(slots, np.arange(len(slots)))  # no expert over C; slots 0..n-1, unique
    assert np.all(gating.weight[~kept] == 0)
    if k == 2:
        any_kept = kept.any(1)
        np.testing.assert_allclose(gating.weight[any_kept].sum(1), 1.0, rtol=1e-12)
    if capacity is None:
        assert kept.all()  # dropless never drops


def test_capacity_formula():
    assert expert_capacity(100, 8, 1, 1.0, 4) == 13  # ceil(100 / 8)
    assert expert_capacity(100, 8, 2, 1.25, 4) == 32  # ceil(100 / 8 * 1.25 * 2)
    assert expert_capacity(10, 8, 1, 1.0, 4) == 4  # min_capacity
    assert route(np.zeros((10, 4)) + np.arange(4.0), 1, 1.0, 0, drop_tokens=False).capacity == 10


@given(case=gating_cases(max_experts=12, max_tokens=24), z_loss=st.booleans())
def test_gradients_of_weights_aux_loss_and_z_loss(case, z_loss):
    logits, k, capacity = case
    capacity_factor = 1.0 if capacity is None else capacity * logits.shape[1] / (k * len(logits))

    def differentiable_outputs(z):
        routing = route(z, k, capacity_factor, 0, drop_tokens=capacity is not None, z_loss=z_loss)
        total = routing.aux_loss * 0.37 + (routing.z_loss * 0.21 if z_loss else 0.0)
        return routing.weight * 1.0 + total

    # atol: the z-loss (lse^2, up to a few hundred) leaves central differences ~1e-8 of rounding.
    check_gradients(differentiable_outputs, [logits], rtol=1e-5, atol=1e-6)


@given(tokens=st.integers(1, 9), width=st.integers(1, 7), num_experts=st.integers(1, 6), seed=seeds)
def test_gate_logits_gradients(tokens, width, num_experts, seed):
    rng = np.random.default_rng(seed)
    x, weight = rng.standard_normal((tokens, width)), rng.standard_normal((width, num_experts))
    check_gradients(GateLogits.apply, [x, weight])


def test_gate_logits_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match=r"x \[T, d\] and weight \[d, E\], got \(5, 3\) and \(4, 2\)"):
        GateLogits.apply(Tensor(np.ones((5, 3))), Tensor(np.ones((4, 2))))


@given(case=gating_cases(k=1, max_experts=12, max_tokens=24), seed=seeds, policy=st.sampled_from(["", "RSample"]))
def test_training_noise_is_seeded_and_gradients_still_match(case, seed, policy):
    logits, _, _ = case

    def weights(z):
        return route(z, 1, 1.0, 1, training=True, noisy_gate_policy=policy, use_rts=True).weight

    check_gradients(weights, [logits], before_each_call=lambda: backend.manual_seed(seed))


def test_second_expert_sampling_draws_from_the_softmax():
    """With Gumbel noise the second choice follows softmax over the other experts (2 experts left)."""
    backend.manual_seed(0)
    logits = np.tile(np.array([[5.0, np.log(3.0), 0.0]]), (20000, 1))
    routing = route(logits, 2, 10.0, 0, training=True, second_expert_sampling=True)
    share = np.mean(routing.expert_index[:, 1] == 1)
    assert abs(share - 0.75) < 0.02  # p(e=1 | not e=0) = 3 / (3 + 1)


def test_top2_refuses_top1_only_options():
    with pytest.raises(ValueError, match="top-1 gating only"):
        route(np.zeros((4, 3)), 2, 1.0, 0, use_rts=True)
