"""Gating: the vectorised reference (cuda/gating.py) against its token-by-token specification, the
properties DeepSpeed's gates promise (top-1, top-2 and top-k with both drop policies, with and without
a padding mask), DeepSpeed's float32 capacity, and float64 gradients."""

import numpy as np
import pytest
from helpers import check_gradients
from hypothesis import given
from hypothesis import strategies as st

from minimoe import backend
from minimoe.cuda.gating import DROP_POLICIES, aux_loss_backward, expert_capacity, route_token_by_token, topk_gating
from minimoe.moe.gate import GateLogits, MoESettings, route
from minimoe.tensor import Tensor

seeds = st.integers(0, 2**32 - 1)


@st.composite
def gating_cases(draw, k=None, max_experts=64, max_tokens=80, masks=True):
    """Random logits [T, E] (E >= k), a capacity below or above demand, and (sometimes) a token mask;
    k in 1..4 and, for k >= 3, a drop policy."""
    k = draw(st.sampled_from([1, 2, 3, 4])) if k is None else k
    num_experts = draw(st.integers(max(k, 1), max_experts))
    num_tokens = draw(st.integers(1, max_tokens))
    rng = np.random.default_rng(draw(seeds))
    logits = rng.standard_normal((num_tokens, num_experts)) * draw(st.sampled_from([0.5, 1.0, 4.0]))
    capacity = draw(st.one_of(st.none(), st.integers(1, num_tokens + 1)))
    mask = rng.random(num_tokens) < draw(st.sampled_from([0.3, 0.8])) if masks and draw(st.booleans()) else None
    return logits, k, capacity, mask, draw(st.sampled_from(DROP_POLICIES))


def assert_same_gating(actual, expected, rtol=1e-12):
    for name in ("expert_index", "position", "tokens_per_expert"):
        np.testing.assert_array_equal(getattr(actual, name), getattr(expected, name), err_msg=name)
    assert actual.capacity == expected.capacity
    for name in ("weight", "choice_fraction", "aux_loss", "dropped", "used_tokens"):
        np.testing.assert_allclose(getattr(actual, name), getattr(expected, name), rtol=rtol, atol=1e-15,
                                   err_msg=name)


@given(case=gating_cases())
def test_reference_matches_token_by_token_rules(case):
    logits, k, capacity, mask, policy = case
    assert_same_gating(topk_gating(logits, k, capacity, token_mask=mask, drop_policy=policy),
                       route_token_by_token(logits, k, capacity, token_mask=mask, drop_policy=policy))


@given(case=gating_cases(), training=st.booleans(), factor=st.sampled_from([0.5, 1.0, 1.1, None]))
def test_route_follows_the_token_by_token_rules(case, training, factor):
    """route, as the layer calls it (capacity from the settings, deterministic evaluation or training
    without noise), against the specification."""
    logits, k, _, mask, policy = case
    settings = MoESettings(k=k, capacity_factor=factor or 1.0, eval_capacity_factor=factor or 1.0, min_capacity=2,
                           drop_tokens=factor is not None, drop_policy=policy, use_rts=False,
                           second_expert_sampling=False)
    routing = route(logits, settings, training=training, token_mask=mask)
    capacity = None if factor is None else expert_capacity(*logits.shape, k, factor, 2)
    expected = route_token_by_token(logits, k, capacity, token_mask=mask, drop_policy=policy)
    np.testing.assert_array_equal(routing.expert_index, expected.expert_index)
    np.testing.assert_array_equal(routing.position, expected.position)
    np.testing.assert_allclose(routing.weight.data, expected.weight, rtol=1e-12)
    np.testing.assert_allclose(routing.aux_loss.data, expected.aux_loss, rtol=1e-12)


@given(case=gating_cases(k=2), seed=seeds)
def test_noisy_second_choices_follow_the_rules(case, seed):
    logits, _, capacity, mask, _ = case
    noisy = logits + np.random.default_rng(seed).gumbel(size=logits.shape)
    assert_same_gating(topk_gating(logits, 2, capacity, second_scores=noisy, token_mask=mask),
                       route_token_by_token(logits, 2, capacity, second_scores=noisy, token_mask=mask))


@given(case=gating_cases(k=1), seed=seeds)
def test_random_token_selection_keeps_each_experts_first_c_by_priority(case, seed):
    logits, _, capacity, mask, _ = case
    priority = np.random.default_rng(seed).random(len(logits))
    gating = topk_gating(logits, 1, capacity, priority=priority, token_mask=mask)
    assert_same_gating(gating, route_token_by_token(logits, 1, capacity, priority=priority, token_mask=mask))
    used = np.ones(len(logits), bool) if mask is None else mask
    for expert in range(logits.shape[1]):
        mine = np.flatnonzero((gating.expert_index[:, 0] == expert) & used)
        by_priority = mine[np.argsort(priority[mine], kind="stable")]
        kept = set(np.flatnonzero((gating.position[:, 0] >= 0) & (gating.expert_index[:, 0] == expert)))
        assert kept == set(by_priority[: gating.capacity])


@given(case=gating_cases())
def test_capacity_and_table_invariants(case):
    logits, k, capacity, mask, policy = case
    gating = topk_gating(logits, k, capacity, token_mask=mask, drop_policy=policy)
    kept = gating.position >= 0
    assert gating.position.max(initial=-1) < gating.capacity
    assert all(len(set(row)) == k for row in gating.expert_index.tolist())  # distinct experts per token
    for expert in range(logits.shape[1]):
        slots = np.sort(gating.position[kept & (gating.expert_index == expert)])
        np.testing.assert_array_equal(slots, np.arange(len(slots)))  # no expert over C; slots 0..n-1, unique
    assert np.all(gating.weight[~kept] == 0)
    if k >= 2:
        any_kept = kept.any(1)
        np.testing.assert_allclose(gating.weight[any_kept].sum(1), 1.0, rtol=1e-12)
    used = np.ones(len(logits), bool) if mask is None else mask
    if capacity is None:
        assert kept[used].all()  # dropless never drops


@given(case=gating_cases(masks=False), seed=seeds)
def test_a_masked_token_takes_no_capacity_no_weight_and_no_part_in_the_aux_loss(case, seed):
    """Routing a batch with padding equals routing its used tokens alone (at the same capacity)."""
    logits, k, capacity, _, policy = case
    mask = np.random.default_rng(seed).random(len(logits)) < 0.6
    capacity = capacity or len(logits)
    padded = topk_gating(logits, k, capacity, token_mask=mask, drop_policy=policy)
    alone = topk_gating(logits[mask], k, capacity, drop_policy=policy)
    assert np.all(padded.position[~mask] == -1) and np.all(padded.weight[~mask] == 0)
    np.testing.assert_array_equal(padded.position[mask], alone.position)
    np.testing.assert_allclose(padded.weight[mask], alone.weight, rtol=1e-12)
    np.testing.assert_array_equal(padded.tokens_per_expert, alone.tokens_per_expert)
    if mask.any():
        np.testing.assert_allclose(padded.aux_loss, alone.aux_loss, rtol=1e-12)
        np.testing.assert_allclose(padded.dropped, alone.dropped, rtol=1e-12, atol=1e-15)
    aux_grad = aux_loss_backward(1.0, padded)
    assert np.all(aux_grad[~mask] == 0)


@given(tokens=st.integers(1, 100_000), experts=st.integers(1, 512), k=st.integers(1, 4),
       factor=st.floats(0.05, 4.0, allow_nan=False), min_capacity=st.integers(0, 8))
def test_capacity_is_deepspeeds_float32_formula(tokens, experts, k, factor, min_capacity):
    """DeepSpeed's _capacity: ceil((T / E) * torch.tensor(factor * k)) with the factor a float32 tensor,
    so the product is a float32 product of two float32 numbers."""
    product = np.multiply(np.float32(tokens / experts), np.float32(factor * k), dtype=np.float32)
    assert expert_capacity(tokens, experts, k, factor, min_capacity) == max(min_capacity, int(np.ceil(product)))


def test_capacity_examples_where_float32_and_float64_differ():
    assert expert_capacity(100, 2, 1, 1.1, 0) == 55  # float64: ceil(55.000000000000007) = 56
    assert expert_capacity(25, 2, 1, 1.2, 0) == 16  # float64: ceil(15.0) = 15
    assert expert_capacity(100, 8, 1, 1.0, 4) == 13  # ceil(100 / 8)
    assert expert_capacity(100, 8, 2, 1.25, 4) == 32  # ceil(100 / 8 * 1.25 * 2)
    assert expert_capacity(10, 8, 1, 1.0, 4) == 4  # min_capacity
    logits = np.zeros((10, 4)) + np.arange(4.0)
    assert route(logits, MoESettings(k=1, min_capacity=0, drop_tokens=False)).capacity == 10


@pytest.mark.parametrize("policy", DROP_POLICIES)
def test_top_k_drop_policies_keep_the_right_choices(policy):
    """k = 3 over 4 experts, capacity 2: expert 0 is every token's first choice; "position" keeps the
    first two tokens, "probs" the two with the largest probability of expert 0."""
    logits = np.log(np.array([[0.4, 0.3, 0.2, 0.1], [0.5, 0.2, 0.2, 0.1], [0.7, 0.1, 0.1, 0.1],
                              [0.45, 0.35, 0.15, 0.05]]))
    gating = topk_gating(logits, 3, 2, drop_policy=policy)
    tokens_kept_by_expert_0 = np.argwhere((gating.expert_index == 0) & (gating.position >= 0))[:, 0]
    assert tokens_kept_by_expert_0.tolist() == ([0, 1] if policy == "position" else [1, 2])
    np.testing.assert_array_equal(gating.expert_index[:, 0], 0)  # the largest probability comes first


@given(case=gating_cases(max_experts=12, max_tokens=24), z_loss=st.booleans())
def test_gradients_of_weights_aux_loss_and_z_loss(case, z_loss):
    logits, k, capacity, mask, policy = case
    capacity_factor = 1.0 if capacity is None else capacity * logits.shape[1] / (k * len(logits))
    settings = MoESettings(k=k, capacity_factor=capacity_factor, eval_capacity_factor=capacity_factor,
                           min_capacity=0, drop_tokens=capacity is not None, drop_policy=policy,
                           z_loss_coef=1.0 if z_loss else 0.0)

    def differentiable_outputs(z):
        routing = route(z, settings, token_mask=mask)
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
    logits = case[0]
    settings = MoESettings(k=1, min_capacity=1, noisy_gate_policy=policy, use_rts=True)

    def weights(z):
        return route(z, settings, training=True).weight

    check_gradients(weights, [logits], before_each_call=lambda: backend.manual_seed(seed))


def test_second_expert_sampling_draws_from_the_softmax():
    """With Gumbel noise the second choice follows softmax over the other experts (2 experts left)."""
    backend.manual_seed(0)
    logits = np.tile(np.array([[5.0, np.log(3.0), 0.0]]), (20000, 1))
    routing = route(logits, MoESettings(k=2, capacity_factor=10.0, min_capacity=0), training=True)
    share = np.mean(routing.expert_index[:, 1] == 1)
    assert abs(share - 0.75) < 0.02  # p(e=1 | not e=0) = 3 / (3 + 1)


def test_evaluation_is_deterministic_unless_deepspeeds_eval_randomness_is_asked_for():
    """DeepSpeed keeps random token selection and second-expert sampling on when its gate is not
    training; minimoe does so only with eval_randomness."""
    logits = np.random.default_rng(0).standard_normal((400, 6))
    for k in (1, 2):
        outcomes = {}
        for randomness in (False, True):
            settings = MoESettings(k=k, capacity_factor=0.5, eval_capacity_factor=0.5, eval_randomness=randomness)
            runs = []
            for seed in (1, 2):
                backend.manual_seed(seed)
                runs.append(route(logits, settings, training=False).position)
            outcomes[randomness] = np.array_equal(*runs)
        assert outcomes == {False: True, True: False}, k


def test_noisy_scores_and_priorities_are_refused_beyond_top_2():
    with pytest.raises(ValueError, match="defined for k <= 2 only"):
        topk_gating(np.zeros((4, 5)), 3, None, priority=np.zeros(4))
    with pytest.raises(ValueError, match="k must lie in 1..E=3"):
        topk_gating(np.zeros((4, 3)), 4, None)
