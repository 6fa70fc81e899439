"""minimoe/step.py's training step on the CPU (its CUDA graphs are tested on a GPU in
tests/test_gpu_training.py): it trains, refuses a non-finite step, and says why a run cannot use graphs."""

import numpy as np
import pytest

from minimoe import backend
from minimoe.config import load_config
from minimoe.model import GPT, GPTConfig
from minimoe.optim import AdamW
from minimoe.step import TrainStep
from minimoe.train import _graphs_obstacle

TINY_MOE = GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16, moe_every=1, experts_per_layer=[4],
                     k=2, dropout=0.1)


def batch(seed: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.random.default_rng(seed).integers(0, TINY_MOE.vocab_size, (4, TINY_MOE.block_size + 1))
    return tokens[:, :-1], tokens[:, 1:]


def test_eager_steps_lower_the_loss_on_a_repeated_batch():
    model = GPT(TINY_MOE)
    step = TrainStep(model, AdamW(model.parameters(), lr=1e-2), grad_clip=1.0)
    inputs, targets = batch(0)
    losses = []
    for index in range(20):
        backend.manual_seed(0, index)
        output = step(inputs, targets)
        losses.append(float(output.lm_loss))
        assert np.isfinite(float(output.grad_norm)) and len(output.moe) == 2
        assert all(p.grad is None for p in model.parameters()), "an eager step keeps no gradients"
    assert losses[-1] < 0.7 * losses[0], losses


def test_a_step_with_a_non_finite_loss_leaves_weights_and_moments_as_they_were():
    model = GPT(TINY_MOE)
    optimizer = AdamW(model.parameters(), lr=1e-2)
    step = TrainStep(model, optimizer, grad_clip=1.0)
    inputs, targets = batch(1)
    step(inputs, targets)
    model.wpe.weight.data[0, 0] = np.inf  # every sequence's first position: the loss is not finite
    before = [p.data.copy() for p in model.parameters()] + [m.copy() for m in optimizer.exp_avg + optimizer.exp_avg_sq]
    with np.errstate(invalid="ignore"):
        output = step(inputs, targets)
    assert not np.isfinite(float(output.loss))
    after = [p.data for p in model.parameters()] + optimizer.exp_avg + optimizer.exp_avg_sq
    for old, new in zip(before, after):
        np.testing.assert_array_equal(old, new)


def test_graphs_are_refused_off_the_gpu_with_the_device_named():
    model = GPT(TINY_MOE)
    with pytest.raises(ValueError, match="GPU only; the device is cpu"):
        TrainStep(model, AdamW(model.parameters(), lr=1e-2), grad_clip=1.0, graphs=True)


@pytest.mark.parametrize("settings, world_size, reason", [
    ([], 1, None),
    (["model.moe_every=1", "model.k=2"], 1, None),
    ([], 2, "2 ranks"),
    (["train.grad_accum_steps=4"], 1, "train.grad_accum_steps = 4"),
    (["distill.teacher=runs/teacher"], 1, "distillation"),
    (["model.moe_every=1", "model.drop_tokens=false"], 1, "dropless"),
    (["model.moe_every=1", "model.k=3"], 1, "k = 3"),
])
def test_a_run_says_why_its_steps_cannot_be_graphs(settings, world_size, reason):
    obstacle = _graphs_obstacle(load_config(None, settings), world_size)
    assert obstacle == reason if reason is None else reason in obstacle
