"""Run configuration: TOML files in examples/, overridden by `--set section.key=value`.

A config has five sections, each a dataclass whose defaults are the default run: [model] (GPTConfig),
[data], [train], [optim], and [distill] for a distilled student. Loading checks every key and type and
says which one is wrong, so a typo in a config never trains silently with a default.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import typing
from dataclasses import dataclass, field
from typing import Any

from minimoe.cuda.gating import DROP_POLICIES
from minimoe.data import CORPORA, read_user_file
from minimoe.model import GPTConfig
from minimoe.moe.gate import NOISY_GATE_POLICIES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(Exception):
    """A bad config file or override (a user-facing, one-line error)."""


@dataclass
class DataConfig:
    path: str = ""  # a UTF-8 text file; empty: the built-in corpus below
    corpus: str = "shakespeare"  # "shakespeare" (5 MB) or "dictionaries" (78 MB); both fetched once (minimoe/data.py)
    val_fraction: float = 0.1


@dataclass
class TrainConfig:
    device: str = "cpu"  # "cpu", "cuda" or "auto"
    # "float32", "bfloat16" (GPU: bf16 compute, float32 master weights), "float64" (for exactness tests) or "auto"
    precision: str = "auto"
    seed: int = 0  # seeds batches and dropout (model.init_seed seeds the weights)
    batch_size: int = 32  # sequences per micro-batch; a step takes one per rank and accumulation step
    grad_accum_steps: int = 1  # micro-batches per rank per step
    ep_size: int = 1  # expert-parallel ranks (with mpirun); the world is ep_size x dp_size
    local_size: int = 0  # ranks per node: an EP group over several nodes all-to-alls hierarchically; 0: flat
    max_steps: int = 600
    eval_interval: int = 100
    eval_batches: int = 8
    log_interval: int = 25
    out_dir: str = "runs/default"
    grad_clip: float = 1.0
    # On a GPU, replay each step as CUDA graphs (minimoe/step.py) where the step allows it: one process, one
    # micro-batch, no teacher, MoE layers that drop tokens with k <= 2 (static shapes); else eager.
    cuda_graphs: bool = True
    sample_tokens: int = 300
    sample_prompt: str = "\n"
    temperature: float = 0.8
    top_k: int = 40


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8


@dataclass
class DistillConfig:
    """Mixture-of-Students (DeepSpeed-MoE sec. 4.2): a student trained on its own labels and on a teacher's
    softened predictions, loss = (1 - alpha) CE + alpha T^2 KL(softmax(teacher / T) || softmax(student / T))
    + the student's auxiliary losses, the distillation term only for the first kd_stop of the steps."""

    teacher: str = ""  # the teacher's checkpoint (`minimoe distill --teacher` sets it); empty: plain training
    alpha: float = 0.5
    temperature: float = 1.0
    kd_stop: float = 1.0  # fraction of train.max_steps after which the student learns from the labels alone


@dataclass
class Config:
    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


def _check_value(where: str, value: Any, expected: Any) -> Any:
    """`value` as the type `expected`, or a ConfigError naming `where`, the value and the type."""
    origin = typing.get_origin(expected)
    if origin is list:
        (item_type,) = typing.get_args(expected)
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list of {item_type.__name__}, got {value!r}")
        return [_check_value(f"{where}[{i}]", item, item_type) for i, item in enumerate(value)]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        raise ConfigError(f"{where} must be {expected.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _apply(section: Any, name: str, values: dict[str, Any]) -> None:
    hints = typing.get_type_hints(type(section))
    for key, value in values.items():
        if key not in hints:
            known = ", ".join(hints)
            raise ConfigError(f"unknown key {name}.{key} (known keys of [{name}]: {known})")
        setattr(section, key, _check_value(f"{name}.{key}", value, hints[key]))


def _apply_tree(config: Config, tree: dict[str, Any], source: str) -> None:
    sections = {f.name for f in dataclasses.fields(config)}
    for name, values in tree.items():
        if name not in sections:
            raise ConfigError(f"{source}: unknown section [{name}] (known: {', '.join(sorted(sections))})")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{name}] must be a table of keys, got {values!r}")
        _apply(getattr(config, name), name, values)


def _parse_override(text: str) -> tuple[str, str, Any]:
    """'train.max_steps=100' -> ('train', 'max_steps', 100); a value that is not TOML is a string."""
    key, equals, raw = text.partition("=")
    section, dot, name = key.strip().partition(".")
    if not equals or not dot or not name:
        raise ConfigError(f"--set takes section.key=value, got {text!r}")
    try:
        value = tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw
    return section, name, value


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    config = Config()
    if path:
        text = read_user_file(path, "config file", ConfigError)
        try:
            tree = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path} is not valid TOML: {error}") from None
        _apply_tree(config, tree, path)
    for text in overrides or []:
        section, name, value = _parse_override(text)
        _apply_tree(config, {section: {name: value}}, "--set")
    validate(config)
    return config


def _require(name: str, value: Any, holds: bool, expected: str) -> None:
    """ConfigError naming the key, what it must be and the value it got, unless the rule `holds`.
    Rules are written so that NaN fails them (NaN compares false with everything)."""
    if not holds:
        raise ConfigError(f"{name} must be {expected}, got {value!r}")


def validate(config: Config) -> None:
    """Value checks that types alone cannot make: every number against its meaning."""
    model, data, train, optim = config.model, config.data, config.train, config.optim
    at_least_one = {"model.vocab_size": model.vocab_size, "model.block_size": model.block_size,
                    "model.n_layer": model.n_layer, "model.n_head": model.n_head, "model.n_embd": model.n_embd,
                    "model.mlp_ratio": model.mlp_ratio, "train.batch_size": train.batch_size,
                    "train.max_steps": train.max_steps, "train.grad_accum_steps": train.grad_accum_steps,
                    "train.ep_size": train.ep_size, "train.eval_interval": train.eval_interval,
                    "train.eval_batches": train.eval_batches, "train.log_interval": train.log_interval}
    for name, value in at_least_one.items():
        _require(name, value, value >= 1, "at least 1")
    at_least_zero = {"model.init_seed": model.init_seed, "train.seed": train.seed,
                     "train.local_size": train.local_size, "train.sample_tokens": train.sample_tokens,
                     "train.top_k": train.top_k, "optim.warmup_steps": optim.warmup_steps}
    for name, value in at_least_zero.items():
        _require(name, value, value >= 0, "at least 0")
    _require("model.vocab_size", model.vocab_size, model.vocab_size <= 256, "at most 256 for the byte tokenizer")
    if model.n_embd % model.n_head:
        raise ConfigError(f"model.n_embd={model.n_embd} must be divisible by model.n_head={model.n_head}")
    _require("model.dropout", model.dropout, 0.0 <= model.dropout < 1.0, "in [0, 1)")
    _validate_moe(model)
    _require("data.corpus", data.corpus, data.corpus in CORPORA, " or ".join(repr(name) for name in CORPORA))
    _require("data.val_fraction", data.val_fraction, 0.0 < data.val_fraction < 1.0, "strictly between 0 and 1")
    _require("train.device", train.device, train.device in ("cpu", "cuda", "auto"), "'cpu', 'cuda' or 'auto'")
    _require("train.precision", train.precision, train.precision in ("auto", "float32", "bfloat16", "float64"),
             "'auto', 'float32', 'bfloat16' or 'float64'")
    if train.precision == "bfloat16" and train.device == "cpu":
        raise ConfigError("train.precision = 'bfloat16' needs train.device = 'cuda' (the NumPy path is float32)")
    _require("train.out_dir", train.out_dir, train.out_dir.strip() != "", "a directory path")
    _require("train.grad_clip", train.grad_clip, 0.0 <= train.grad_clip < math.inf,
             "a finite number >= 0 (0 turns clipping off)")
    _require("train.temperature", train.temperature, 0.0 <= train.temperature < math.inf,
             "a finite number >= 0 (0 samples greedily)")
    prompt = train.sample_prompt.encode("utf-8")
    _require("train.sample_prompt", train.sample_prompt, train.sample_tokens == 0 or 0 < len(prompt)
             <= model.block_size, f"1 to model.block_size={model.block_size} bytes long (train.sample_tokens > 0)")
    _require("train.sample_prompt", train.sample_prompt, max(prompt, default=0) < model.vocab_size,
             f"bytes below model.vocab_size={model.vocab_size}")
    _require("optim.lr", optim.lr, 0.0 < optim.lr < math.inf, "a finite number > 0")
    _require("optim.min_lr", optim.min_lr, 0.0 <= optim.min_lr <= optim.lr, f"in [0, optim.lr={optim.lr}]")
    _require("optim.weight_decay", optim.weight_decay, 0.0 <= optim.weight_decay < math.inf, "a finite number >= 0")
    for name in ("beta1", "beta2"):
        value = getattr(optim, name)
        _require(f"optim.{name}", value, 0.0 <= value < 1.0, "in [0, 1)")
    _require("optim.eps", optim.eps, 0.0 < optim.eps < math.inf, "a finite number > 0")
    distill = config.distill
    _require("distill.alpha", distill.alpha, 0.0 <= distill.alpha <= 1.0, "in [0, 1]")
    _require("distill.temperature", distill.temperature, 0.0 < distill.temperature < math.inf, "a finite number > 0")
    _require("distill.kd_stop", distill.kd_stop, 0.0 <= distill.kd_stop <= 1.0, "in [0, 1]")


def _validate_moe(model: GPTConfig) -> None:
    _require("model.moe_every", model.moe_every, model.moe_every >= 0, "0 (dense) or a positive block interval")
    if model.moe_every == 0:
        return
    try:
        experts = [count for count in model.experts_in_block() if count]
    except ValueError as error:
        raise ConfigError(f"model.{error}") from None
    if not experts:
        raise ConfigError(f"model.moe_every={model.moe_every} leaves no MoE layer in {model.n_layer} blocks")
    _require("model.experts_per_layer", model.experts_per_layer, min(model.experts_per_layer) >= 1,
             "a list of counts of at least 1")
    _require("model.k", model.k, model.k >= 1, "at least 1 (experts per token)")
    if model.k > min(experts):
        raise ConfigError(f"model.k={model.k} needs at least {model.k} experts in every MoE layer, got "
                          f"{model.experts_per_layer}")
    _require("model.drop_policy", model.drop_policy, model.drop_policy in DROP_POLICIES, f"one of {DROP_POLICIES}")
    for name in ("capacity_factor", "eval_capacity_factor"):
        value = getattr(model, name)
        _require(f"model.{name}", value, 0.0 < value < math.inf, "a finite number > 0")
    _require("model.min_capacity", model.min_capacity, model.min_capacity >= 0, "at least 0")
    _require("model.noisy_gate_policy", model.noisy_gate_policy, model.noisy_gate_policy in NOISY_GATE_POLICIES,
             f"one of {NOISY_GATE_POLICIES}")
    if model.k >= 2 and model.noisy_gate_policy == "RSample":
        raise ConfigError("model.noisy_gate_policy='RSample' is top-1 only (DeepSpeed's top2gating and topkgating "
                          "ignore it)")
    for name in ("aux_loss_coef", "z_loss_coef"):
        value = getattr(model, name)
        _require(f"model.{name}", value, 0.0 <= value < math.inf, "a finite number >= 0")


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(tree: dict[str, Any]) -> Config:
    config = Config()
    _apply_tree(config, tree, "checkpoint")
    validate(config)
    return config
