"""Multi-GPU benchmarks, run under mpirun with one rank per GPU (NCCL):

    mpirun -n 2 minimoe bench alltoall
    mpirun -n 2 minimoe bench moe-layer --ep 2

alltoall: the expert-parallel exchange over message sizes, flat (one grouped ncclSend/ncclRecv round)
and hierarchical (comm/alltoall.py, the ranks as 2 simulated nodes), against the link itself: a plain
ncclSend/ncclRecv between ranks 0 and 1, one way and both ways at once. Bus bandwidth follows
nccl-tests: bytes each rank sends to the others over the time, the slowest rank's time. Every timed
repetition starts with idle GPUs and the ranks lined up by a barrier; the figure is the median over
repetitions of the slowest rank. Correctness first: every rank checks what it received against what
its peers sent.

moe-layer --ep P: weak scaling of the MoE layer (T=8192 tokens per GPU, d=1024, f=4096, E=8, bf16,
forward and forward+backward): EP=P, each GPU holding E/P experts and exchanging rows by all-to-all,
against EP=1, each GPU running all E experts on its own tokens with no exchange. Per-GPU throughput
at EP=P as a fraction of EP=1's (the target is 85%). Correctness first: the EP layer's output on every
rank against the one-GPU layer with the same weights on the same tokens.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import numpy as np

from minimoe import backend
from minimoe.bench.gpu import EXPERTS, HIDDEN, TOKENS, WIDTH, bf16, event_times
from minimoe.comm.alltoall import HierarchicalComm
from minimoe.comm.communicator import NCCLComm
from minimoe.parallel import start_world
from minimoe.tensor import Tensor


def _start() -> NCCLComm:
    world, device = start_world("cuda")
    if not isinstance(world, NCCLComm) or world.size < 2:
        raise SystemExit("this benchmark needs mpirun with at least 2 ranks, one GPU each "
                         f"(here: {world.size} rank(s) on {device})")
    return world


def _slowest_ms(world: NCCLComm, fn: Callable[[], Any]) -> float:
    """The median over repetitions of the slowest rank's time for fn. Every repetition starts with the
    GPUs idle and the ranks lined up (device sync, then an MPI barrier): otherwise a rank that launches
    early would count, inside the collective, the time it waits for a late one."""
    import cupy

    def line_up() -> None:
        cupy.cuda.Device().synchronize()
        world.barrier()

    times = event_times(fn, before_each=line_up)
    return float(np.median(world.mpi.all_reduce(np.array(times), op="max")))


def _say(world: NCCLComm, text: str) -> None:
    if world.rank == 0:
        print(text, flush=True)


def bench_alltoall(args: argparse.Namespace) -> None:
    import cupy

    world = _start()
    size, rank = world.size, world.rank
    hierarchical = HierarchicalComm(world, size // 2 if size % 2 == 0 else 1)  # 2 nodes when it can
    _say(world, f"bench alltoall on {size} x {backend.gpu_name()} (CuPy {cupy.__version__}, NCCL "
                f"{world.nccl.get_version()}); hierarchical = {hierarchical.nodes} simulated nodes x "
                f"{hierarchical.local_size}; bus bandwidth = "
                "bytes sent to other ranks / time of the slowest rank; median of 20")
    _say(world, f"{'bytes per peer':>16}{'flat ms':>10}{'flat GB/s':>11}{'hier ms':>10}{'hier GB/s':>11}")
    for exponent in range(10, 29, 2):  # 1 KiB .. 256 MiB to each peer
        per_peer = 2**exponent // 2  # bf16 elements
        # Element i of the chunk for rank j is a function of j, i and the sender: integers, which bf16 may
        # round, but rounds the same way on both sides.
        send = (cupy.arange(size * per_peer, dtype=cupy.int64).reshape(size, per_peer) % 251 + rank * 256)
        send = send.astype(bf16())
        expected = cupy.stack([(cupy.arange(per_peer, dtype=cupy.int64) + rank * per_peer) % 251 + source * 256
                               for source in range(size)]).astype(bf16())
        row = f"{2**exponent:>16,}"
        for comm in (world, hierarchical):
            assert bool((comm.all_to_all(send) == expected).all()), f"rank {rank}: all-to-all received wrong data"
            ms = _slowest_ms(world, lambda: comm.all_to_all(send))  # noqa: B023
            bandwidth = (size - 1) * 2**exponent / (ms * 1e-3) / 1e9
            row += f"{ms:>10.3f}{bandwidth:>11.1f}"
        _say(world, row)
    _link_reference(world)


def _link_reference(world: NCCLComm) -> None:
    """The NVLink figure: 256 MiB from rank 0 to rank 1 alone, and both ways at once."""
    import cupy

    nbytes = 2**28
    buffer, received = cupy.ones(nbytes, dtype=cupy.uint8), cupy.empty(nbytes, dtype=cupy.uint8)
    stream = cupy.cuda.get_current_stream().ptr
    peer = 1 - world.rank

    def exchange(both_ways: bool) -> None:
        if world.rank > 1:
            return
        world.nccl.groupStart()
        if world.rank == 0 or both_ways:
            world.comm.send(buffer.data.ptr, nbytes, 1, peer, stream)
        if world.rank == 1 or both_ways:
            world.comm.recv(received.data.ptr, nbytes, 1, peer, stream)
        world.nccl.groupEnd()

    one_way = _slowest_ms(world, lambda: exchange(False))
    both = _slowest_ms(world, lambda: exchange(True))
    _say(world, f"link (ncclSend/ncclRecv, 256 MiB, ranks 0 and 1): one way {nbytes / (one_way * 1e-3) / 1e9:.1f} "
                f"GB/s; both ways at once {nbytes / (both * 1e-3) / 1e9:.1f} GB/s each way")


def bench_moe_layer_ep(args: argparse.Namespace) -> None:
    import cupy

    from minimoe.comm.groups import build_groups
    from minimoe.moe.gate import MoESettings
    from minimoe.moe.layer import MoE

    world = _start()
    if args.ep != world.size:
        raise SystemExit(f"--ep {args.ep} needs mpirun -n {args.ep} (one expert-parallel group), got {world.size}")
    groups = build_groups(world, args.ep, [EXPERTS])
    cases = [(args.k, args.dropless)] if args.k else [(2, False), (1, False), (2, True)]
    rng = cupy.random.default_rng(world.rank)  # every GPU its own tokens
    x = rng.standard_normal((TOKENS, WIDTH), dtype=cupy.float32).astype(bf16())
    grad = rng.standard_normal((TOKENS, WIDTH), dtype=cupy.float32).astype(bf16())
    _say(world, f"bench moe-layer --ep {args.ep} on {world.size} x {backend.gpu_name()}: per GPU T={TOKENS}, "
                f"d={WIDTH}, f={HIDDEN}, E={EXPERTS} in all, bf16; times in ms, median of 20 of the slowest rank")
    for k, dropless in cases:
        settings = MoESettings(k=k, drop_tokens=not dropless)  # capacity factor 1, DeepSpeed's RTS and sampling

        def layer(expert_parallel: Any = None) -> MoE:
            return MoE(WIDTH, HIDDEN, EXPERTS, settings, np.random.default_rng(0), 0.02,  # noqa: B023
                       expert_parallel=expert_parallel).to(bf16()).train()

        times, outputs = {}, {}
        for name, moe in (("EP=1", layer()), (f"EP={args.ep}", layer(groups.expert_parallel))):
            backend.manual_seed(world.rank)
            outputs[name] = moe(Tensor(x))[0].data.astype(cupy.float32)

            def forward_backward(moe: MoE = moe) -> None:
                y, _ = moe(Tensor(x, requires_grad=True))
                y.backward(grad)

            times[name] = (_slowest_ms(world, lambda moe=moe: moe(Tensor(x))), _slowest_ms(world, forward_backward))
        reference, parallel = outputs["EP=1"], outputs[f"EP={args.ep}"]
        error = float(cupy.linalg.norm(parallel - reference) / cupy.linalg.norm(reference))
        worst = float(world.mpi.all_reduce(np.array([error]), op="max")[0])
        label = f"k={k}, {'dropless' if dropless else 'capacity factor 1.0'}"
        _say(world, f"\n{label}: EP={args.ep} output vs EP=1 on the same tokens, relative L2 error {worst:.1e} "
                    "(largest over ranks)")
        _say(world, f"{'layout':<10}{'forward':>10}{'fwd+bwd':>10}{'tokens/s per GPU (fwd+bwd)':>30}")
        for name, (forward, both) in times.items():
            _say(world, f"{name:<10}{forward:>10.3f}{both:>10.3f}{TOKENS / (both * 1e-3):>30,.0f}")
        base, scaled = times["EP=1"], times[f"EP={args.ep}"]
        _say(world, f"EP={args.ep} per-GPU throughput = {100 * base[0] / scaled[0]:.0f}% (forward), "
                    f"{100 * base[1] / scaled[1]:.0f}% (forward+backward) of EP=1's")


BENCHMARKS = {"alltoall": bench_alltoall, "moe-layer": bench_moe_layer_ep}
