"""AdamW, the learning-rate schedule and gradient clipping against the properties their formulas imply."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from minimoe.nn import Parameter
from minimoe.optim import AdamW, clip_scale, cosine_lr, global_grad_norm


@given(seed=st.integers(0, 2**32 - 1), lr=st.floats(1e-4, 1e-1))
def test_first_adam_step_moves_each_weight_by_lr_times_sign_of_gradient(seed, lr):
    """At step 1 the bias-corrected moments are g and g^2, so the update is lr * g / (|g| + eps)."""
    rng = np.random.default_rng(seed)
    parameter = Parameter(rng.standard_normal((3, 4)).astype(np.float64), decay=False)
    parameter.grad = rng.standard_normal((3, 4)) + np.sign(rng.standard_normal((3, 4))) * 0.1
    before = parameter.data.copy()
    AdamW([parameter], lr=lr, eps=1e-12).step()
    np.testing.assert_allclose(before - parameter.data, lr * np.sign(parameter.grad), rtol=1e-6)


def test_weight_decay_is_decoupled_and_skips_no_decay_parameters():
    decayed = Parameter(np.full(4, 2.0))
    kept = Parameter(np.full(4, 2.0), decay=False)
    for p in (decayed, kept):
        p.grad = np.zeros(4)
    AdamW([decayed, kept], lr=0.1, weight_decay=0.5).step()
    np.testing.assert_allclose(decayed.data, 2.0 * (1 - 0.1 * 0.5))  # zero gradient: only the decay acts
    np.testing.assert_allclose(kept.data, 2.0)


def test_grad_scale_equals_scaling_the_gradient():
    rng = np.random.default_rng(0)
    a, b = Parameter(rng.standard_normal(5)), Parameter(rng.standard_normal(5))
    b.data[:] = a.data
    grad = rng.standard_normal(5)
    a.grad, b.grad = grad * 0.25, grad
    opt_a, opt_b = AdamW([a], lr=0.01), AdamW([b], lr=0.01)
    for _ in range(3):
        opt_a.step()
        opt_b.step(grad_scale=0.25)
    np.testing.assert_allclose(a.data, b.data, rtol=1e-6)


def test_cosine_schedule_warms_up_linearly_then_decays_to_min():
    lrs = [cosine_lr(s, 1.0, 0.1, warmup_steps=10, decay_steps=100) for s in range(120)]
    np.testing.assert_allclose(lrs[:10], np.arange(1, 11) / 10)
    assert all(a >= b for a, b in zip(lrs[10:100], lrs[11:101]))
    assert abs(lrs[55] - 0.55) < 1e-12  # halfway through the decay: the mean of max and min
    assert lrs[100:] == [0.1] * 20


@given(seed=st.integers(0, 2**32 - 1), max_norm=st.floats(0.01, 10.0))
def test_clipping_brings_global_norm_to_at_most_max_norm(seed, max_norm):
    rng = np.random.default_rng(seed)
    params = [Parameter(np.zeros(s)) for s in (3, (2, 2), 7)]
    for p in params:
        p.grad = rng.standard_normal(p.shape) * 3
    norm = global_grad_norm(params)
    assert abs(norm - np.sqrt(sum((p.grad**2).sum() for p in params))) < 1e-4 * norm
    scaled = norm * clip_scale(norm, max_norm)
    assert scaled <= max_norm * (1 + 1e-6)
    if norm <= max_norm:
        assert clip_scale(norm, max_norm) == 1.0


@given(bad=st.sampled_from([np.nan, np.inf, -np.inf]), max_norm=st.sampled_from([0.0, 1.0]),
       where=st.sampled_from(["norm", "loss"]))
def test_a_non_finite_norm_or_loss_gives_a_nan_scale_and_the_update_changes_nothing(bad, max_norm, where):
    """The update's refusal, which CUDA graphs of the step rely on (the host reads the loss only after
    the update was launched): a NaN scale leaves weights, moments and the bf16-free state as they were."""
    rng = np.random.default_rng(0)
    parameter = Parameter(rng.standard_normal(6))
    parameter.grad = rng.standard_normal(6)
    norm, loss = (bad, 2.0) if where == "norm" else (3.0, bad)
    scale = clip_scale(np.float64(norm), max_norm, np.float64(loss))
    assert np.isnan(scale)
    optimizer = AdamW([parameter], lr=0.1)
    optimizer.step()  # a real first step, so that the moments are not zero
    state = [parameter.data.copy(), optimizer.exp_avg[0].copy(), optimizer.exp_avg_sq[0].copy()]
    optimizer.step(scale)
    for before, after in zip(state, [parameter.data, optimizer.exp_avg[0], optimizer.exp_avg_sq[0]]):
        np.testing.assert_array_equal(before, after)
    assert clip_scale(np.float64(1.0), max_norm, np.float64(2.0)) == 1.0  # finite and unclipped: 1
