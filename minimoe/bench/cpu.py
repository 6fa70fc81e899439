"""`minimoe bench cpu-step`: one full training step (forward, backward, clipping, AdamW) of a config's GPT on the NumPy
path, against the same model written in PyTorch eager on the CPU when PyTorch is importable (a
benchmark peer only: minimoe never imports it elsewhere).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from minimoe import breakdown
from minimoe.config import Config, load_config
from minimoe.model import GPT
from minimoe.optim import AdamW, clip_scale, global_grad_norm


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median_time(step: Callable[[], Any], warmup: int, repeats: int) -> float:
    """Median wall time of `step` in seconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _minimoe_step(config: Config, inputs: np.ndarray, targets: np.ndarray) -> tuple[GPT, Callable[[], float]]:
    model = GPT(config.model)
    optimizer = AdamW(model.parameters(), lr=config.optim.lr, betas=(config.optim.beta1, config.optim.beta2),
                      eps=config.optim.eps, weight_decay=config.optim.weight_decay)

    def step() -> float:
        loss = model(inputs, targets).loss
        loss.backward()
        with breakdown.timed("optimizer", "update"):  # clipping and AdamW
            optimizer.step(clip_scale(global_grad_norm(model.parameters()), config.train.grad_clip))
        model.zero_grad()
        return loss.item()

    return model, step


def _torch_step(config: Config, model: GPT, inputs: np.ndarray, targets: np.ndarray) -> Callable[[], float]:
    """The same GPT in PyTorch eager, starting from `model`'s weights (kept [in, out]: x @ W)."""
    import torch
    import torch.nn.functional as F

    model_config = config.model
    params = {name: torch.tensor(value, requires_grad=True) for name, value in model.state_dict().items()}
    decays = {name: parameter.decay for name, parameter in model.named_parameters()}
    x_in, y_in = torch.tensor(inputs), torch.tensor(targets)
    heads, width = model_config.n_head, model_config.n_embd

    def linear(x: Any, prefix: str) -> Any:
        return x @ params[prefix + ".weight"] + params[prefix + ".bias"]

    def layer_norm(x: Any, prefix: str) -> Any:
        return F.layer_norm(x, (width,), params[prefix + ".weight"], params[prefix + ".bias"], 1e-5)

    def forward() -> Any:
        batch, length = x_in.shape
        x = params["wte.weight"][x_in] + params["wpe.weight"][torch.arange(length)]
        for layer in range(model_config.n_layer):
            prefix = f"blocks.{layer}."
            qkv = linear(layer_norm(x, prefix + "ln_1"), prefix + "attn.qkv")
            q, k, v = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + linear(attended.transpose(1, 2).reshape(batch, length, width), prefix + "attn.proj")
            hidden = F.gelu(linear(layer_norm(x, prefix + "ln_2"), prefix + "mlp.fc"), approximate="tanh")
            x = x + linear(hidden, prefix + "mlp.proj")
        logits = layer_norm(x, "ln_f") @ params["wte.weight"].T
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), y_in.view(-1))

    decay = [p for name, p in params.items() if decays[name]]
    no_decay = [p for name, p in params.items() if not decays[name]]
    optim = config.optim
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": optim.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)

    def step() -> float:
        loss = forward()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), config.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def bench_cpu_step(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    threads = os.cpu_count()
    batch, length = config.train.batch_size, config.model.block_size
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.model.vocab_size, (batch, length + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    model, minimoe_step = _minimoe_step(config, inputs, targets)
    rows = []
    try:
        import torch

        torch.set_num_threads(threads)
        torch_step = _torch_step(config, model, inputs, targets)
        torch_label = f"PyTorch {torch.__version__} eager"
    except ImportError:
        torch_step, torch_label = None, None
    first_losses = {"minimoe": minimoe_step()}
    if torch_step is not None:
        first_losses[torch_label] = torch_step()
        gap = abs(first_losses["minimoe"] - first_losses[torch_label])
        if gap > 1e-4 * abs(first_losses["minimoe"]):
            raise RuntimeError(f"minimoe and PyTorch disagree on the first step's loss: {first_losses}")
    rows.append((f"minimoe (NumPy {np.__version__})", median_time(minimoe_step, 1, args.steps)))
    if torch_step is not None:
        rows.append((torch_label, median_time(torch_step, 1, args.steps)))

    tokens_per_step = batch * length
    print(f"bench cpu-step: one training step (forward, backward, clip, AdamW), {model.num_parameters():,} "
          f"parameters, batch {batch} x {length} tokens, float32")
    print(f"machine: {cpu_name()}, {threads} threads; median of {args.steps} steps after 2 warm-up steps")
    print("first-step loss on the same weights and batch: "
          + ", ".join(f"{name} {loss:.6f}" for name, loss in first_losses.items()))
    print(f"{'implementation':<28}{'ms/step':>10}{'tokens/s':>12}")
    for name, seconds in rows:
        print(f"{name:<28}{1e3 * seconds:>10.1f}{tokens_per_step / seconds:>12,.0f}")
    if torch_step is None:
        print("PyTorch is not importable here: no peer timed (pip install torch to compare)")
    else:
        print(f"minimoe takes {rows[0][1] / rows[1][1]:.2f}x the time of PyTorch eager per step")
    if args.breakdown:
        print(f"minimoe's step by part of the model, mean of {args.steps} steps (wall clock per op):")
        print("\n".join(breakdown.step_table(minimoe_step, args.steps)))
