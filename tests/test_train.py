"""Training end to end on generated text: the loss falls, resume is exact, loss for loss, and the whole-split
evaluation scores every window once."""

import json

import numpy as np
import pytest
from helpers import generated_text

from minimoe.checkpoint import load_checkpoint
from minimoe.config import ConfigError, load_config
from minimoe.tensor import no_grad
from minimoe.train import evaluate_split, load_data, load_model, train

TINY = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "model.dropout=0.1",
        "train.batch_size=8", "train.eval_interval=5", "train.eval_batches=2", "train.log_interval=5",
        "train.sample_tokens=20", "optim.warmup_steps=5", "optim.lr=0.01"]


def tiny_config(tmp_path, name, *extra):
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(generated_text(300))
    return load_config(None, [*TINY, f"data.path={corpus}", f"train.out_dir={tmp_path / name}", *extra])


def logged(run_dir, key):
    """{step: value} of one metric from a run's metrics.jsonl."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m[key] for m in lines if key in m}


def test_training_lowers_the_validation_loss_and_samples(tmp_path):
    result = train(tiny_config(tmp_path, "run", "train.max_steps=40"))
    assert result.final_val_loss < 0.75 * result.initial_val_loss
    assert result.checkpoint.exists() and len(result.sample) >= 1


def test_whole_split_evaluation_scores_every_window_once(tmp_path):
    """Against the model run on one window at a time: the mean over the windows, and with equal batches
    the textbook standard error of the batches' means."""
    result = train(tiny_config(tmp_path, "run", "train.max_steps=3"))
    model, config = load_model(result.checkpoint)
    data = load_data(config)
    tokens, block = data.splits["val"], config.model.block_size
    windows = (len(tokens) - 1) // block
    model.eval()
    with no_grad():
        per_window = np.array([model(tokens[None, w * block:(w + 1) * block],
                                     tokens[None, w * block + 1:(w + 1) * block + 1]).lm_loss.item()
                               for w in range(windows)])
    batch_size = next(size for size in range(7, windows) if windows % size == 0)
    equal = evaluate_split(model, data, "val", batch_size)
    batch_means = per_window.reshape(-1, batch_size).mean(axis=1)
    assert (equal.tokens, equal.batches) == (windows * block, windows // batch_size)
    np.testing.assert_allclose(equal.loss, per_window.mean(), rtol=1e-5)
    np.testing.assert_allclose(equal.standard_error, batch_means.std(ddof=1) / np.sqrt(len(batch_means)), rtol=1e-4)
    uneven = evaluate_split(model, data, "val", windows // 2 + 1)  # a full batch and a shorter one
    np.testing.assert_allclose(uneven.loss, per_window.mean(), rtol=1e-5)
    assert uneven.batches == 2


def test_resumed_run_equals_uninterrupted_run_loss_for_loss(tmp_path):
    whole = train(tiny_config(tmp_path, "whole", "train.max_steps=12"))
    train(tiny_config(tmp_path, "halves", "train.max_steps=12"), until=6)
    halves = train(tiny_config(tmp_path, "halves", "train.max_steps=12"), resume=True)
    assert logged(tmp_path / "whole", "train_loss") == logged(tmp_path / "halves", "train_loss")
    assert list(logged(tmp_path / "whole", "train_loss")) == list(range(1, 13))
    # The stop at step 6 adds one evaluation; every evaluation the whole run made is there, equal.
    whole_val, halves_val = logged(tmp_path / "whole", "val_loss"), logged(tmp_path / "halves", "val_loss")
    assert whole_val == {step: halves_val[step] for step in whole_val}
    assert whole.final_val_loss == halves.final_val_loss and whole.sample == halves.sample
    a, _ = load_checkpoint(tmp_path / "whole" / "checkpoint.bin")
    b, _ = load_checkpoint(tmp_path / "halves" / "checkpoint.bin")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_resume_refuses_a_changed_model(tmp_path):
    train(tiny_config(tmp_path, "run", "train.max_steps=4"), until=2)
    with pytest.raises(ConfigError, match="model.n_embd is 16 but the checkpoint was trained with 32"):
        train(tiny_config(tmp_path, "run", "train.max_steps=4", "model.n_embd=16"), resume=True)
