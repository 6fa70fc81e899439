"""The tables of docs/results.md's GPU claims from the runs that dev/claims.sh leaves (or brings back):
each run's `minimoe eval` score (RUN.eval), its parameter count (RUN.log) and its tokens and training
FLOPs (RUN/metrics.jsonl). Runs named NAME-s<seed> are the seeds of config NAME.

    python dev/claims_table.py RUNS_DIR
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np

CONFIGS = ["dense", "dense-768", "moe", "prmoe", "mos7-kd", "mos7-labels", "mos6-kd", "mos6-labels"]


def run_summary(run: Path) -> dict[str, float]:
    score = re.search(r"loss (\d+\.\d+) \+- (\d+\.\d+)", run.with_suffix(".eval").read_text())
    parameters = re.search(r"minimoe: ([\d,]+) parameters", run.with_suffix(".log").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"val_loss"' in line]
    return {"loss": float(score.group(1)), "error": float(score.group(2)),
            "parameters": int(parameters.group(1).replace(",", "")), "tokens": records[-1]["tokens"],
            "flops": records[-1]["train_flops"], "curve": [(r["step"], r["val_loss"]) for r in records]}


def crossing_step(curve: list[tuple[int, float]], target: float) -> float:
    """The first step at which a validation curve reaches `target`, linear between evaluations."""
    for (step_a, loss_a), (step_b, loss_b) in zip(curve, curve[1:]):
        if loss_b <= target:
            return step_a + (step_b - step_a) * (loss_a - target) / (loss_a - loss_b)
    return float("nan")


def main(runs_dir: str) -> None:
    runs = {name: [run_summary(path) for path in sorted(Path(runs_dir).glob(f"{name}-s[0-9]"))] for name in CONFIGS}
    print("| config | parameters | train GFLOPs per token | tokens | training PFLOPs | " +
          " | ".join(f"seed {seed}" for seed in range(3)) + " | mean +- std |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, seeds in runs.items():
        if not seeds:
            continue
        losses = np.array([run["loss"] for run in seeds])
        first = seeds[0]
        print(f"| {name} | {first['parameters']:,} | {first['flops'] / first['tokens'] / 1e9:.3f} | "
              f"{first['tokens'] / 1e6:.1f} M | {first['flops'] / 1e15:.2f} | " +
              " | ".join(f"{loss:.4f}" for loss in losses) +
              f" | **{losses.mean():.4f} +- {losses.std(ddof=1):.4f}** |")
    for a, b in [("moe", "dense"), ("dense-768", "dense"), ("prmoe", "moe"), ("mos7-kd", "mos7-labels"),
                 ("mos6-kd", "mos6-labels"), ("mos7-kd", "prmoe"), ("mos7-labels", "prmoe"), ("mos6-labels", "prmoe")]:
        if runs[a] and runs[b]:
            difference = np.array([x["loss"] - y["loss"] for x, y in zip(runs[a], runs[b])])
            print(f"{a} - {b}, paired by seed: {difference.mean():+.4f} +- {difference.std(ddof=1):.4f}")
    # Claim 1: where the MoE's in-training validation curve reaches the dense model's final value (the same
    # 16 validation batches for both at each seed).
    if runs["moe"] and runs["dense"]:
        for seed, (moe, dense) in enumerate(zip(runs["moe"], runs["dense"])):
            final_step, final_loss = dense["curve"][-1]
            step = crossing_step(moe["curve"], final_loss)
            print(f"seed {seed}: the MoE reaches the dense model's final {final_loss:.4f} at step {step:.0f} of "
                  f"{final_step} ({step / final_step:.2f} of the dense model's training FLOPs)")


if __name__ == "__main__":
    main(sys.argv[1])
