"""Expert parallelism under mpiexec: the MoE layer (EP=2, EP=2 x DP=2, EP=4 flat and as 2 simulated
nodes x 2; top-1, top-2, top-3 with padding masked, dropless) against the one-process layer
(tests/mpi_programs/moe_ep_check.py states what is compared); `minimoe train` under mpiexec against
one process; checkpoints across expert-parallel sizes; a failure on one rank ending the job."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import MPIEXEC

PROGRAM = Path(__file__).parent / "mpi_programs" / "moe_ep_check.py"
pytestmark = [pytest.mark.mpi, pytest.mark.skipif(
    MPIEXEC is None, reason="mpiexec not found: pip install -e '.[mpi]'")]


@pytest.mark.parametrize("ranks, ep_size, local_size", [(2, 2, 0), (4, 2, 0), (4, 4, 0), (4, 4, 2)])
@pytest.mark.parametrize("k, residual, drop_tokens, mask", [(1, False, True, False), (2, True, True, False),
                                                           (2, False, False, False), (3, False, True, True),
                                                           (3, False, False, True)])
def test_expert_parallel_layer_matches_one_process(ranks, ep_size, local_size, k, residual, drop_tokens, mask):
    spec = json.dumps({"k": k, "residual": residual, "ep_size": ep_size, "drop_tokens": drop_tokens,
                       "local_size": local_size, "mask": mask})
    result = subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, str(PROGRAM), spec],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(": ok") == ranks


def train_args(corpus: Path, out_dir: Path, *extra: str) -> list[str]:
    settings = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "model.moe_every=1",
                "model.experts_per_layer=[8]", "model.k=2", "model.capacity_factor=0.8", "train.batch_size=4",
                "train.max_steps=6", "train.eval_interval=3", "train.eval_batches=1", "train.sample_tokens=4",
                "optim.warmup_steps=2", "optim.lr=0.01", f"data.path={corpus}", f"train.out_dir={out_dir}", *extra]
    return ["train", *(arg for setting in settings for arg in ("--set", setting))]


@pytest.mark.parametrize("precision, loss_tolerance, weight_tolerance",
                         [("float64", 1e-10, 1e-10), ("float32", 1e-5, 1e-3)])
@pytest.mark.parametrize("ranks, ep_size, local_size", [(2, 2, 0), (4, 2, 0), (4, 4, 2), (8, 8, 4), (8, 4, 2)])
def test_expert_parallel_training_equals_one_process(tmp_path, ranks, ep_size, local_size, precision,
                                                     loss_tolerance, weight_tolerance):
    """mpirun -n P minimoe train with ep_size (EP=2, EP=2 x DP=2, EP=4 as 2 simulated nodes of 2, EP=8 as
    2 nodes of 4, and EP=4 x DP=2 with each EP group over 2 nodes of 2; hierarchical all-to-alls across
    the simulated nodes) against one process that
    accumulates the same P micro-batches: the same losses every step and the same final weights and
    optimizer state, every expert under its global index, whatever the layout.

    Weights are compared relative to each array's largest value. In float32 that bound is looser than the
    losses': AdamW divides by sqrt(v), so a weight whose gradient is near zero (the attention key bias's
    is exactly zero in exact arithmetic: softmax ignores a shift) moves by an amount set by rounding,
    and summing over ranks rounds differently from summing over micro-batches in one process."""
    import numpy as np
    from helpers import generated_text

    from minimoe.checkpoint import load_checkpoint
    from minimoe.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(generated_text(300))
    common = [f"train.precision={precision}", f"train.local_size={local_size}"]
    parallel = subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, "-m", "minimoe.cli",
                               *train_args(corpus, tmp_path / "parallel", f"train.ep_size={ep_size}", *common)],
                              capture_output=True, text=True, timeout=300)
    assert parallel.returncode == 0, parallel.stdout + parallel.stderr
    layout = f"hierarchical all-to-all over {ep_size // local_size} nodes x {local_size}" if local_size else "flat"
    assert layout in parallel.stdout
    assert main(train_args(corpus, tmp_path / "single", f"train.grad_accum_steps={ranks}", *common)) == 0

    def losses(run: str) -> list[float]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["train_loss"] for line in lines if "train_loss" in line]

    assert len(losses("single")) == 6
    np.testing.assert_allclose(losses("parallel"), losses("single"), rtol=loss_tolerance)
    parallel_arrays, _ = load_checkpoint(tmp_path / "parallel" / "checkpoint.bin")
    single_arrays, _ = load_checkpoint(tmp_path / "single" / "checkpoint.bin")
    assert parallel_arrays.keys() == single_arrays.keys()
    for name, value in single_arrays.items():
        np.testing.assert_allclose(parallel_arrays[name], value, rtol=0,
                                   atol=weight_tolerance * np.abs(value).max(), err_msg=name)


def test_checkpoint_reshards_across_expert_parallel_sizes(tmp_path):
    """Steps 1-2 on 4 ranks (EP=4), steps 3-4 resumed on 2 ranks (EP=2, 2 micro-batches each), steps 5-6
    resumed in one process (4 micro-batches): float64 losses and final weights equal those of one process
    that ran all six steps. Each save writes the experts as part files and loading joins them."""
    import numpy as np
    from helpers import generated_text

    from minimoe.checkpoint import load_checkpoint
    from minimoe.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(generated_text(300))
    resharded, single = tmp_path / "resharded", tmp_path / "single"
    layouts = [(4, ["train.ep_size=4"], 2), (2, ["train.ep_size=2", "train.grad_accum_steps=2"], 4)]
    for ranks, settings, until in layouts:
        args = [*train_args(corpus, resharded, "train.precision=float64", *settings), "--until", str(until)]
        result = subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, "-m", "minimoe.cli", *args,
                                 *(["--resume"] if until > 2 else [])], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        parts = sorted(path.name for path in resharded.glob("checkpoint.bin.step*"))
        assert parts == [f"checkpoint.bin.step{until}.part{part}-of-{ranks}" for part in range(ranks)]
    whole = ["train.precision=float64", "train.grad_accum_steps=4"]
    assert main([*train_args(corpus, resharded, *whole), "--resume"]) == 0
    assert not list(resharded.glob("checkpoint.bin.step*"))  # one process writes a single file
    assert main(train_args(corpus, single, *whole)) == 0

    def losses(run: Path) -> list[float]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["train_loss"] for line in lines if "train_loss" in line]

    assert len(losses(single)) == 6
    np.testing.assert_allclose(losses(resharded), losses(single), rtol=1e-10)
    resharded_arrays, _ = load_checkpoint(resharded / "checkpoint.bin")
    for name, value in load_checkpoint(single / "checkpoint.bin")[0].items():
        np.testing.assert_allclose(resharded_arrays[name], value, rtol=0, atol=1e-10 * np.abs(value).max(),
                                   err_msg=name)


def test_a_failure_on_one_rank_ends_the_whole_job(tmp_path):
    """Rank 1 raises; rank 0 is inside a collective waiting for it. MPI_Abort ends both, with rank 1's
    message, well before the timeout; a refused layout ends it the same way with a one-line reason."""
    from helpers import generated_text

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(generated_text(300))
    program = Path(__file__).parent / "mpi_programs" / "abort_check.py"
    bug = subprocess.run([MPIEXEC, "-n", "2", sys.executable, str(program),
                          *train_args(corpus, tmp_path / "bug", "train.ep_size=2")],
                         capture_output=True, text=True, timeout=60)
    assert bug.returncode != 0
    assert "minimoe train: rank 1: failed:" in bug.stderr and "a bug that only rank 1 meets" in bug.stderr
    layout = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "minimoe.cli",
                             *train_args(corpus, tmp_path / "layout", "train.ep_size=4")],
                            capture_output=True, text=True, timeout=60)
    assert layout.returncode != 0
    assert "error: the world size 2 is not ep_size=4 x dp_size for any whole dp_size" in layout.stderr
    assert not (tmp_path / "layout").exists()  # refused before any work


def test_ctrl_c_on_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    from helpers import generated_text

    from minimoe.checkpoint import load_checkpoint

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(generated_text(300))
    program = Path(__file__).parent / "mpi_programs" / "stop_check.py"
    result = subprocess.run([MPIEXEC, "-n", "2", sys.executable, str(program),
                             *train_args(corpus, tmp_path / "run", "train.ep_size=2")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stopped at step 3; checkpoint saved" in result.stdout
    assert load_checkpoint(tmp_path / "run" / "checkpoint.bin")[1]["step"] == 3


@pytest.mark.parametrize("ranks", [2, 4])
def test_expert_parallel_generation_gives_the_one_process_text(tmp_path, ranks):
    """`mpirun -n P minimoe generate` splits the experts of a checkpoint over P ranks and the prompts
    between them (some ranks get none: they still take part in every step's exchanges): the same greedy
    and seeded texts as one process, cut at the same stop strings."""
    from helpers import generated_text

    from minimoe.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(generated_text(300))
    assert main(train_args(corpus, tmp_path / "run", "train.max_steps=3", "model.k=3")) == 0
    args = ["generate", "--ckpt", str(tmp_path / "run" / "checkpoint.bin"), "--max-new-tokens", "12",
            "--prompt", "The king", "--prompt", "A", "--prompt", "Good night and", "--temperature", "0.9",
            "--top-k", "5", "--seed", "3", "--stop", " ", "--stop", "e"]
    single = subprocess.run([sys.executable, "-m", "minimoe.cli", *args], capture_output=True, text=True, timeout=120)
    parallel = subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, "-m", "minimoe.cli", *args],
                              capture_output=True, text=True, timeout=300)
    assert single.returncode == 0 and parallel.returncode == 0, single.stderr + parallel.stderr
    assert single.stdout.count("-----") == 2
    assert parallel.stdout == single.stdout


def test_expert_parallel_distillation_equals_one_process(tmp_path):
    """`mpirun -n 2 minimoe distill` with the student's experts split (EP=2; each rank holds the whole
    teacher and distils its own micro-batches) against one process accumulating the same two: the same
    losses, distillation losses and final weights (float64)."""
    import numpy as np
    from helpers import generated_text

    from minimoe.checkpoint import load_checkpoint
    from minimoe.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(generated_text(300))
    assert main(train_args(corpus, tmp_path / "teacher", "train.max_steps=3")) == 0
    teacher = ["distill", "--teacher", str(tmp_path / "teacher" / "checkpoint.bin")]
    student = ["train.precision=float64", "distill.alpha=0.6", "distill.temperature=2.0"]
    parallel = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "minimoe.cli", *teacher,
                               *train_args(corpus, tmp_path / "parallel", "train.ep_size=2", *student)[1:]],
                              capture_output=True, text=True, timeout=300)
    assert parallel.returncode == 0, parallel.stdout + parallel.stderr
    assert main([*teacher, *train_args(corpus, tmp_path / "single", "train.grad_accum_steps=2", *student)[1:]]) == 0

    def logged(run: Path, key: str) -> list[float]:
        lines = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [r[key] for r in lines if key in r]

    for key in ("train_loss", "kd_loss"):
        assert len(logged("single", key)) == 6
        np.testing.assert_allclose(logged("parallel", key), logged("single", key), rtol=1e-10)
    parallel_arrays, _ = load_checkpoint(tmp_path / "parallel" / "checkpoint.bin")
    for name, value in load_checkpoint(tmp_path / "single" / "checkpoint.bin")[0].items():
        np.testing.assert_allclose(parallel_arrays[name], value, rtol=0, atol=1e-10 * np.abs(value).max(),
                                   err_msg=name)
