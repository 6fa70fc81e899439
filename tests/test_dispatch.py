"""Dispatch and combine by the mapping table against GShard's one-hot einsum formulation, their
adjointness, and float64 gradients of the autograd ops."""

import numpy as np
from helpers import check_gradients
from hypothesis import given, settings
from hypothesis import strategies as st

from minimoe.cuda.dispatch import combine, combine_weight_grad, dispatch, launch_fill_slots, source_tokens
from minimoe.cuda.gating import topk_gating
from minimoe.moe.gate import Routing
from minimoe.moe.layer import Combine, Dispatch

seeds = st.integers(0, 2**32 - 1)


@st.composite
def tables(draw, max_tokens=40, max_experts=16, max_width=8):
    """A real gating table (drops included when the capacity is short) and rows x [T, d]."""
    k = draw(st.sampled_from([1, 2]))
    num_experts = draw(st.integers(k, max_experts))
    num_tokens = draw(st.integers(1, max_tokens))
    width = draw(st.integers(1, max_width))
    rng = np.random.default_rng(draw(seeds))
    capacity = draw(st.one_of(st.none(), st.integers(1, num_tokens)))
    gating = topk_gating(rng.standard_normal((num_tokens, num_experts)), k, capacity)
    x = rng.standard_normal((num_tokens, width))
    return gating, x, rng


def one_hot_dispatch_mask(gating, num_experts):
    """GShard / DeepSpeed's dispatch mask [T, E, C]: 1 where choice j of token t sits (dropped: nowhere)."""
    mask = np.zeros((len(gating.position), num_experts, gating.capacity))
    for t, j in zip(*np.nonzero(gating.position >= 0)):
        mask[t, gating.expert_index[t, j], gating.position[t, j]] = 1.0
    return mask


@given(case=tables())
def test_table_matches_one_hot_einsums(case):
    gating, x, rng = case
    num_experts = len(gating.tokens_per_expert)
    mask = one_hot_dispatch_mask(gating, num_experts)
    buffer = dispatch(x, gating.expert_index, gating.position, num_experts, gating.capacity)
    np.testing.assert_allclose(buffer, np.einsum("tec,td->ecd", mask, x), rtol=1e-12)
    combine_weights = np.zeros_like(mask)  # DeepSpeed's combine_weights: gate weight at the token's slot
    for t, j in zip(*np.nonzero(gating.position >= 0)):
        combine_weights[t, gating.expert_index[t, j], gating.position[t, j]] = gating.weight[t, j]
    out = rng.standard_normal(buffer.shape)
    np.testing.assert_allclose(combine(out, gating.expert_index, gating.position, gating.weight),
                               np.einsum("tec,ecd->td", combine_weights, out), rtol=1e-10, atol=1e-12)


@given(case=tables())
def test_combine_is_the_adjoint_of_dispatch(case):
    gating, x, rng = case
    num_experts = len(gating.tokens_per_expert)
    table = gating.expert_index, gating.position
    buffer = rng.standard_normal((num_experts, gating.capacity, x.shape[1]))
    scale = rng.standard_normal(gating.position.shape)
    for weights in (None, scale):
        left = np.sum(dispatch(x, *table, num_experts, gating.capacity, weights) * buffer)
        right = np.sum(x * combine(buffer, *table, weights))
        np.testing.assert_allclose(left, right, rtol=1e-10, atol=1e-10)


@given(k=st.sampled_from([1, 2]), num_experts=st.integers(2, 8), num_tokens=st.integers(1, 30),
       width=st.integers(1, 6), seed=seeds)
def test_dispatch_then_combine_without_drops_is_k_times_identity(k, num_experts, num_tokens, width, seed):
    rng = np.random.default_rng(seed)
    gating = topk_gating(rng.standard_normal((num_tokens, num_experts)), k, capacity=None)
    x = rng.standard_normal((num_tokens, width))
    buffer = dispatch(x, gating.expert_index, gating.position, num_experts, gating.capacity)
    # Unit weights add the k copies of each row back: the identity for k = 1.
    np.testing.assert_allclose(combine(buffer, gating.expert_index, gating.position), k * x, rtol=1e-12)
    filled = np.zeros((num_experts, gating.capacity), bool)
    filled[gating.expert_index.ravel(), gating.position.ravel()] = True
    assert np.all(buffer[~filled] == 0)  # slots no token fills are zero, never garbage


@given(case=tables(max_tokens=12, max_experts=6, max_width=4))
def test_dispatch_and_combine_gradients(case):
    gating, x, rng = case
    routing = Routing(gating.expert_index, gating.position, weight=None, capacity=gating.capacity,
                      tokens_per_expert=gating.tokens_per_expert, dropped=gating.dropped, aux_loss=None, z_loss=None)
    out = rng.standard_normal((len(gating.tokens_per_expert), gating.capacity, x.shape[1]))
    check_gradients(lambda t: Dispatch.apply(t, routing=routing), [x])
    check_gradients(lambda o, w: Combine.apply(o, w, routing=routing), [out, gating.weight.copy()])


def test_weight_gradient_is_the_dot_product_with_the_row_read():
    gating = topk_gating(np.array([[2.0, 0.0, -1.0], [0.0, 3.0, 1.0]]), 2, capacity=None)
    out = np.arange(3 * gating.capacity * 2, dtype=float).reshape(3, gating.capacity, 2)
    grad_y = np.array([[1.0, -1.0], [0.5, 2.0]])
    grad_w = combine_weight_grad(grad_y, out, gating.expert_index, gating.position)
    for t in range(2):
        for j in range(2):
            row = out[gating.expert_index[t, j], gating.position[t, j]]
            assert grad_w[t, j] == grad_y[t] @ row


@settings(max_examples=10)
@given(case=tables(max_tokens=6, max_experts=4, max_width=24), dtype=st.sampled_from([np.float32, np.float16]))
def test_numba_dispatch_kernel_matches_reference(case, dtype):
    """The Numba CUDA dispatch kernel (on the simulator where there is no GPU: NUMBA_ENABLE_CUDASIM=1)
    writes every slot, the empty ones as zeros: the buffer starts as NaN, so a missed word shows."""
    gating, x, _ = case
    num_experts = len(gating.tokens_per_expert)
    x = x.astype(dtype)
    buffer = np.full((num_experts * gating.capacity, x.shape[1]), np.nan, dtype=dtype)
    source = source_tokens(gating.expert_index, gating.position, num_experts, gating.capacity)
    launch_fill_slots(x, source, buffer)
    expected = dispatch(x, gating.expert_index, gating.position, num_experts, gating.capacity)
    np.testing.assert_array_equal(buffer, expected.reshape(buffer.shape))
