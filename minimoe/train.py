"""The training loop: batches -> forward -> loss -> backward -> clip -> AdamW, with evaluation,
metrics, checkpoints and exact resume.

Exact resume rests on one rule: nothing random depends on the history of the run. The batch of step s
comes from a generator seeded with (seed, s), dropout masks from the backend generator reseeded with
(seed, s), evaluation always uses the same batches, and the checkpoint holds the parameters, both AdamW
moments and the step count. A run stopped at step s and resumed therefore computes bit for bit what the
uninterrupted run computes.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from minimoe import backend
from minimoe.checkpoint import load_checkpoint, save_checkpoint
from minimoe.comm.groups import LayoutError
from minimoe.config import Config, ConfigError, from_dict, to_dict
from minimoe.data import ByteTokenizer, DataError, TokenData, load_text
from minimoe.generate import generate
from minimoe.model import GPT
from minimoe.moe.layer import describe
from minimoe.optim import AdamW, clip_scale, cosine_lr, global_grad_norm
from minimoe.parallel import Parallel, expert_array_names, start_world
from minimoe.tensor import no_grad

EVAL_STREAM = 2**31 - 1  # seeds the fixed evaluation batches, apart from every training step's seed
CHECKPOINT_NAME = "checkpoint.bin"
METRICS_NAME = "metrics.jsonl"


@dataclass
class TrainResult:
    step: int
    initial_val_loss: float
    final_val_loss: float
    sample: str
    checkpoint: Path
    is_main_rank: bool = True  # rank 0 of an MPI job (or the only process): the one that reports


def load_data(config: Config) -> TokenData:
    tokenizer = ByteTokenizer(config.model.vocab_size)
    text = load_text(config.data.path)
    try:
        tokens = tokenizer.encode(text)
    except DataError as error:
        raise DataError(f"the corpus does not fit model.vocab_size={config.model.vocab_size}: {error}") from None
    return TokenData(tokens, config.data.val_fraction, config.model.block_size)


def evaluate(model: GPT, data: TokenData, config: Config) -> float:
    """Mean validation loss over the same eval_batches batches every time it is called."""
    rng = np.random.default_rng([config.train.seed, EVAL_STREAM])
    losses = []
    model.eval()
    with no_grad():
        for _ in range(config.train.eval_batches):
            inputs, targets = data.batch("val", config.train.batch_size, rng)
            losses.append(model(backend.asarray(inputs), backend.asarray(targets)).lm_loss.item())
    model.train()
    return float(np.mean(losses))


def checkpoint_arrays(model: GPT, optimizer: AdamW) -> dict[str, np.ndarray]:
    """The model's weights in float32 (the optimizer's master weights where training runs in bf16) and
    the optimizer's state."""
    arrays = {f"model.{name}": backend.to_numpy(value)
              for (name, _), value in zip(model.named_parameters(), optimizer.values())}
    for name, value in optimizer.state_dict().items():
        arrays[f"optim.{name}"] = np.asarray(value)
    return arrays


def _section(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {name[len(prefix):]: value for name, value in arrays.items() if name.startswith(prefix)}


def load_model(path: str | Path) -> tuple[GPT, Config]:
    """The model saved in a checkpoint, with the config it was trained with."""
    arrays, meta = load_checkpoint(path)
    config = from_dict(meta["config"])
    model = GPT(config.model)
    model.load_state_dict(_section(arrays, "model."))
    return model, config


def _check_resumable(config: Config, saved: Config) -> None:
    """Resuming continues the same run: the model, data and optimizer settings must not change."""
    for section in ("model", "data", "optim"):
        mine, theirs = to_dict(config)[section], to_dict(saved)[section]
        for key in mine:
            if mine[key] != theirs[key]:
                raise ConfigError(f"cannot resume: {section}.{key} is {mine[key]!r} but the checkpoint was "
                                  f"trained with {theirs[key]!r}")
    for key in ("seed", "batch_size"):
        if getattr(config.train, key) != getattr(saved.train, key):
            raise ConfigError(f"cannot resume: train.{key} is {getattr(config.train, key)!r} but the checkpoint "
                              f"was trained with {getattr(saved.train, key)!r}")


def _read_metrics(path: Path, up_to_step: int) -> list[str]:
    if not path.exists():
        return []
    return [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= up_to_step]


def _progress(step: int, total: int, loss: float, lr: float, tokens_per_s: float) -> str:
    width = 24
    filled = int(width * step / total)
    return (f"[{'#' * filled}{'.' * (width - filled)}] step {step:>5}/{total} | loss {loss:.4f} | "
            f"lr {lr:.2e} | {tokens_per_s:,.0f} tok/s")


def _silent(*args: Any, **kwargs: Any) -> None:
    """print for ranks other than 0."""


class _StopFlag:
    """First Ctrl-C: finish the step in flight, save a checkpoint, stop. A second one stops at once."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: finishing this step and saving a checkpoint (Ctrl-C again to abort)", file=sys.stderr)


def train(config: Config, resume: bool = False, until: int | None = None) -> TrainResult:
    """Train as `config` says, from scratch or from the run's checkpoint, up to step `until`
    (default train.max_steps); returns the losses, a sample and the checkpoint path."""
    train_config, optim_config = config.train, config.optim
    world, device = start_world(train_config.device)
    out_dir = Path(train_config.out_dir)
    checkpoint_path, metrics_path = out_dir / CHECKPOINT_NAME, out_dir / METRICS_NAME
    stop_at = train_config.max_steps if until is None else until
    if not 0 < stop_at <= train_config.max_steps:
        raise ConfigError(f"--until must lie in 1..train.max_steps={train_config.max_steps}, got {stop_at}")

    try:
        parallel = Parallel.build(world, train_config.ep_size,
                                  [count for count in config.model.experts_in_block() if count],
                                  train_config.local_size)
    except LayoutError as error:
        raise ConfigError(str(error)) from None
    say = print if parallel.is_main else _silent
    data = load_data(config)
    expert_parallel = parallel.groups.expert_parallel if train_config.ep_size > 1 else None
    model = GPT(config.model, expert_parallel)
    precision = train_config.precision if train_config.precision != "auto" else (
        "bfloat16" if device == "cuda" else "float32")
    if precision == "bfloat16":
        model.to(backend.bfloat16())  # the working copies; AdamW keeps float32 masters
    elif precision == "float64":
        model.to(np.float64)
    optimizer = AdamW(model.parameters(), lr=optim_config.lr, betas=(optim_config.beta1, optim_config.beta2),
                      eps=optim_config.eps, weight_decay=optim_config.weight_decay)
    expert_names = expert_array_names(model, optimizer)
    say(f"minimoe: {parallel.describe_parameters(model)} on {device} ({precision}); "
        f"{len(data.splits['train']):,} training tokens; out_dir {out_dir}"
        + (f"; {world.size} ranks, ep_size {train_config.ep_size}, {parallel.describe_all_to_all()}"
           if world.size > 1 else ""))

    step, initial_val_loss = 0, None
    if resume:
        arrays, meta = load_checkpoint(checkpoint_path)
        _check_resumable(config, from_dict(meta["config"]))
        arrays = parallel.local_experts(arrays, expert_names)  # checkpoints hold every expert
        model.load_state_dict(_section(arrays, "model."))
        optimizer.load_state_dict(_section(arrays, "optim."))
        step, initial_val_loss = meta["step"], meta["initial_val_loss"]
        say(f"resumed from {checkpoint_path} at step {step}")
        if step >= stop_at:
            raise ConfigError(f"the checkpoint is already at step {step}; raise train.max_steps or --until")
    if parallel.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    metrics = _read_metrics(metrics_path, step)

    def record(**fields: Any) -> None:
        metrics.append(json.dumps(fields))

    def save() -> None:
        meta = {"config": to_dict(config), "step": step, "initial_val_loss": initial_val_loss}
        arrays, parts = parallel.save_expert_parts(checkpoint_path, step, checkpoint_arrays(model, optimizer),
                                                   expert_names)
        if parallel.is_main:
            save_checkpoint(checkpoint_path, arrays, meta, parts)
            metrics_path.write_text("\n".join(metrics) + "\n")

    if step == 0:
        initial_val_loss = val_loss = evaluate(model, data, config)
        record(step=0, val_loss=initial_val_loss)
        say(f"step     0 | validation loss {initial_val_loss:.4f}")

    interactive = sys.stdout.isatty() and parallel.is_main
    stop = _StopFlag()
    previous_handler = signal.signal(signal.SIGINT, stop)
    accumulation = train_config.grad_accum_steps
    micro_batches = world.size * accumulation  # in one step, over all ranks
    tokens_per_step = micro_batches * train_config.batch_size * config.model.block_size
    window_start, window_steps, stopping = time.perf_counter(), 0, False
    try:
        while step < stop_at and not stopping:
            lr = cosine_lr(step, optim_config.lr, optim_config.min_lr, optim_config.warmup_steps,
                           train_config.max_steps)
            optimizer.lr = lr
            loss_sum = 0.0
            for accumulated in range(accumulation):
                # Micro-batch `micro` of the step is the same data and dropout on any layout; one
                # micro-batch per step keeps the seeds of a plain single-process run.
                micro = world.rank * accumulation + accumulated
                seeds = [train_config.seed, step] + ([micro] if micro_batches > 1 else [])
                backend.manual_seed(*seeds)
                inputs, targets = data.batch("train", train_config.batch_size, np.random.default_rng(seeds))
                output = model(backend.asarray(inputs), backend.asarray(targets))
                (output.loss * (1.0 / micro_batches) if micro_batches > 1 else output.loss).backward()
                loss_sum += output.lm_loss.item()
            if world.size > 1:
                parallel.sync_gradients(model)
                grad_norm = parallel.grad_norm(model)
            else:
                grad_norm = global_grad_norm(optimizer.parameters)
            optimizer.step(clip_scale(grad_norm, train_config.grad_clip))
            grad_norm = float(grad_norm)
            model.zero_grad()
            step += 1
            window_steps += 1
            loss_value, stopping = parallel.mean_and_any(loss_sum / accumulation, stop.requested)
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_steps * tokens_per_step / elapsed
            moe = describe(output.moe)
            record(step=step, train_loss=loss_value, lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_s,
                   **({"moe": moe} if moe else {}))
            line = _progress(step, train_config.max_steps, loss_value, lr, tokens_per_s)
            if step % train_config.log_interval == 0 or step == stop_at:
                say(("\r" if interactive else "") + line, flush=True)
                for layer, stats in enumerate(moe):
                    say(f"    moe layer {layer}: tokens per expert {stats['tokens_per_expert']}, "
                        f"dropped {100 * stats['dropped']:.1f}% (capacity {stats['capacity']})")
                window_start, window_steps = time.perf_counter(), 0
            elif interactive:
                say("\r" + line, end="", flush=True)
            if step % train_config.eval_interval == 0 or step == stop_at or stopping:
                val_loss = evaluate(model, data, config)
                record(step=step, val_loss=val_loss)
                say(f"step {step:>5} | validation loss {val_loss:.4f}")
                save()
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    if stopping:
        say(f"stopped at step {step}; checkpoint saved to {checkpoint_path}; continue with --resume")

    tokenizer = ByteTokenizer(config.model.vocab_size)
    prompt = tokenizer.encode(train_config.sample_prompt)
    sample = tokenizer.decode(generate(model, prompt, train_config.sample_tokens, train_config.temperature,
                                       train_config.top_k, seed=train_config.seed))
    return TrainResult(step, initial_val_loss, val_loss, sample, checkpoint_path, parallel.is_main)
