"""The GPT: a GPT-2 style decoder (Radford et al., 2019), read top to bottom like nanoGPT's model.py.

tokens [B, T] -> token embedding + learned position embedding -> n_layer blocks of
(pre-LayerNorm causal self-attention, pre-LayerNorm MLP), each added to the residual stream ->
final LayerNorm -> logits [B, T, V] through the token embedding matrix itself (tied weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from minimoe import backend, ops
from minimoe.nn import MLP, CausalSelfAttention, Embedding, LayerNorm, Module
from minimoe.tensor import Tensor


@dataclass
class GPTConfig:
    vocab_size: int = 256  # byte-level tokenizer
    block_size: int = 64  # context length in tokens
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * n_embd
    dropout: float = 0.0
    bias: bool = True
    init_seed: int = 1337  # seeds the initial weights (independent of the data and dropout seed)


class Block(Module):
    def __init__(self, config: GPTConfig, rng: np.random.Generator):
        # GPT-2: projections into the residual stream start with std 0.02 / sqrt(2 * n_layer).
        output_std = 0.02 / (2 * config.n_layer) ** 0.5
        self.ln_1 = LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config.n_embd, config.n_head, rng, output_std, config.dropout, config.bias)
        self.ln_2 = LayerNorm(config.n_embd)
        self.mlp = MLP(config.n_embd, config.mlp_ratio * config.n_embd, rng, output_std, config.dropout,
                       config.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(Module):
    def __init__(self, config: GPTConfig):
        self.config = config
        rng = np.random.default_rng(config.init_seed)
        self.wte = Embedding(config.vocab_size, config.n_embd, rng)
        self.wpe = Embedding(config.block_size, config.n_embd, rng, decay=False)
        self.blocks = [Block(config, rng) for _ in range(config.n_layer)]
        self.ln_f = LayerNorm(config.n_embd)

    def forward(self, tokens: Any, targets: Any = None) -> tuple[Tensor, Tensor | None]:
        """tokens [B, T] (integers < vocab_size, T <= block_size) -> (logits [B, T, V], mean loss or None)."""
        batch, length = tokens.shape
        if length > self.config.block_size:
            raise ValueError(f"sequence of {length} tokens is longer than the model's context "
                             f"(block_size={self.config.block_size})")
        positions = backend.array_module(tokens).arange(length)
        x = ops.dropout(self.wte(tokens) + self.wpe(positions), self.config.dropout, self.training)
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        logits = x @ self.wte.weight.transpose()  # tied: the output layer is the embedding matrix
        if targets is None:
            return logits, None
        flat_logits = logits.reshape(batch * length, self.config.vocab_size)
        return logits, ops.cross_entropy(flat_logits, targets.reshape(-1))

    def num_parameters(self) -> int:
        return sum(parameter.size for parameter in self.parameters())
