"""minimoe/breakdown.py: a training step's time by part of the model and phase."""

import numpy as np

from minimoe import breakdown
from minimoe.model import GPT, GPTConfig

PARTS = ("embedding", "layernorm", "attention", "mlp", "moe", "output layer, loss")


def test_a_step_is_timed_by_part_and_phase_and_the_spans_fit_in_it():
    """Every part of a GPT with dense and MoE blocks gets forward and backward spans: an op's backward
    counts in the part its forward ran in, though backward runs outside every module. The spans lie
    inside the step, and nothing is recorded outside measure()."""
    config = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, moe_every=2, experts_per_layer=[4])
    model = GPT(config).to(np.float64)
    rng = np.random.default_rng(0)
    tokens, targets = rng.integers(0, 11, (2, 8)), rng.integers(0, 11, (2, 8))
    with breakdown.measure() as spans:
        with breakdown.timed("step", "all"):
            model(tokens, targets).loss.backward()
            with breakdown.timed("optimizer", "update"):
                model.zero_grad()
    seconds = spans.seconds()
    assert {(part, phase) for part in PARTS for phase in ("forward", "backward")} <= set(seconds)
    assert ("optimizer", "update") in seconds and all(value >= 0 for value in seconds.values())
    step = seconds.pop(("step", "all"))
    assert sum(seconds.values()) <= step
    assert breakdown.current == "other"
    model(tokens, targets).loss.backward()  # unmeasured: the hooks record nothing
    assert spans.seconds().keys() == {*seconds, ("step", "all")}


def test_step_table_lists_every_part_once():
    config = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, moe_every=2, experts_per_layer=[4])
    model = GPT(config)
    tokens = np.random.default_rng(1).integers(0, 11, (2, 8))
    lines = breakdown.step_table(lambda: model(tokens, tokens).loss.backward(), steps=2)
    assert sorted(line.split("  ")[0].strip() for line in lines[1:-2]) == sorted(PARTS)
    assert lines[-2].startswith("outside any span") and lines[-1].startswith("step")
