"""The training loop: batches -> forward -> loss -> backward -> clip -> AdamW, with evaluation,
metrics, checkpoints and exact resume.

Exact resume rests on one rule: nothing random depends on the history of the run. The batch of step s
comes from a generator seeded with (seed, s), dropout masks from the backend generator reseeded with
(seed, s), evaluation always uses the same batches, and the checkpoint holds the parameters, both AdamW
moments and the step count. A run stopped at step s and resumed therefore computes bit for bit what the
uninterrupted run computes.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from minimoe import backend, ops
from minimoe.checkpoint import load_checkpoint, save_checkpoint
from minimoe.comm.communicator import Communicator
from minimoe.comm.groups import LayoutError
from minimoe.config import Config, ConfigError, from_dict, to_dict
from minimoe.data import ByteTokenizer, DataError, TokenData, load_documents
from minimoe.engine import SamplingParams
from minimoe.generate import generate
from minimoe.model import GPT
from minimoe.moe.gate import Routing
from minimoe.optim import AdamW, clip_scale, cosine_lr, global_grad_norm
from minimoe.parallel import Parallel, expert_array_names, local_experts, start_world
from minimoe.run_dir import METRICS_NAME, RunDir, read_metrics, write_metrics
from minimoe.step import TrainStep
from minimoe.tensor import no_grad

EVAL_STREAM = 2**31 - 1  # seeds the fixed evaluation batches, apart from every training step's seed


@dataclass
class TrainResult:
    step: int
    initial_val_loss: float
    final_val_loss: float
    sample: str | None  # None when Ctrl-C stopped the run or the sampling
    checkpoint: Path
    is_main_rank: bool = True  # rank 0 of an MPI job (or the only process): the one that reports


def load_data(config: Config) -> TokenData:
    tokenizer = ByteTokenizer(config.model.vocab_size)
    texts = load_documents(config.data.path, config.data.corpus)
    try:
        documents = [tokenizer.encode(text) for text in texts]
    except DataError as error:
        raise DataError(f"the corpus does not fit model.vocab_size={config.model.vocab_size}: {error}") from None
    return TokenData(documents, config.data.val_fraction, config.model.block_size)


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


@dataclass
class SplitLoss:
    loss: float  # mean next-token loss over every scored token (nats)
    standard_error: float  # of that mean, from the spread of the batches' means
    tokens: int
    batches: int


def evaluate_split(model: GPT, data: TokenData, split: str, batch_size: int, every: int = 1) -> SplitLoss:
    """The loss on a whole split rather than on a few random windows (whose error can be as large as
    the differences being measured): the split cut into consecutive windows of block_size, each scoring
    its block_size next tokens, so every token but the last window's remainder is scored once. every > 1
    scores one window in `every`: a sample spread evenly over the split (every document's tail), for
    splits too large to score whole often. An MoE routes each batch in evaluation mode
    (eval_capacity_factor), so its loss can move with batch_size."""
    block = data.block_size
    starts = np.arange(0, (len(data.splits[split]) - 1) // block, every) * block
    windows = len(starts)
    batch_means, weights = [], []
    model.eval()
    with no_grad():
        for first in range(0, windows, batch_size):
            inputs, targets = data.windows(split, starts[first:first + batch_size])
            batch_means.append(model(backend.asarray(inputs), backend.asarray(targets)).lm_loss.item())
            weights.append(len(inputs))
    model.train()
    batch_means, weights, count = np.array(batch_means), np.array(weights) / windows, len(batch_means)
    mean = float(np.sum(weights * batch_means))
    variance = np.sum(weights * (batch_means - mean) ** 2) * count / max(count - 1, 1)  # of one batch's mean
    return SplitLoss(mean, float(np.sqrt(variance / count)), windows * block, count)


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


def load_model(path: str | Path, expert_parallel: Communicator | None = None) -> tuple[GPT, Config]:
    """The model saved in a checkpoint (whatever ep_size wrote it), with the config it was trained with.
    expert_parallel: the ranks to split the experts over (this rank keeps its slice); None: all here."""
    arrays, meta = load_checkpoint(path)
    config = from_dict(meta["config"])
    model = GPT(config.model, expert_parallel)
    experts = Parallel.expert_parameters(model)
    expert_names = {name for name, parameter in model.named_parameters() if id(parameter) in experts}
    model.load_state_dict(local_experts(_section(arrays, "model."), expert_names, expert_parallel))
    return model, config


def _layout(world_size: int, config: Config, device: str, precision: str) -> dict[str, Any]:
    """What decides a step's numbers besides the config: the same layout repeats the run bit for bit."""
    return {"ranks": world_size, "ep_size": config.train.ep_size, "device": device, "precision": precision}


def _check_resumable(config: Config, saved: Config, meta: dict[str, Any], micro_batches: int, stop_at: int,
                     until: int | None) -> list[str]:
    """Resuming continues the same run: the model, data, optimizer, seed and global batch must not
    change (ConfigError naming the first that did). Returns what the resumed run does differently."""
    step = meta["step"]
    for section in ("model", "data", "optim", "distill"):
        mine, theirs = to_dict(config)[section], to_dict(saved)[section]
        for key in mine:
            if mine[key] != theirs[key]:
                raise ConfigError(f"cannot resume: {section}.{key} is {mine[key]!r} but the checkpoint was "
                                  f"trained with {theirs[key]!r}")
    for key in ("seed", "batch_size"):
        if getattr(config.train, key) != getattr(saved.train, key):
            raise ConfigError(f"cannot resume: train.{key} is {getattr(config.train, key)!r} but the checkpoint "
                              f"was trained with {getattr(saved.train, key)!r}")
    saved_micro_batches = meta.get("micro_batches", micro_batches)  # absent from older checkpoints: not checked
    if micro_batches != saved_micro_batches:
        ranks = micro_batches // config.train.grad_accum_steps
        hint = (f"; with {ranks} ranks, set train.grad_accum_steps={saved_micro_batches // ranks}"
                if saved_micro_batches % ranks == 0 else "")
        raise ConfigError(f"cannot resume: the checkpoint's steps each took {saved_micro_batches} micro-batches "
                          f"(ranks x train.grad_accum_steps), this run's would take {micro_batches} "
                          f"({ranks} x {config.train.grad_accum_steps}){hint}")
    max_steps, saved_max_steps = config.train.max_steps, saved.train.max_steps
    if step >= stop_at:
        if until is not None and until < max_steps:
            raise ConfigError(f"--until {until} is not past the checkpoint's step {step}")
        raise ConfigError(f"the run is complete at step {step} (train.max_steps={max_steps}); to train further, "
                          f"resume with --set train.max_steps=N for some N > {step} (the learning-rate schedule "
                          f"then decays over N steps)")
    differences = []
    if max_steps != saved_max_steps:
        differences.append(f"train.max_steps {saved_max_steps} -> {max_steps}: the learning-rate schedule now "
                           f"decays over {max_steps} steps, so from step {step} on the learning rates differ from "
                           f"the original run's")
    return differences


def _progress(step: int, total: int, loss: float, lr: float, tokens_per_s: float) -> str:
    width = 24
    filled = int(width * step / total)
    return (f"[{'#' * filled}{'.' * (width - filled)}] step {step:>5}/{total} | loss {loss:.4f} | "
            f"lr {lr:.2e} | {tokens_per_s:,.0f} tok/s")


class Console:
    """What rank 0 prints: log lines, and in a terminal a live progress bar that a log line replaces
    (the bar is rewritten in place with a carriage return; a line printed while it shows clears it
    first, so the two never share a line). Ranks other than 0 print nothing."""

    def __init__(self, enabled: bool, interactive: bool):
        self.enabled, self.interactive, self.bar_shown = enabled, interactive and enabled, False

    def _clear_bar(self) -> None:
        if self.bar_shown:
            print("\r\033[K", end="")
            self.bar_shown = False

    def line(self, text: str) -> None:
        if self.enabled:
            self._clear_bar()
            print(text, flush=True)

    def bar(self, text: str) -> None:
        if self.interactive:
            self._clear_bar()
            print(text, end="", flush=True)
            self.bar_shown = True


class _StopFlag:
    """First Ctrl-C: finish the step in flight, save a checkpoint, stop. A second one stops at once."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: finishing this step and saving a checkpoint (Ctrl-C again to abort)", file=sys.stderr)


def moe_log(routings: list[Routing]) -> list[dict[str, Any]]:
    """Per MoE layer, what the training log records: tokens per expert, dropped fraction, capacity."""
    return [{"tokens_per_expert": backend.to_numpy(r.tokens_per_expert).tolist(),
             "dropped": round(float(r.dropped), 6), "capacity": r.capacity} for r in routings]


@dataclass
class Run:
    """One training run while it trains: its parts, where it stands, and what it has logged."""

    config: Config
    world: Communicator
    parallel: Parallel
    run_dir: RunDir
    console: Console
    data: TokenData
    model: GPT
    optimizer: AdamW
    expert_names: set[str]
    layout: dict[str, Any]
    teacher: GPT | None = None  # Mixture-of-Students: the model the student learns from (forward only)
    graphed_step: TrainStep | None = None  # the step as CUDA graphs, where this run's steps allow it
    step: int = 0
    initial_val_loss: float = math.nan
    val_loss: float = math.nan
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def micro_batches(self) -> int:
        """Micro-batches in one step, over all ranks: the global batch is this x train.batch_size."""
        return self.world.size * self.config.train.grad_accum_steps

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batches * self.config.train.batch_size * self.config.model.block_size


def _start(config: Config, run_dir: RunDir, resume: bool, overwrite: bool, until: int | None) -> tuple[Run, int]:
    """Everything a run needs before its first step, and the step it stops after: the world and
    device, the locked run directory, data, model and optimizer, restored from the checkpoint when
    resuming."""
    train_config = config.train
    stop_at = train_config.max_steps if until is None else until
    if not 0 < stop_at <= train_config.max_steps:
        raise ConfigError(f"--until must lie in 1..train.max_steps={train_config.max_steps}, got {stop_at} "
                          f"(to train past train.max_steps, raise it: --set train.max_steps=N)")
    world, device = start_world(train_config.device)
    try:
        parallel = Parallel.build(world, train_config.ep_size,
                                  [count for count in config.model.experts_in_block() if count],
                                  train_config.local_size)
    except LayoutError as error:
        raise ConfigError(str(error)) from None
    if parallel.is_main:
        run_dir.claim(resume, overwrite)
    console = Console(parallel.is_main, sys.stdout.isatty())
    data = load_data(config)
    expert_parallel = parallel.groups.expert_parallel if train_config.ep_size > 1 else None
    model = GPT(config.model, expert_parallel)
    precision = train_config.precision if train_config.precision != "auto" else (
        "bfloat16" if device == "cuda" else "float32")
    if precision == "bfloat16" and device == "cpu":
        raise ConfigError("train.precision = 'bfloat16' needs a GPU, and train.device = 'auto' chose the CPU here")
    if precision == "bfloat16":
        model.to(backend.bfloat16())  # the working copies; AdamW keeps float32 masters
    elif precision == "float64":
        model.to(np.float64)
    optim_config = config.optim
    optimizer = AdamW(model.parameters(), lr=optim_config.lr, betas=(optim_config.beta1, optim_config.beta2),
                      eps=optim_config.eps, weight_decay=optim_config.weight_decay)
    run = Run(config, world, parallel, run_dir, console, data, model, optimizer,
              expert_array_names(model, optimizer), _layout(world.size, config, device, precision),
              _load_teacher(config, model) if config.distill.teacher else None)
    console.line(f"minimoe: {parallel.describe_parameters(model)} on {device} ({precision}); "
                 f"{len(data.splits['train']):,} training tokens; out_dir {run_dir.path}"
                 + (f"; {world.size} ranks, ep_size {train_config.ep_size}, {parallel.describe_all_to_all()}"
                    if world.size > 1 else ""))
    distill = config.distill
    if run.teacher is not None:
        console.line(f"distilling from {distill.teacher} ({run.teacher.num_parameters():,} parameters): loss = "
                     f"{1 - distill.alpha:g} CE + {distill.alpha:g} KD at temperature {distill.temperature:g}, up to "
                     f"step {math.ceil(distill.kd_stop * train_config.max_steps)}, then the labels alone")
    obstacle = _graphs_obstacle(config, world.size)
    if device == "cuda" and train_config.cuda_graphs:
        if obstacle is None:
            run.graphed_step = TrainStep(model, optimizer, train_config.grad_clip, graphs=True)
            console.line("each step replays as CUDA graphs (train.cuda_graphs=false runs it eagerly)")
        else:
            console.line(f"steps run eagerly, not as CUDA graphs: {obstacle}")
    if resume:
        _restore(run, stop_at, until)
    return run, stop_at


def _graphs_obstacle(config: Config, world_size: int) -> str | None:
    """Why this run's steps cannot replay as CUDA graphs (minimoe/step.py), or None if they can."""
    model = config.model
    if world_size > 1:
        return f"{world_size} ranks (the gradients' exchange runs between backward and update)"
    if config.train.grad_accum_steps > 1:
        return f"train.grad_accum_steps = {config.train.grad_accum_steps} (one micro-batch a step is captured)"
    if config.distill.teacher:
        return "a distillation run (the teacher's forward is not captured)"
    if model.moe_every and not model.drop_tokens:
        return "dropless MoE layers (each step's capacity is read on the host)"
    if model.moe_every and model.k > 2:
        return f"k = {model.k} (routing beyond top-2 reads the experts' loads on the host)"
    return None


def _load_teacher(config: Config, student: GPT) -> GPT:
    """The teacher of a distillation run: its whole checkpoint (all experts, whatever ep_size wrote it) on
    every rank, in the student's working precision, in evaluation mode; it only ever runs forward."""
    teacher, teacher_config = load_model(config.distill.teacher)
    if teacher_config.model.vocab_size != config.model.vocab_size:
        raise ConfigError(f"the teacher's vocabulary ({teacher_config.model.vocab_size}) differs from the student's "
                          f"model.vocab_size={config.model.vocab_size}")
    if teacher_config.model.block_size < config.model.block_size:
        raise ConfigError(f"the teacher's context ({teacher_config.model.block_size}) is shorter than the student's "
                          f"model.block_size={config.model.block_size}")
    return teacher.to(student.wte.weight.dtype).eval()


def _distilling(config: Config, step: int) -> bool:
    """Whether step (0-based) adds the distillation term: a teacher, alpha > 0, and before kd_stop (the
    paper's staged distillation: late in training the student learns from the labels alone)."""
    distill = config.distill
    return bool(distill.teacher) and distill.alpha > 0 and step < distill.kd_stop * config.train.max_steps


def training_cost(run: Run) -> dict[str, int]:
    """What the run's steps so far cost: the tokens trained on and the training FLOPs (3x the student's
    forward, plus the teacher's forward on the steps that distil), for plots of loss against compute."""
    config, tokens_per_step = run.config, run.tokens_per_step
    flops = 3 * config.model.forward_flops_per_token() * run.step * tokens_per_step
    if run.teacher is not None:
        distilled_steps = sum(_distilling(config, step) for step in range(run.step))
        flops += run.teacher.config.forward_flops_per_token() * distilled_steps * tokens_per_step
    return {"tokens": run.step * tokens_per_step, "train_flops": flops}


def _restore(run: Run, stop_at: int, until: int | None) -> None:
    """Load the run's checkpoint into `run` after checking that it continues the same run, and say what
    continues exactly and what does not."""
    arrays, meta = load_checkpoint(run.run_dir.checkpoint)
    differences = _check_resumable(run.config, from_dict(meta["config"]), meta, run.micro_batches, stop_at, until)
    arrays = local_experts(arrays, run.expert_names, run.parallel.groups.expert_parallel)  # checkpoints hold all
    run.model.load_state_dict(_section(arrays, "model."))
    run.optimizer.load_state_dict(_section(arrays, "optim."))
    run.step, run.initial_val_loss = meta["step"], meta["initial_val_loss"]
    if run.parallel.is_main and run.run_dir.metrics.exists():
        run.metrics, skipped = read_metrics(run.run_dir.metrics, up_to_step=run.step)
        if skipped:
            differences.append(f"{skipped} damaged line(s) of {METRICS_NAME} skipped")
    saved_layout = meta.get("layout", run.layout)  # absent from older checkpoints: not checked
    if saved_layout != run.layout:
        changed = ", ".join(f"{key} {saved_layout[key]} -> {run.layout[key]}" for key in run.layout
                            if saved_layout[key] != run.layout[key])
        differences.append(f"{changed}: the same batches, dropout and schedule, but sums run in another order, "
                           f"so the numbers are not bit for bit those of the original layout")
    run.console.line(f"resumed from {run.run_dir.checkpoint} at step {run.step}: "
                     + ("; ".join(differences) if differences else
                        "the same batches, dropout, schedule and layout, so the continuation is bit for bit "
                        "the uninterrupted run"))


class TrainingDiverged(Exception):
    """The loss or the gradient norm stopped being finite (a one-line error; nothing is saved)."""


def _train_step(run: Run, stop: _StopFlag) -> tuple[float, float, float, list[Routing], bool, float | None]:
    """One optimizer step over every rank's micro-batches: (mean loss on the labels, learning rate,
    gradient norm, the last micro-batch's MoE statistics, whether any rank asked to stop, the mean
    distillation loss when distilling). Refuses to update the weights with a non-finite loss or
    gradient."""
    train_config, optim_config = run.config.train, run.config.optim
    world, model, optimizer = run.world, run.model, run.optimizer
    lr = cosine_lr(run.step, optim_config.lr, optim_config.min_lr, optim_config.warmup_steps,
                   train_config.max_steps)
    optimizer.lr = lr
    if run.graphed_step is not None:
        return _graphed_train_step(run, stop, lr)
    accumulation, micro_batches = train_config.grad_accum_steps, run.micro_batches
    loss_sum = kd_sum = 0.0
    distilling = run.teacher is not None and _distilling(run.config, run.step)
    for accumulated in range(accumulation):
        # Micro-batch `micro` of the step is the same data and dropout on any layout; one micro-batch
        # per step keeps the seeds of a plain single-process run.
        micro = world.rank * accumulation + accumulated
        seeds = [train_config.seed, run.step] + ([micro] if micro_batches > 1 else [])
        backend.manual_seed(*seeds)
        inputs, targets = run.data.batch("train", train_config.batch_size, np.random.default_rng(seeds))
        output = model(backend.asarray(inputs), backend.asarray(targets), keep_logits=distilling)
        loss = output.loss
        if distilling:  # (1 - alpha) CE + alpha KD + the auxiliary losses, from loss = CE + auxiliary
            with no_grad():
                teacher_logits = run.teacher(backend.asarray(inputs)).logits.data
            vocab = teacher_logits.shape[-1]
            kd = ops.distillation_loss(output.logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab),
                                       run.config.distill.temperature)
            loss = loss + run.config.distill.alpha * (kd - output.lm_loss)
            kd_sum += kd.item()
        (loss * (1.0 / micro_batches) if micro_batches > 1 else loss).backward()
        loss_sum += output.lm_loss.item()
    if world.size > 1:
        run.parallel.sync_gradients(model)
        grad_norm = run.parallel.grad_norm(model)
    else:
        grad_norm = global_grad_norm(optimizer.parameters)
    loss, stopping = run.parallel.mean_and_any(loss_sum / accumulation, stop.requested)
    norm = float(grad_norm)
    _check_finite(run, loss, norm)
    optimizer.step(clip_scale(grad_norm, train_config.grad_clip))
    model.zero_grad()
    run.step += 1
    kd_loss = run.parallel.mean_and_any(kd_sum / accumulation, False)[0] if distilling else None
    return loss, lr, norm, output.moe, stopping, kd_loss


def _graphed_train_step(run: Run, stop: _StopFlag, lr: float) -> tuple[float, float, float, list[Routing], bool, None]:
    """_train_step for a run of one process and one micro-batch, replayed as CUDA graphs: the same seeds
    and batch, the same update; its weights are left as they were when the loss or the norm is not
    finite (the update refuses a non-finite scale), and then the run stops as an eager one does."""
    seeds = [run.config.train.seed, run.step]
    backend.manual_seed(*seeds)
    inputs, targets = run.data.batch("train", run.config.train.batch_size, np.random.default_rng(seeds))
    output = run.graphed_step(backend.asarray(inputs), backend.asarray(targets))
    loss, norm = float(output.lm_loss), float(output.grad_norm)
    _check_finite(run, loss, norm)
    run.step += 1
    return loss, lr, norm, output.moe, stop.requested, None


def _check_finite(run: Run, loss: float, norm: float) -> None:
    if not (math.isfinite(loss) and math.isfinite(norm)):
        raise TrainingDiverged(
            f"step {run.step + 1}: the training loss is {loss} and the gradient norm {norm}; stopped "
            f"without updating the weights. The last checkpoint, if any, is kept in {run.run_dir.path} (lower "
            f"optim.lr, raise optim.eps or check the data)")


def _evaluate_and_save(run: Run) -> None:
    """Validation loss logged, then the metrics and the checkpoint written (every rank takes part: the
    expert slices are written by the ranks that hold them). Never saves non-finite numbers."""
    run.val_loss = evaluate(run.model, run.data, run.config)
    run.metrics.append({"step": run.step, "val_loss": run.val_loss, **training_cost(run)})
    run.console.line(f"step {run.step:>5} | validation loss {run.val_loss:.4f}")
    arrays = checkpoint_arrays(run.model, run.optimizer)
    if not (math.isfinite(run.val_loss) and all(np.isfinite(value).all() for value in arrays.values())):
        raise TrainingDiverged(f"step {run.step}: the validation loss is {run.val_loss} or a weight is not "
                               f"finite; nothing saved, the last checkpoint is kept in {run.run_dir.path}")
    meta = {"config": to_dict(run.config), "step": run.step, "initial_val_loss": run.initial_val_loss,
            "micro_batches": run.micro_batches, "layout": run.layout}
    checkpoint = run.run_dir.checkpoint
    arrays, parts = run.parallel.save_expert_parts(checkpoint, run.step, arrays, run.expert_names)
    if run.parallel.is_main:
        write_metrics(run.run_dir.metrics, run.metrics)  # first: the log never lags the checkpoint
        save_checkpoint(checkpoint, arrays, meta, parts)


def train(config: Config, resume: bool = False, until: int | None = None, overwrite: bool = False) -> TrainResult:
    """Train as `config` says, from scratch (in a train.out_dir that holds no run, unless `overwrite`) or
    from the run's checkpoint (`resume`), up to step `until` (default train.max_steps); returns the
    losses, a sample (None if Ctrl-C skipped it) and the checkpoint path."""
    run_dir = RunDir(Path(config.train.out_dir))
    try:
        run, stop_at = _start(config, run_dir, resume, overwrite, until)
        # A run that overflows is stopped by the checks on the loss, the gradient norm and the weights it
        # would save, with one line; NumPy's own overflow warnings on the way would only bury that line.
        with np.errstate(over="ignore", invalid="ignore"):
            return _train_to(run, stop_at)
    finally:
        run_dir.release()


def _train_to(run: Run, stop_at: int) -> TrainResult:
    train_config = run.config.train
    console = run.console
    if run.step == 0:
        run.initial_val_loss = evaluate(run.model, run.data, run.config)
        run.metrics.append({"step": 0, "val_loss": run.initial_val_loss, **training_cost(run)})
        console.line(f"step     0 | validation loss {run.initial_val_loss:.4f}")
    stop = _StopFlag()
    previous_handler = signal.signal(signal.SIGINT, stop)
    window_start, window_steps, stopping = time.perf_counter(), 0, False
    try:
        while run.step < stop_at and not stopping:
            loss, lr, grad_norm, moe_stats, stopping, kd_loss = _train_step(run, stop)
            window_steps += 1
            tokens_per_s = window_steps * run.tokens_per_step / (time.perf_counter() - window_start)
            moe = moe_log(moe_stats)
            run.metrics.append({"step": run.step, "train_loss": loss, "lr": lr, "grad_norm": grad_norm,
                                "tokens_per_s": tokens_per_s, **({"kd_loss": kd_loss} if kd_loss is not None else {}),
                                **({"moe": moe} if moe else {})})
            progress = _progress(run.step, train_config.max_steps, loss, lr, tokens_per_s)
            if run.step % train_config.log_interval == 0 or run.step == stop_at:
                console.line(progress)
                for layer, stats in enumerate(moe):
                    console.line(f"    moe layer {layer}: tokens per expert {stats['tokens_per_expert']}, "
                                 f"dropped {100 * stats['dropped']:.1f}% (capacity {stats['capacity']})")
                window_start, window_steps = time.perf_counter(), 0
            else:
                console.bar(progress)
            if run.step % train_config.eval_interval == 0 or run.step == stop_at or stopping:
                _evaluate_and_save(run)
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    if stopping:
        console.line(f"stopped at step {run.step}; checkpoint saved to {run.run_dir.checkpoint}; continue with "
                     f"--resume")
    return TrainResult(run.step, run.initial_val_loss, run.val_loss, None if stopping else _sample(run),
                       run.run_dir.checkpoint, run.parallel.is_main)


def _sample(run: Run) -> str | None:
    """train.sample_tokens sampled after train.sample_prompt; None if Ctrl-C interrupts it."""
    train_config = run.config.train
    if train_config.sample_tokens == 0:
        return ""
    tokenizer = ByteTokenizer(run.config.model.vocab_size)
    params = SamplingParams(max_new_tokens=train_config.sample_tokens, temperature=train_config.temperature,
                            top_k=train_config.top_k, seed=train_config.seed)
    expert_parallel = run.parallel.groups.expert_parallel if run.config.train.ep_size > 1 else None
    try:
        [sequence] = generate(run.model, [tokenizer.encode(train_config.sample_prompt)], params, expert_parallel)
    except KeyboardInterrupt:
        return None
    return train_config.sample_prompt + sequence.text
