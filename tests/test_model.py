"""The GPT as a whole: float64 gradients of every parameter, causality, state dicts, bad input."""

import numpy as np
import pytest
from helpers import numeric_gradient
from hypothesis import given, settings
from hypothesis import strategies as st

from minimoe.model import GPT, GPTConfig
from minimoe.tensor import no_grad


def tiny_model(seed: int = 0, **overrides) -> GPT:
    config = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8, init_seed=seed)
    for key, value in overrides.items():
        setattr(config, key, value)
    return GPT(config).to(np.float64)


def test_chunked_loss_equals_the_loss_over_materialised_logits(monkeypatch):
    """Above CHUNKED_LOSS_LOGITS logits the model's loss goes through the chunked output layer (here
    forced, with chunks of 5 rows): the same loss and the same gradient for every parameter as with the
    logits materialised, which forward(keep_logits=True) returns."""
    import minimoe.model
    from minimoe import ops

    rng = np.random.default_rng(3)
    tokens, targets = rng.integers(0, 11, (3, 6)), rng.integers(0, 11, (3, 6))
    runs = []
    for chunked in (False, True):
        model = tiny_model(3)
        if chunked:
            monkeypatch.setattr(minimoe.model, "CHUNKED_LOSS_LOGITS", 0)
            monkeypatch.setattr(ops, "LOGITS_PER_CHUNK", 5 * 11)
        output = model(tokens, targets, keep_logits=not chunked)
        assert (output.logits is None) == chunked
        output.loss.backward()
        runs.append((output.loss.item(), {name: p.grad for name, p in model.named_parameters()}))
    (plain_loss, plain_grads), (chunked_loss, chunked_grads) = runs
    assert chunked_loss == pytest.approx(plain_loss, rel=1e-12)
    for name, grad in plain_grads.items():
        np.testing.assert_allclose(chunked_grads[name], grad, rtol=1e-9, atol=1e-13, err_msg=name)


@settings(max_examples=4)
@given(seed=st.integers(0, 1000), batch=st.integers(1, 2), length=st.integers(1, 6))
def test_whole_gpt_gradients_match_finite_differences(seed, batch, length):
    """Every parameter tensor of a tiny GPT (embeddings, attention, MLP, LayerNorms) gets the gradient
    central differences give, checked on a few random entries of each tensor."""
    model = tiny_model(seed)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 11, (batch, length))
    targets = rng.integers(0, 11, (batch, length))
    model(tokens, targets).loss.backward()

    def loss_value() -> float:
        with no_grad():
            return model(tokens, targets).loss.item()

    for name, parameter in model.named_parameters():
        picks = [tuple(rng.integers(0, size) for size in parameter.shape) for _ in range(3)]
        for index in picks:
            view = parameter.data[tuple(slice(i, i + 1) for i in index)]
            numeric = numeric_gradient(loss_value, view)
            np.testing.assert_allclose(parameter.grad[index], numeric.item(), rtol=1e-5, atol=1e-8,
                                       err_msg=f"{name}{list(index)}")


def test_model_is_causal():
    model = tiny_model(1)
    tokens = np.random.default_rng(0).integers(0, 11, (1, 6))
    changed = tokens.copy()
    changed[0, -1] = (changed[0, -1] + 1) % 11
    with no_grad():
        a = model(tokens).logits
        b = model(changed).logits
    np.testing.assert_array_equal(a.data[0, :-1], b.data[0, :-1])
    assert not np.allclose(a.data[0, -1], b.data[0, -1])


def test_longer_sequence_than_context_is_refused():
    with pytest.raises(ValueError, match="longer than the model's context \\(block_size=6\\)"):
        tiny_model()(np.zeros((1, 7), dtype=np.int64))


def test_state_dict_round_trip_and_shape_check():
    source, target = tiny_model(1), tiny_model(2)
    target.load_state_dict(source.state_dict())
    for (name, a), (_, b) in zip(source.named_parameters(), target.named_parameters()):
        np.testing.assert_array_equal(a.data, b.data, err_msg=name)
    state = source.state_dict()
    state["wte.weight"] = state["wte.weight"][:, :4]
    with pytest.raises(ValueError, match="wte.weight"):
        target.load_state_dict(state)
    del state["wte.weight"]
    with pytest.raises(ValueError, match="missing \\['wte.weight'\\]"):
        target.load_state_dict(state)


def test_output_layer_is_tied_to_token_embedding():
    """The logits come from wte itself: a token that never occurs in the input still gets an embedding
    gradient (through the output layer), and there is no separate output matrix."""
    model = tiny_model()
    assert [name for name, _ in model.named_parameters() if name.startswith(("wte", "lm_head"))] == ["wte.weight"]
    model(np.array([[1, 2, 3]]), np.array([[2, 3, 4]])).loss.backward()
    absent = [0, 5, 6, 7, 8, 9, 10]
    assert np.all(np.abs(model.wte.weight.grad[absent]).sum(axis=1) > 0)


def test_initial_loss_is_near_uniform_guess():
    model = GPT(GPTConfig()).eval()
    tokens = np.random.default_rng(0).integers(0, 256, (4, 64))
    with no_grad():
        loss = model(tokens, np.roll(tokens, -1, axis=1)).loss
    assert abs(loss.item() - np.log(256)) < 0.1


@pytest.mark.parametrize("overrides", [{}, {"moe_every": 2, "experts_per_layer": [4], "k": 1},
                                       {"moe_every": 1, "experts_per_layer": [4, 2], "k": 2, "residual": True}])
def test_forward_flops_count_every_weight_a_token_passes_through(overrides):
    """An independent count from the parameters themselves: 2 FLOPs per weight a token multiplies by (an
    expert's weights k / E times: k of the E experts), the tied head, and attention's two products over
    block_size keys."""
    model = tiny_model(**overrides)
    config = model.config
    per_weight = 0.0
    for name, parameter in model.named_parameters():
        if name.startswith("blocks.") and name.endswith("weight") and parameter.ndim >= 2:
            per_weight += parameter.size * (config.k / parameter.shape[0] if ".experts." in name else 1)
    attention = config.n_layer * 2 * 2 * config.block_size * config.n_embd
    expected = 2 * per_weight + 2 * config.n_embd * config.vocab_size + attention
    assert config.forward_flops_per_token() == pytest.approx(expected, rel=1e-12)
