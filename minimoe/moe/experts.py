"""The experts: E independent two-layer MLPs applied to their buffers as batched matmuls.

buffer [E, C, d] -> @ fc_weight [E, d, f] + fc_bias -> GELU -> [E, C, f] -> @ proj_weight [E, f, d]
+ proj_bias -> [E, C, d]. Expert e only ever sees the rows dispatch put in buffer[e]; empty slots hold
zeros, and combine never reads their outputs.
"""

from __future__ import annotations

import numpy as np

from minimoe import ops
from minimoe.nn import Module, Parameter, normal_init
from minimoe.tensor import Tensor


class Experts(Module):
    def __init__(self, num_experts: int, width: int, hidden: int, rng: np.random.Generator, output_std: float):
        self.fc_weight = Parameter(normal_init((num_experts, width, hidden), 0.02, rng))
        self.fc_bias = Parameter(np.zeros((num_experts, 1, hidden), np.float32), decay=False)
        self.proj_weight = Parameter(normal_init((num_experts, hidden, width), output_std, rng))
        self.proj_bias = Parameter(np.zeros((num_experts, 1, width), np.float32), decay=False)

    def keep_slice(self, first: int, count: int) -> None:
        """Keep experts first .. first + count - 1 (this rank's share under expert parallelism)."""
        for parameter in self.parameters():
            parameter.data = parameter.data[first:first + count].copy()

    def forward(self, buffer: Tensor) -> Tensor:
        return ops.mlp(buffer, self.fc_weight, self.fc_bias, self.proj_weight, self.proj_bias)
