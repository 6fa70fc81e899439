"""GPU benchmarks: `minimoe bench moe-layer | gating | dispatch` (need a CUDA GPU and CuPy).

Every table gives minimoe's time, the floor and the peers present on the machine, measured in one run:
- the floor is the larger of FLOPs / the bf16 GEMM rate and bytes / the copy bandwidth, both measured
  here first (an 8192^3 bf16 GEMM through cuda/gemm.py; a 1 GiB device-to-device copy, counting bytes
  read plus bytes written);
- times are medians of CUDA-event-timed repetitions after warm-up.

train-step: a 12-layer GPT-MoE training step against the same model in PyTorch (see STEP_MODEL): with
torchtitan's grouped_mm MoE, eager and under torch.compile (the strongest peers), and as a naive loop
over experts.
moe-layer: T=8192 tokens, d=1024, f=4096, E=8, bf16, training mode; k=2 and k=1 with token dropping
(capacity factor 1.0) and k=2 dropless. Peers: torchtitan's grouped_mm MoE (dropless, no expert biases;
under torch.compile and eager), DeepSpeed's own deepspeed.moe.layer.MoE (the seed system), a naive
PyTorch eager loop over experts, transformers' MixtralSparseMoeBlock (SwiGLU experts: 1.5x the FLOPs).
Correctness first: the bf16 layer's output against the same layer in float32.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np

from minimoe import backend, breakdown
from minimoe.graphs import CaptureError
from minimoe.tensor import Tensor

TOKENS, WIDTH, HIDDEN, EXPERTS = 8192, 1024, 4096, 8


def event_times(fn: Callable[[], Any], warmup: int = 3, repeats: int = 20,
                before_each: Callable[[], Any] | None = None) -> list[float]:
    """Milliseconds of each of `repeats` calls of fn() between CUDA events on the current stream, after
    `warmup` untimed calls; before_each, when given, runs untimed before every timed call."""
    import cupy

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if before_each is not None:
            before_each()
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return times


def event_ms(fn: Callable[[], Any], warmup: int = 3, repeats: int = 20) -> float:
    """Median milliseconds of fn() between CUDA events on the current stream."""
    return float(np.median(event_times(fn, warmup, repeats)))


def queued_ms(fn: Callable[[], Any], calls: int = 50) -> float:
    """GPU milliseconds per call of fn() when the host is never what the GPU waits for: the stream is held
    shut by a host function until all `calls` calls are queued, then runs them back to back. Set beside
    event_ms (one call alone, host work included) it says how much of a call is launch overhead."""
    import threading

    import cupy

    fn()
    gate, timed_out = threading.Event(), []
    # The host function opens by itself after 5 s, so a fn that waits for the GPU stalls once, not forever.
    cupy.cuda.get_current_stream().launch_host_func(lambda _: timed_out.append(not gate.wait(5.0)), None)
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(calls):
        fn()
    stop.record()
    gate.set()
    stop.synchronize()
    if timed_out[0]:
        raise RuntimeError("queued_ms: fn waited for the GPU while the stream was held; it cannot be queued")
    return cupy.cuda.get_elapsed_time(start, stop) / calls


def torch_ms(fn: Callable[[], Any], warmup: int = 3, repeats: int = 20) -> float:
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return float(np.median(times))


def bf16() -> Any:
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def measure_ceilings() -> tuple[float, float]:
    """(bf16 GEMM FLOP/s, copy bytes/s) measured on this GPU, on random data."""
    import cupy

    from minimoe.cuda.gemm import matmul

    size = 8192
    a = cupy.random.standard_normal((size, size), dtype=cupy.float32).astype(bf16())
    b = cupy.random.standard_normal((size, size), dtype=cupy.float32).astype(bf16())
    gemm_rate = 2 * size**3 / (event_ms(lambda: matmul(a, b), repeats=10) * 1e-3)
    source = cupy.random.random(2**28, dtype=cupy.float32)  # 1 GiB
    target = cupy.empty_like(source)
    copy_rate = 2 * source.nbytes / (event_ms(lambda: target.__setitem__(Ellipsis, source), repeats=10) * 1e-3)
    return gemm_rate, copy_rate


def header(name: str) -> tuple[float, float]:
    import cupy

    gemm_rate, copy_rate = measure_ceilings()
    print(f"bench {name} on {backend.gpu_name()} (CuPy {cupy.__version__}); measured ceilings: "
          f"bf16 GEMM {gemm_rate / 1e12:.0f} TFLOP/s, copy {copy_rate / 1e12:.2f} TB/s (read + write)")
    return gemm_rate, copy_rate


# ----------------------------------------------------------------------------- moe-layer


def _minimoe_layer(k: int, dropless: bool, dtype: Any) -> Any:
    from minimoe.moe.gate import MoESettings
    from minimoe.moe.layer import MoE

    settings = MoESettings(k=k, drop_tokens=not dropless)  # capacity factor 1, DeepSpeed's RTS and sampling
    return MoE(WIDTH, HIDDEN, EXPERTS, settings, np.random.default_rng(0), 0.02).to(dtype).train()


def _check_bf16_against_float32(k: int, dropless: bool, x: Any) -> float:
    """Relative L2 error of the bf16 layer's output against the same weights in float32 (same noise)."""
    import cupy

    outputs = []
    for dtype in (bf16(), np.float32):
        layer = _minimoe_layer(k, dropless, dtype)
        backend.manual_seed(0)
        y, _ = layer(Tensor(x.astype(dtype)))
        outputs.append(y.data.astype(cupy.float32))
    return float(cupy.linalg.norm(outputs[0] - outputs[1]) / cupy.linalg.norm(outputs[1]))


def _time_minimoe(k: int, dropless: bool, x: Any, grad: Any) -> tuple[float, float, float | None, Any]:
    """(forward ms, forward+backward ms, forward ms with the calls queued: the GPU's own time, None for
    dropless, which reads its capacity on the host and cannot be queued; the layer)."""
    layer = _minimoe_layer(k, dropless, bf16())

    def forward() -> Any:
        return layer(Tensor(x, requires_grad=True))

    def forward_backward() -> None:
        y, _ = forward()
        y.backward(grad)

    return (event_ms(forward), event_ms(forward_backward), None if dropless else queued_ms(forward, 20), layer)


def _torch_peers(k: int, dropless: bool) -> dict[str, tuple[float, float] | str]:
    """Forward and forward+backward ms of each peer, or the reason it could not run."""
    import torch

    results: dict[str, tuple[float, float] | str] = {}
    x = torch.randn(1, TOKENS, WIDTH, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(1, TOKENS, WIDTH, device="cuda", dtype=torch.bfloat16)

    def timed(module: Any, pick: Callable[[Any], Any]) -> tuple[float, float]:
        def forward_backward() -> None:
            pick(module(x)).backward(grad)

        return torch_ms(lambda: module(x)), torch_ms(forward_backward)

    peers = (("PyTorch grouped_mm (torchtitan), compiled", lambda k, dropless: _grouped_layer(k, dropless, True)),
             ("PyTorch grouped_mm (torchtitan), eager", _grouped_layer), ("DeepSpeed 0.19 MoE", _deepspeed_layer),
             ("PyTorch eager loop (naive)", _eager_layer), ("Mixtral block (SwiGLU, 1.5x FLOPs)", _mixtral_layer))
    for name, build in peers:
        if name.startswith("Mixtral") and (dropless or k != 2):
            continue  # Mixtral's block is top-2 and dropless by construction: timed once, with k=2 drop
        try:
            module, pick = build(k, dropless)
            results[name] = timed(module, pick)
            del module
        except Exception as error:  # a peer that cannot run here is reported, not fatal
            results[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:100]}"
        torch.cuda.empty_cache()
    return results


def _deepspeed_layer(k: int, dropless: bool) -> tuple[Any, Callable[[Any], Any]]:
    import torch

    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29511"}.items():
        os.environ.setdefault(key, value)
    import deepspeed
    from deepspeed.moe.layer import MoE

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed("nccl")
    expert = torch.nn.Sequential(torch.nn.Linear(WIDTH, HIDDEN), torch.nn.GELU(approximate="tanh"),
                                 torch.nn.Linear(HIDDEN, WIDTH))
    layer = MoE(hidden_size=WIDTH, expert=expert, num_experts=EXPERTS, ep_size=1, k=k, capacity_factor=1.0,
                eval_capacity_factor=1.0, min_capacity=4, drop_tokens=not dropless, use_rts=k == 1)
    layer = layer.cuda().to(torch.bfloat16).train()
    layer.set_deepspeed_parallelism()
    return layer, lambda out: out[0]


def _eager_layer(k: int, dropless: bool) -> tuple[Any, Callable[[Any], Any]]:
    """The usual PyTorch eager MoE layer (see _eager_moe), bf16 experts."""
    import torch

    return _loop_module(WIDTH, HIDDEN, EXPERTS, k, torch.bfloat16).cuda().train(), lambda out: out


def _loop_module(width: int, hidden: int, experts: int, k: int, dtype: Any) -> Any:
    """A torch module around _eager_moe: the gate (float32) and the experts (tanh-GELU MLPs) in `dtype`."""
    import torch

    class LoopMoE(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = torch.nn.Linear(width, experts, bias=False).float()
            self.experts = torch.nn.ModuleList(
                torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.GELU(approximate="tanh"),
                                    torch.nn.Linear(hidden, width)).to(dtype) for _ in range(experts))

        def forward(self, x: Any) -> Any:
            return _eager_moe(x.reshape(-1, width), self.gate, self.experts, k).reshape(x.shape)

    return LoopMoE()


def _eager_moe(tokens: Any, gate: Any, experts: Any, k: int) -> Any:
    """The usual PyTorch eager MoE on tokens [T, d]: a float32 softmax gate, top-k (renormalised for
    k = 2), then a Python loop over the experts, each on the tokens that chose it (no capacity)."""
    import torch
    import torch.nn.functional as F

    with torch.autocast("cuda", enabled=False):
        probs = F.softmax(gate(tokens.float()), dim=-1)
    weights, chosen = probs.topk(k, dim=-1)
    if k == 2:
        weights = weights / weights.sum(-1, keepdim=True)
    out = torch.zeros_like(tokens)
    for e, expert in enumerate(experts):
        token, slot = (chosen == e).nonzero(as_tuple=True)
        out.index_add_(0, token, (expert(tokens[token]) * weights[token, slot, None]).to(out.dtype))
    return out


GROUP_ALIGN = 16  # rows: each expert's group in the grouped GEMM starts on a multiple of this (torchtitan's padding)


def _grouped_moe(tokens: Any, gate: Any, w1: Any, w2: Any, k: int) -> Any:
    """The PyTorch MoE that a user who cares about speed runs (torchtitan's): a float32 softmax gate, top-k
    (renormalised for k = 2), the k copies of every token sorted by expert into groups padded to
    GROUP_ALIGN rows, then both expert matrices as one grouped GEMM each in bf16 (torch._grouped_mm over
    w1 [E, d, f] and w2 [E, f, d], cast to bf16 as torchtitan casts them: the grouped GEMM takes no part in
    autocast; no expert biases, as torchtitan's experts have none), and the weighted copies added back.
    Dropless, and no shape depends on the data, so torch.compile takes it whole."""
    import torch
    import torch.nn.functional as F

    num_experts = w1.shape[0]
    with torch.autocast("cuda", enabled=False):
        probs = F.softmax(gate(tokens.float()), dim=-1)
    weights, chosen = probs.topk(k, dim=-1)
    if k == 2:
        weights = weights / weights.sum(-1, keepdim=True)
    flat = chosen.reshape(-1)
    order = torch.argsort(flat, stable=True)  # copy i of the sorted list is flat copy order[i]
    counts = torch.zeros(num_experts, dtype=torch.int64, device=tokens.device).index_add_(
        0, flat, torch.ones_like(flat))
    padded = (counts + GROUP_ALIGN - 1) // GROUP_ALIGN * GROUP_ALIGN
    ends = torch.cumsum(padded, 0)
    # Row of sorted copy i: its group's padded start + its rank in the group.
    sorted_expert = flat[order]
    rank = torch.arange(len(flat), device=tokens.device) - (torch.cumsum(counts, 0) - counts)[sorted_expert]
    rows = (ends - padded)[sorted_expert] + rank
    capacity = len(flat) + num_experts * (GROUP_ALIGN - 1)  # every group padded: a bound known in advance
    copies = tokens[order // k].bfloat16()  # (under autocast a LayerNorm's output is float32)
    grouped = copies.new_zeros(capacity, tokens.shape[1]).index_copy(0, rows, copies)
    offsets = ends.to(torch.int32)
    hidden = F.gelu(torch._grouped_mm(grouped, w1.bfloat16(), offs=offsets), approximate="tanh")
    out_rows = torch._grouped_mm(hidden, w2.bfloat16(), offs=offsets)[rows]
    weighted = (out_rows * weights.reshape(-1)[order, None].to(out_rows.dtype)).to(tokens.dtype)
    return torch.zeros_like(tokens).index_add(0, order // k, weighted)


def _grouped_module(width: int, hidden: int, experts: int, k: int, dtype: Any) -> Any:
    """A torch module around _grouped_moe: the gate (float32) and the stacked expert matrices in `dtype`
    (float32 in a training step, the master weights AdamW updates, as every other weight there)."""
    import torch

    class GroupedMoE(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = torch.nn.Linear(width, experts, bias=False).float()
            self.w1 = torch.nn.Parameter((torch.randn(experts, width, hidden) * 0.02).to(dtype))
            self.w2 = torch.nn.Parameter((torch.randn(experts, hidden, width) * 0.02).to(dtype))

        def forward(self, x: Any) -> Any:
            return _grouped_moe(x.reshape(-1, width), self.gate, self.w1, self.w2, k).reshape(x.shape)

    return GroupedMoE()


def _grouped_layer(k: int, dropless: bool, compiled: bool = False) -> tuple[Any, Callable[[Any], Any]]:
    import torch

    module = _grouped_module(WIDTH, HIDDEN, EXPERTS, k, torch.bfloat16).cuda().train()
    return (torch.compile(module) if compiled else module), lambda out: out


def _mixtral_layer(k: int, dropless: bool) -> tuple[Any, Callable[[Any], Any]]:
    import torch
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=WIDTH, intermediate_size=HIDDEN, num_local_experts=EXPERTS,
                           num_experts_per_tok=2)
    block = MixtralSparseMoeBlock(config).cuda().to(torch.bfloat16).train()
    return block, lambda out: out[0] if isinstance(out, tuple) else out


def _breakdown(layer: Any, x: Any, grad: Any) -> list[tuple[str, float]]:
    """Time of each kernel family of one forward and backward, run on their own on the layer's arrays."""
    import minimoe.cuda.bias_gelu as bias_gelu
    import minimoe.cuda.dispatch as dispatch
    import minimoe.cuda.gating as gating
    from minimoe.cuda.gemm import matmul
    from minimoe.moe.gate import route

    experts = layer.experts
    w1, b1, w2, b2 = (p.data for p in (experts.fc_weight, experts.fc_bias, experts.proj_weight, experts.proj_bias))
    gate_weight = layer.gate.weight.data
    settings = layer.settings
    backend.manual_seed(0)
    logits = gating.gate_logits(x, gate_weight)
    routing = route(logits, settings, training=True)
    table = routing.expert_index, routing.position
    weight = routing.weight.data

    def dispatch_x() -> Any:  # as the layer dispatches: with the inverse table the gating kernel wrote
        return dispatch.dispatch(x, *table, EXPERTS, routing.capacity, source_token=routing.source_token)

    buffer = dispatch_x()
    pre = matmul(buffer, w1)
    hidden = bias_gelu.bias_gelu_forward(pre, b1)
    out = matmul(hidden, w2)
    grad_out, _ = dispatch.combine_backward(grad, out, *table, weight)
    gating_result = gating.topk_gating(logits, settings.k, routing.capacity)
    rows = [
        ("gate: logits (float32, cast in registers)", event_ms(lambda: gating.gate_logits(x, gate_weight))),
        ("gate: routing (cuda/gating)", event_ms(lambda: route(logits, settings, training=True))),
        ("dispatch (Numba)", event_ms(dispatch_x)),
        ("expert GEMM 1 [E,C,d]x[E,d,f]", event_ms(lambda: matmul(buffer, w1))),
        ("bias + GELU", event_ms(lambda: bias_gelu.bias_gelu_forward(pre, b1))),
        ("expert GEMM 2 [E,C,f]x[E,f,d] (+ bias)",
         event_ms(lambda: bias_gelu.bias_add_forward(matmul(hidden, w2), b2))),
        ("combine", event_ms(lambda: dispatch.combine(out, *table, weight))),
        ("backward: combine", event_ms(lambda: dispatch.combine_backward(grad, out, *table, weight))),
        ("backward: GEMM 2 (2 GEMMs + bias sum)", event_ms(lambda: (
            matmul(grad_out, w2, transpose_b=True), matmul(hidden, grad_out, transpose_a=True),
            bias_gelu.bias_add_backward(grad_out, b2)))),
        ("backward: bias + GELU", event_ms(lambda: bias_gelu.bias_gelu_backward(hidden, pre, b1))),
        ("backward: GEMM 1 (2 GEMMs)", event_ms(lambda: (
            matmul(hidden, w1, transpose_b=True), matmul(buffer, hidden, transpose_a=True)))),
        ("backward: dispatch (= combine, unit weights)", event_ms(lambda: dispatch.combine(buffer, *table))),
        ("backward: gate (weights + aux + logits kernels)", event_ms(lambda: (
            gating.gate_weight_backward(weight, gating_result), gating.aux_loss_backward(1.0, gating_result),
            gating.gate_logits_backward(logits, x, gate_weight)))),
    ]
    return rows


def bench_moe_layer(args: argparse.Namespace) -> None:
    import cupy

    backend.set_device("cuda")
    gemm_rate, copy_rate = header("moe-layer")
    cases = [(args.k, args.dropless)] if args.k else [(2, False), (1, False), (2, True)]
    rng = cupy.random.default_rng(0)
    x = rng.standard_normal((TOKENS, WIDTH), dtype=cupy.float32).astype(bf16())
    grad = rng.standard_normal((TOKENS, WIDTH), dtype=cupy.float32).astype(bf16())
    print(f"T={TOKENS}, d={WIDTH}, f={HIDDEN}, E={EXPERTS}, bf16 activations and experts, float32 gate; "
          "capacity factor 1.0 unless dropless; times in ms (median of 20)")
    for k, dropless in cases:
        error = _check_bf16_against_float32(k, dropless, x)
        forward, forward_backward, forward_queued, layer = _time_minimoe(k, dropless, x, grad)
        flops = 2 * 2 * TOKENS * k * WIDTH * HIDDEN + 2 * TOKENS * WIDTH * EXPERTS  # routed tokens only
        weight_bytes = 2 * 2 * EXPERTS * WIDTH * HIDDEN
        floor_forward = max(flops / gemm_rate, (weight_bytes + 2 * 2 * TOKENS * WIDTH) / copy_rate) * 1e3
        floor_both = max(3 * flops / gemm_rate, (3 * weight_bytes + 6 * 2 * TOKENS * WIDTH) / copy_rate) * 1e3
        label = f"k={k}, {'dropless' if dropless else 'capacity factor 1.0'}"
        print(f"\n{label}: bf16 output vs float32 layer, relative L2 error {error:.2e}")
        print(f"{'implementation':<42}{'forward':>10}{'fwd+bwd':>10}")
        print(f"{'floor (FLOPs / GEMM rate, bytes / copy)':<42}{floor_forward:>10.3f}{floor_both:>10.3f}")
        print(f"{'minimoe':<42}{forward:>10.3f}{forward_backward:>10.3f}")
        if forward_queued is not None:
            print(f"{'minimoe, calls queued (GPU time)':<42}{forward_queued:>10.3f}")
        if not args.no_peers:
            for name, result in _torch_peers(k, dropless).items():
                if isinstance(result, str):
                    print(f"{name:<42}  could not run: {result}")
                else:
                    print(f"{name:<42}{result[0]:>10.3f}{result[1]:>10.3f}")
        if (k, dropless) == cases[0]:
            rows = _breakdown(layer, x, grad)
            print(f"\nwhere minimoe's time goes ({label}; each kernel family timed on its own):")
            for name, ms in rows:
                print(f"  {name:<48}{ms:>8.3f} ms")
            print(f"  {'sum of the parts':<48}{sum(ms for _, ms in rows):>8.3f} ms "
                  f"(measured forward + backward: {forward_backward:.3f} ms; the rest is Python and launches)")
        del layer


# ----------------------------------------------------------------------------- gating and dispatch


def bench_gating(args: argparse.Namespace) -> None:
    import cupy

    from minimoe.cuda.gating import expert_capacity, topk_gating

    backend.set_device("cuda")
    _, copy_rate = header("gating")
    tokens, experts = 65536, 64
    logits = cupy.random.default_rng(0).standard_normal((tokens, experts), dtype=cupy.float32)
    print(f"T={tokens}, E={experts}, float32 logits; bytes = logits read + probabilities written + the "
          "table (expert_index, position int64; weight float32) + dispatch's inverse table (E * C int64), "
          "each array counted once")
    for k in (1, 2, 4):
        capacity = expert_capacity(tokens, experts, k, 1.0, 4)
        gating = topk_gating(logits, k, capacity)
        expected = topk_gating(cupy.asnumpy(logits), k, capacity)
        assert np.array_equal(cupy.asnumpy(gating.position), expected.position), "GPU gating differs from reference"
        timings = [("one call alone", event_ms(lambda: topk_gating(logits, k, capacity)))]  # noqa: B023
        if k <= 2:  # k >= 3's reference reads counts on the host: its calls cannot be queued
            timings.append(("calls queued (GPU time)", queued_ms(lambda: topk_gating(logits, k, capacity))))  # noqa: B023
        inverse_table = experts * capacity * 8 if k <= 2 else 0  # k >= 3 does not write it
        moved = 2 * logits.nbytes + tokens * k * (8 + 8 + 4) + inverse_table
        path = "gate_route kernel" if k <= 2 else "NumPy reference on CuPy (no fused kernel)"
        for name, ms in timings:
            print(f"k={k}, {name:<24}{ms * 1e3:8.1f} us, {moved / (ms * 1e-3) / 1e12:.2f} TB/s = "
                  f"{100 * moved / (ms * 1e-3) / copy_rate:.0f}% of the copy ceiling ({path})")
    print("(checked against the NumPy reference; 'one call alone' includes the host's allocations and launch, "
          "'queued' is the GPU's own time)")


def bench_dispatch(args: argparse.Namespace) -> None:
    import cupy

    from minimoe.cuda.dispatch import combine, dispatch
    from minimoe.cuda.gating import expert_capacity, topk_gating

    backend.set_device("cuda")
    _, copy_rate = header("dispatch")
    tokens, experts, width = 65536, 64, 1024
    rng = cupy.random.default_rng(0)
    x = rng.standard_normal((tokens, width), dtype=cupy.float32).astype(bf16())
    for k in (1, 2):
        capacity = expert_capacity(tokens, experts, k, 1.0, 4)
        gating = topk_gating(rng.standard_normal((tokens, experts), dtype=cupy.float32), k, capacity)
        table = gating.expert_index, gating.position
        kept = int((gating.position >= 0).sum())
        row_bytes = width * 2
        buffer = dispatch(x, *table, experts, capacity)
        expected = dispatch(cupy.asnumpy(x).astype(np.float32), *(cupy.asnumpy(a) for a in table), experts, capacity)
        assert np.array_equal(cupy.asnumpy(buffer).astype(np.float32), expected), "GPU dispatch differs"
        # As in the MoE layer, dispatch takes the inverse table the gating kernel wrote.
        calls = {"dispatch": lambda: dispatch(x, *table, experts, capacity, source_token=gating.source_token),  # noqa: B023
                 "combine": lambda: combine(buffer, *table, gating.weight)}  # noqa: B023
        moved = {"dispatch": kept * row_bytes + experts * capacity * row_bytes,  # kept rows read, every slot written
                 "combine": kept * row_bytes + tokens * row_bytes}  # kept rows read, every token written
        for name, call in calls.items():
            for how, ms in (("one call alone", event_ms(call)), ("calls queued", queued_ms(call))):
                rate = moved[name] / (ms * 1e-3)
                print(f"k={k}, T={tokens}, E={experts}, d={width}, C={capacity}, bf16: {name:<8} {how:<15}"
                      f"{ms * 1e3:8.1f} us, {rate / 1e12:.2f} TB/s = {100 * rate / copy_rate:.0f}% of the copy ceiling")


# ----------------------------------------------------------------------------- train-step


STEP_MODEL = dict(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768, moe_every=2,
                  experts_per_layer=[8], k=2, capacity_factor=1.0)
STEP_BATCH = 8


def _minimoe_train_step(tokens: Any, targets: Any, graphs: bool) -> tuple[Callable[[], Any], Callable[[], float], int]:
    """minimoe's step of the benchmark's model (minimoe.step.TrainStep, eagerly or as CUDA graphs), reseeded
    at every step as the training loop does; returns (step, GiB the step's memory pools hold, parameters)."""
    import cupy

    from minimoe.model import GPT, GPTConfig
    from minimoe.optim import AdamW
    from minimoe.step import TrainStep

    model = GPT(GPTConfig(**STEP_MODEL)).to(bf16())
    train_step = TrainStep(model, AdamW(model.parameters(), lr=3e-4), grad_clip=1.0, graphs=graphs)
    count = [0]

    def step() -> Any:
        backend.manual_seed(0, count[0])
        count[0] += 1
        return train_step(tokens, targets).loss

    def memory_gib() -> float:
        graph_bytes = train_step.captured.memory_bytes() if train_step.captured else 0
        return (cupy.get_default_memory_pool().total_bytes() + graph_bytes) / 2**30

    return step, memory_gib, model.num_parameters()


def _torch_train_step(tokens: Any, targets: Any, grouped: bool, compiled: bool,
                      parts: TorchParts | None = None) -> Callable[[], Any]:
    """The same GPT-MoE in PyTorch: pre-LayerNorm blocks, fused SDPA attention, tanh-GELU MLPs, top-2
    softmax MoE in every other block, tied embeddings; bf16 autocast with float32 weights. grouped: the
    MoE as _grouped_moe (torchtitan's) with the fused AdamW, the peer a PyTorch user who cares about speed
    runs; else the naive loop over experts (_eager_moe) with the default multi-tensor AdamW. compiled:
    the model under torch.compile. parts: mark every part of the model for the profiler (TorchParts);
    each part is then compiled on its own, as the hooks that mark it must run outside compiled code.

    The model is cut where minimoe's is (breakdown.py's parts), each part a module with a `part` name:
    the embeddings, every LayerNorm with the residual add before it (minimoe's add_and_normalise; inductor
    fuses the two as well), attention, the MLP or MoE, and the tied output layer with the loss. A part
    takes the weights it shares as arguments, so their gradients count in the part."""
    import torch
    import torch.nn.functional as F

    width, heads, layers = STEP_MODEL["n_embd"], STEP_MODEL["n_head"], STEP_MODEL["n_layer"]
    experts, vocab, length = STEP_MODEL["experts_per_layer"][0], STEP_MODEL["vocab_size"], STEP_MODEL["block_size"]

    class Embedding(torch.nn.Module):
        part = "embedding"

        def forward(self, idx: Any, wte: Any, wpe: Any) -> Any:
            return F.embedding(idx, wte) + wpe[:idx.shape[1]]

    class AddNorm(torch.nn.Module):
        part = "layernorm"

        def __init__(self) -> None:
            super().__init__()
            self.ln = torch.nn.LayerNorm(width)

        def forward(self, x: Any, y: Any = None) -> tuple[Any, Any]:
            """The residual stream plus a block's output y (none before the first block), and its LayerNorm."""
            x = x if y is None else x + y
            return x, self.ln(x)

    class Attention(torch.nn.Module):
        part = "attention"

        def __init__(self) -> None:
            super().__init__()
            self.qkv, self.proj = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)

        def forward(self, h: Any) -> Any:
            batch, steps, _ = h.shape
            q, k, v = self.qkv(h).view(batch, steps, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.proj(attended.transpose(1, 2).reshape(batch, steps, width))

    class Output(torch.nn.Module):
        part = "output layer, loss"

        def forward(self, h: Any, wte: Any, targets: Any) -> Any:
            logits = h @ wte.T  # tied: the output layer is the embedding matrix
            return F.cross_entropy(logits.float().view(-1, vocab), targets.view(-1))

    def feed_forward(is_moe: bool) -> Any:
        if is_moe:
            module = (_grouped_module if grouped else _loop_module)(width, 4 * width, experts, 2, torch.float32)
            module.part = "moe"
        else:
            module = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(approximate="tanh"),
                                         torch.nn.Linear(4 * width, width))
            module.part = "mlp"
        return module

    class GPT(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte = torch.nn.Parameter(torch.empty(vocab, width))
            self.wpe = torch.nn.Parameter(torch.empty(length, width))
            self.embedding, self.output = Embedding(), Output()
            self.norms = torch.nn.ModuleList(AddNorm() for _ in range(2 * layers + 1))  # ln_1, ln_2 ..., ln_f
            self.attentions = torch.nn.ModuleList(Attention() for _ in range(layers))
            self.feed_forwards = torch.nn.ModuleList(feed_forward((i + 1) % 2 == 0) for i in range(layers))

        def forward(self, idx: Any, targets: Any) -> Any:
            x, h = self.norms[0](self.embedding(idx, self.wte, self.wpe))
            for layer, (attention, feed_forward) in enumerate(zip(self.attentions, self.feed_forwards)):
                x, h = self.norms[2 * layer + 1](x, attention(h))
                x, h = self.norms[2 * layer + 2](x, feed_forward(h))
            return self.output(h, self.wte, targets)

    model = GPT().cuda()
    for parameter in model.parameters():
        if parameter.dim() > 1:  # GPT-2's init for every matrix, as minimoe's model uses
            torch.nn.init.normal_(parameter, std=0.02)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=grouped or None)
    idx, tgt = torch.as_tensor(tokens, device="cuda"), torch.as_tensor(targets, device="cuda")
    forward = torch.compile(model) if compiled and parts is None else model
    if parts is not None:
        # Every part compiled on its own; the 25 LayerNorms (and the 12 attentions) are one code object,
        # which would pass the default limit on recompilations and fall back to eager.
        torch._dynamo.config.recompile_limit = 64
        for module in model.modules():
            if hasattr(module, "part"):
                if compiled:
                    module.forward = torch.compile(module.forward)
                parts.hook(module, module.part)

    def update() -> None:
        with parts.timed("optimizer", "update") if parts is not None else contextlib.nullcontext():
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def step() -> Any:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = forward(idx, tgt)
        loss.backward()
        update()
        return loss.detach()

    return step


class TorchParts:
    """The PyTorch peer's kernel time by part of the model. Module hooks open a profiler range when a
    part's forward starts (forward pre-hook) and close it when it ends (forward hook); its backward
    likewise, from its full backward pre-hook (the gradient of its outputs is there) to its full backward
    hook (the gradient of its inputs is). torch.profiler ties every kernel to the range it was launched
    in, so a part's time is the sum of its kernels' durations: GPU time without the gaps between them
    (profile() also sums every kernel of the step, which set against the step's time gives the gaps)."""

    def __init__(self) -> None:
        self.open: dict[tuple[int, str], Any] = {}

    def hook(self, module: Any, name: str) -> None:
        import torch

        def enter(phase: str) -> Callable[..., None]:
            def hook(*_: Any) -> None:  # (a hook that returns something replaces the module's output)
                self.open[id(module), phase] = torch.profiler.record_function(f"{name}|{phase}").__enter__()
            return hook

        def leave(phase: str) -> Callable[..., None]:
            def hook(*_: Any) -> None:
                self.open.pop((id(module), phase)).__exit__(None, None, None)
            return hook

        module.register_forward_pre_hook(enter("forward"))
        module.register_forward_hook(leave("forward"))
        module.register_full_backward_pre_hook(enter("backward"))
        module.register_full_backward_hook(leave("backward"))

    @staticmethod
    def timed(name: str, phase: str) -> Any:
        import torch

        return torch.profiler.record_function(f"{name}|{phase}")

    @staticmethod
    def profile(step: Callable[[], Any], steps: int) -> tuple[dict[tuple[str, str], float], float]:
        """step() run `steps` times under torch.profiler: (kernel seconds per step by (part, phase) of
        the ranges named "part|phase", all kernel seconds per step)."""
        import torch

        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as profiler:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
        seconds: dict[tuple[str, str], float] = defaultdict(float)
        kernels = 0.0
        for event in profiler.events():
            if event.device_type != torch.autograd.DeviceType.CPU:
                continue  # (the ranges' mirrors on the GPU's timeline)
            kernels += event.self_device_time_total / 1e6 / steps  # every kernel counts in one op, its launcher
            if event.name.count("|") == 1:
                name, phase = event.name.split("|")
                seconds[name, phase] += event.device_time_total / 1e6 / steps
        return dict(seconds), kernels


def _torch_breakdown(inputs: Any, targets: Any, steps: int = 5) -> list[str]:
    """Lines on the compiled grouped_mm peer's step: its kernel time by part (TorchParts, every part
    compiled on its own, as the hooks must run outside compiled code), then the whole model compiled:
    its kernel time against its step's time."""
    parts = TorchParts()
    step = _torch_train_step(inputs, targets, grouped=True, compiled=True, parts=parts)
    for _ in range(3):  # compiles, then warms up
        step()
    seconds, kernels = parts.profile(step, steps)
    part_ms = torch_ms(step, warmup=0, repeats=10)
    lines = breakdown.table({**seconds, ("step", "all"): kernels}, f"{1e3 * kernels:.2f} ms of kernels")
    lines.append(f"(with every part compiled on its own, a step takes {part_ms:.1f} ms)")
    whole = _torch_train_step(inputs, targets, grouped=True, compiled=True)
    for _ in range(3):
        whole()
    whole_ms = torch_ms(whole, warmup=0, repeats=10)
    _, whole_kernels = TorchParts.profile(whole, steps)
    lines.append(f"the whole model compiled: {1e3 * whole_kernels:.2f} ms of kernels in a {whole_ms:.1f} ms step "
                 f"(the GPU idle between kernels {whole_ms - 1e3 * whole_kernels:.2f} ms a step, waiting for launches)")
    return lines


def bench_train_step(args: argparse.Namespace) -> None:
    import cupy

    backend.set_device("cuda")
    header("train-step")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, STEP_MODEL["vocab_size"], (STEP_BATCH, STEP_MODEL["block_size"] + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    tokens_per_step = STEP_BATCH * STEP_MODEL["block_size"]
    expected = float(np.log(STEP_MODEL["vocab_size"]))
    print(f"{'implementation':<52}{'ms/step':>10}{'tokens/s':>12}{'peak GiB':>10}")
    minimoe_ms = {}
    for name, graphs in (("minimoe (bf16, float32 masters), CUDA graphs", True),
                         ("minimoe (bf16, float32 masters), eager", False)):
        step, memory_gib, parameters = _minimoe_train_step(cupy.asarray(inputs), cupy.asarray(targets), graphs)
        try:
            first = float(step())
        except CaptureError as error:  # reported, and the eager step still measured
            print(f"{name:<52}  could not run: {error}")
            continue
        minimoe_ms[name] = event_ms(step, warmup=2, repeats=10)
        print(f"{name:<52}{minimoe_ms[name]:>10.1f}{tokens_per_step / minimoe_ms[name] * 1e3:>12,.0f}"
              f"{memory_gib():>10.1f}   (first-step loss {first:.3f})")
        if args.breakdown and not graphs:
            print("minimoe's eager step by part of the model, mean of 10 steps (CUDA events around every op):")
            print("\n".join(breakdown.step_table(step, 10)))
        del step, memory_gib
        gc.collect()  # the model, its optimizer and graphs sit in reference cycles (tape, closures)
        cupy.get_default_memory_pool().free_all_blocks()
    print(f"GPT-MoE: {STEP_MODEL}, {parameters / 1e6:.0f} M parameters, batch {STEP_BATCH} x "
          f"{STEP_MODEL['block_size']} tokens; one step = forward, backward, clipping, AdamW; a random model's "
          f"first loss should be about ln V = {expected:.3f}")
    if args.no_peers:
        return
    peers = {}
    for name, grouped, compiled in (("PyTorch eager, grouped_mm MoE, fused AdamW", True, False),
                                    ("PyTorch compiled, grouped_mm MoE, fused AdamW", True, True),
                                    ("PyTorch eager, loop over experts (naive)", False, False)):
        try:
            import torch

            torch.cuda.reset_peak_memory_stats()
            torch_step = _torch_train_step(inputs, targets, grouped, compiled)
            first_loss = float(torch_step())  # (compiles, when compiled)
            peers[name] = torch_ms(torch_step, warmup=2, repeats=10)
            print(f"{name:<52}{peers[name]:>10.1f}{tokens_per_step / peers[name] * 1e3:>12,.0f}"
                  f"{torch.cuda.max_memory_allocated() / 2**30:>10.1f}   (first-step loss {first_loss:.3f})")
            del torch_step
            torch.cuda.empty_cache()
        except Exception as error:  # a peer that cannot run here is reported, not fatal
            print(f"{name:<52}  could not run: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
    print("peak GiB: minimoe's CuPy memory pools after the timed steps (the graphs' own included); PyTorch's "
          "largest allocation (torch.cuda.max_memory_allocated)")
    strongest = [name for name in peers if "grouped_mm" in name]
    if strongest:
        best = min(strongest, key=peers.get)
        fastest = min(minimoe_ms, key=minimoe_ms.get)
        print(f"minimoe's throughput ({fastest}) is {peers[best] / minimoe_ms[fastest]:.2f}x the strongest peer's "
              f"({best})")
    if args.breakdown:
        print("The compiled grouped_mm peer's kernel time by part of the model, per step (torch.profiler, 5 steps):")
        print("\n".join(_torch_breakdown(inputs, targets)))


def _peak_gib(fn: Callable[[], Any]) -> float:
    """GiB that one fn() takes into CuPy's memory pool beyond what is in use before it (the inputs)."""
    import cupy

    pool = cupy.get_default_memory_pool()
    pool.free_all_blocks()
    before = pool.used_bytes()
    fn()
    cupy.cuda.Device().synchronize()
    return (pool.total_bytes() - before) / 2**30


def bench_attention(args: argparse.Namespace) -> None:
    """Two parts of the training step, each forward + backward at bench train-step's shapes, in the two
    ways minimoe can run them: causal attention as flash attention's kernels or with the probabilities
    materialised (cuBLAS and the masked softmax), and the output layer + loss chunked
    (ops.lm_head_cross_entropy) or with the logits materialised."""
    import cupy

    from minimoe import ops
    from minimoe.cuda.attention import causal_attention_backward, causal_attention_forward
    from minimoe.cuda.flash_attention import flash_attention_backward, flash_attention_forward

    backend.set_device("cuda")
    header("attention")
    rng = np.random.default_rng(0)
    heads, width, length = STEP_MODEL["n_head"], STEP_MODEL["n_embd"], STEP_MODEL["block_size"]
    shape = (STEP_BATCH, heads, length, width // heads)
    q, k, v, grad = (cupy.asarray(rng.standard_normal(shape).astype(backend.bfloat16())) for _ in range(4))

    def flash() -> None:
        out, lse = flash_attention_forward(q, k, v)
        flash_attention_backward(grad, q, k, v, out, lse)

    def materialised() -> None:
        _, probs = causal_attention_forward(q, k, v)
        causal_attention_backward(grad, q, k, v, probs)

    rows, vocab = STEP_BATCH * length, STEP_MODEL["vocab_size"]
    x = cupy.asarray((rng.standard_normal((rows, width)) * 0.5).astype(backend.bfloat16()))
    weight = cupy.asarray((rng.standard_normal((vocab, width)) * 0.02).astype(backend.bfloat16()))
    targets = cupy.asarray(rng.integers(0, vocab, rows))

    def chunked() -> None:
        ops.lm_head_cross_entropy(Tensor(x, requires_grad=True), Tensor(weight, requires_grad=True), targets).backward()

    def logits() -> None:
        inputs, output = Tensor(x, requires_grad=True), Tensor(weight, requires_grad=True)
        ops.cross_entropy(inputs @ output.transpose(), targets).backward()

    print(f"attention: q, k, v [{', '.join(map(str, shape))}] bf16, causal; output layer + loss: x [{rows}, {width}], "
          f"weight [{vocab}, {width}] bf16; forward + backward each")
    print(f"{'part':<58}{'ms':>8}{'pool GiB':>10}   (GiB: what one run takes into CuPy's pool beyond its inputs)")
    for name, fn in (("attention, flash kernels", flash), ("attention, probabilities materialised", materialised),
                     ("output layer + loss, chunked", chunked), ("output layer + loss, logits materialised", logits)):
        gib = _peak_gib(fn)
        print(f"{name:<58}{event_ms(fn, warmup=2, repeats=10):>8.2f}{gib:>10.2f}")
    if not args.no_peers:
        print(_sdpa_peer(q, k, v, grad))


def _sdpa_peer(q: Any, k: Any, v: Any, grad: Any) -> str:
    """The row of PyTorch's fused attention (scaled_dot_product_attention, causal, the backend PyTorch
    picks) on the same q, k, v [B, H, T, D] and output gradient, forward + backward, in bench attention's
    table (its memory column left out: PyTorch's pool is not CuPy's)."""
    try:
        import torch
        import torch.nn.functional as F

        q, k, v = (torch.from_dlpack(a).detach().requires_grad_() for a in (q, k, v))
        grad = torch.from_dlpack(grad)

        def sdpa() -> None:  # (the gradients as new arrays, as minimoe's: autograd.grad adds into no .grad)
            torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), grad)

        name = f"attention, PyTorch {torch.__version__} scaled_dot_product_attention"
        return f"{name:<58}{torch_ms(sdpa, 2, 10):>8.2f}"
    except Exception as error:  # a peer that cannot run here is reported, not fatal
        return f"attention, PyTorch scaled_dot_product_attention: could not run: {type(error).__name__}: {error}"


BENCHMARKS = {"moe-layer": bench_moe_layer, "gating": bench_gating, "dispatch": bench_dispatch,
              "train-step": bench_train_step, "attention": bench_attention}
