"""Run configuration: TOML files in examples/, overridden by `--set section.key=value`.

A config has four sections, each a dataclass whose defaults are the default run: [model] (GPTConfig),
[data], [train], [optim]. Loading checks every key and type and says which one is wrong, so a typo in a
config never trains silently with a default.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    path: str = ""  # a UTF-8 text file; empty: the bundled-on-demand Shakespeare corpus
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
class Config:
    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


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
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file {path!r} does not exist") from None
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


def validate(config: Config) -> None:
    """Value checks that types alone cannot make."""
    model, train = config.model, config.train
    positive = {"model.vocab_size": model.vocab_size, "model.block_size": model.block_size,
                "model.n_layer": model.n_layer, "model.n_head": model.n_head, "model.n_embd": model.n_embd,
                "train.batch_size": train.batch_size, "train.max_steps": train.max_steps,
                "train.grad_accum_steps": train.grad_accum_steps, "train.ep_size": train.ep_size,
                "train.eval_interval": train.eval_interval, "train.eval_batches": train.eval_batches,
                "train.log_interval": train.log_interval}
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    if model.vocab_size > 256:
        raise ConfigError(f"model.vocab_size must be at most 256 for the byte tokenizer, got {model.vocab_size}")
    if model.n_embd % model.n_head:
        raise ConfigError(f"model.n_embd={model.n_embd} must be divisible by model.n_head={model.n_head}")
    if not 0.0 <= model.dropout < 1.0:
        raise ConfigError(f"model.dropout must lie in [0, 1), got {model.dropout}")
    _validate_moe(model)
    if train.device not in ("cpu", "cuda", "auto"):
        raise ConfigError(f"train.device must be 'cpu', 'cuda' or 'auto', got {train.device!r}")
    if train.precision not in ("auto", "float32", "bfloat16", "float64"):
        raise ConfigError(f"train.precision must be 'auto', 'float32', 'bfloat16' or 'float64', "
                          f"got {train.precision!r}")
    if train.precision == "bfloat16" and train.device == "cpu":
        raise ConfigError("train.precision = 'bfloat16' needs train.device = 'cuda' (the NumPy path is float32)")


def _validate_moe(model: GPTConfig) -> None:
    if model.moe_every < 0:
        raise ConfigError(f"model.moe_every must be 0 (dense) or a positive block interval, got {model.moe_every}")
    if model.moe_every == 0:
        return
    try:
        experts = [count for count in model.experts_in_block() if count]
    except ValueError as error:
        raise ConfigError(f"model.{error}") from None
    if not experts:
        raise ConfigError(f"model.moe_every={model.moe_every} leaves no MoE layer in {model.n_layer} blocks")
    if min(model.experts_per_layer) < 1:
        raise ConfigError(f"model.experts_per_layer entries must be at least 1, got {model.experts_per_layer}")
    if model.k not in (1, 2):
        raise ConfigError(f"model.k must be 1 or 2, got {model.k}")
    if model.k == 2 and min(experts) < 2:
        raise ConfigError(f"model.k=2 needs at least 2 experts in every MoE layer, got {model.experts_per_layer}")
    for name in ("capacity_factor", "eval_capacity_factor"):
        if getattr(model, name) <= 0:
            raise ConfigError(f"model.{name} must be positive, got {getattr(model, name)}")
    if model.min_capacity < 0:
        raise ConfigError(f"model.min_capacity must be at least 0, got {model.min_capacity}")
    if model.noisy_gate_policy not in NOISY_GATE_POLICIES:
        raise ConfigError(f"model.noisy_gate_policy must be one of {NOISY_GATE_POLICIES}, "
                          f"got {model.noisy_gate_policy!r}")
    if model.k == 2 and model.noisy_gate_policy == "RSample":
        raise ConfigError("model.noisy_gate_policy='RSample' is top-1 only (DeepSpeed's top2gating ignores it)")
    for name in ("aux_loss_coef", "z_loss_coef"):
        if getattr(model, name) < 0:
            raise ConfigError(f"model.{name} must be at least 0, got {getattr(model, name)}")


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(tree: dict[str, Any]) -> Config:
    config = Config()
    _apply_tree(config, tree, "checkpoint")
    validate(config)
    return config
