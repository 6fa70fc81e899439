"""`minimoe bench serve`: the HTTP server under load, N concurrent clients against one at a time.

A server (minimoe/serve.py) runs in this process on 127.0.0.1 and a free port, its engine in a process
of its own as `minimoe serve` runs it, on a model with random weights: on the GPU bench decode's model
(482M parameters, bf16), on the CPU a small one (4 layers, d=128, 8 experts top-2, context 256). A fixed
number of requests, their prompt lengths and max_tokens drawn from a fixed seed, each streamed (greedy,
so every request makes exactly max_tokens tokens), are sent by --clients concurrent clients, then the
same requests one at a time. The clients run in processes of their own, as real clients do, 8 to a
process: in the server's process their reading and parsing of every streamed chunk would take the
server's interpreter lock and be counted against it, and one process of 64 client threads was itself a
limit (2 CPU cores, a model of 5k parameters whose steps cost little: 4,567 tokens/s with the 64 clients
in one process, 6,284 with them in eight). Printed for each: output tokens per second over the whole
run, the 50th and 99th percentiles of time to first token (from sending the request to its first chunk)
and of time per output token (after the first), and the engine's own account of the run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import socket
import threading
import time
from typing import Any

import numpy as np

from minimoe import backend
from minimoe.model import GPT, GPTConfig

CLIENTS_PER_PROCESS = 8  # client threads per client process (one process parsing 64 streams bounded the run)
CPU_MODEL = dict(vocab_size=256, block_size=256, n_layer=4, n_head=4, n_embd=128, moe_every=1, experts_per_layer=[8],
                 k=2, drop_tokens=False)


def _requests(count: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz ", dtype=np.uint8)
    return [{"prompt": bytes(rng.choice(letters, rng.integers(16, 65))).decode(),
             "max_tokens": int(rng.integers(16, 129)), "temperature": 0.0, "stream": True} for _ in range(count)]


def _one(url: str, body: dict[str, Any]) -> tuple[float, float, int]:
    """(seconds to the first chunk, seconds from the first chunk to the last, tokens) of one request."""
    import httpx

    start = time.perf_counter()
    first, tokens = None, 0
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            if first is None:
                first = time.perf_counter()
            tokens += len(json.loads(line[6:])["choices"][0]["text"].encode())  # byte tokens
    return first - start, time.perf_counter() - first, tokens


def _send(url: str, requests: list[dict[str, Any]], threads: int) -> list[tuple[float, float, int]]:
    """_one of every request, `threads` at a time (in one client process)."""
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda body: _one(url, body), requests))


def _run(clients_pool: concurrent.futures.Executor, url: str, requests: list[dict[str, Any]],
         clients: int) -> dict[str, float]:
    """The requests sent by `clients` concurrent clients, CLIENTS_PER_PROCESS threads to a process of the
    pool, each process a share of the requests; throughput over the wall time of all of them."""
    processes = -(-clients // CLIENTS_PER_PROCESS)
    shares = [requests[i::processes] for i in range(processes)]
    threads = [len(range(i, clients, processes)) for i in range(processes)]
    start = time.perf_counter()
    results = [one for share in clients_pool.map(_send, [url] * processes, shares, threads) for one in share]
    elapsed = time.perf_counter() - start
    first = np.array([r[0] for r in results])
    per_token = np.array([r[1] / max(r[2] - 1, 1) for r in results])
    return {"tokens/s": sum(r[2] for r in results) / elapsed, "ttft p50": np.percentile(first, 50),
            "ttft p99": np.percentile(first, 99), "tpot p50": np.percentile(per_token, 50),
            "tpot p99": np.percentile(per_token, 99)}


def bench_model(device: str) -> GPT:
    """The benchmark's model with random weights on `device` (the engine process's load_model)."""
    from minimoe.bench.decode import build_model
    from minimoe.generate import prepare

    if backend.set_device(device) == "cuda":
        return build_model()
    return prepare(GPT(GPTConfig(**CPU_MODEL)))


def bench_serve(args: argparse.Namespace) -> None:
    import functools
    import logging

    import uvicorn

    from minimoe.serve import EngineProcess, create_app

    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    engine = EngineProcess(functools.partial(bench_model, args.device), max_batch=args.clients,
                           max_queue=4 * args.requests)
    engine.start()
    device = engine.device
    app = create_app(engine, "bench")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    requests = _requests(args.requests)
    clients = concurrent.futures.ProcessPoolExecutor(-(-args.clients // CLIENTS_PER_PROCESS),
                                                     mp_context=multiprocessing.get_context("spawn"))
    # Warm-up: 1, 2, 4, ... short requests at once, up to the clients, so that the client processes are up
    # and every path of the server has run once (the server itself captured its CUDA graphs at start-up).
    for size in sorted({min(1 << i, args.clients) for i in range(args.clients.bit_length() + 1)}):
        warm_up = [dict(body, max_tokens=8) for body in _requests(size, seed=1)]
        _run(clients, url, warm_up, size)
    where = engine.device_name if device == "cuda" else f"CPU ({__import__('os').cpu_count()} threads)"
    print(f"bench serve on {where}: {engine.parameters:,} parameters, {args.requests} streamed greedy requests "
          f"(prompts 16-64 bytes, 16-128 new tokens, seed 0) over loopback HTTP")
    rows, timelines = {}, {}
    for name, concurrent_clients in ((f"{args.clients} concurrent clients", args.clients), ("one at a time", 1)):
        before = engine.stats
        rows[name] = _run(clients, url, requests, concurrent_clients)
        after = engine.stats
        timelines[name] = ({phase: after["seconds"][phase] - before["seconds"][phase] for phase in after["seconds"]},
                           {key: after["counters"][key] - before["counters"][key] for key in after["counters"]})
    clients.shutdown()
    print(f"{'':<26}{'tokens/s':>10}{'TTFT p50 ms':>13}{'TTFT p99 ms':>13}{'TPOT p50 ms':>13}{'TPOT p99 ms':>13}")
    for name, row in rows.items():
        print(f"{name:<26}{row['tokens/s']:>10,.0f}{1e3 * row['ttft p50']:>13.1f}{1e3 * row['ttft p99']:>13.1f}"
              f"{1e3 * row['tpot p50']:>13.2f}{1e3 * row['tpot p99']:>13.2f}")
    ratio = rows[f"{args.clients} concurrent clients"]["tokens/s"] / rows["one at a time"]["tokens/s"]
    print(f"throughput with {args.clients} clients: {ratio:.1f}x one at a time")
    print("the engine process's scheduler meanwhile (wall seconds by phase; a decode step's mean batch):")
    for name, (seconds, counts) in timelines.items():
        steps = max(counts["decode_steps"], 1)
        phases = ", ".join(f"{phase} {value:.2f}" for phase, value in seconds.items())
        print(f"  {name}: {counts['decode_steps']} steps of {counts['decoded_rows'] / steps:.1f} rows on average, "
              f"{1e3 * seconds['step'] / steps:.2f} ms each; {phases} (of {sum(seconds.values()):.2f})")
    server.should_exit = True
    thread.join(timeout=10)
