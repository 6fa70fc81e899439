"""Fused softmax + cross-entropy: the language-model loss from logits, without storing probabilities.

For logits z [N, V] and targets t [N], with rows whose target equals `ignore_index` left out:

    loss = (1 / n_valid) * sum_{valid n} (logsumexp(z_n) - z_{n, t_n})

Forward keeps only logsumexp [N]; backward rebuilds the softmax from the logits and the saved
logsumexp, so the [N, V] probabilities never exist as a second array beside the logits:

    d loss / d z_{n, v} = (softmax(z_n)_v - [v == t_n]) / n_valid     (0 for ignored rows)

A batch with every row ignored has loss 0 and zero gradient (n_valid is clamped to 1).
"""

from typing import Any

from minimoe.cuda.softmax import logsumexp as row_logsumexp

from minimoe.backend import array_module


def _valid_rows(targets: Any, ignore_index: int) -> tuple[Any, Any, Any]:
    xp = array_module(targets)
    valid = targets != ignore_index
    safe_targets = xp.where(valid, targets, 0)
    count = max(int(valid.sum()), 1)
    return valid, safe_targets, count


def cross_entropy_forward(logits: Any, targets: Any, ignore_index: int = -100) -> tuple[Any, Any]:
    """Returns (mean loss as a 0-d array, logsumexp [N]) for logits [N, V] and integer targets [N]."""
    xp = array_module(logits)
    logsumexp = row_logsumexp(logits)
    valid, safe_targets, count = _valid_rows(targets, ignore_index)
    target_logit = xp.take_along_axis(logits, safe_targets[:, None], axis=-1)[:, 0]
    loss = (xp.where(valid, logsumexp - target_logit, 0.0).sum() / count).astype(logits.dtype)
    return loss, logsumexp


def cross_entropy_backward(
    grad_loss: Any, logits: Any, targets: Any, logsumexp: Any, ignore_index: int = -100
) -> Any:
    xp = array_module(logits)
    valid, safe_targets, count = _valid_rows(targets, ignore_index)
    grad_logits = xp.exp(logits - logsumexp[:, None])
    grad_logits[xp.arange(len(targets)), safe_targets] -= 1.0
    grad_logits *= (valid * (grad_loss / count))[:, None].astype(logits.dtype)
    return grad_logits
