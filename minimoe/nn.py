"""Modules: parameters grouped with the forward that uses them (nanoGPT's layers, on minimoe Tensors).

A Module finds its parameters by walking its attributes (Parameters, Modules, lists of Modules) in the
order they were set, so `named_parameters()` names are stable dotted paths like `blocks.0.attn.qkv.weight`
that checkpoints store. Weights are [in, out] so that a layer is `x @ weight + bias`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from minimoe import backend, breakdown, ops
from minimoe.tensor import Tensor


class Parameter(Tensor):
    """A trainable tensor. `decay` says whether AdamW applies weight decay to it (not to biases,
    LayerNorm gains or the position table: GPT-2 / nanoGPT practice). `keep_float32` keeps it in float32
    when the model is cast to bf16 (the MoE gate, as DeepSpeed keeps its gate in float32)."""

    def __init__(self, data: Any, decay: bool = True, keep_float32: bool = False):
        super().__init__(backend.asarray(data), requires_grad=True)
        self.decay = decay
        self.keep_float32 = keep_float32


def normal_init(shape: tuple[int, ...], std: float, rng: np.random.Generator) -> np.ndarray:
    return (rng.standard_normal(shape) * std).astype(np.float32)


class Module:
    training = True
    part: str | None = None  # the part of the model its ops count in (breakdown.py); None: its caller's

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        for name, value in vars(self).items():
            if isinstance(value, Parameter):
                yield prefix + name, value
            elif isinstance(value, Module):
                yield from value.named_parameters(f"{prefix}{name}.")
            elif isinstance(value, (list, tuple)):
                for index, item in enumerate(value):
                    if isinstance(item, Module):
                        yield from item.named_parameters(f"{prefix}{name}.{index}.")

    def parameters(self) -> list[Parameter]:
        return [parameter for _, parameter in self.named_parameters()]

    def modules(self) -> Iterator[Module]:
        yield self
        for value in vars(self).values():
            children = value if isinstance(value, (list, tuple)) else [value]
            for child in children:
                if isinstance(child, Module):
                    yield from child.modules()

    def train(self, mode: bool = True) -> Module:
        for module in self.modules():
            module.training = mode
        return self

    def eval(self) -> Module:
        return self.train(False)

    def zero_grad(self) -> None:
        for parameter in self.parameters():
            parameter.grad = None

    def to(self, dtype: Any) -> Module:
        """Cast the parameters to `dtype` on the current device (float64 for gradient checks, bf16 for
        GPU working copies; parameters marked keep_float32 stay float32 unless dtype is float64)."""
        for parameter in self.parameters():
            target = np.float32 if parameter.keep_float32 and np.dtype(dtype).itemsize < 4 else dtype
            parameter.data = backend.asarray(parameter.data).astype(target)
        return self

    def state_dict(self) -> dict[str, np.ndarray]:
        return {name: backend.to_numpy(parameter.data).copy() for name, parameter in self.named_parameters()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        own = dict(self.named_parameters())
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"state dict does not fit the model: missing {missing}, unexpected {unexpected}")
        for name, parameter in own.items():
            if tuple(state[name].shape) != parameter.shape:
                raise ValueError(f"{name}: the state dict has shape {tuple(state[name].shape)}, "
                                 f"the model expects {parameter.shape}")
            parameter.data = backend.asarray(state[name]).astype(parameter.dtype)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.part is None:
            return self.forward(*args, **kwargs)
        with breakdown.part(self.part):
            return self.forward(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


class Linear(Module):
    def __init__(self, in_features: int, out_features: int, rng: np.random.Generator,
                 bias: bool = True, std: float = 0.02, keep_float32: bool = False):
        self.weight = Parameter(normal_init((in_features, out_features), std, rng), keep_float32=keep_float32)
        self.bias = Parameter(np.zeros(out_features, np.float32), decay=False) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return ops.linear(x, self.weight, self.bias) if self.bias is not None else x @ self.weight


class Embedding(Module):
    part = "embedding"

    def __init__(self, num_embeddings: int, width: int, rng: np.random.Generator, decay: bool = True):
        self.weight = Parameter(normal_init((num_embeddings, width), 0.02, rng), decay=decay)

    def forward(self, indices: Any) -> Tensor:
        return ops.embedding_lookup(self.weight, indices)


class LayerNorm(Module):
    part = "layernorm"

    def __init__(self, width: int, eps: float = 1e-5):
        self.weight = Parameter(np.ones(width, np.float32), decay=False)
        self.bias = Parameter(np.zeros(width, np.float32), decay=False)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps)

    def add_and_normalise(self, x: Tensor, addend: Tensor) -> tuple[Tensor, Tensor]:
        """(x + addend, this LayerNorm of it) in one op each way (ops.add_layer_norm): the residual
        stream's add and the norm that reads the sum, which the breakdown counts as this norm's time."""
        with breakdown.part(self.part):
            return ops.add_layer_norm(x, addend, self.weight, self.bias, self.eps)


class MLP(Module):
    """The transformer's feed-forward block: Linear(d -> hidden), GELU, Linear(hidden -> d), dropout.

    `output_std` initialises the second projection, which writes into the residual stream (GPT-2 scales
    it by 1/sqrt(2 * n_layer) so that the stream's variance does not grow with depth)."""

    part = "mlp"

    def __init__(self, width: int, hidden: int, rng: np.random.Generator, output_std: float,
                 dropout: float = 0.0, bias: bool = True):
        self.fc = Linear(width, hidden, rng, bias)
        self.proj = Linear(hidden, width, rng, bias, std=output_std)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        if self.fc.bias is None:
            return ops.dropout(self.proj(ops.gelu(self.fc(x))), self.dropout, self.training)
        out = ops.mlp(x, self.fc.weight, self.fc.bias, self.proj.weight, self.proj.bias)
        return ops.dropout(out, self.dropout, self.training)


class CausalSelfAttention(Module):
    """Multi-head causal self-attention: one Linear makes q, k, v for every head; the heads attend
    independently (cuda/attention.py) and one Linear mixes their outputs back into the stream."""

    part = "attention"

    def __init__(self, width: int, n_head: int, rng: np.random.Generator, output_std: float,
                 dropout: float = 0.0, bias: bool = True):
        if width % n_head:
            raise ValueError(f"n_embd={width} is not divisible by n_head={n_head}")
        self.n_head = n_head
        self.qkv = Linear(width, 3 * width, rng, bias)
        self.proj = Linear(width, width, rng, bias, std=output_std)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        head_width = width // self.n_head
        # [B, T, 3d] -> [B, T, 3, H, D]: q, k, v of every head, attended where they lie (ops.CausalAttention)
        qkv = self.qkv(x).reshape(batch, length, 3, self.n_head, head_width)
        out = ops.causal_attention(qkv).reshape(batch, length, width)  # the heads side by side
        return ops.dropout(self.proj(out), self.dropout, self.training)
