"""One eager training step of `minimoe bench train-step`'s model, for Nsight Compute: the kernels of the
step alone lie between cudaProfilerStart and cudaProfilerStop (a CUDA graph replays the same kernels).
Run on the device machine as
    ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv \
        python3 dev/profile_train_step.py > kernels.csv
and add the durations up per kernel name (python3 dev/profile_decode.py --summary kernels.csv)."""

from __future__ import annotations


def main() -> None:
    import cupy
    import numpy as np

    from minimoe import backend
    from minimoe.bench.gpu import STEP_BATCH, STEP_MODEL, _minimoe_train_step

    backend.set_device("cuda")
    tokens = np.random.default_rng(0).integers(0, STEP_MODEL["vocab_size"], (STEP_BATCH, STEP_MODEL["block_size"] + 1))
    step, _, _ = _minimoe_train_step(cupy.asarray(tokens[:, :-1]), cupy.asarray(tokens[:, 1:]), graphs=False)
    for _ in range(2):  # compiles what the step needs
        step()
    cupy.cuda.Device().synchronize()
    cupy.cuda.profiler.start()
    step()
    cupy.cuda.Device().synchronize()
    cupy.cuda.profiler.stop()


if __name__ == "__main__":
    main()
