"""Benchmarks with side-by-side peers: `minimoe bench NAME`.

Each benchmark checks its own result first, then times minimoe and the peers present in one run on one
machine and prints what it measured, where, against which floor.

    cpu.py     cpu-step: one training step on the NumPy path against PyTorch eager on the CPU
    gpu.py     moe-layer, gating, dispatch, train-step: one GPU
    decode.py  decode: generation at batch 1 to 256 against transformers' Mixtral generate
    serve.py   serve: the HTTP server under concurrent clients against one at a time (CPU or GPU)
    comm.py    alltoall, moe-layer --ep P: several GPUs under mpirun
"""

from __future__ import annotations

import argparse


def run(name: str, args: argparse.Namespace) -> None:
    if name == "cpu-step":
        from minimoe.bench.cpu import bench_cpu_step

        bench_cpu_step(args)
        return
    if name == "serve":
        from minimoe.bench.serve import bench_serve

        bench_serve(args)
        return
    from minimoe.backend import DeviceError, cupy_or_reason

    _, reason = cupy_or_reason()
    if reason:
        raise DeviceError(f"bench {name} times GPU kernels and needs a CUDA GPU with CuPy, but {reason}")
    if name == "alltoall" or args.ep > 1:
        from minimoe.bench import comm

        comm.BENCHMARKS[name](args)
    elif name == "decode":
        from minimoe.bench.decode import bench_decode

        bench_decode(args)
    else:
        from minimoe.bench import gpu

        gpu.BENCHMARKS[name](args)
