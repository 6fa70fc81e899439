"""Counter-based random numbers for the GPU: Philox4x32-10 (Salmon, Moraes, Dror and Shaw, "Parallel
random numbers: as easy as 1, 2, 3", SC 2011), the generator family behind cuRAND's and PyTorch's
GPU draws.

philox(key, counter) maps a 128-bit counter (four 32-bit words) and a 64-bit key (two words) to four
32-bit words by 10 rounds of

    (high_0, low_0) = M_0 * x_0,  (high_1, low_1) = M_1 * x_2          (32 x 32 -> 64-bit products)
    x = (high_1 ^ x_1 ^ k_0,  low_1,  high_0 ^ x_3 ^ k_1,  low_0)

with the key bumped by the Weyl constants (k_0 += W_0, k_1 += W_1, mod 2^32) before every round but
the first. For a fixed key it is a bijection of the counter, so distinct counters never repeat a block.

A draw of n numbers from (key, counter): number i is word i % 4 of philox(key, counter + i // 4), as
a float32 in [0, 1) from its top 24 bits, (word >> 8) * 2^-24, exact in float32. It uses the counters
counter .. counter + ceil(n / 4) - 1: the caller (minimoe.backend) moves its counter past them, so
that no two draws of one seed share a counter. Nothing is stored between draws: the state is two
integers, and any draw can be repeated from them.

Reference: NumPy, vectorised over the counters (the products in uint64). GPU: cuda/philox.cu's
philox_uniform, a thread per counter. Both give the same bits (integer arithmetic and one exact
conversion), so the tests compare them for equality. gumbel_noisy adds the Gumbel noise of a draw to
the gate's logits in the same launch, so that the uniform numbers are never stored.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from minimoe.cuda import build

MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
WEYL = (0x9E3779B9, 0xBB67AE85)
ROUNDS = 10
WORD = 0xFFFFFFFF
THREADS = 256
TINY = np.float32(np.finfo(np.float32).tiny)  # the clamp that keeps log(0) out of the Gumbel noise


def philox(counter: np.ndarray, key: int) -> np.ndarray:
    """counter [n, 4] uint32 (word 0 first) and a 64-bit key -> [n, 4] uint32 blocks."""
    x0, x1, x2, x3 = (counter[:, i].astype(np.uint64) for i in range(4))
    key_0, key_1 = np.uint64(key & WORD), np.uint64(key >> 32)
    multiplier_0, multiplier_1 = np.uint64(MULTIPLIERS[0]), np.uint64(MULTIPLIERS[1])
    word, shift = np.uint64(WORD), np.uint64(32)
    for round_index in range(ROUNDS):
        if round_index:
            key_0, key_1 = (key_0 + np.uint64(WEYL[0])) & word, (key_1 + np.uint64(WEYL[1])) & word
        product_0, product_1 = multiplier_0 * x0, multiplier_1 * x2  # < 2^64: exact
        x0, x1, x2, x3 = ((product_1 >> shift) ^ x1 ^ key_0, product_1 & word,
                          (product_0 >> shift) ^ x3 ^ key_1, product_0 & word)
    return np.stack([x0, x1, x2, x3], axis=1).astype(np.uint32)


def counters_used(size: int) -> int:
    """How many counters a draw of `size` numbers uses (the caller's counter moves on by this much)."""
    return math.ceil(size / 4)


def uniform_reference(size: int, key: int, counter: int) -> np.ndarray:
    """The draw of `size` float32 numbers in [0, 1) from (key, counter), on the host."""
    counters = counter + np.arange(counters_used(size), dtype=np.uint64)
    blocks = philox(np.stack([counters & np.uint64(WORD), counters >> np.uint64(32),
                              np.zeros_like(counters), np.zeros_like(counters)], axis=1), key)
    return ((blocks.reshape(-1)[:size] >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24))


def key_slot(key: int) -> Any:
    """A device array of one uint64 holding `key`: the GPU kernels read their key from device memory, so
    that a CUDA graph replaying a draw takes the key the slot holds then (minimoe.backend rewrites it at
    every reseeding)."""
    import cupy

    return cupy.full(1, np.uint64(key), dtype=cupy.uint64)


def uniform(shape: tuple[int, ...], key: Any, counter: int) -> Any:
    """The draw of prod(shape) float32 numbers in [0, 1) from (key, counter), on the GPU, shaped; key: a
    key_slot."""
    import cupy

    out = cupy.empty(shape, dtype=cupy.float32)
    _launch("philox_uniform", (out,), out.size, key, counter)
    return out


def gumbel_noisy(logits: Any, key: Any, counter: int) -> Any:
    """logits - log(-log(max(u, tiny))) with u the draw of logits.size numbers from (key, counter) (key:
    a key_slot): the float32 logits plus Gumbel noise, on the GPU in one launch that never stores u
    (DeepSpeed's `logits + gumbel_rsample(...)`). Its reference is cuda/gating.py's add_gumbel_noise over
    uniform_reference: the same numbers, up to the GPU's logf."""
    import cupy

    logits = cupy.ascontiguousarray(logits, dtype=cupy.float32)
    noisy = cupy.empty(logits.shape, dtype=cupy.float32)
    _launch("gumbel_noisy", (logits, noisy), logits.size, key, counter, TINY)
    return noisy


def _launch(name: str, arrays: tuple[Any, ...], size: int, key: Any, counter: int, *extra: Any) -> None:
    """philox.cu's kernel `name` over a draw of `size` numbers: a thread per counter (at most 4096 blocks,
    each thread striding on), arguments (arrays, size, key slot, counter, extra)."""
    groups = counters_used(size)
    if groups:
        build.kernel("philox.cu", name)((min(math.ceil(groups / THREADS), 4096),), (THREADS,),
                                        (*arrays, np.int64(size), key, np.uint64(counter), *extra))
