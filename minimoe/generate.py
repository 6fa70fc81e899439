"""Sampling text from a trained GPT: temperature and top-k over the last position's logits.

Each new token runs the model over the last block_size tokens (a sliding window once the text is
longer than the context). Sampling happens on the host with a seeded NumPy generator, so the same
checkpoint, prompt and seed give the same text on any device.
"""

from __future__ import annotations

import numpy as np

from minimoe import backend
from minimoe.model import GPT
from minimoe.tensor import no_grad


def sample_next(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    """One token id from logits [V]: greedy for temperature 0, else softmax(logits / temperature)
    restricted to the top_k largest logits (all of them when top_k <= 0)."""
    if temperature <= 0:
        return int(np.argmax(logits))
    logits = logits.astype(np.float64) / temperature
    if 0 < top_k < len(logits):
        cutoff = np.partition(logits, -top_k)[-top_k]
        logits = np.where(logits < cutoff, -np.inf, logits)
    probs = np.exp(logits - logits.max())
    return int(rng.choice(len(probs), p=probs / probs.sum()))


def generate(model: GPT, prompt: np.ndarray, max_new_tokens: int, temperature: float = 0.8,
             top_k: int = 40, seed: int = 0) -> np.ndarray:
    """The prompt's tokens [T] followed by max_new_tokens sampled ones."""
    block_size = model.config.block_size
    if len(prompt) > block_size:
        raise ValueError(f"the prompt is {len(prompt)} tokens long, more than the model's context "
                         f"(block_size={block_size})")
    if len(prompt) == 0:
        raise ValueError("the prompt is empty; give at least one character to start from")
    if max_new_tokens < 1:
        raise ValueError(f"max new tokens must be at least 1, got {max_new_tokens}")
    if not 0 <= temperature < np.inf:
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top-k must be at least 0 (0 keeps the whole vocabulary), got {top_k}")
    if seed < 0:
        raise ValueError(f"the seed must be at least 0, got {seed}")
    rng = np.random.default_rng(seed)
    tokens = list(prompt)
    was_training = model.training
    model.eval()
    with no_grad():
        for _ in range(max_new_tokens):
            window = backend.asarray(np.array(tokens[-block_size:])[None, :])
            last = backend.to_numpy(model(window).logits.data[0, -1])
            tokens.append(sample_next(last, temperature, top_k, rng))
    model.train(was_training)
    return np.array(tokens, dtype=np.int64)
