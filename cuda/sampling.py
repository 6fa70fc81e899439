"""Sampling the next token on the device, one row of logits per sequence, each row with its own settings:
temperature, top-k, top-p (nucleus) and a seed. No row of logits leaves the device; only the tokens do.

For row i with logits l [V], temperature T, top_k, top_p, seed key and the position of the token drawn:

    T = 0:   the token is argmax_e l_e (the lowest e among equals): greedy
    T > 0:   z = l / T,  p = softmax(z)
             order the tokens by z, larger first, the lower index first among equals;
             token e is allowed if fewer than top_k tokens come before it (top_k = 0: no limit) and the
             probability of the tokens before it is below top_p (Holtzman et al., 2020: the nucleus is the
             shortest prefix of that order whose mass reaches top_p; top_p = 1: no limit);
             token = argmax over allowed e of z_e + g_e,  g_e = -log(-log(u_e))  (Gumbel-max: a sample of
             e with probability p_e renormalised over the allowed tokens)

The uniform numbers u_e come from Philox (cuda/philox.py) with the row's key and counters derived from
the position alone: position * ceil(V / 4) onwards, the V numbers of one position. So a sequence draws
the same numbers whatever batch it is in and wherever in that batch: the same seed gives the same text
alone or inside a batch.

Reference: NumPy, in float64 over the same float32 uniform numbers. GPU: cuda/sampling.cu, one block
per row, float32; the two can differ only where two tokens' scores, or a nucleus boundary, lie within
float32 rounding of each other.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from minimoe.backend import is_gpu
from minimoe.cuda import build, philox

build.register("sampling.cu", "sample_tokens<float>", "sample_tokens<bf16>")
THREADS = 256


def seed_key(seed: int) -> int:
    """The 64-bit Philox key of a request's seed."""
    return int(np.random.SeedSequence([seed]).generate_state(1, np.uint64)[0])


def counters_per_position(vocab_size: int) -> int:
    """The Philox counters one position's draw of vocab_size numbers uses."""
    return philox.counters_used(vocab_size)


def sample_tokens(logits: Any, temperature: Any, top_k: Any, top_p: Any, key: Any, position: Any) -> Any:
    """tokens [n] int64 from logits [n, V] and per-row temperature [n], top_k [n], top_p [n], key [n]
    (uint64) and position [n] (the index the drawn token will have in its sequence)."""
    if is_gpu(logits):
        return _gpu_sample(logits, temperature, top_k, top_p, key, position)
    rows, vocab = logits.shape
    tokens = np.empty(rows, dtype=np.int64)
    for i in range(rows):
        logit = logits[i].astype(np.float64)
        if temperature[i] == 0:
            tokens[i] = int(np.argmax(logit))
            continue
        z = logit / float(temperature[i])
        p = np.exp(z - z.max())
        p /= p.sum()
        indices = np.arange(vocab)
        before = (z[None, :] > z[:, None]) | ((z[None, :] == z[:, None]) & (indices[None, :] < indices[:, None]))
        allowed = np.ones(vocab, dtype=bool)  # before[e, j]: token j comes before token e
        if top_k[i] > 0:
            allowed &= before.sum(axis=1) < top_k[i]
        if top_p[i] < 1.0:
            allowed &= (before * p[None, :]).sum(axis=1) < top_p[i]
        counter = int(position[i]) * counters_per_position(vocab)
        uniform = philox.uniform_reference(vocab, int(key[i]), counter).astype(np.float64)
        gumbel = -np.log(-np.log(np.maximum(uniform, philox.TINY)))
        tokens[i] = int(np.argmax(np.where(allowed, z + gumbel, -np.inf)))
    return tokens


def _gpu_sample(logits: Any, temperature: Any, top_k: Any, top_p: Any, key: Any, position: Any) -> Any:
    import cupy

    rows, vocab = logits.shape
    logits = cupy.ascontiguousarray(logits)
    tokens = cupy.empty(rows, dtype=cupy.int64)
    if rows:
        build.kernel("sampling.cu", f"sample_tokens<{build.type_name(logits)}>")(
            (rows,), (THREADS,),
            (logits, cupy.ascontiguousarray(temperature, dtype=cupy.float32),
             cupy.ascontiguousarray(top_k, dtype=cupy.int32), cupy.ascontiguousarray(top_p, dtype=cupy.float32),
             cupy.ascontiguousarray(key, dtype=cupy.uint64), cupy.ascontiguousarray(position, dtype=cupy.int64),
             tokens, np.int32(vocab), np.int32(counters_per_position(vocab)), philox.TINY),
            shared_mem=8 * vocab)
    return tokens
