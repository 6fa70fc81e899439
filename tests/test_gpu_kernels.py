"""Every GPU kernel against its NumPy reference on Hypothesis-drawn shapes (marker `gpu`: skipped, with
the reason, where no GPU is usable).

Fresh random inputs each example; CuPy's memory pool is poisoned (every free byte set to 0xFF, which
is NaN in float32 and bf16 and -1 in int64, or to 0x7F, a huge value in all of them) before each
launch, so an output element a kernel fails to write shows as a mismatch.
Tolerances, as relative L2 errors against a float64 reference: float32 kernels 1e-5 (float32
rounding over sums of at most a few thousand terms); bf16 kernels 1e-2 (bf16 keeps 8 significant bits:
each stored value is off by up to 2^-9 relative, and the inputs themselves were rounded to bf16).
"""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.gpu
seeds = st.integers(0, 2**32 - 1)
dtypes = st.sampled_from(["float32", "bfloat16"])
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}


def cupy_module():
    import cupy

    return cupy


def poison_pool(byte: int) -> None:
    cupy = cupy_module()
    pool = cupy.get_default_memory_pool()
    pool.free_all_blocks()
    block = cupy.empty(256 << 20, dtype=cupy.uint8)
    block.fill(byte)
    del block  # back to the pool: the next allocations reuse these poisoned bytes


def to_gpu(array, dtype):
    """A device copy in `dtype`, and the host float64 values it actually holds (after bf16 rounding)."""
    import ml_dtypes

    cupy = cupy_module()
    host_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    rounded = np.asarray(array).astype(host_dtype)
    return cupy.asarray(rounded), rounded.astype(np.float64)


def to_host(array):
    return cupy_module().asnumpy(array).astype(np.float64)


def assert_close(actual, expected, dtype, what, scale=None):
    """Relative L2 error within the dtype's tolerance. For a sum whose terms cancel, pass `scale`, the
    same sum over the terms' absolute values: rounding error grows with the terms, not the result."""
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values (unwritten outputs?)"
    error = np.linalg.norm(actual - expected) / max(np.linalg.norm(expected if scale is None else scale), 1e-30)
    assert error <= TOLERANCE[dtype], f"{what}: relative error {error:.2e} > {TOLERANCE[dtype]:.0e} ({dtype})"


@given(batch=st.sampled_from([(), (1,), (3,), (2, 2)]), m=st.integers(1, 70), k=st.integers(1, 70),
       n=st.integers(1, 70), transpose_a=st.booleans(), transpose_b=st.booleans(), broadcast_b=st.booleans(),
       b_as_view=st.booleans(), dtype=dtypes, seed=seeds, poison=st.sampled_from([0xFF, 0x7F]))
def test_gemm_matches_reference(batch, m, k, n, transpose_a, transpose_b, broadcast_b, b_as_view, dtype, seed,
                                poison):
    """b_as_view: b given as the transposed view of a contiguous array (the tied output layer's
    weight.transpose()), which the kernel reads with the transpose flag flipped rather than copied."""
    from minimoe.cuda.gemm import matmul

    rng = np.random.default_rng(seed)
    a_host = rng.standard_normal((*batch, *((k, m) if transpose_a else (m, k))))
    b_shape = (k, n) if not transpose_b else (n, k)
    b_host = rng.standard_normal(b_shape if broadcast_b else (*batch, *b_shape))
    a, a_values = to_gpu(a_host, dtype)
    b, b_values = to_gpu(b_host, dtype)
    if b_as_view:
        b = cupy_module().ascontiguousarray(b.swapaxes(-1, -2)).swapaxes(-1, -2)
    poison_pool(poison)
    out = matmul(a, b, transpose_a, transpose_b)
    expected = matmul(a_values, b_values, transpose_a, transpose_b)
    assert out.shape == expected.shape and out.dtype == a.dtype
    assert_close(to_host(out), expected, dtype, "gemm")


@given(groups=st.integers(1, 4), rows=st.integers(1, 300), features=st.integers(1, 200), per_expert=st.booleans(),
       dtype=dtypes, seed=seeds, poison=st.sampled_from([0xFF, 0x7F]))
def test_bias_gelu_and_bias_add_match_reference(groups, rows, features, per_expert, dtype, seed, poison):
    from minimoe.cuda.bias_gelu import (
        bias_add_backward,
        bias_add_forward,
        bias_gelu_backward,
        bias_gelu_backward_recomputing,
        bias_gelu_forward,
    )

    rng = np.random.default_rng(seed)
    x, x_values = to_gpu(rng.standard_normal((groups, rows, features)) * 2, dtype)
    bias, bias_values = to_gpu(rng.standard_normal((groups, 1, features) if per_expert else (features,)), dtype)
    grad, grad_values = to_gpu(rng.standard_normal((groups, rows, features)), dtype)
    poison_pool(poison)
    y = bias_gelu_forward(x, bias)
    grad_x, grad_bias = bias_gelu_backward(grad, x, bias)
    expected_grad_x, expected_grad_bias = bias_gelu_backward(grad_values, x_values, bias_values)
    # float32 evaluates 1 + tanh(u) with cancellation where tanh(u) is near -1 (inputs below about -2):
    # the rounding is relative to the input's size there, not to the tiny result.
    pre = x_values + bias_values
    assert_close(to_host(y), bias_gelu_forward(x_values, bias_values), dtype, "bias_gelu forward",
                 scale=np.abs(pre))
    assert_close(to_host(grad_x), expected_grad_x, dtype, "bias_gelu grad x", scale=np.abs(grad_values))
    assert grad_bias.shape == bias.shape
    terms = np.abs(expected_grad_x)
    absolute_sum = terms.sum(axis=1, keepdims=True) if per_expert else terms.reshape(-1, features).sum(axis=0)
    assert_close(to_host(grad_bias), expected_grad_bias, dtype, "bias_gelu grad bias", scale=absolute_sum)

    # x already holding its bias (ops.MLP after cuBLASLt's epilogue): GELU alone, and the backward that
    # also recomputes the activation, bit for bit what the forward wrote
    poison_pool(poison)
    y = bias_gelu_forward(x, None)
    grad_x, grad_bias, recomputed = bias_gelu_backward_recomputing(grad, x, bias, biased=True)
    expected_grad_x, expected_grad_bias, expected_y = bias_gelu_backward_recomputing(grad_values, x_values, bias_values,
                                                                                     biased=True)
    assert_close(to_host(y), expected_y, dtype, "gelu forward", scale=np.abs(x_values))
    np.testing.assert_array_equal(to_host(recomputed), to_host(y))
    assert_close(to_host(grad_x), expected_grad_x, dtype, "gelu grad x (biased)", scale=np.abs(grad_values))
    assert_close(to_host(grad_bias), expected_grad_bias, dtype, "gelu grad bias (biased)",
                 scale=np.abs(grad_values).sum(axis=1, keepdims=True) if per_expert
                 else np.abs(grad_values).reshape(-1, features).sum(axis=0))
    _, _, recomputed = bias_gelu_backward_recomputing(grad, x, bias)
    np.testing.assert_array_equal(to_host(recomputed), to_host(bias_gelu_forward(x, bias)))

    poison_pool(poison)
    y = bias_add_forward(x, bias)
    grad_x, grad_bias = bias_add_backward(grad, bias)
    assert_close(to_host(y), x_values + bias_values, dtype, "bias add", scale=np.abs(x_values) + np.abs(bias_values))
    assert grad_x is grad and grad_bias.shape == bias.shape
    _, expected_grad_bias = bias_add_backward(grad_values, bias_values)
    terms = np.abs(grad_values)
    absolute_sum = terms.sum(axis=1, keepdims=True) if per_expert else terms.reshape(-1, features).sum(axis=0)
    assert_close(to_host(grad_bias), expected_grad_bias, dtype, "bias add grad bias", scale=absolute_sum)


@given(tokens=st.integers(1, 300), width=st.integers(1, 300), num_experts=st.one_of(st.integers(1, 20),
       st.sampled_from([64, 100])), misaligned=st.booleans(), dtype=dtypes, seed=seeds,
       poison=st.sampled_from([0xFF, 0x7F]))
def test_gate_logits_and_backward_match_reference(tokens, width, num_experts, misaligned, dtype, seed, poison):
    """float32 logits from bf16 or float32 x, and both gradients (grad x in x's dtype); E across several
    passes of 8 experts, with a tail; a weight that does not start 16-byte aligned takes the scalar loads;
    T across several token tiles of the weight gradient."""
    from minimoe.cuda.gating import gate_logits, gate_logits_backward

    cupy = cupy_module()
    rng = np.random.default_rng(seed)
    x, x_values = to_gpu(rng.standard_normal((tokens, width)), dtype)
    flat = rng.standard_normal(width * num_experts + 1).astype(np.float32)
    # misaligned: a contiguous weight that starts 4 bytes into its allocation
    weight = cupy.asarray(flat)[misaligned:misaligned + width * num_experts].reshape(width, num_experts)
    weight_values = cupy.asnumpy(weight).astype(np.float64)
    grad = cupy.asarray(rng.standard_normal((tokens, num_experts)).astype(np.float32))
    grad_values = to_host(grad)
    poison_pool(poison)
    logits = gate_logits(x, weight)
    grad_x, grad_weight = gate_logits_backward(grad, x, weight)
    assert logits.dtype == cupy.float32 and logits.shape == (tokens, num_experts)
    assert_close(to_host(logits), x_values @ weight_values, "float32", "gate logits",
                 scale=np.abs(x_values) @ np.abs(weight_values))
    last = tokens - 1  # a token's logits are the same bits alone as among the others (decode batches need it)
    np.testing.assert_array_equal(to_host(gate_logits(x[last:], weight)), to_host(logits[last:]))
    assert grad_x.dtype == x.dtype and grad_weight.dtype == cupy.float32 and grad_weight.shape == weight.shape
    assert_close(to_host(grad_x), grad_values @ weight_values.T, dtype, "gate logits grad x",
                 scale=np.abs(grad_values) @ np.abs(weight_values.T))
    assert_close(to_host(grad_weight), x_values.T @ grad_values, "float32", "gate logits grad weight",
                 scale=np.abs(x_values.T) @ np.abs(grad_values))


@st.composite
def gating_inputs(draw):
    k = draw(st.sampled_from([1, 2, 1, 2, 3, 4]))  # k >= 3: the reference itself on CuPy arrays
    num_experts = draw(st.one_of(st.integers(k, 64), st.sampled_from([100, 257, 512])))  # 1 to 32 lanes per token
    num_tokens = draw(st.integers(1, 3000))  # tiles of 64 tokens and more, T not a multiple of a tile
    rng = np.random.default_rng(draw(seeds))
    logits = (rng.standard_normal((num_tokens, num_experts)) * draw(st.sampled_from([0.5, 2.0]))).astype(np.float32)
    capacity = draw(st.one_of(st.none(), st.integers(1, max(1, 2 * num_tokens * k // num_experts))))
    extras = {}
    if k <= 2 and draw(st.booleans()):
        noise = rng.gumbel(size=logits.shape).astype(np.float32)
        extras["first_scores" if k == 1 else "second_scores"] = logits + noise
    if k == 1 and draw(st.booleans()):
        extras["priority"] = rng.random(num_tokens).astype(np.float32)
    if draw(st.booleans()):  # padding: a token mask
        extras["token_mask"] = rng.random(num_tokens) < draw(st.sampled_from([0.1, 0.7]))
    if k >= 3:
        extras["drop_policy"] = draw(st.sampled_from(["probs", "position"]))
    return logits, k, capacity, extras


def check_gating_on_gpu(logits, k, capacity, extras, poison) -> None:
    """The GPU gating of these inputs equals the NumPy reference's."""
    from minimoe.cuda.dispatch import source_tokens
    from minimoe.cuda.gating import topk_gating

    cupy = cupy_module()
    expected = topk_gating(logits, k, capacity, **extras)
    poison_pool(poison)
    actual = topk_gating(cupy.asarray(logits), k, capacity,
                         **{n: v if isinstance(v, str) else cupy.asarray(v) for n, v in extras.items()})
    assert actual.capacity == expected.capacity
    for name in ("expert_index", "position", "tokens_per_expert"):
        np.testing.assert_array_equal(cupy.asnumpy(getattr(actual, name)), getattr(expected, name), err_msg=name)
    for name in ("probs", "weight", "choice_fraction", "aux_loss", "dropped", "used_tokens"):
        np.testing.assert_allclose(cupy.asnumpy(getattr(actual, name)), getattr(expected, name), rtol=2e-5,
                                   atol=1e-7, err_msg=name)
    if capacity is not None and k <= 2:  # the kernel's inverse table against the reference table's inverse
        inverse = source_tokens(expected.expert_index, expected.position, logits.shape[1], capacity)
        np.testing.assert_array_equal(cupy.asnumpy(actual.source_token), inverse, err_msg="source_token")


@given(case=gating_inputs(), poison=st.sampled_from([0xFF, 0x7F]))
def test_gating_matches_reference(case, poison):
    logits, k, capacity, extras = case
    check_gating_on_gpu(logits, k, capacity, extras, poison)


@pytest.mark.parametrize("k, capacity_factor, rts",
                         [(1, 0.9, False), (1, 0.9, True), (2, None, False), (2, 1.2, False)])
def test_gating_with_tiles_longer_than_a_block(k, capacity_factor, rts):
    """So many tokens that each block's tile takes several ranking rounds of ROUTE_THREADS entries."""
    from minimoe.cuda.gating import ROUTE_THREADS, _route_launch

    num_experts = 64
    blocks = _route_launch(num_experts, cupy_module().cuda.runtime.getDevice()).most_blocks
    num_tokens = 2 * ROUTE_THREADS * blocks + 123
    rng = np.random.default_rng(num_tokens)
    logits = rng.standard_normal((num_tokens, num_experts)).astype(np.float32)
    extras = {"priority": rng.random(num_tokens).astype(np.float32)} if rts else {}
    capacity = None if capacity_factor is None else int(num_tokens * k / num_experts * capacity_factor)
    check_gating_on_gpu(logits, k, capacity, extras, 0xFF)


def test_gating_of_logits_not_16_byte_aligned():
    """E = 64 allows 16-byte loads, but these rows start 4 bytes past an aligned address: the kernel must
    take its scalar path (a misaligned vector load would fault)."""
    from minimoe.cuda.gating import topk_gating

    cupy = cupy_module()
    num_tokens, num_experts = 1000, 64
    logits = np.random.default_rng(0).standard_normal((num_tokens, num_experts)).astype(np.float32)
    shifted = cupy.empty(num_tokens * num_experts + 1, dtype=cupy.float32)[1:].reshape(num_tokens, num_experts)
    shifted[...] = cupy.asarray(logits)
    assert shifted.data.ptr % 16 != 0
    expected = topk_gating(logits, 2, 40)
    np.testing.assert_array_equal(cupy.asnumpy(topk_gating(shifted, 2, 40).position), expected.position)


@given(case=gating_inputs(), seed=seeds, through=st.sampled_from(["weights", "balancing", "both"]),
       poison=st.sampled_from([0xFF, 0x7F]))
def test_gate_route_backward_matches_reference(case, seed, through, poison):
    """The routing's backward to the logits from the combine weights' gradient, the load-balancing loss's,
    or both (one launch for k <= 2; padding tokens take no balancing gradient)."""
    from minimoe.cuda.gating import (
        aux_loss_backward,
        aux_weight,
        gate_route_backward,
        gate_weight_backward,
        topk_gating,
    )

    cupy = cupy_module()
    logits, k, capacity, extras = case
    expected_gating = topk_gating(logits.astype(np.float64), k, capacity, **extras)
    gating = topk_gating(cupy.asarray(logits), k, capacity,
                         **{n: v if isinstance(v, str) else cupy.asarray(v) for n, v in extras.items()})
    rng = np.random.default_rng(seed)
    grad = rng.standard_normal((len(logits), k)).astype(np.float32) if through != "balancing" else None
    grad_aux = np.float32(rng.standard_normal()) if through != "weights" else None
    poison_pool(poison)
    actual = cupy.asnumpy(gate_route_backward(None if grad is None else cupy.asarray(grad),
                                              None if grad_aux is None else cupy.asarray(grad_aux), gating))
    expected, scale = np.zeros(logits.shape), np.zeros(logits.shape)
    if grad is not None:
        expected += gate_weight_backward(grad.astype(np.float64), expected_gating)
        scale += np.abs(expected)
    if grad_aux is not None:
        expected += aux_loss_backward(np.float64(grad_aux), expected_gating)
        # p (c - sum_e c_e p_e) with one row c for every used token cancels: measure against its terms
        probs, used = expected_gating.probs, extras.get("token_mask", np.ones(len(logits), bool))[:, None]
        row = np.abs(grad_aux * aux_weight(k, logits.shape[1]) / max(float(expected_gating.used_tokens), 1.0)
                     * expected_gating.choice_fraction)
        scale += used * probs * (row + (row * probs).sum(axis=1, keepdims=True))
    assert_close(actual.astype(np.float64), expected, "float32", f"gate route backward through {through}", scale=scale)


@given(k=st.sampled_from([1, 2]), num_experts=st.integers(2, 16), num_tokens=st.integers(1, 400),
       width=st.sampled_from([1, 3, 8, 24, 64, 136, 1000]), capacity_share=st.sampled_from([0.3, 1.0, None]),
       dtype=dtypes, seed=seeds, poison=st.sampled_from([0xFF, 0x7F]))
def test_dispatch_and_combine_match_reference(k, num_experts, num_tokens, width, capacity_share, dtype, seed, poison):
    from minimoe.cuda.dispatch import combine, combine_backward, dispatch
    from minimoe.cuda.gating import topk_gating

    cupy = cupy_module()
    rng = np.random.default_rng(seed)
    capacity = None if capacity_share is None else max(1, int(capacity_share * num_tokens * k / num_experts))
    gating = topk_gating(rng.standard_normal((num_tokens, num_experts)), k, capacity)
    table = gating.expert_index, gating.position
    gpu_table = tuple(cupy.asarray(a) for a in table)
    x, x_values = to_gpu(rng.standard_normal((num_tokens, width)), dtype)
    grad_y, grad_y_values = to_gpu(rng.standard_normal((num_tokens, width)), dtype)
    weight = gating.weight.astype(np.float32)
    poison_pool(poison)
    buffer = dispatch(x, *gpu_table, num_experts, gating.capacity)
    expected_buffer = dispatch(x_values, *table, num_experts, gating.capacity)
    np.testing.assert_array_equal(to_host(buffer), expected_buffer)  # a copy: bit-exact, zeros included
    y = combine(buffer, *gpu_table, cupy.asarray(weight))
    assert_close(to_host(y), combine(expected_buffer, *table, weight), dtype, "combine")
    unit = combine(buffer, *gpu_table)
    assert_close(to_host(unit), combine(expected_buffer, *table), dtype, "combine with unit weights")
    grad_buffer, grad_weight = combine_backward(grad_y, buffer, *gpu_table, cupy.asarray(weight))
    expected_grad_buffer, expected_grad_weight = combine_backward(grad_y_values, expected_buffer, *table, weight)
    assert_close(to_host(grad_buffer), expected_grad_buffer, dtype, "combine backward: buffer")
    assert_close(to_host(grad_weight), expected_grad_weight, dtype, "combine backward: weight")


def test_dispatch_and_combine_of_nothing():
    """The dropless expert-parallel exchange may send or receive no rows: an empty table dispatches into
    an all-zero buffer (or an empty one), and combines into no rows, with no launch out of bounds."""
    from minimoe.cuda.dispatch import combine, combine_backward, dispatch

    cupy = cupy_module()
    no_rows = cupy.empty((0, 1), dtype=cupy.int64)
    x = cupy.ones((0, 64), dtype=cupy.float32)
    assert not to_host(dispatch(x, no_rows, no_rows, 3, 5)).any()
    assert dispatch(x, no_rows, no_rows, 3, 0).shape == (3, 0, 64)
    buffer = cupy.ones((3, 5, 64), dtype=cupy.float32)
    assert combine(buffer, no_rows, no_rows).shape == (0, 64)
    grad_buffer, grad_weight = combine_backward(x, buffer, no_rows, no_rows, cupy.ones((0, 1), cupy.float32))
    assert not to_host(grad_buffer).any() and grad_weight.shape == (0, 1)
    cupy.cuda.Device().synchronize()  # an illegal access would surface here


@pytest.mark.parametrize("k, residual", [(1, False), (2, True)])
def test_moe_layer_on_gpu_matches_cpu_in_float32(k, residual):
    """Forward and every gradient of a training-mode MoE layer (eval-mode routing, so no noise) on the
    GPU path against the NumPy path with the same weights."""
    from minimoe import backend
    from minimoe.moe.gate import MoESettings
    from minimoe.moe.layer import MoE
    from minimoe.tensor import Tensor

    cupy = cupy_module()
    rng = np.random.default_rng(k)
    settings = MoESettings(k=k, capacity_factor=0.8, eval_capacity_factor=0.8, min_capacity=1)
    layers = {}
    for device in ("cpu", "cuda"):
        backend.set_device(device)
        layers[device] = MoE(64, 128, 8, settings, np.random.default_rng(0), 0.02, residual=residual).eval()
    backend.set_device("cpu")
    x = rng.standard_normal((500, 64)).astype(np.float32)
    grad = rng.standard_normal((500, 64)).astype(np.float32)
    results = {}
    for device, xp in (("cpu", np), ("cuda", cupy)):
        layer = layers[device]
        inputs = Tensor(xp.asarray(x), requires_grad=True)
        y, routing = layer(inputs)
        ((y * xp.asarray(grad)).sum() + routing.aux_loss).backward()
        results[device] = [y.data, inputs.grad] + [p.grad for p in layer.parameters()]
    for cpu, gpu in zip(results["cpu"], results["cuda"]):
        assert_close(to_host(gpu), cpu.astype(np.float64), "float32", "MoE layer output or gradient")


@given(rows=st.integers(1, 300), width=st.sampled_from([8, 20, 24, 64, 200, 768]),
       features=st.sampled_from([8, 40, 64, 3072]), dtype=dtypes, seed=seeds, poison=st.sampled_from([0xFF, 0x7F]))
def test_linear_epilogue_matches_reference(rows, width, features, dtype, seed, poison):
    """cuda/epilogue.py's product with its bias (the bias in cuBLASLt's epilogue, the bias gradient in
    the weight gradient's, where cuBLASLt has an algorithm; else the product and cuda/bias_gelu.py's
    kernels) against the float64 reference: y, then the gradients of x, weight and bias."""
    from minimoe.cuda import epilogue

    rng = np.random.default_rng(seed)
    x, x_values = to_gpu(rng.standard_normal((rows, width)), dtype)
    weight, weight_values = to_gpu(rng.standard_normal((width, features)) / width**0.5, dtype)
    bias, bias_values = to_gpu(rng.standard_normal(features), dtype)
    grad, grad_values = to_gpu(rng.standard_normal((rows, features)), dtype)
    poison_pool(poison)
    y = epilogue.linear_forward(x, weight, bias)
    assert_close(to_host(y), epilogue.linear_forward(x_values, weight_values, bias_values), dtype, "linear output")
    poison_pool(poison)
    grads = epilogue.linear_backward(grad, x, weight, bias)
    expected = epilogue.linear_backward(grad_values, x_values, weight_values, bias_values)
    magnitude = np.abs(grad_values)  # the scales of the sums that cancel
    scales = (magnitude @ np.abs(weight_values).T, np.abs(x_values).T @ magnitude, magnitude.sum(axis=0))
    for name, actual, expected_grad, scale in zip(("x", "weight", "bias"), grads, expected, scales):
        assert actual.shape == expected_grad.shape
        assert_close(to_host(actual), expected_grad, dtype, f"linear grad {name}", scale=scale)


def test_linear_epilogue_runs_in_cublaslt_at_the_models_shapes():
    """At bench train-step's layer shapes, bf16, cuBLASLt has algorithms for both epilogues: the fused
    path runs (else the test above would pass on the fallback alone)."""
    from minimoe.backend import bfloat16
    from minimoe.cuda import epilogue

    cupy = cupy_module()
    x, weight, bias = (cupy.ones(shape, dtype=bfloat16()) for shape in ((64, 768), (768, 3072), (3072,)))
    product, has_bias = epilogue.biased_product(x, weight, bias)
    assert has_bias
    grad_y = cupy.ones(product.shape, product.dtype)
    assert epilogue._plan(grad_y, x, weight, epilogue.EPILOGUE_BGRADA, forward=False) is not None


@given(batched=st.booleans(), groups=st.integers(1, 3), rows=st.integers(1, 70), width=st.sampled_from([20, 64]),
       hidden=st.sampled_from([24, 256]), seed=seeds, poison=st.sampled_from([0xFF, 0x7F]))
def test_mlp_op_matches_reference(batched, groups, rows, width, hidden, seed, poison):
    """ops.mlp in bf16 on the GPU (dense: the biases in cuBLASLt's epilogue where the widths allow;
    batched experts: the kernels) against the same op in float64 on the host: output and all five
    gradients, the backward recomputing the GELU the forward did not keep."""
    from minimoe import ops
    from minimoe.tensor import Tensor

    rng = np.random.default_rng(seed)
    experts = (groups,) if batched else ()
    shapes = ((groups, rows, width), (*experts, width, hidden), (*experts, 1, hidden) if batched else (hidden,),
              (*experts, hidden, width), (*experts, 1, width) if batched else (width,))
    scales = (1.0, width**-0.5, 1.0, hidden**-0.5, 1.0)
    pairs = [to_gpu(rng.standard_normal(shape) * scale, "bfloat16") for shape, scale in zip(shapes, scales)]
    grad, grad_values = to_gpu(rng.standard_normal((groups, rows, width)), "bfloat16")
    results = []
    for arrays, upstream in (([device for device, _ in pairs], grad), ([host for _, host in pairs], grad_values)):
        poison_pool(poison)
        tensors = [Tensor(a, requires_grad=True) for a in arrays]
        out = ops.mlp(*tensors)
        (out * Tensor(upstream)).sum().backward()
        results.append([out.data] + [t.grad for t in tensors])
    for name, actual, expected in zip(("out", "x", "fc weight", "fc bias", "proj weight", "proj bias"), *results):
        assert actual.shape == expected.shape
        assert_close(to_host(actual), expected, "bfloat16", f"mlp {name}")


@given(rows=st.integers(1, 300), width=st.sampled_from([1, 7, 8, 64, 130, 300, 512, 768, 1024, 2000]), dtype=dtypes,
       seed=seeds, residual=st.booleans(), poison=st.sampled_from([0xFF, 0x7F]))
def test_layernorm_matches_reference(rows, width, dtype, seed, residual, poison):
    """LayerNorm forward and backward; with `residual`, fused with the residual add before it (the sum
    as a separate add would round it, and the sum's other gradient added into grad x)."""
    from minimoe.cuda.layernorm import add_layernorm_forward, layernorm_backward, layernorm_forward

    rng = np.random.default_rng(seed)
    x, x_values = to_gpu(rng.standard_normal((rows, width)) * 3 + 1, dtype)
    addend, addend_values = to_gpu(rng.standard_normal((rows, width)), dtype)
    weight, weight_values = to_gpu(rng.standard_normal(width), dtype)
    bias, bias_values = to_gpu(rng.standard_normal(width), dtype)
    grad, grad_values = to_gpu(rng.standard_normal((rows, width)), dtype)
    grad_sum, grad_sum_values = to_gpu(rng.standard_normal((rows, width)), dtype) if residual else (None, None)
    poison_pool(poison)
    if residual:
        total, y, mean, rstd = add_layernorm_forward(x, addend, weight, bias, 1e-5)
        # the float32 sum rounded to the dtype, as the kernel (and a separate add) rounds it
        normalised = to_gpu(x_values.astype(np.float32) + addend_values.astype(np.float32), dtype)[1]
        np.testing.assert_array_equal(to_host(total), normalised)
    else:
        normalised, (y, mean, rstd) = x_values, layernorm_forward(x, weight, bias, 1e-5)
    grad_x, grad_weight, grad_bias = layernorm_backward(grad, total if residual else x, weight, mean, rstd, grad_sum)
    expected_y, expected_mean, expected_rstd = layernorm_forward(normalised, weight_values, bias_values, 1e-5)
    expected = layernorm_backward(grad_values, normalised, weight_values, expected_mean, expected_rstd,
                                  grad_sum_values)
    assert_close(to_host(y), expected_y, dtype, "layernorm y")
    np.testing.assert_allclose(to_host(mean), expected_mean, rtol=1e-5, atol=1e-6)  # float32 statistics
    np.testing.assert_allclose(to_host(rstd), expected_rstd, rtol=1e-4)
    # grad_x = rstd * (g - mean(g) - xhat mean(g xhat)) cancels (exactly 0 for width 1): measure the
    # error against the size of its terms.
    scale = np.abs(grad_values * weight_values) * expected_rstd + (0 if grad_sum is None else np.abs(grad_sum_values))
    assert_close(to_host(grad_x), expected[0], dtype, "layernorm grad x", scale=scale)
    scale = np.abs(grad_values * (normalised - expected_mean) * expected_rstd).sum(0)
    assert_close(to_host(grad_weight), expected[1], dtype, "layernorm grad weight", scale=scale)
    assert_close(to_host(grad_bias), expected[2], dtype, "layernorm grad bias", scale=np.abs(grad_values).sum(0))


@given(rows=st.integers(1, 200), vocab=st.sampled_from([2, 50, 256, 1000, 50257]), dtype=dtypes, seed=seeds,
       ignored=st.floats(0.0, 1.0), in_place=st.booleans(), poison=st.sampled_from([0xFF, 0x7F]))
def test_cross_entropy_matches_reference(rows, vocab, dtype, seed, ignored, in_place, poison):
    """in_place: the gradient written over the logits (out=logits), as the model's training loss does."""
    from minimoe.cuda.softmax_xent import cross_entropy_backward, cross_entropy_forward

    cupy = cupy_module()
    rng = np.random.default_rng(seed)
    logits, logits_values = to_gpu(rng.standard_normal((rows, vocab)) * 2, dtype)
    targets = rng.integers(0, vocab, rows)
    targets[rng.random(rows) < ignored] = -100
    poison_pool(poison)
    loss, logsumexp = cross_entropy_forward(logits, cupy.asarray(targets), -100)
    grad = cross_entropy_backward(cupy.asarray(np.float32(0.7)), logits, cupy.asarray(targets), logsumexp, -100,
                                  out=logits if in_place else None)
    assert (grad is logits) == in_place
    expected_loss, expected_logsumexp = cross_entropy_forward(logits_values, targets, -100)
    expected_grad = cross_entropy_backward(0.7, logits_values, targets, expected_logsumexp, -100)
    np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5, atol=1e-6)  # float32 arithmetic in both
    # __logf's absolute error is ~1e-7, so a logsumexp near 0 needs an absolute tolerance too.
    np.testing.assert_allclose(to_host(logsumexp), expected_logsumexp, rtol=1e-5, atol=1e-6)
    assert_close(to_host(grad), expected_grad, dtype, "cross-entropy gradient")


@given(sizes=st.lists(st.sampled_from([1, 3, 1000, 70_001]), min_size=1, max_size=4), step=st.integers(1, 50),
       seed=seeds, data=st.data())
def test_multi_tensor_adamw_and_grad_norm_match_reference(sizes, step, seed, data):
    """One launch over several tensors (one larger than a chunk), float32 and bf16 gradients, with and
    without bf16 working copies, a device clip factor, some tensors' arrays one element off 16-byte
    alignment (the kernel's element-at-a-time path); against adamw_step per tensor on the host."""
    from minimoe.cuda.adamw import adamw_update, hyperparameters, sum_of_squares

    cupy = cupy_module()
    rng = np.random.default_rng(seed)
    kinds = [data.draw(st.sampled_from(["float32", "bfloat16"])) for _ in sizes]
    host = {name: [rng.standard_normal(n).astype(np.float32) for n in sizes] for name in ("value", "m")}
    host["v"] = [np.abs(rng.standard_normal(n)).astype(np.float32) for n in sizes]
    grads = [to_gpu(rng.standard_normal(n), kind) for n, kind in zip(sizes, kinds)]
    decays = [float(d) for d in rng.choice([0.0, 0.1], len(sizes))]
    shifts = [data.draw(st.sampled_from([0, 1])) for _ in sizes]  # 1: a view one float32 past an allocation
    device = {name: [cupy.concatenate([cupy.zeros(shift, cupy.float32), cupy.asarray(a)])[shift:]
                     for a, shift in zip(arrays, shifts)] for name, arrays in host.items()}
    from minimoe.backend import bfloat16

    working = [cupy.empty(n, dtype=bfloat16()) if kind == "bfloat16" else None for n, kind in zip(sizes, kinds)]
    hyper = hyperparameters(1e-2, 0.9, 0.95, step)
    constants = dict(beta1=0.9, beta2=0.95, eps=1e-8)
    norm = float(cupy.sqrt(sum_of_squares([g for g, _ in grads])))
    expected_norm = np.sqrt(sum((values ** 2).sum() for _, values in grads))
    np.testing.assert_allclose(norm, expected_norm, rtol=1e-5)
    adamw_update(device["value"], [g for g, _ in grads], device["m"], device["v"], working, decays,
                 hyper=cupy.asarray(hyper), grad_scale=cupy.asarray(0.5, dtype=cupy.float32), **constants)
    adamw_update(host["value"], [values.astype(np.float32) for _, values in grads], host["m"], host["v"],
                 [None] * len(sizes), decays, hyper=hyper, grad_scale=0.5, **constants)
    for name in ("value", "m", "v"):
        for actual, expected in zip(device[name], host[name]):
            np.testing.assert_allclose(cupy.asnumpy(actual), expected, rtol=2e-5, atol=1e-6, err_msg=name)
    for copy, value in zip(working, device["value"]):
        if copy is not None:  # the working copy is the updated master rounded to bf16 (to nearest, ties to even)
            np.testing.assert_array_equal(to_host(copy), cupy.asnumpy(value).astype(bfloat16()).astype(np.float64))


@given(batch=st.integers(1, 2), heads=st.integers(1, 3), length=st.sampled_from([1, 5, 63, 64, 65, 200, 300]),
       width=st.sampled_from([16, 32, 48, 64]), packed=st.booleans(), seed=seeds, poison=st.sampled_from([0xFF, 0x7F]))
@example(batch=1, heads=2, length=300, width=64, packed=True, seed=1, poison=0xFF)  # the model's width, many tiles
@example(batch=2, heads=1, length=200, width=64, packed=False, seed=2, poison=0x7F)
def test_flash_attention_matches_reference(batch, heads, length, width, packed, seed, poison):
    """The flash-attention kernels (bf16) against the float64 recurrence: out, lse and the three
    gradients, over one query block and several, with partial last blocks; with `packed`, q, k, v read in
    place from one [B, T, 3, H, D], out written into a [B, T, H, D] and the gradients into one packed
    [B, T, 3, H, D], as the model's attention runs them (poisoned, so an unwritten element shows)."""
    check_flash_attention(batch, heads, length, width, packed, seed, poison)


@settings(max_examples=10)
@given(batch=st.integers(1, 2), heads=st.integers(1, 3), length=st.sampled_from([5, 64, 65, 200]),
       width=st.sampled_from([16, 32, 48, 64]), packed=st.booleans(), seed=seeds, poison=st.sampled_from([0xFF, 0x7F]))
@example(batch=1, heads=2, length=300, width=64, packed=True, seed=3, poison=0xFF)
def test_flash_attention_on_mma_sync_matches_reference(batch, heads, length, width, packed, seed, poison):
    """The same check with cuda/flash_attention.cu compiled for the device's plain target: on Hopper the
    kernels otherwise run as wgmma (build.py compiles the file for sm_90a), and their mma.sync form, the
    one every other GPU runs, would go untested there."""
    from minimoe.cuda import build

    def forget_compiled() -> None:
        build.load_module.cache_clear()
        build.kernel.cache_clear()

    saved = set(build._ARCHITECTURE_SPECIFIC)
    build._ARCHITECTURE_SPECIFIC.discard("flash_attention.cu")
    forget_compiled()
    try:
        check_flash_attention(batch, heads, length, width, packed, seed, poison)
    finally:
        build._ARCHITECTURE_SPECIFIC.update(saved)
        forget_compiled()


def check_flash_attention(batch, heads, length, width, packed, seed, poison):
    from minimoe.cuda.attention import causal_attention_forward
    from minimoe.cuda.flash_attention import flash_attention_backward, flash_attention_forward, heads_of

    cupy = cupy_module()
    rng = np.random.default_rng(seed)
    if packed:
        qkv, qkv_values = to_gpu(rng.standard_normal((batch, length, 3, heads, width)), "bfloat16")
        (q, k, v), (q_values, k_values, v_values) = heads_of(qkv), heads_of(qkv_values)
        grad, grad_values = to_gpu(rng.standard_normal((batch, length, heads, width)), "bfloat16")
        grad, grad_values = grad.transpose(0, 2, 1, 3), grad_values.transpose(0, 2, 1, 3)
    else:
        (q, q_values), (k, k_values), (v, v_values), (grad, grad_values) = (
            to_gpu(rng.standard_normal((batch, heads, length, width)), "bfloat16") for _ in range(4))
    poison_pool(poison)
    out = cupy.empty((batch, length, heads, width), dtype=q.dtype).transpose(0, 2, 1, 3) if packed else None
    out, lse = flash_attention_forward(q, k, v, out=out)
    expected_out, expected_lse = flash_attention_forward(q_values, k_values, v_values)
    assert_close(to_host(out), expected_out, "bfloat16", "flash attention output")
    assert_close(to_host(lse), expected_lse, "bfloat16", "flash attention log-sum-exp")
    poison_pool(poison)
    grads = heads_of(cupy.empty((batch, length, 3, heads, width), dtype=q.dtype)) if packed else None
    grads = flash_attention_backward(grad, q, k, v, out, lse, grads=grads)
    expected_grads = flash_attention_backward(grad_values, q_values, k_values, v_values, expected_out, expected_lse)
    # The gradients are sums that cancel (with one key, dq is exactly 0: ds = p (dp - delta) with dp = delta):
    # measure their error against the same sums over the terms' magnitudes.
    probs = causal_attention_forward(q_values, k_values, v_values)[1]
    delta = np.abs((grad_values * expected_out).sum(-1))[..., None]
    terms = probs * (np.abs(grad_values) @ np.abs(v_values).swapaxes(-1, -2) + delta) / width**0.5
    scales = (terms @ np.abs(k_values), terms.swapaxes(-1, -2) @ np.abs(q_values),
              probs.swapaxes(-1, -2) @ np.abs(grad_values))
    for name, actual, expected, scale in zip(("q", "k", "v"), grads, expected_grads, scales):
        assert_close(to_host(actual), expected, "bfloat16", f"flash attention grad {name}", scale=scale)


@given(batch=st.integers(1, 3), heads=st.integers(1, 3), length=st.sampled_from([1, 5, 33, 64, 200]),
       width=st.sampled_from([8, 16, 64]), dtype=dtypes, seed=seeds, poison=st.sampled_from([0xFF, 0x7F]))
def test_causal_attention_matches_reference(batch, heads, length, width, dtype, seed, poison):
    from minimoe.cuda.attention import causal_attention_backward, causal_attention_forward

    rng = np.random.default_rng(seed)
    (q, q_values), (k, k_values), (v, v_values), (grad, grad_values) = (
        to_gpu(rng.standard_normal((batch, heads, length, width)), dtype) for _ in range(4))
    poison_pool(poison)
    out, probs = causal_attention_forward(q, k, v)
    grads = causal_attention_backward(grad, q, k, v, probs)
    expected_out, expected_probs = causal_attention_forward(q_values, k_values, v_values)
    expected_grads = causal_attention_backward(grad_values, q_values, k_values, v_values, expected_probs)
    assert_close(to_host(probs), expected_probs, dtype, "attention probabilities")
    assert_close(to_host(out), expected_out, dtype, "attention output")
    for name, actual, expected in zip(("q", "k", "v"), grads, expected_grads):
        assert_close(to_host(actual), expected, dtype, f"attention grad {name}")


@given(groups=st.integers(1, 9), parts=st.integers(0, 300), width=st.integers(1, 2000), dtype=dtypes, seed=seeds,
       poison=st.sampled_from([0xFF, 0x7F]))
def test_sum_partials_matches_reference(groups, parts, width, dtype, seed, poison):
    """The second stage of the parameter gradients: float32 partial sums added over their middle axis and
    written in the parameter's dtype (no parts: zeros), against NumPy's sum in float64."""
    from minimoe.backend import bfloat16
    from minimoe.cuda.partial_sums import sum_partials

    partial = np.random.default_rng(seed).standard_normal((groups, parts, width)).astype(np.float32)
    device = cupy_module().asarray(partial)
    poison_pool(poison)
    out = sum_partials(device, np.float32 if dtype == "float32" else bfloat16())
    assert out.shape == (groups, width) and out.dtype.name == dtype
    expected = partial.astype(np.float64).sum(axis=1)
    assert_close(to_host(out), expected, dtype, "sum_partials", scale=np.abs(partial).astype(np.float64).sum(axis=1))


@given(shape=st.sampled_from([(1,), (7,), (8,), (3, 5), (64, 768), (2, 3, 1000), (70_001,)]), offset=st.booleans(),
       dtype=dtypes, seed=seeds, poison=st.sampled_from([0xFF, 0x7F]))
def test_add_gradients_matches_reference(shape, offset, dtype, seed, poison):
    """The tape's sum of two gradients: sizes off the 16-byte vector and views starting off a 16-byte
    boundary (offset) take the scalar path; rounded once, so equal to the reference's rounding of the
    float64 sum for float32 inputs and within one bf16 rounding otherwise."""
    from minimoe.cuda.accumulate import add_gradients

    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    (a, a_values), (b, b_values) = (to_gpu(rng.standard_normal(size + offset), dtype) for _ in range(2))
    a, b = a[offset:].reshape(shape), b[offset:].reshape(shape)
    a_values, b_values = a_values[offset:].reshape(shape), b_values[offset:].reshape(shape)
    poison_pool(poison)
    out = add_gradients(a, b)
    assert out.shape == shape and out.dtype == a.dtype
    assert_close(to_host(out), a_values + b_values, dtype, "add_gradients",
                 scale=np.abs(a_values) + np.abs(b_values))


@given(rows=st.integers(1, 300), vocab=st.integers(1, 50), width=st.sampled_from([1, 3, 64, 768]), dtype=dtypes,
       seed=seeds, poison=st.sampled_from([0xFF, 0x7F]))
def test_embedding_row_gradient_adds_into_a_dense_gradient(rows, vocab, width, dtype, seed, poison):
    """A lookup's gradient (the rows it read, indices repeating when the table has fewer rows than were
    read) added into the table's gradient: each row's float32 sum added with one rounding. The sums'
    scratch comes from the poisoned pool, so a row the kernels did not zero shows; the gradient given is
    left as it was (the tape may hold it elsewhere too)."""
    from minimoe.cuda.embedding import RowGradient

    rng = np.random.default_rng(seed)
    indices = rng.integers(0, vocab, rows)
    grad, grad_values = to_gpu(rng.standard_normal((vocab, width)), dtype)
    row_grads, row_values = to_gpu(rng.standard_normal((rows, width)), dtype)
    expected, magnitude = grad_values.copy(), np.abs(grad_values)
    np.add.at(expected, indices, row_values)
    np.add.at(magnitude, indices, np.abs(row_values))
    poison_pool(poison)
    out = RowGradient(row_grads, cupy_module().asarray(indices), vocab).added_to(grad)
    assert out.shape == grad.shape and out.dtype == grad.dtype
    assert_close(to_host(out), expected, dtype, "RowGradient.added_to", scale=magnitude)
    np.testing.assert_array_equal(to_host(grad), grad_values)


@given(batch=st.integers(1, 4), length=st.integers(1, 70), extra_positions=st.integers(0, 5), vocab=st.integers(1, 50),
       width=st.sampled_from([1, 3, 8, 64, 768]), dtype=dtypes, seed=seeds, poison=st.sampled_from([0xFF, 0x7F]))
def test_token_and_position_embedding_matches_reference(batch, length, extra_positions, vocab, width, dtype, seed,
                                                        poison):
    """GPT's input in one launch: the two rows' sum rounded once, as an add of the two lookups rounds it; the
    position table's gradient the batch's sum, its rows past the sequence 0 (poisoned memory shows)."""
    from minimoe.cuda.embedding import position_table_gradient, token_and_position_forward

    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, length))
    token_table, token_values = to_gpu(rng.standard_normal((vocab, width)), dtype)
    position_table, position_values = to_gpu(rng.standard_normal((length + extra_positions, width)), dtype)
    grad, grad_values = to_gpu(rng.standard_normal((batch, length, width)), dtype)
    poison_pool(poison)
    out = token_and_position_forward(token_table, position_table, cupy_module().asarray(tokens))
    expected = to_gpu(token_values[tokens].astype(np.float32) + position_values[:length].astype(np.float32), dtype)[1]
    np.testing.assert_array_equal(to_host(out), expected)
    grad_table = position_table_gradient(grad, length + extra_positions)
    expected = np.zeros(position_values.shape)
    expected[:length] = grad_values.sum(axis=0)
    assert_close(to_host(grad_table), expected, dtype, "position table gradient",
                 scale=np.pad(np.abs(grad_values).sum(axis=0), ((0, extra_positions), (0, 0))))
    np.testing.assert_array_equal(to_host(grad_table)[length:], 0)


def test_multi_tensor_adamw_with_a_nan_scale_writes_nothing():
    """A NaN scale (clip_scale's answer to a non-finite loss or norm) leaves values, moments and working
    copies untouched: the refusal a CUDA graph of the step relies on."""
    from minimoe.backend import bfloat16
    from minimoe.cuda.adamw import adamw_update, hyperparameters

    cupy = cupy_module()
    rng = np.random.default_rng(0)
    arrays = {name: [cupy.asarray(rng.standard_normal(n).astype(np.float32)) for n in (5, 70_001)]
              for name in ("value", "m", "v", "grad")}
    working = [cupy.asarray(rng.standard_normal(n)).astype(bfloat16()) for n in (5, 70_001)]
    before = {name: [a.copy() for a in values] for name, values in [*arrays.items(), ("working", working)]}
    adamw_update(arrays["value"], arrays["grad"], arrays["m"], arrays["v"], working, [0.1, 0.0],
                 hyper=cupy.asarray(hyperparameters(1e-2, 0.9, 0.95, 3)), beta1=0.9, beta2=0.95, eps=1e-8,
                 grad_scale=cupy.asarray(np.nan, dtype=cupy.float32))
    for name, values in [*arrays.items(), ("working", working)]:
        for old, new in zip(before[name], values):
            np.testing.assert_array_equal(to_host(old), to_host(new), err_msg=name)


# Philox's number 0 from key 0 and this counter is exactly 0 (its word's top 24 bits are 0; found by a search
# over the reference), so a draw that starts there takes the clamp that keeps log(0) out.
ZERO_DRAW_COUNTER = 14883995


@given(rows=st.integers(1, 500), experts=st.integers(1, 64), seed=seeds, key=st.integers(0, 2**64 - 1),
       counter=st.integers(0, 2**63), zero_first=st.booleans(), poison=st.sampled_from([0xFF, 0x7F]))
def test_gumbel_noisy_matches_reference(rows, experts, seed, key, counter, zero_first, poison):
    """The fused draw-and-add kernel against the reference formula over the reference's draw."""
    from minimoe.cuda.gating import add_gumbel_noise
    from minimoe.cuda.philox import gumbel_noisy, key_slot, uniform_reference

    if zero_first:
        key, counter = 0, ZERO_DRAW_COUNTER
    logits = np.random.default_rng(seed).standard_normal((rows, experts)).astype(np.float32)
    uniform = uniform_reference(logits.size, key, counter).reshape(logits.shape)
    assert not zero_first or uniform.flat[0] == 0.0
    poison_pool(poison)
    actual = cupy_module().asnumpy(gumbel_noisy(cupy_module().asarray(logits), key_slot(key), counter))
    np.testing.assert_allclose(actual, add_gumbel_noise(logits, uniform), rtol=1e-5, atol=1e-5)


@given(size=st.integers(1, 5000), key=st.integers(0, 2**64 - 1), counter=st.integers(0, 2**63),
       poison=st.sampled_from([0xFF, 0x7F]))
def test_philox_uniform_matches_reference(size, key, counter, poison):
    """Integer arithmetic and one exact conversion: the GPU's draw equals the reference bit for bit
    (sizes not a multiple of 4 take the kernel's tail path)."""
    from minimoe.cuda.philox import key_slot, uniform, uniform_reference

    poison_pool(poison)
    actual = cupy_module().asnumpy(uniform((size,), key_slot(key), counter))
    np.testing.assert_array_equal(actual, uniform_reference(size, key, counter))


def test_gpu_random_uniform_draws_fresh_numbers_and_repeats_after_reseeding():
    from minimoe import backend

    backend.set_device("cuda")
    try:
        backend.manual_seed(3, 7)
        first, second = (backend.to_numpy(backend.random_uniform((5, 7))) for _ in range(2))
        assert not np.array_equal(first, second), "the second draw repeated the first: the counter did not move"
        backend.manual_seed(3, 7)
        np.testing.assert_array_equal(backend.to_numpy(backend.random_uniform((5, 7))), first)
        assert backend.random_uniform((4,), backend.bfloat16()).dtype == backend.bfloat16()
    finally:
        backend.set_device("cpu")


def test_jitter_factors_on_the_gpu_take_many_values_in_float32():
    """The Jitter policy's factors U(0.99, 1.01) are drawn and applied in float32 (in bf16 they collapse
    to a handful of values): a layer's bf16 input meets many distinct factors within the range."""
    from minimoe import backend
    from minimoe.moe.gate import jitter

    backend.set_device("cuda")
    try:
        backend.manual_seed(0)
        factors = backend.to_numpy(jitter((100_000,), np.float32))
    finally:
        backend.set_device("cpu")
    assert factors.dtype == np.float32
    assert factors.min() >= 0.99 and factors.max() <= 1.01
    assert len(np.unique(factors)) > 50_000
    assert np.mean(factors == 1.0) < 0.01


@given(rows=st.integers(1, 300), vocab=st.sampled_from([1, 2, 97, 256, 1000]),
       temperature=st.sampled_from([0.5, 1.0, 2.0]), dtype=dtypes, seed=seeds, poison=st.sampled_from([0xFF, 0x7F]))
def test_distillation_kernels_match_reference(rows, vocab, temperature, dtype, seed, poison):
    from minimoe.cuda.distillation import distillation_backward, distillation_forward

    cupy = cupy_module()
    rng = np.random.default_rng(seed)
    student, student_values = to_gpu(rng.standard_normal((rows, vocab)) * 2, dtype)
    teacher, teacher_values = to_gpu(rng.standard_normal((rows, vocab)) * 2, dtype)
    poison_pool(poison)
    loss, student_lse, teacher_lse = distillation_forward(student, teacher, temperature)
    grad = distillation_backward(cupy.asarray(np.float32(0.7)), student, teacher, student_lse, teacher_lse,
                                 temperature)
    expected_loss, expected_student_lse, expected_teacher_lse = distillation_forward(student_values, teacher_values,
                                                                                     temperature)
    expected_grad = distillation_backward(0.7, student_values, teacher_values, expected_student_lse,
                                          expected_teacher_lse, temperature)
    # The loss is stored in the logits' dtype (bf16: 8 significant bits); a sum of rows' KL, each >= 0.
    np.testing.assert_allclose(float(loss), expected_loss, rtol=TOLERANCE[dtype], atol=1e-6)
    np.testing.assert_allclose(to_host(student_lse), expected_student_lse, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_host(teacher_lse), expected_teacher_lse, rtol=1e-5, atol=1e-6)
    q = np.exp(student_values / temperature - expected_student_lse[:, None])
    p = np.exp(teacher_values / temperature - expected_teacher_lse[:, None])
    assert_close(to_host(grad), expected_grad, dtype, "distillation gradient",
                 scale=0.7 * temperature / rows * (q + p))
