"""One eager decode step of `minimoe bench decode`'s model, for Nsight Compute: the kernels of the step
alone lie between cudaProfilerStart and cudaProfilerStop. Run on the device machine as
    ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv \
        python3 dev/profile_decode.py BATCH > kernels.csv
and add the durations up per kernel name (dev/profile_decode.py --summary kernels.csv)."""

from __future__ import annotations

import csv
import sys
from collections import defaultdict


def summary(path: str) -> None:
    totals, counts = defaultdict(float), defaultdict(int)
    with open(path) as file:
        rows = [line for line in file if line.startswith('"')]
    for row in csv.DictReader(rows):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        name = row["Kernel Name"].split("(")[0][:60]
        value = float(row["Metric Value"].replace(",", ""))
        totals[name] += value / 1e3 if row["Metric Unit"] in ("ns", "nsecond") else value  # in us
        counts[name] += 1
    total = sum(totals.values())
    print(f"{'kernel':<62}{'launches':>9}{'us':>10}{'share':>8}")
    for name in sorted(totals, key=totals.get, reverse=True):
        print(f"{name:<62}{counts[name]:>9}{totals[name]:>10.1f}{100 * totals[name] / total:>7.1f}%")
    print(f"{'all':<62}{sum(counts.values()):>9}{total:>10.1f}")


def main() -> None:
    import cupy
    import numpy as np

    from minimoe import backend
    from minimoe.bench.decode import build_model, prompts
    from minimoe.engine import Engine, SamplingParams

    batch = int(sys.argv[1])
    backend.set_device("cuda")
    engine = Engine(build_model(), slots=batch, graphs=False)
    for prompt in prompts(batch):
        engine.submit(prompt, SamplingParams(max_new_tokens=8, temperature=0.0))
    engine.admit()
    engine.step()  # compiles what the step needs
    cupy.cuda.Device().synchronize()
    cupy.cuda.profiler.start()
    engine.step()
    cupy.cuda.Device().synchronize()
    cupy.cuda.profiler.stop()
    del np


if __name__ == "__main__":
    summary(sys.argv[2]) if sys.argv[1] == "--summary" else main()
