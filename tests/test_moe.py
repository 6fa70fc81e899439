"""The MoE layer and the MoE GPT: a one-expert MoE is the dense MLP, float64 gradients through the whole
layer (gate included) for top-1 and top-2 with and without residual, pyramid placement, and training."""

import json

import numpy as np
import pytest
from helpers import check_gradients, generated_text, numeric_gradient
from hypothesis import given, settings
from hypothesis import strategies as st

from minimoe import backend
from minimoe.config import ConfigError, load_config
from minimoe.model import GPT, GPTConfig
from minimoe.moe.gate import MoESettings
from minimoe.moe.layer import MoE
from minimoe.nn import MLP
from minimoe.plot import plot_run
from minimoe.tensor import Tensor, no_grad
from minimoe.train import train

seeds = st.integers(0, 2**32 - 1)


@given(tokens=st.integers(1, 20), width=st.integers(1, 6), seed=seeds, training=st.booleans())
def test_one_expert_with_room_for_every_token_is_the_dense_mlp(tokens, width, seed, training):
    rng = np.random.default_rng(seed)
    moe = MoE(width, 4 * width, 1, MoESettings(k=1, capacity_factor=1.0, min_capacity=0), rng, 0.02).to(np.float64)
    mlp = MLP(width, 4 * width, rng, 0.02).to(np.float64)
    mlp.fc.weight.data = moe.experts.fc_weight.data[0] + 0
    mlp.fc.bias.data = moe.experts.fc_bias.data[0, 0] + rng.standard_normal(4 * width)
    moe.experts.fc_bias.data[0, 0] = mlp.fc.bias.data
    mlp.proj.weight.data = moe.experts.proj_weight.data[0] + 0
    mlp.proj.bias.data = moe.experts.proj_bias.data[0, 0] + rng.standard_normal(width)
    moe.experts.proj_bias.data[0, 0] = mlp.proj.bias.data
    moe.train(training)
    x = Tensor(rng.standard_normal((tokens, width)))
    y, routing = moe(x)
    np.testing.assert_allclose(y.data, mlp(x).data, rtol=1e-12, atol=1e-14)  # softmax over one expert = 1
    assert routing.dropped == 0.0 and routing.tokens_per_expert.tolist() == [tokens]


@settings(max_examples=12)
@given(k=st.sampled_from([1, 2]), residual=st.booleans(), num_experts=st.integers(2, 4),
       tokens=st.integers(1, 8), seed=seeds, policy=st.sampled_from(["", "Jitter"]), z_loss=st.booleans())
def test_whole_layer_gradients_match_finite_differences(k, residual, num_experts, tokens, seed, policy, z_loss):
    """Input and every parameter (gate weights included) of a training-mode MoE layer with capacity
    short enough to drop tokens; the objective includes the auxiliary losses."""
    width, hidden = 3, 5
    rng = np.random.default_rng(seed)
    settings_ = MoESettings(k=k, capacity_factor=0.75, min_capacity=1, use_rts=k == 1, noisy_gate_policy=policy,
                            second_expert_sampling=True, z_loss_coef=0.2 if z_loss else 0.0)
    moe = MoE(width, hidden, num_experts, settings_, rng, 0.5, residual=residual).to(np.float64)
    for parameter in moe.parameters():  # larger weights than the GPT init, so every path matters
        parameter.data = rng.standard_normal(parameter.shape)
    x = rng.standard_normal((tokens, width))
    out_weights = rng.standard_normal((tokens, width))

    def objective(x_tensor):
        y, routing = moe(x_tensor)
        total = (y * out_weights).sum() + 0.3 * routing.aux_loss
        return total + 0.2 * routing.z_loss if z_loss else total

    def reseed():
        backend.manual_seed(seed)

    check_gradients(objective, [x], before_each_call=reseed, rtol=1e-5, atol=1e-7)
    moe.zero_grad()
    reseed()
    objective(Tensor(x)).backward()

    def objective_value():
        reseed()
        with no_grad():
            return objective(Tensor(x)).item()

    for name, parameter in moe.named_parameters():
        numeric = numeric_gradient(objective_value, parameter.data)
        np.testing.assert_allclose(parameter.grad, numeric, rtol=1e-5, atol=1e-7, err_msg=name)


def test_residual_moe_mixes_moe_and_mlp_per_token():
    rng = np.random.default_rng(0)
    moe = MoE(4, 8, 2, MoESettings(k=1, min_capacity=0), rng, 0.02, residual=True).to(np.float64)
    moe.eval()
    x = Tensor(rng.standard_normal((5, 4)))
    with no_grad():
        y, _ = moe(x)
        residual_mlp, coefficient = moe.residual_mlp, moe.coefficient
        moe.residual_mlp = moe.coefficient = None  # the same layer without its residual branch
        moe_only, _ = moe(x)
        logits = coefficient(x).data
    mix = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(y.data, moe_only.data * mix[:, :1] + residual_mlp(x).data * mix[:, 1:], rtol=1e-12)


def test_pyramid_placement_and_expert_counts():
    config = GPTConfig(n_layer=6, moe_every=2, experts_per_layer=[2, 4, 8])
    assert config.experts_in_block() == [0, 2, 0, 4, 0, 8]
    assert GPTConfig(n_layer=4, moe_every=1, experts_per_layer=[3]).experts_in_block() == [3, 3, 3, 3]
    model = GPT(GPTConfig(n_layer=4, n_embd=16, n_head=2, moe_every=2, experts_per_layer=[2, 4], residual=True))
    assert [type(b.mlp).__name__ for b in model.blocks] == ["MLP", "MoE", "MLP", "MoE"]
    assert model.blocks[3].mlp.experts.fc_weight.shape == (4, 16, 64)
    with pytest.raises(ConfigError, match="experts_per_layer has 2 entries"):
        load_config(None, ["model.moe_every=1", "model.experts_per_layer=[2, 4]"])
    with pytest.raises(ConfigError, match="k=2 needs at least 2 experts"):
        load_config(None, ["model.moe_every=2", "model.experts_per_layer=[1]", "model.k=2"])


def test_training_loss_adds_weighted_aux_losses_of_every_moe_layer():
    config = GPTConfig(vocab_size=11, block_size=6, n_layer=4, n_head=2, n_embd=8, moe_every=2,
                       experts_per_layer=[2, 3], k=2, aux_loss_coef=0.05, z_loss_coef=0.001)
    model = GPT(config).to(np.float64)
    tokens = np.random.default_rng(0).integers(0, 11, (2, 6))
    output = model(tokens, np.roll(tokens, 1))
    assert len(output.moe) == 2
    expected = output.lm_loss.item() + sum(0.05 * s.aux_loss.item() + 0.001 * s.z_loss.item() for s in output.moe)
    assert output.loss.item() == pytest.approx(expected, rel=1e-12)
    assert [len(s.tokens_per_expert) for s in output.moe] == [2, 3]
    assert all(s.tokens_per_expert.sum() == 2 * 12 for s in output.moe)


def test_moe_gpt_trains_and_logs_expert_load(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(generated_text(300))
    config = load_config(None, [
        "model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "model.moe_every=1",
        "model.experts_per_layer=[2, 4]", "model.residual=true", "train.batch_size=8", "train.max_steps=30",
        "train.eval_interval=15", "train.eval_batches=2", "train.sample_tokens=10", "optim.warmup_steps=5",
        "optim.lr=0.01", f"data.path={corpus}", f"train.out_dir={tmp_path / 'run'}"])
    result = train(config)
    assert result.final_val_loss < 0.75 * result.initial_val_loss
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    moe_logs = [r["moe"] for r in records if "moe" in r]
    assert len(moe_logs) == 30 and [len(layer["tokens_per_expert"]) for layer in moe_logs[0]] == [2, 4]
    assert all(sum(layer["tokens_per_expert"]) == 8 * 16 for layer in moe_logs[-1])
    written = plot_run(tmp_path / "run")
    assert [p.name for p in written] == ["loss.png", "expert_load.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") and p.stat().st_size > 10_000 for p in written)
