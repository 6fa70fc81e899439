"""`minimoe plot RUN_DIR`: PNGs of a run's metrics.jsonl.

loss.png: the training loss (each step, and a 25-step moving average) and the validation loss.
expert_load.png (MoE runs): one heatmap per MoE layer, step on x, expert on y, colour = the share of
that layer's routed choices the expert received at that step (before capacity drops). A balanced
layer is a flat colour at 1/E; a collapsing router shows bright rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from minimoe.train import METRICS_NAME


class PlotError(Exception):
    """The run cannot be plotted (a user-facing, one-line error)."""


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotError("minimoe plot needs matplotlib: pip install 'minimoe[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / METRICS_NAME
    if not path.exists():
        raise PlotError(f"{path} does not exist: is {run_dir} a train.out_dir?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write loss.png (and expert_load.png for MoE runs) into run_dir; returns the paths written."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    plt = _pyplot()
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    written = []

    figure, axes = plt.subplots(figsize=(8, 4.5))
    if train:
        steps, losses = np.array(train).T
        axes.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train (per step)")
        window = min(25, len(losses))
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        axes.plot(steps[window - 1:], smooth, color="tab:blue", label=f"train ({window}-step mean)")
    if val:
        steps, losses = np.array(val).T
        axes.plot(steps, losses, "o-", color="tab:orange", label="validation")
    axes.set_xlabel("step")
    axes.set_ylabel("cross-entropy (nats per byte)")
    axes.set_title(f"{run_dir.name}: loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    written.append(run_dir / "loss.png")
    figure.savefig(written[-1], dpi=120)
    plt.close(figure)

    moe = [(r["step"], r["moe"]) for r in records if "moe" in r]
    if moe:
        layers = len(moe[0][1])
        figure, all_axes = plt.subplots(layers, 1, figsize=(9, 2.2 + 1.6 * layers), squeeze=False)
        steps = [step for step, _ in moe]
        for layer, axes in enumerate(all_axes[:, 0]):
            load = np.array([entry[layer]["tokens_per_expert"] for _, entry in moe], dtype=float).T
            share = load / load.sum(axis=0, keepdims=True)
            image = axes.imshow(share, aspect="auto", interpolation="nearest", cmap="viridis",
                                extent=(steps[0] - 0.5, steps[-1] + 0.5, load.shape[0] - 0.5, -0.5))
            axes.set_ylabel(f"MoE layer {layer}\nexpert")
            figure.colorbar(image, ax=axes, label="share of choices")
        all_axes[-1, 0].set_xlabel("step")
        all_axes[0, 0].set_title(f"{run_dir.name}: expert load per MoE layer (1/E is balanced)")
        figure.tight_layout()
        written.append(run_dir / "expert_load.png")
        figure.savefig(written[-1], dpi=120)
        plt.close(figure)
    return written
