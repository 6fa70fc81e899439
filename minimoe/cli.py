"""The `minimoe` command: train, distill, eval, generate, serve, plot, bench.

User mistakes (a bad config key or value, a path that is not what it should be, a missing or
corrupted checkpoint, text the tokenizer cannot take, a prompt longer than the context, a run
directory that holds another run) and a training run whose loss stops being finite end with one line
on stderr and exit status 2, never a traceback; Ctrl-C outside the training loop's own handling ends
with one line and status 130. Anything else is a bug and keeps its traceback. Under mpirun either
ends every rank of the job (MPI_Abort) with the failing rank's message, so that no rank waits forever
in a collective.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback

INTERRUPTED = 130  # the shell's status for a process ended by SIGINT


class UsageError(Exception):
    """A request that cannot be carried out as given (one line to the user)."""


def user_errors() -> tuple[type[Exception], ...]:
    """The exceptions that mean a user mistake (or a diverged run), reported in one line. Imported
    here, not at the top: the engine loads inside main's try, so a Ctrl-C while it loads is caught."""
    from minimoe.backend import DeviceError
    from minimoe.checkpoint import CheckpointError
    from minimoe.comm.communicator import CommError
    from minimoe.config import ConfigError
    from minimoe.data import DataError
    from minimoe.inference import CacheError
    from minimoe.train import TrainingDiverged

    return ConfigError, DataError, CheckpointError, DeviceError, CommError, TrainingDiverged, CacheError, UsageError


def _train(args: argparse.Namespace) -> None:
    from minimoe.config import load_config
    from minimoe.train import train

    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in train.out_dir and --overwrite replaces it: give one")
    config = load_config(args.config, args.set)
    result = train(config, resume=args.resume, until=args.until, overwrite=args.overwrite)
    if not result.is_main_rank:
        return
    ratio = result.final_val_loss / result.initial_val_loss
    print(f"validation loss: {result.initial_val_loss:.4f} at step 0 -> {result.final_val_loss:.4f} at step "
          f"{result.step} ({100 * ratio:.1f}% of the start)")
    print(f"checkpoint: {result.checkpoint}")
    if result.sample is not None:
        print("sample:\n" + result.sample)


def _distill(args: argparse.Namespace) -> None:
    """`minimoe distill`: `minimoe train` with a teacher (config [distill]; --teacher sets its checkpoint)."""
    args.set = [*args.set, f"distill.teacher={json.dumps(args.teacher)}"]
    _train(args)


def _eval(args: argparse.Namespace) -> None:
    from minimoe import backend
    from minimoe.train import evaluate_split, load_data, load_model

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.every < 1:
        raise UsageError(f"--every must be at least 1, got {args.every}")
    backend.set_device(args.device)
    model, config = load_model(args.ckpt)
    result = evaluate_split(model, load_data(config), args.split, args.batch_size, args.every)
    corpus = config.data.path or config.data.corpus
    scored = f"all {result.tokens:,}" if args.every == 1 else f"{result.tokens:,} (one window in {args.every}) of the"
    print(f"{args.split} loss {result.loss:.4f} +- {result.standard_error:.4f} (standard error over "
          f"{result.batches} batches) on {scored} {args.split} tokens of {corpus}")


def _generate(args: argparse.Namespace) -> None:
    from minimoe.data import ByteTokenizer
    from minimoe.engine import GenerationError, SamplingParams
    from minimoe.generate import generate, prepare
    from minimoe.parallel import start_world
    from minimoe.train import load_model

    world, _ = start_world(args.device)
    expert_parallel = world if world.size > 1 else None  # under mpirun: the experts split over every rank
    model, config = load_model(args.ckpt, expert_parallel)
    tokenizer = ByteTokenizer(config.model.vocab_size)
    prompts = args.prompt or ["\n"]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))
    try:
        sequences = generate(prepare(model), [tokenizer.encode(prompt) for prompt in prompts], params,
                             expert_parallel)
    except GenerationError as error:
        raise UsageError(str(error)) from None
    if world.rank == 0:
        print("\n-----\n".join(prompt + sequence.text for prompt, sequence in zip(prompts, sequences)))


def _serve(args: argparse.Namespace) -> None:
    import functools
    from pathlib import Path

    try:
        import fastapi  # noqa: F401  (the serve extra)
        import uvicorn  # noqa: F401

        from minimoe.serve import EngineError, checkpoint_model, serve
    except ImportError as error:
        raise UsageError(f"minimoe serve needs FastAPI and uvicorn ({error.name} is missing): pip install -e "
                         f"'.[serve]' in a clone of minimoe") from None
    for name, value in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue)):
        if value < 1:
            raise UsageError(f"{name} must be at least 1, got {value}")
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must lie in 1..65535, got {args.port}")
    try:
        serve(functools.partial(checkpoint_model, args.ckpt, args.device),
              args.name or Path(args.ckpt).resolve().parent.name, args.host, args.port, args.max_batch, args.max_queue)
    except EngineError as error:
        raise UsageError(f"the engine could not start: {error}") from None


def _plot(args: argparse.Namespace) -> None:
    from minimoe.plot import PlotError, plot_compare, plot_run

    try:
        if args.compare:
            written = [plot_compare(args.run_dirs, args.compare)]
        else:
            written = [path for run_dir in args.run_dirs for path in plot_run(run_dir)]
    except PlotError as error:
        raise UsageError(str(error)) from None
    print("wrote " + ", ".join(str(path) for path in written))


def _bench(args: argparse.Namespace) -> None:
    from minimoe import bench

    bench.run(args.name, args)


def _training_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--config", help="TOML file (sections [model], [data], [train], [optim], [distill])")
    command.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                         help="override one config value (repeatable), e.g. --set train.max_steps=100")
    command.add_argument("--resume", action="store_true", help="continue from train.out_dir's checkpoint")
    command.add_argument("--overwrite", action="store_true",
                         help="start over in a train.out_dir that holds a run, deleting that run's files")
    command.add_argument("--until", type=int, help="stop after this step (the schedule still spans max_steps)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minimoe", description="A readable Mixture-of-Experts GPT engine.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a GPT (dense or MoE) from a TOML config")
    _training_options(train)
    train.set_defaults(run=_train)

    distill = commands.add_parser("distill", help="Mixture-of-Students: train a student on a teacher's predictions")
    distill.add_argument("--teacher", required=True, help="the teacher's checkpoint.bin (any model, any ep_size)")
    _training_options(distill)
    distill.set_defaults(run=_distill)

    evaluate = commands.add_parser("eval", help="a checkpoint's loss on the whole validation (or training) split")
    evaluate.add_argument("ckpt", help="a checkpoint.bin written by `minimoe train` or `minimoe distill`")
    evaluate.add_argument("--split", default="val", choices=["val", "train"])
    evaluate.add_argument("--batch-size", type=int, default=32, help="windows of block_size per forward pass")
    evaluate.add_argument("--every", type=int, default=1, help="score every N-th window only (an even sample "
                          "of a large split; default 1: all of it)")
    evaluate.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    evaluate.set_defaults(run=_eval)

    generate = commands.add_parser("generate", help="sample text from a checkpoint (several --prompt: one batch)")
    generate.add_argument("--ckpt", required=True, help="a checkpoint.bin written by `minimoe train`")
    generate.add_argument("--prompt", action="append", default=[], help="repeatable; default: a newline")
    generate.add_argument("--max-new-tokens", type=int, default=300)
    generate.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    generate.add_argument("--top-k", type=int, default=40, help="0 samples from the whole vocabulary")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1 keeps everything")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--stop", action="append", default=[], help="end a completion before this string")
    generate.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    generate.set_defaults(run=_generate)

    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server of a checkpoint (the serve extra)")
    serve.add_argument("--ckpt", required=True, help="a checkpoint.bin written by `minimoe train`")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    serve.add_argument("--max-batch", type=int, default=64, help="sequences generated at once (KV cache slots)")
    serve.add_argument("--max-queue", type=int, default=256, help="requests waiting at most; beyond: 429")
    serve.add_argument("--name", help="the model id clients ask for (default: the checkpoint's directory name)")
    serve.set_defaults(run=_serve)

    plot = commands.add_parser("plot", help="PNGs of a run: loss curves, expert load per MoE layer")
    plot.add_argument("run_dirs", nargs="+", metavar="run_dir", help="a train.out_dir (it holds metrics.jsonl)")
    plot.add_argument("--compare", metavar="PNG", help="instead: one plot of every run's validation loss "
                      "against training FLOPs, written to PNG (runs named NAME-s<seed> share a colour)")
    plot.set_defaults(run=_plot)

    bench = commands.add_parser("bench", help="benchmarks with side-by-side peers")
    bench.add_argument("name", choices=["cpu-step", "moe-layer", "gating", "dispatch", "train-step", "attention",
                                        "decode", "serve", "alltoall"])
    bench.add_argument("--config", help="cpu-step: TOML config of the model to time (default: the default config)")
    bench.add_argument("--steps", type=int, default=10, help="cpu-step: timed steps (after 2 warm-up steps)")
    bench.add_argument("--k", type=int, choices=[1, 2], help="moe-layer: top-k (default: both)")
    bench.add_argument("--dropless", action="store_true", help="moe-layer: no capacity, no dropped tokens")
    bench.add_argument("--no-peers", action="store_true",
                       help="moe-layer, decode, train-step, attention: time minimoe only")
    bench.add_argument("--breakdown", action="store_true",
                       help="train-step, cpu-step: also the step by part of the model (minimoe/breakdown.py); "
                            "train-step: the compiled peer's too")
    bench.add_argument("--batches", default="1,8,64,256", help="decode: batch sizes, comma-separated")
    bench.add_argument("--clients", type=int, default=64, help="serve: concurrent clients")
    bench.add_argument("--requests", type=int, default=256, help="serve: requests in all")
    bench.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"], help="serve: where the model runs")
    bench.add_argument("--ep", type=int, default=1,
                       help="moe-layer: expert-parallel size (mpirun -n EP, one GPU per rank) against EP=1")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Information (the device chosen) goes to stdout with the progress; stderr is kept for the error line.
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except KeyboardInterrupt:
        return _end(args, "interrupted", INTERRUPTED)
    except Exception as error:
        if isinstance(error, user_errors()):
            return _end(args, f"error: {error}", 2)
        from minimoe.parallel import abort_world, launched_ranks, rank_prefix

        if launched_ranks() > 1:  # a bug on one rank ends the job, never leaves the others waiting
            sys.stderr.write(f"minimoe {args.command}: {rank_prefix()}failed:\n{traceback.format_exc()}")
            abort_world(1)
        raise
    return 0


def _end(args: argparse.Namespace, message: str, status: int) -> int:
    """One line on stderr, naming the rank under mpirun, and the exit status; under mpirun the whole
    job ends (MPI_Abort), so that no rank waits forever in a collective."""
    from minimoe.parallel import abort_world, rank_prefix

    print(f"minimoe {args.command}: {rank_prefix()}{message}", file=sys.stderr)
    abort_world(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
