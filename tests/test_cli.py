"""The command line: user mistakes end in one line naming the problem, exit status 2, no traceback."""

import os
import re
import subprocess
import sys

import pytest
from helpers import generated_text

from minimoe.cli import main
from minimoe.plot import config_name

TINY = ["--set", "model.n_layer=1", "--set", "model.n_embd=16", "--set", "model.n_head=2",
        "--set", "model.block_size=8", "--set", "train.batch_size=4", "--set", "train.eval_batches=1",
        "--set", "train.sample_tokens=5"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 3-step run of a model with an ASCII-only vocabulary (128)."""
    root = tmp_path_factory.mktemp("cli")
    (root / "corpus.txt").write_text(generated_text(100))
    assert main(["train", *TINY, "--set", f"data.path={root / 'corpus.txt'}", "--set", "model.vocab_size=128",
                 "--set", "train.max_steps=3", "--set", f"train.out_dir={root / 'run'}"]) == 0
    return root / "run" / "checkpoint.bin"


def one_line_error(capsys, argv, expected):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert expected in err, err


def test_generate_from_checkpoint(checkpoint, capsys):
    assert main(["generate", "--ckpt", str(checkpoint), "--prompt", "The", "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out.startswith("The")


def test_eval_reports_the_whole_validation_split(checkpoint, capsys):
    assert main(["eval", str(checkpoint), "--device", "cpu"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"val loss \d\.\d{4} \+- 0\.\d{4} \(standard error over \d+ batches\) on all [\d,]+ val "
                        r"tokens of .*corpus\.txt", line), line


def test_eval_every_scores_an_even_sample_of_the_split(checkpoint, capsys):
    assert main(["eval", str(checkpoint), "--device", "cpu", "--batch-size", "3"]) == 0
    whole = int(re.search(r"on all ([\d,]+) val", capsys.readouterr().out).group(1).replace(",", ""))
    assert main(["eval", str(checkpoint), "--device", "cpu", "--batch-size", "3", "--every", "3"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    sampled = int(re.search(r"on ([\d,]+) \(one window in 3\) of the val tokens", line).group(1).replace(",", ""))
    windows = whole // 8  # block_size 8
    assert sampled == -(-windows // 3) * 8
    one_line_error(capsys, ["eval", str(checkpoint), "--every", "0"], "--every must be at least 1, got 0")


@pytest.mark.parametrize("argv, expected", [
    (["train", "--set", "model.n_layers=3"], "unknown key model.n_layers"),
    (["train", "--set", "train.max_steps=ten"], "train.max_steps must be int, got 'ten'"),
    (["train", "--config", "no/such.toml"], "config file 'no/such.toml' does not exist"),
    (["generate", "--ckpt", "no/such/checkpoint.bin"], "checkpoint no/such/checkpoint.bin does not exist"),
])
def test_user_mistakes_are_one_line(capsys, argv, expected):
    one_line_error(capsys, argv, expected)


def test_corrupted_checkpoint_is_one_line(checkpoint, tmp_path, capsys):
    damaged = tmp_path / "damaged.bin"
    raw = bytearray(checkpoint.read_bytes())
    raw[-10] ^= 0xFF
    damaged.write_bytes(bytes(raw))
    one_line_error(capsys, ["generate", "--ckpt", str(damaged)], "is corrupted")


def test_prompt_outside_vocabulary_is_one_line(checkpoint, capsys):
    one_line_error(capsys, ["generate", "--ckpt", str(checkpoint), "--prompt", "naïve"],
                   "byte 0xc3 at byte offset 2 is outside the tokenizer's vocabulary of 128")


def test_prompt_longer_than_context_is_one_line(checkpoint, capsys):
    one_line_error(capsys, ["generate", "--ckpt", str(checkpoint), "--prompt", "x" * 9],
                   "the prompt is 9 tokens long, more than the model's context (block_size=8)")


def test_plot_writes_loss_curve_and_refuses_a_non_run(checkpoint, tmp_path, capsys):
    assert main(["plot", str(checkpoint.parent)]) == 0
    assert (checkpoint.parent / "loss.png").read_bytes().startswith(b"\x89PNG")
    one_line_error(capsys, ["plot", str(tmp_path)], "metrics.jsonl does not exist")


def test_plot_compare_draws_runs_against_training_flops(checkpoint, tmp_path, capsys):
    corpus = checkpoint.parent.parent / "corpus.txt"
    for name in ["wide-s0", "wide-s1"]:
        assert main(["train", *TINY, "--set", f"data.path={corpus}", "--set", "model.vocab_size=128", "--set",
                     "model.n_embd=32", "--set", "train.max_steps=2", "--set", f"train.out_dir={tmp_path / name}"]) == 0
    png = tmp_path / "compare.png"
    assert main(["plot", "--compare", str(png), str(checkpoint.parent), str(tmp_path / "wide-s0"),
                 str(tmp_path / "wide-s1")]) == 0
    assert png.read_bytes().startswith(b"\x89PNG")
    assert config_name(tmp_path / "wide-s1") == "wide" and config_name(tmp_path / "dense-768") == "dense-768"
    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.jsonl").write_text('{"step": 0, "val_loss": 5.5}\n')
    one_line_error(capsys, ["plot", "--compare", str(png), str(old)], "logs no training FLOPs")
    for bad in [tmp_path / "no" / "such.png", tmp_path / "compare.pdf"]:
        one_line_error(capsys, ["plot", "--compare", str(bad), str(tmp_path / "wide-s0")],
                       f"--compare takes the path of a .png file in an existing directory, got '{bad}'")


def test_console_script_prints_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "minimoe.cli", "train", "--set", "optim.lr=fast"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == "minimoe train: error: optim.lr must be float, got 'fast' (str)"


def test_generate_refuses_values_it_would_otherwise_reinterpret(checkpoint, capsys):
    for flag, value, expected in [
        ("--max-new-tokens", "-5", "max new tokens must be an integer of at least 1, got -5"),
        ("--temperature", "-1", "temperature must be a finite number >= 0"),
        ("--top-k", "-3", "top-k must be an integer of at least 0 (0 keeps the whole vocabulary), got -3"),
        ("--top-p", "0", "top-p must lie in (0, 1], got 0.0"),
    ]:
        one_line_error(capsys, ["generate", "--ckpt", str(checkpoint), flag, value], expected)


@pytest.mark.parametrize("setting, expected", [
    ("train.out_dir={file}", "train.out_dir '{file}' is a file, not a directory"),
    ("data.path={root}", "data.path '{root}' is a directory, not a file"),
    ("train.out_dir={file}/run", "cannot be created or written (Not a directory)"),
])
def test_paths_that_are_not_what_they_should_be_are_one_line(checkpoint, capsys, setting, expected):
    root = checkpoint.parent.parent
    names = {"file": root / "corpus.txt", "root": root}
    one_line_error(capsys, ["train", *TINY, "--set", f"data.path={root / 'corpus.txt'}", "--set",
                            "model.vocab_size=128", "--set", setting.format(**names)], expected.format(**names))


def test_config_that_is_a_directory_is_one_line(tmp_path, capsys):
    one_line_error(capsys, ["train", "--config", str(tmp_path)], f"config file '{tmp_path}' is a directory")


def test_resume_and_overwrite_together_are_refused(capsys):
    one_line_error(capsys, ["train", "--resume", "--overwrite"], "--resume continues the run")


def test_ctrl_c_during_start_up_is_one_line(monkeypatch, tmp_path, capsys):
    import minimoe.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(minimoe.train, "load_data", interrupted)
    assert main(["train", "--set", f"train.out_dir={tmp_path / 'run'}"]) == 130
    assert capsys.readouterr().err == "minimoe train: interrupted\n"


def test_gpu_benchmarks_without_a_gpu_are_one_line(capsys):
    from minimoe.backend import cupy_or_reason

    if not cupy_or_reason()[1]:
        pytest.skip("a GPU is usable here: the benchmarks would run")
    for name in ("moe-layer", "gating", "alltoall"):
        one_line_error(capsys, ["bench", name], f"bench {name} times GPU kernels and needs a CUDA GPU with CuPy")


def test_a_prompt_of_bytes_that_are_not_utf8_is_one_line(checkpoint, capsys):
    """A command line's invalid bytes reach Python as lone surrogates (os.fsdecode)."""
    one_line_error(capsys, ["generate", "--ckpt", str(checkpoint), "--prompt", os.fsdecode(b"The \xff king")],
                   "the text is not valid UTF-8")
