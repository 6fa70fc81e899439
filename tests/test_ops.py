"""Every autograd op against float64 central differences, on shapes drawn by Hypothesis
(broadcasting included), plus the properties each op's math promises."""

import numpy as np
import pytest
from helpers import check_gradients
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, mutually_broadcastable_shapes

from minimoe import backend, ops
from minimoe.tensor import Tensor, no_grad

seeds = st.integers(0, 2**32 - 1)
small_shapes = array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4)


def randn(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.asarray(np.random.default_rng(seed).standard_normal(shape))


@pytest.mark.parametrize("op", [ops.add, ops.sub, ops.mul, ops.div])
@given(shapes=mutually_broadcastable_shapes(num_shapes=2, max_dims=3, max_side=3), seed=seeds)
def test_binary_ops_gradients_with_broadcasting(op, shapes, seed):
    a, b = randn(seed, shapes.input_shapes[0]), randn(seed + 1, shapes.input_shapes[1])
    if op is ops.div:
        b = np.asarray(np.sign(b) * (np.abs(b) + 0.5))  # keep the divisor away from zero
    check_gradients(op, [a, b])


@given(shape=small_shapes, seed=seeds)
def test_unary_ops_gradients(shape, seed):
    x = randn(seed, shape)
    check_gradients(ops.neg, [x])
    check_gradients(ops.exp, [x])
    check_gradients(ops.log, [np.abs(x) + 0.5])
    check_gradients(ops.gelu, [x])


@given(shapes=mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=2, max_side=3),
       m=st.integers(1, 4), k=st.integers(1, 4), n=st.integers(1, 4), seed=seeds)
def test_batched_matmul_gradients_with_broadcast_batch_axes(shapes, m, k, n, seed):
    a = randn(seed, shapes.input_shapes[0] + (m, k))
    b = randn(seed + 1, shapes.input_shapes[1] + (k, n))
    check_gradients(ops.matmul, [a, b])


@given(leading=st.integers(1, 3), m=st.integers(2, 4), k=st.integers(2, 4), n=st.integers(2, 4), seed=seeds)
def test_matmul_with_a_transposed_weight_gradients_and_layout(leading, m, k, n, seed):
    """x @ w^T (the tied output layer): float64 gradients, and w's gradient comes out in w's own layout
    (C-contiguous, so the tape adds the embedding's gradient to it in one vectorised pass)."""
    x, w = randn(seed, (leading, m, k)), randn(seed + 1, (n, k))
    check_gradients(lambda a, b: a @ b.transpose(), [x, w])
    weight = Tensor(w, requires_grad=True)
    (Tensor(x) @ weight.transpose()).sum().backward()
    assert weight.grad.flags.c_contiguous
    np.testing.assert_allclose(weight.grad, np.ones((leading, m, n)).reshape(-1, n).T @ x.reshape(-1, k))


@given(leading=st.integers(1, 3), rows=st.integers(1, 4), k=st.integers(1, 4), n=st.integers(1, 4), seed=seeds)
def test_linear_gradients(leading, rows, k, n, seed):
    """ops.linear (x @ w + b as one node) against float64 differences, and its value against x @ w + b."""
    x, w, b = randn(seed, (leading, rows, k)), randn(seed + 1, (k, n)), randn(seed + 2, (n,))
    check_gradients(ops.linear, [x, w, b])
    with no_grad():
        expected = (Tensor(x) @ Tensor(w) + Tensor(b)).data
        np.testing.assert_allclose(ops.linear(Tensor(x), Tensor(w), Tensor(b)).data, expected, rtol=1e-12, atol=1e-12)


@given(batched=st.booleans(), groups=st.integers(1, 3), rows=st.integers(1, 4), width=st.integers(1, 4),
       hidden=st.integers(1, 5), seed=seeds)
def test_mlp_gradients(batched, groups, rows, width, hidden, seed):
    """ops.mlp, the feed-forward block as one node that recomputes its GELU in the backward, against float64
    differences and against the ops it stands for: dense (2-D weights) or batched experts (3-D)."""
    experts = (groups,) if batched else ()
    x = randn(seed, (groups, rows, width))
    fc_weight, proj_weight = randn(seed + 1, (*experts, width, hidden)), randn(seed + 2, (*experts, hidden, width))
    fc_bias = randn(seed + 3, (*experts, 1, hidden) if batched else (hidden,))
    proj_bias = randn(seed + 4, (*experts, 1, width) if batched else (width,))
    arguments = [x, fc_weight, fc_bias, proj_weight, proj_bias]
    check_gradients(ops.mlp, arguments)
    with no_grad():
        x_, w1, b1, w2, b2 = (Tensor(a) for a in arguments)
        expected = (ops.gelu(x_ @ w1 + b1) @ w2 + b2).data
        np.testing.assert_allclose(ops.mlp(x_, w1, b1, w2, b2).data, expected, rtol=1e-12, atol=1e-12)


@given(shape=small_shapes, seed=seeds)
def test_reshape_and_transpose_gradients(shape, seed):
    x = randn(seed, shape)
    check_gradients(lambda t: t.reshape(-1), [x])
    axes = tuple(np.random.default_rng(seed).permutation(len(shape)).tolist())
    check_gradients(lambda t: t.transpose(*axes), [x])
    check_gradients(lambda t: t.transpose(), [x])


@given(rows=st.integers(1, 5), cols=st.integers(1, 4), seed=seeds)
def test_getitem_gradients_basic_and_repeated_integer_indices(rows, cols, seed):
    x = randn(seed, (rows, cols))
    index = np.random.default_rng(seed).integers(0, rows, size=rows + 2)  # repeats are likely
    check_gradients(lambda t: t[index], [x])
    check_gradients(lambda t: t[:, -1:], [x])
    check_gradients(lambda t: t[rows // 2], [x])


@given(sizes=st.lists(st.integers(1, 3), min_size=1, max_size=4), other=st.integers(1, 3), seed=seeds)
def test_concat_and_split_gradients(sizes, other, seed):
    parts = [randn(seed + i, (other, size)) for i, size in enumerate(sizes)]
    check_gradients(lambda *ts: ops.concat(list(ts), axis=1), parts)
    whole = randn(seed, (other, sum(sizes)))
    check_gradients(lambda t: ops.concat([p * (i + 1.0) for i, p in enumerate(ops.split(t, sizes, axis=1))], 1),
                    [whole])


@given(shape=small_shapes, keepdims=st.booleans(), data=st.data())
def test_sum_and_mean_gradients_over_any_axis(shape, keepdims, data):
    x = randn(data.draw(seeds), shape)
    axis = data.draw(st.sampled_from([None, *range(-len(shape), len(shape))]))
    check_gradients(lambda t: ops.sum(t, axis, keepdims), [x])
    check_gradients(lambda t: ops.mean(t, axis, keepdims), [x])


@given(shape=small_shapes, seed=seeds)
def test_softmax_and_log_softmax_gradients_and_normalisation(shape, seed):
    x = randn(seed, shape) * 3
    check_gradients(ops.softmax, [x])
    check_gradients(ops.log_softmax, [x])
    with no_grad():
        np.testing.assert_allclose(ops.softmax(Tensor(x)).data.sum(-1), 1.0, rtol=1e-12)
        np.testing.assert_allclose(np.exp(ops.log_softmax(Tensor(x)).data), ops.softmax(Tensor(x)).data,
                                   rtol=1e-12)


@given(rows=st.integers(1, 6), vocab=st.integers(2, 7), seed=seeds)
def test_cross_entropy_gradients_and_value_with_ignored_rows(rows, vocab, seed):
    rng = np.random.default_rng(seed)
    logits = randn(seed, (rows, vocab)) * 2
    targets = rng.integers(0, vocab, rows)
    targets[rng.random(rows) < 0.3] = -100
    check_gradients(lambda t: ops.cross_entropy(t, targets), [logits])
    valid = targets != -100
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -log_probs[valid, targets[valid]].mean() if valid.any() else 0.0
    np.testing.assert_allclose(ops.cross_entropy(Tensor(logits), targets).item(), expected, rtol=1e-12)


@given(rows=st.integers(1, 6), vocab=st.integers(2, 7), seed=seeds)
def test_cross_entropy_that_overwrites_its_logits_gives_the_same_gradient(rows, vocab, seed):
    """overwrite_logits (the model's training loss): the backward writes the gradient over the logits,
    here as in the model an intermediate (x * 2), and the gradient reaching x is the same as without."""
    rng = np.random.default_rng(seed)
    logits = randn(seed, (rows, vocab))
    targets = rng.integers(0, vocab, rows)
    grads = []
    for overwrite in (False, True):
        x = Tensor(logits.copy(), requires_grad=True)
        intermediate = x * 2.0
        ops.cross_entropy(intermediate, targets, overwrite_logits=overwrite).backward()
        assert np.array_equal(intermediate.data, logits * 2.0) != overwrite  # overwritten only when asked
        grads.append(x.grad)
    np.testing.assert_array_equal(*grads)


@given(shape=array_shapes(min_dims=1, max_dims=3, min_side=2, max_side=5), seed=seeds)
def test_layer_norm_gradients_and_normalised_rows(shape, seed):
    x = randn(seed, shape) * 2 + 1
    width = shape[-1]
    weight, bias = randn(seed + 1, (width,)), randn(seed + 2, (width,))
    check_gradients(ops.layer_norm, [x, weight, bias], rtol=1e-4, atol=1e-6)
    eps = 1e-5
    y = ops.layer_norm(Tensor(x), Tensor(np.ones(width)), Tensor(np.zeros(width)), eps).data
    np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-9)
    np.testing.assert_allclose(y.var(-1), x.var(-1) / (x.var(-1) + eps), rtol=1e-9)  # 1 up to the eps


@given(shape=array_shapes(min_dims=1, max_dims=3, min_side=2, max_side=5), seed=seeds)
def test_add_layer_norm_gradients_and_equality_with_the_two_ops(shape, seed):
    x, addend = randn(seed, shape) * 2 + 1, randn(seed + 3, shape)
    width = shape[-1]
    weight, bias = randn(seed + 1, (width,)), randn(seed + 2, (width,))

    def both(*inputs):  # the sum and its LayerNorm both reach the loss, as in the residual stream
        total, y = ops.add_layer_norm(*inputs)
        return total * 0.5 + y

    check_gradients(both, [x, addend, weight, bias], rtol=1e-4, atol=1e-6)
    check_gradients(lambda *inputs: ops.add_layer_norm(*inputs)[1], [x, addend, weight, bias], rtol=1e-4, atol=1e-6)
    tensors = [Tensor(a, requires_grad=True) for a in (x, addend, weight, bias)]
    total, y = ops.add_layer_norm(*tensors)
    np.testing.assert_array_equal(total.data, x + addend)
    np.testing.assert_array_equal(y.data, ops.layer_norm(Tensor(x + addend), Tensor(weight), Tensor(bias)).data)
    total.sum().backward()  # only the sum reaches the loss: the LayerNorm's parameters get no gradient
    np.testing.assert_array_equal(tensors[0].grad, np.ones(shape))
    np.testing.assert_array_equal(tensors[1].grad, np.ones(shape))
    assert tensors[2].grad is None and tensors[3].grad is None


@given(vocab=st.integers(1, 6), width=st.integers(1, 4), batch=st.integers(1, 3), length=st.integers(1, 5),
       seed=seeds)
def test_embedding_gradients_with_repeated_indices(vocab, width, batch, length, seed):
    indices = np.random.default_rng(seed).integers(0, vocab, (batch, length))
    check_gradients(lambda w: ops.embedding_lookup(w, indices), [randn(seed, (vocab, width))])


@given(vocab=st.integers(1, 6), positions=st.integers(1, 6), width=st.integers(1, 4), batch=st.integers(1, 3),
       data=st.data(), seed=seeds)
def test_token_and_position_embedding_gradients(vocab, positions, width, batch, data, seed):
    """GPT's input: both tables' gradients, the position rows past the sequence 0."""
    length = data.draw(st.integers(1, positions))
    tokens = np.random.default_rng(seed).integers(0, vocab, (batch, length))
    check_gradients(lambda tokens_table, position_table: ops.token_and_position_embedding(
        tokens_table, position_table, tokens), [randn(seed, (vocab, width)), randn(seed + 1, (positions, width))])


def test_token_and_position_embedding_rejects_a_sequence_past_the_position_table():
    with pytest.raises(ValueError, match="position table of at least 5 rows"):
        ops.token_and_position_embedding(Tensor(np.zeros((3, 2))), Tensor(np.zeros((4, 2))), np.zeros((1, 5), int))


@given(vocab=st.integers(1, 6), width=st.integers(1, 4), length=st.integers(1, 5), seed=seeds)
def test_tied_embedding_gradients(vocab, width, length, seed):
    """The table read by a lookup and multiplied as an output layer, as GPT ties them: the lookup's
    gradient (the rows it read) meets the product's dense one on the tape, whichever comes first."""
    indices = np.random.default_rng(seed).integers(0, vocab, length)
    check_gradients(lambda w: ops.embedding_lookup(w, indices) @ w.transpose(), [randn(seed, (vocab, width))])
    check_gradients(lambda w: w @ ops.embedding_lookup(w, indices).transpose(), [randn(seed, (vocab, width))])


@given(shape=small_shapes, p=st.floats(0.1, 0.9), seed=seeds)
def test_dropout_gradients_and_keep_rate(shape, p, seed):
    x = randn(seed, shape)
    check_gradients(lambda t: ops.dropout(t, p, training=True), [x],
                    before_each_call=lambda: backend.manual_seed(seed))
    assert ops.dropout(Tensor(x), p, training=False).data is x  # evaluation: the identity


def test_dropout_keeps_expected_fraction_and_scales():
    backend.manual_seed(0)
    x = np.ones(200_000)
    y = ops.dropout(Tensor(x), 0.25, training=True).data
    assert abs((y > 0).mean() - 0.75) < 0.01
    np.testing.assert_allclose(y[y > 0], 1 / 0.75)


@given(batch=st.integers(1, 2), heads=st.integers(1, 2), length=st.integers(1, 5), width=st.integers(1, 4),
       seed=seeds)
def test_causal_attention_gradients(batch, heads, length, width, seed):
    qkv = randn(seed, (batch, length, 3, heads, width))  # packed, as the qkv Linear makes it
    check_gradients(ops.causal_attention, [qkv])
    from minimoe.cuda.attention import causal_attention_forward

    out = ops.causal_attention(Tensor(qkv)).data  # [B, T, H, D]: each head's attention, heads side by side
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    np.testing.assert_array_equal(out, causal_attention_forward(q, k, v)[0].transpose(0, 2, 1, 3))


@given(heads=st.integers(1, 3), length=st.sampled_from([1, 2, 63, 64, 65, 150]), width=st.integers(1, 8), seed=seeds)
def test_flash_attention_recurrence_equals_plain_attention(heads, length, width, seed):
    """The blocked recurrence (flash_attention.py, the GPU kernels' reference) against the whole softmax
    (attention.py), forward and backward, in float64: the same numbers to rounding, over one block of
    keys and several (BLOCK = 64), the last one partial."""
    from minimoe.cuda.attention import causal_attention_backward, causal_attention_forward
    from minimoe.cuda.flash_attention import flash_attention_backward, flash_attention_forward

    q, k, v, grad = (randn(seed + i, (heads, length, width)) for i in range(4))
    out, lse = flash_attention_forward(q, k, v)
    expected, probs = causal_attention_forward(q, k, v)
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)
    scores = np.einsum("htd,hsd->hts", q, k) / width**0.5
    visible = np.tril(np.ones((length, length), dtype=bool))
    np.testing.assert_allclose(lse, np.log(np.where(visible, np.exp(scores), 0).sum(axis=-1)), rtol=1e-10)
    for actual, wanted in zip(flash_attention_backward(grad, q, k, v, out, lse),
                              causal_attention_backward(grad, q, k, v, probs)):
        np.testing.assert_allclose(actual, wanted, rtol=1e-9, atol=1e-11)


@given(rows=st.integers(1, 9), width=st.integers(1, 4), vocab=st.integers(2, 7), chunk_rows=st.integers(1, 4),
       ignored=st.booleans(), seed=seeds)
def test_lm_head_cross_entropy_gradients_and_plain_equality(rows, width, vocab, chunk_rows, ignored, seed):
    """The chunked output layer + loss: float64 central differences, and the same loss and gradients as
    the logits materialised (x @ W^T, then cross_entropy), over one chunk or several, ignored rows too."""
    x, weight = randn(seed, (rows, width)), randn(seed + 1, (vocab, width))
    targets = np.random.default_rng(seed).integers(0, vocab, rows)
    if ignored:
        targets[:: 2] = -100
    check_gradients(lambda a, b: ops.lm_head_cross_entropy(a, b, targets, chunk_rows=chunk_rows), [x, weight])
    chunked = [Tensor(x, requires_grad=True), Tensor(weight, requires_grad=True)]
    plain = [Tensor(x, requires_grad=True), Tensor(weight, requires_grad=True)]
    loss = ops.lm_head_cross_entropy(*chunked, targets, chunk_rows=chunk_rows)
    expected = ops.cross_entropy(plain[0] @ plain[1].transpose(), targets)
    loss.backward()
    expected.backward()
    np.testing.assert_allclose(loss.data, expected.data, rtol=1e-12)
    for actual, wanted in zip(chunked, plain):
        np.testing.assert_allclose(actual.grad, wanted.grad, rtol=1e-10, atol=1e-14)


@given(length=st.integers(2, 6), width=st.integers(1, 4), seed=seeds)
def test_causal_attention_never_looks_ahead(length, width, seed):
    qkv = randn(seed, (1, length, 3, 1, width))
    out = ops.causal_attention(Tensor(qkv)).data
    changed = qkv.copy()
    changed[:, -1, 1:] += 5.0  # the last token's key and value
    np.testing.assert_array_equal(out[:, :-1], ops.causal_attention(Tensor(changed)).data[:, :-1])
    # The first token can only attend to itself.
    np.testing.assert_allclose(out[:, 0], qkv[:, 0, 2], rtol=1e-12)


def test_tensor_used_twice_accumulates_gradient():
    x = Tensor(np.array([1.5, -2.0]), requires_grad=True)
    (x * x + x).sum().backward()
    np.testing.assert_allclose(x.grad, 2 * x.data + 1)


def test_no_grad_records_no_tape():
    x = Tensor(np.ones(3), requires_grad=True)
    with no_grad():
        y = x * 2
    assert y.creator is None and not y.requires_grad


def test_backward_needs_a_scalar_or_a_gradient():
    with pytest.raises(ValueError, match="single-element"):
        (Tensor(np.ones(3), requires_grad=True) * 2).backward()


def test_a_bias_that_does_not_fit_is_refused_with_both_shapes():
    x, weight = Tensor(np.ones((2, 3, 4))), Tensor(np.ones((4, 4)))
    with pytest.raises(ValueError, match=r"bias of shape \(5,\) does not fit x of shape \(6, 4\)"):
        ops.linear(x, weight, Tensor(np.ones(5)))
    experts_weight, experts_bias = Tensor(np.ones((2, 4, 4))), Tensor(np.ones((2, 1, 4)))
    expected = r"\(3, 1, 4\) does not fit x of shape \(2, 3, 4\): expected \(4,\) or \(2, 1, 4\)"
    with pytest.raises(ValueError, match=expected):
        ops.mlp(x, experts_weight, Tensor(np.ones((3, 1, 4))), experts_weight, experts_bias)
