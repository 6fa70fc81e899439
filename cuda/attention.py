"""Causal scaled dot-product attention (Vaswani et al., 2017, eq. 1) with the GPT decoder mask.

For q, k, v of shape [B, H, T, D] (batch, heads, time, head width):

    scores = q @ k^T / sqrt(D),   scores[t, s] = -inf for s > t      (a token sees only its past)
    probs  = softmax(scores),     out = probs @ v

The reference keeps probs [B, H, T, T] for the backward:

    dv = probs^T @ dout,   dprobs = dout @ v^T,
    dscores = probs * (dprobs - sum_s dprobs * probs),   dq = dscores @ k / sqrt(D),   dk = dscores^T @ q / sqrt(D)
"""

from typing import Any

from minimoe.backend import array_module


def causal_attention_forward(q: Any, k: Any, v: Any) -> tuple[Any, Any]:
    """Returns (out [B, H, T, D], probs [B, H, T, T])."""
    xp = array_module(q)
    length, width = q.shape[-2], q.shape[-1]
    scores = (q @ k.swapaxes(-1, -2)) * (1.0 / width**0.5)
    future = xp.triu(xp.ones((length, length), dtype=bool), k=1)
    scores = xp.where(future, -xp.inf, scores)
    scores = xp.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = scores / scores.sum(axis=-1, keepdims=True)
    return probs @ v, probs


def causal_attention_backward(
    grad_out: Any, q: Any, k: Any, v: Any, probs: Any
) -> tuple[Any, Any, Any]:
    scale = 1.0 / q.shape[-1] ** 0.5
    grad_v = probs.swapaxes(-1, -2) @ grad_out
    grad_probs = grad_out @ v.swapaxes(-1, -2)
    grad_scores = probs * (grad_probs - (grad_probs * probs).sum(axis=-1, keepdims=True)) * scale
    return grad_scores @ k, grad_scores.swapaxes(-1, -2) @ q, grad_v
