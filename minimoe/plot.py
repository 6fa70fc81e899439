"""`minimoe plot RUN_DIR`: PNGs of a run's metrics.jsonl.

loss.png: the training loss (each step, and a 25-step moving average) and the validation loss at the
steps it was measured (markers: nothing was measured between them).
expert_load.png (MoE runs): one heatmap per MoE layer, step on x, expert on y, colour = the expert's
share of that layer's routed choices at that step (before capacity drops) times E, on one colour scale
for every layer: 1 (white) is the balanced share 1/E, blue an expert that gets less, red one that gets
more; a collapsing router shows red rows. Below them, the fraction of choices each layer dropped.
`minimoe plot --compare OUT.png RUN_DIR...`: the validation loss of several runs against their training
FLOPs, one colour per config: runs whose directory names differ only in a trailing "-s<seed>" are seeds of
one config and share it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from minimoe.run_dir import EXPERT_LOAD_PLOT_NAME, LOSS_PLOT_NAME, METRICS_NAME, read_metrics


class PlotError(Exception):
    """The run cannot be plotted (a user-facing, one-line error)."""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise PlotError("minimoe plot needs matplotlib: pip install matplotlib (in a clone of minimoe: "
                        "pip install -e '.[plot]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def run_records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_NAME
    if not path.is_file():
        raise PlotError(f"{path} does not exist: is {run_dir} a train.out_dir?")
    records, _ = read_metrics(path)
    return records


def relative_load(moe: list[tuple[int, list[dict[str, Any]]]], layer: int) -> np.ndarray:
    """[E, steps]: each expert's share of layer `layer`'s choices at each logged step, times E (1 is
    balanced)."""
    load = np.array([entry[layer]["tokens_per_expert"] for _, entry in moe], dtype=float).T
    return load / np.maximum(load.sum(axis=0, keepdims=True), 1.0) * load.shape[0]


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write loss.png (and expert_load.png for MoE runs) into run_dir; returns the paths written."""
    run_dir = Path(run_dir)
    records = run_records(run_dir)
    plt = _pyplot()
    written = [_plot_loss(plt, run_dir, records)]
    moe = [(r["step"], r["moe"]) for r in records if "moe" in r]
    if moe:
        written.append(_plot_expert_load(plt, run_dir, moe))
    return written


def _plot_loss(plt: Any, run_dir: Path, records: list[dict[str, Any]]) -> Path:
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    figure, axes = plt.subplots(figsize=(8, 4.5))
    if train:
        steps, losses = np.array(train).T
        axes.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train (per step)")
        window = min(25, len(losses))
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        axes.plot(steps[window - 1:], smooth, color="tab:blue", label=f"train ({window}-step mean)")
    if val:
        steps, losses = np.array(val).T
        axes.plot(steps, losses, "o", color="tab:orange", label="validation")
    axes.set_xlabel("step")
    axes.set_ylabel("cross-entropy (nats per byte)")
    axes.set_title(f"{run_dir.name}: loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path = run_dir / LOSS_PLOT_NAME
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _plot_expert_load(plt: Any, run_dir: Path, moe: list[tuple[int, list[dict[str, Any]]]]) -> Path:
    from matplotlib.colors import TwoSlopeNorm

    layers = len(moe[0][1])
    steps = np.array([step for step, _ in moe])
    loads = [relative_load(moe, layer) for layer in range(layers)]
    # One scale for every layer, white at the balanced share.
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, max(float(load.max()) for load in loads)))
    figure, all_axes = plt.subplots(layers + 1, 1, figsize=(9, 3.0 + 1.6 * (layers + 1)), squeeze=False,
                                    sharex=True)
    heatmaps = all_axes[:layers, 0]
    for layer, (axes, load) in enumerate(zip(heatmaps, loads)):
        image = axes.imshow(load, aspect="auto", interpolation="nearest", cmap="RdBu_r", norm=norm,
                            extent=(steps[0] - 0.5, steps[-1] + 0.5, load.shape[0] - 0.5, -0.5))
        axes.set_ylabel(f"MoE layer {layer}\nexpert")
        axes.set_yticks(range(load.shape[0]))
    # The colour bar spans every panel, so that the heatmaps and the dropped curve share the step axis.
    colorbar = figure.colorbar(image, ax=list(all_axes[:, 0]), label="share of the choices x E", shrink=0.6)
    ticks = [0.0, 0.5, 1.0, *np.linspace(1.0, norm.vmax, 4)[1:]]
    colorbar.set_ticks(ticks, labels=[f"{tick:.1f}" if tick != 1.0 else "1 = balanced (1/E)" for tick in ticks])
    dropped = all_axes[layers, 0]
    for layer in range(layers):
        dropped.plot(steps, [100 * entry[layer]["dropped"] for _, entry in moe], label=f"layer {layer}")
    dropped.set_ylabel("choices dropped (%)")
    dropped.set_xlabel("step")
    dropped.grid(alpha=0.3)
    dropped.legend(fontsize=8, ncol=min(layers, 4))
    heatmaps[0].set_title(f"{run_dir.name}: expert load per MoE layer, and dropped choices")
    path = run_dir / EXPERT_LOAD_PLOT_NAME
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


def config_name(run_dir: Path) -> str:
    """The config a run belongs to: its directory name without a trailing "-s<seed>"."""
    return re.sub(r"-s\d+$", "", run_dir.name)


def plot_compare(run_dirs: list[str | Path], path: str | Path) -> Path:
    """Validation loss against training FLOPs for every run (from the "train_flops" that `minimoe train`
    logs with each validation loss), one colour per config; written to `path`."""
    path = Path(path)
    if path.suffix.lower() != ".png" or not path.parent.is_dir():
        raise PlotError(f"--compare takes the path of a .png file in an existing directory, got {str(path)!r}")
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(8, 5))
    colours: dict[str, str] = {}
    for run_dir in map(Path, run_dirs):
        points = [(r["train_flops"], r["val_loss"]) for r in run_records(run_dir) if "train_flops" in r]
        if not points:
            raise PlotError(f"{run_dir / METRICS_NAME} logs no training FLOPs (written by an older minimoe)")
        name = config_name(run_dir)
        first = name not in colours
        colours.setdefault(name, f"C{len(colours) % 10}")
        flops, losses = np.array(points[1:] or points).T  # step 0 (no compute yet) does not fit a log axis
        axes.plot(flops, losses, color=colours[name], alpha=0.8, linewidth=1, marker=".",
                  label=name if first else None)
    axes.set_xscale("log")
    axes.set_xlabel("training FLOPs")
    axes.set_ylabel("validation cross-entropy (nats per byte)")
    axes.grid(alpha=0.3, which="both")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
