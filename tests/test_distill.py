"""Mixture-of-Students on the CPU: the distillation loss and its float64 gradient, `minimoe distill` from a
teacher written by `minimoe train`, alpha = 0 equal to plain training bit for bit, staged distillation
(kd_stop), and exact resume."""

import json

import numpy as np
import pytest
from helpers import check_gradients, generated_text
from hypothesis import given
from hypothesis import strategies as st

from minimoe.checkpoint import load_checkpoint
from minimoe.cli import main
from minimoe.config import from_dict
from minimoe.cuda.distillation import distillation_forward
from minimoe.ops import distillation_loss

seeds = st.integers(0, 2**32 - 1)


@given(rows=st.integers(1, 6), vocab=st.integers(1, 9), temperature=st.sampled_from([0.5, 1.0, 2.0, 4.0]),
       seed=seeds)
def test_distillation_gradient_matches_finite_differences(rows, vocab, temperature, seed):
    rng = np.random.default_rng(seed)
    teacher = rng.standard_normal((rows, vocab)) * 2
    check_gradients(lambda student: distillation_loss(student, teacher, temperature),
                    [rng.standard_normal((rows, vocab)) * 2])


@given(rows=st.integers(1, 6), vocab=st.integers(2, 9), temperature=st.sampled_from([0.5, 1.0, 3.0]), seed=seeds)
def test_distillation_loss_is_the_scaled_mean_kl(rows, vocab, temperature, seed):
    rng = np.random.default_rng(seed)
    student, teacher = rng.standard_normal((2, rows, vocab))

    def softmax(z):
        e = np.exp(z / temperature - (z / temperature).max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    p, q = softmax(teacher), softmax(student)
    expected = temperature**2 * np.mean([sum(p[n, v] * np.log(p[n, v] / q[n, v]) for v in range(vocab))
                                          for n in range(rows)])
    loss, _, _ = distillation_forward(student, teacher, temperature)
    np.testing.assert_allclose(loss, expected, rtol=1e-10)
    assert distillation_forward(teacher, teacher, temperature)[0] == pytest.approx(0.0, abs=1e-12)


SETTINGS = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "train.batch_size=8",
            "train.max_steps=8", "train.eval_interval=4", "train.eval_batches=1", "train.sample_tokens=4",
            "optim.warmup_steps=2", "optim.lr=0.01"]


def args(corpus, out_dir, *extra):
    return [arg for s in [*SETTINGS, f"data.path={corpus}", f"train.out_dir={out_dir}", *extra] for arg in ("--set", s)]


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def without_speed(run):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records(run)]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A top-2 MoE teacher (8 experts, 4 layers), written by minimoe train."""
    root = tmp_path_factory.mktemp("distill")
    (root / "corpus.txt").write_text(generated_text(300))
    assert main(["train", *args(root / "corpus.txt", root / "teacher", "model.n_layer=4", "model.moe_every=2",
                                "model.k=2", "train.max_steps=30", "train.eval_interval=30")]) == 0
    return root / "teacher" / "checkpoint.bin"


def student_args(teacher, out_dir, *extra):
    corpus = teacher.parent.parent / "corpus.txt"
    return ["distill", "--teacher", str(teacher), *args(corpus, out_dir, "model.moe_every=2", "model.k=1", *extra)]


def test_a_distilled_student_trains_and_logs_the_distillation_loss(teacher, tmp_path):
    assert main(student_args(teacher, tmp_path / "student", "distill.alpha=0.7", "distill.temperature=2.0")) == 0
    logged = records(tmp_path / "student")
    kd = [r["kd_loss"] for r in logged if "kd_loss" in r]
    assert len(kd) == 8 and all(np.isfinite(kd)) and kd[-1] < kd[0]
    val = [r["val_loss"] for r in logged if "val_loss" in r]
    assert val[-1] < val[0]


def test_alpha_zero_is_plain_training_bit_for_bit(teacher, tmp_path):
    assert main(student_args(teacher, tmp_path / "alpha0", "distill.alpha=0.0")) == 0
    corpus = teacher.parent.parent / "corpus.txt"
    assert main(["train", *args(corpus, tmp_path / "plain", "model.moe_every=2", "model.k=1")]) == 0
    assert without_speed(tmp_path / "alpha0") == without_speed(tmp_path / "plain")
    distilled, _ = load_checkpoint(tmp_path / "alpha0" / "checkpoint.bin")
    plain, _ = load_checkpoint(tmp_path / "plain" / "checkpoint.bin")
    for name, value in plain.items():
        np.testing.assert_array_equal(distilled[name], value, err_msg=name)


def test_staged_distillation_stops_the_teacher_at_kd_stop(teacher, tmp_path):
    assert main(student_args(teacher, tmp_path / "staged", "distill.kd_stop=0.5")) == 0
    assert [r["step"] for r in records(tmp_path / "staged") if "kd_loss" in r] == [1, 2, 3, 4]


def test_the_logged_training_flops_count_the_teacher_while_it_teaches(teacher, tmp_path):
    """Tokens and training FLOPs beside each validation loss: 3x the student's forward on every step, the
    teacher's forward on the distilled ones (kd_stop 0.5: steps 1-4 of 8; 8 x 16 tokens a step)."""
    assert main(student_args(teacher, tmp_path / "staged", "distill.kd_stop=0.5")) == 0
    student = from_dict(load_checkpoint(tmp_path / "staged" / "checkpoint.bin")[1]["config"]).model
    teacher_model = from_dict(load_checkpoint(teacher)[1]["config"]).model
    per_step = 8 * 16
    expected = {0: (0, 0), 4: (4 * per_step, (3 * student.forward_flops_per_token() +
                                              teacher_model.forward_flops_per_token()) * 4 * per_step),
                8: (8 * per_step, 3 * student.forward_flops_per_token() * 8 * per_step +
                    teacher_model.forward_flops_per_token() * 4 * per_step)}
    logged = {r["step"]: (r["tokens"], r["train_flops"]) for r in records(tmp_path / "staged") if "val_loss" in r}
    assert logged == expected


def test_a_resumed_distillation_equals_the_uninterrupted_one(teacher, tmp_path):
    assert main(student_args(teacher, tmp_path / "whole")) == 0
    assert main([*student_args(teacher, tmp_path / "halves"), "--until", "5"]) == 0
    assert main([*student_args(teacher, tmp_path / "halves"), "--resume"]) == 0
    train_records = [r for r in without_speed(tmp_path / "halves") if "train_loss" in r]
    assert train_records == [r for r in without_speed(tmp_path / "whole") if "train_loss" in r]
    whole, _ = load_checkpoint(tmp_path / "whole" / "checkpoint.bin")
    halves, _ = load_checkpoint(tmp_path / "halves" / "checkpoint.bin")
    for name, value in whole.items():
        np.testing.assert_array_equal(halves[name], value, err_msg=name)


def test_a_resume_with_other_distillation_settings_is_refused(teacher, tmp_path, capsys):
    assert main([*student_args(teacher, tmp_path / "run"), "--until", "2"]) == 0
    assert main([*student_args(teacher, tmp_path / "run", "distill.alpha=0.1"), "--resume"]) == 2
    assert "cannot resume: distill.alpha is 0.1 but the checkpoint was trained with 0.5" in capsys.readouterr().err


def test_a_teacher_of_another_vocabulary_is_refused_in_one_line(teacher, tmp_path, capsys):
    assert main(student_args(teacher, tmp_path / "run", "model.vocab_size=128")) == 2
    assert "the teacher's vocabulary (256) differs from the student's model.vocab_size=128" in capsys.readouterr().err
