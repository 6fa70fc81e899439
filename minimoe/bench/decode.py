"""`minimoe bench decode`: generation on one GPU, the engine (engine.py) against transformers' Mixtral.

The model (random weights, bf16): 12 layers, d=768, 12 heads, context 1024, 8 experts of hidden 3072 in
every block, top-2, byte vocabulary. Each batch size B runs B prompts of 128 random tokens, 128 new
tokens each, greedy. Measured per batch:
- prefill: the one forward that fills the caches and samples the first tokens (after an untimed one of
  the same prompts, so that compiling and capturing are not counted);
- decode: the other 127 steps, each a CUDA graph replay plus the copy of B tokens to the host; ms per
  step and decode tokens per second (B per step); and at batch 1 the same steps run eagerly, without
  the graph, to show what the graph saves;
- the floor of a decode step: the bytes it must read (the attention and gate weights, the experts some
  token chose, the KV cache read so far) over the copy bandwidth measured here.
Peer: transformers' MixtralForCausalLM.generate with the same shapes (SwiGLU experts: 1.5x the expert
bytes and FLOPs of minimoe's two-matrix GELU experts), greedy, 128 new tokens, end to end; its decode
rate is (time for 128 new tokens - time for 1) / 127 steps. Correctness first: at batch 8 the
graph's tokens equal the eager steps' tokens, and at batch 2 a sequence equals itself generated alone.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from minimoe import backend
from minimoe.bench.gpu import bf16, header
from minimoe.engine import Engine, SamplingParams
from minimoe.model import GPT, GPTConfig

MODEL = dict(vocab_size=256, block_size=1024, n_layer=12, n_head=12, n_embd=768, moe_every=1,
             experts_per_layer=[8], k=2, drop_tokens=False)
PROMPT, NEW_TOKENS = 128, 128


def build_model() -> GPT:
    return GPT(GPTConfig(**MODEL)).to(bf16()).eval()


def prompts(batch: int, seed: int = 0) -> list[np.ndarray]:
    return list(np.random.default_rng(seed).integers(0, 256, (batch, PROMPT)))


def run_engine(model: GPT, batch: int, graphs: bool) -> tuple[float, list[float], list[list[int]]]:
    """(prefill seconds, seconds of each decode step, the generated tokens) for `batch` prompts."""
    import cupy

    engine = Engine(model, slots=batch, graphs=graphs)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0)
    # An untimed prefill of the same prompts first (then cancelled): a path's first use compiles its
    # kernels and captures its graph, which the timed prefill should not count.
    warm_up = [engine.submit(p, params) for p in prompts(batch)]
    engine.admit()
    for sequence in warm_up:
        engine.cancel(sequence)
    sequences = [engine.submit(p, params) for p in prompts(batch)]
    cupy.cuda.Device().synchronize()
    start = time.perf_counter()
    engine.admit()
    prefill = time.perf_counter() - start
    steps = []
    while engine.running:
        start = time.perf_counter()
        engine.step()  # ends with the tokens on the host: a synchronised step
        steps.append(time.perf_counter() - start)
    return prefill, steps, [s.generated for s in sequences]


def step_bytes(model: GPT, batch: int, cached: int) -> int:
    """Bytes a decode step must read: every non-expert weight, the experts that `batch` tokens choosing 2 of
    8 experts reach on average (1 - (6/8 * 5/7)^batch of them: an expert is missed by one token with
    probability 6/8 * 5/7), and the keys and values of `cached` positions for each sequence."""
    config = model.config
    itemsize = 2
    experts = sum(p.size for name, p in model.named_parameters() if ".experts." in name) * itemsize
    dense = sum(p.size * p.data.dtype.itemsize for name, p in model.named_parameters() if ".experts." not in name)
    reached = 1 - (6 / 8 * 5 / 7) ** batch
    cache = 2 * config.n_layer * batch * cached * config.n_embd * itemsize
    return int(dense + experts * reached + cache)


def mixtral_seconds(batch: int, new_tokens: int) -> float:
    """Seconds of transformers' Mixtral generate with the same shapes (median of 3 after a warm-up)."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=256, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, num_key_value_heads=12, num_local_experts=8,
                           num_experts_per_tok=2, max_position_embeddings=1024)
    model = mixtral_seconds.__dict__.get("model")
    if model is None:
        torch.manual_seed(0)
        model = mixtral_seconds.model = MixtralForCausalLM(config).to("cuda", torch.bfloat16).eval()
    inputs = torch.tensor(np.stack(prompts(batch)), device="cuda")
    times = []
    for _ in range(4):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:]))


def bench_decode(args: argparse.Namespace) -> None:
    backend.set_device("cuda")
    _, copy_rate = header("decode")
    batches = [int(b) for b in args.batches.split(",")]
    model = build_model()
    print(f"model: {model.num_parameters():,} parameters, bf16, {MODEL['n_layer']} layers, d={MODEL['n_embd']}, "
          f"{MODEL['experts_per_layer'][0]} experts top-{MODEL['k']} in every block, byte vocabulary; "
          f"prompt {PROMPT}, {NEW_TOKENS} new tokens, greedy")

    _, _, graph_tokens = run_engine(model, 8, graphs=True)
    _, _, eager_tokens = run_engine(model, 8, graphs=False)
    assert graph_tokens == eager_tokens, "the captured decode step differs from the eager one"
    # Prefills of up to GEMM_ROWS rows go through the same row-independent kernels as decode steps: at
    # batch 2 (256 prompt rows) a sequence is bit for bit itself alone.
    _, _, pair = run_engine(model, 2, graphs=True)
    _, _, alone = run_engine(model, 1, graphs=True)
    assert alone[0] == pair[0], "a sequence generated alone differs from itself in a batch"
    print("checked: graph replays equal eager steps at batch 8; a sequence alone equals itself at batch 2")

    print(f"{'batch':>6}{'prefill ms':>12}{'ms/step':>10}{'decode tok/s':>14}{'floor ms/step':>15}"
          f"{'Mixtral tok/s':>15}{'Mixtral e2e tok/s':>19}{'minimoe e2e tok/s':>19}")
    for batch in batches:
        prefill, steps, _ = run_engine(model, batch, graphs=True)
        step = float(np.median(steps))
        floor = step_bytes(model, batch, PROMPT + NEW_TOKENS // 2) / copy_rate
        ours_e2e = batch * NEW_TOKENS / (prefill + sum(steps))
        peer, peer_e2e = "-", "-"
        if not args.no_peers:
            try:
                one, full = mixtral_seconds(batch, 1), mixtral_seconds(batch, NEW_TOKENS)
                peer = f"{batch * (NEW_TOKENS - 1) / (full - one):,.0f}"
                peer_e2e = f"{batch * NEW_TOKENS / full:,.0f}"
            except ImportError as error:
                peer = peer_e2e = f"n/a ({error.name})"
        print(f"{batch:>6}{1e3 * prefill:>12.1f}{1e3 * step:>10.3f}{batch / step:>14,.0f}{1e3 * floor:>15.3f}"
              f"{peer:>15}{peer_e2e:>19}{ours_e2e:>19,.0f}")
        if batch == 1:
            _, eager_steps, _ = run_engine(model, 1, graphs=False)
            print(f"{'':>6}batch 1 without the CUDA graph: {1e3 * float(np.median(eager_steps)):.3f} ms/step")
