"""The GPT: a GPT-2 style decoder (Radford et al., 2019), read top to bottom like nanoGPT's model.py,
with DeepSpeed-MoE's Mixture-of-Experts layers in place of some MLPs.

tokens [B, T] -> token embedding + learned position embedding -> n_layer blocks of
(pre-LayerNorm causal self-attention, pre-LayerNorm MLP or MoE), each added to the residual stream ->
final LayerNorm -> logits [B, T, V] through the token embedding matrix itself (tied weights).

MoE placement (DeepSpeed-MoE sec. 4): with moe_every = n, the MLP of every n-th block becomes an MoE
(n = 2: every other block, as DeepSpeed-MoE's models do). experts_per_layer gives the expert count of
each MoE layer; a Pyramid-MoE (sec. 4.1) uses fewer experts in early layers and more in the last ones.
With residual = true every MoE layer is a Residual MoE (sec. 4.1); pyramid + residual is PR-MoE.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from minimoe import breakdown, ops
from minimoe.moe.gate import MoESettings, Routing
from minimoe.moe.layer import MoE
from minimoe.nn import MLP, CausalSelfAttention, Embedding, LayerNorm, Module
from minimoe.tensor import Tensor


@dataclass
class GPTConfig:
    vocab_size: int = 256  # byte-level tokenizer
    block_size: int = 64  # context length in tokens
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    mlp_ratio: int = 4  # MLP (and expert) hidden width = mlp_ratio * n_embd
    dropout: float = 0.0
    bias: bool = True
    init_seed: int = 1337  # seeds the initial weights (independent of the data and dropout seed)
    # Mixture of Experts (DeepSpeed-MoE); moe_every = 0 keeps the model dense.
    moe_every: int = 0  # the MLP of blocks n-1, 2n-1, ... becomes an MoE
    experts_per_layer: list[int] = field(default_factory=lambda: [8])  # one value for all MoE layers, or one each
    residual: bool = False  # Residual MoE: a dense MLP beside every MoE, mixed per token
    # How every MoE layer routes: the keys of MoESettings (moe/gate.py), whose defaults and comments these are.
    k: int = MoESettings.k
    capacity_factor: float = MoESettings.capacity_factor
    eval_capacity_factor: float = MoESettings.eval_capacity_factor
    min_capacity: int = MoESettings.min_capacity
    drop_tokens: bool = MoESettings.drop_tokens
    drop_policy: str = MoESettings.drop_policy
    use_rts: bool = MoESettings.use_rts
    noisy_gate_policy: str = MoESettings.noisy_gate_policy
    second_expert_sampling: bool = MoESettings.second_expert_sampling
    eval_randomness: bool = MoESettings.eval_randomness
    aux_loss_coef: float = MoESettings.aux_loss_coef
    z_loss_coef: float = MoESettings.z_loss_coef

    def experts_in_block(self) -> list[int]:
        """Expert count of each block's feed-forward layer, 0 for a dense MLP (experts_per_layer is not read
        when no block is an MoE layer)."""
        moe_blocks = [i for i in range(self.n_layer) if self.moe_every and (i + 1) % self.moe_every == 0]
        if moe_blocks and len(self.experts_per_layer) not in (1, len(moe_blocks)):
            raise ValueError(f"experts_per_layer has {len(self.experts_per_layer)} entries; give one for all "
                             f"MoE layers or one for each of the {len(moe_blocks)} MoE layers")
        counts = self.experts_per_layer * (len(moe_blocks) if len(self.experts_per_layer) == 1 else 1)
        experts = [0] * self.n_layer
        for block, count in zip(moe_blocks, counts):
            experts[block] = count
        return experts

    def moe_settings(self) -> MoESettings:
        return MoESettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(MoESettings)})

    def forward_flops_per_token(self) -> int:
        """Multiply-add FLOPs (2 per multiply-accumulate) of one token's forward pass at full context: the
        weights it passes through, attention over block_size keys (the kernels compute every score, the
        causal mask only hides half of them), the tied LM head. Training costs 3x this (the backward is
        two products per forward product); an MoE layer counts its gate, k experts and any residual MLP,
        which is the "active compute" the DeepSpeed-MoE paper holds equal between dense and MoE models."""
        width, hidden, context = self.n_embd, self.mlp_ratio * self.n_embd, self.block_size
        mlp = 2 * 2 * width * hidden
        attention = 2 * width * 3 * width + 2 * width * width + 2 * 2 * context * width
        flops = 2 * width * self.vocab_size
        for experts in self.experts_in_block():
            flops += attention
            if experts == 0:
                flops += mlp
            else:
                flops += 2 * width * experts + self.k * mlp
                if self.residual:
                    flops += mlp + 2 * width * 2
        return flops


# Above this many logits the loss goes through ops.lm_head_cross_entropy. Below, holding the bf16 logits
# is cheaper than the chunks: on an H200 at bench train-step's shapes (8192 x 50304 logits, 0.77 GiB),
# forward + backward of the output layer and loss took 5.3 ms materialised and 8.7 ms chunked, which
# saved 0.47 GiB (`minimoe bench attention`).
CHUNKED_LOSS_LOGITS = 1 << 30


@dataclass
class ModelOutput:
    logits: Tensor | None  # [B, T, V]; with targets, None unless forward's keep_logits asked for them
    loss: Tensor | None  # what training minimises: lm_loss + the MoE layers' weighted auxiliary losses
    lm_loss: Tensor | None  # the mean next-token cross-entropy alone
    moe: list[Routing]  # one entry per MoE layer, in depth order


class Block(Module):
    def __init__(self, config: GPTConfig, rng: np.random.Generator, num_experts: int = 0, expert_parallel: Any = None):
        # GPT-2: projections into the residual stream start with std 0.02 / sqrt(2 * n_layer).
        output_std = 0.02 / (2 * config.n_layer) ** 0.5
        width, hidden = config.n_embd, config.mlp_ratio * config.n_embd
        self.ln_1 = LayerNorm(width)
        self.attn = CausalSelfAttention(width, config.n_head, rng, output_std, config.dropout, config.bias)
        self.ln_2 = LayerNorm(width)
        if num_experts:
            self.mlp = MoE(width, hidden, num_experts, config.moe_settings(), rng, output_std, config.residual,
                           config.dropout, expert_parallel)
        else:
            self.mlp = MLP(width, hidden, rng, output_std, config.dropout, config.bias)

    def forward(self, x: Tensor, h: Tensor, next_norm: LayerNorm) -> tuple[Tensor, Tensor, Routing | None]:
        """The block on the residual stream x, given h = self.ln_1(x):

            x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))

        returning x and next_norm(x) (the next block's ln_1, or the final LayerNorm). Each residual add runs
        with the LayerNorm that reads its sum, as one op (LayerNorm.add_and_normalise): one pass over the
        stream instead of two."""
        x, h = self.ln_2.add_and_normalise(x, self.attn(h))
        if isinstance(self.mlp, MoE):
            y, routing = self.mlp(h)
        else:
            y, routing = self.mlp(h), None
        x, h = next_norm.add_and_normalise(x, y)
        return x, h, routing


class GPT(Module):
    part = "embedding"  # its own ops: the sum of the two embeddings, and its dropout

    def __init__(self, config: GPTConfig, expert_parallel: Any = None):
        """expert_parallel: the Communicator of the ranks sharing the experts (None: one process)."""
        self.config = config
        rng = np.random.default_rng(config.init_seed)
        self.wte = Embedding(config.vocab_size, config.n_embd, rng)
        self.wpe = Embedding(config.block_size, config.n_embd, rng, decay=False)
        self.blocks = [Block(config, rng, experts, expert_parallel) for experts in config.experts_in_block()]
        self.ln_f = LayerNorm(config.n_embd)

    def forward(self, tokens: Any, targets: Any = None, keep_logits: bool = False) -> ModelOutput:
        """tokens [B, T] (integers < vocab_size, T <= block_size), optional targets [B, T] -> ModelOutput.
        With targets and more than CHUNKED_LOSS_LOGITS logits, the loss comes from
        ops.lm_head_cross_entropy, which never holds the [B*T, V] logits, unless keep_logits asks for
        them (distillation's KD term reads them)."""
        batch, length = tokens.shape
        if length > self.config.block_size:
            raise ValueError(f"sequence of {length} tokens is longer than the model's context "
                             f"(block_size={self.config.block_size})")
        with breakdown.part("embedding"):
            x = ops.token_and_position_embedding(self.wte.weight, self.wpe.weight, tokens)
        x = ops.dropout(x, self.config.dropout, self.training)
        norms = [block.ln_1 for block in self.blocks] + [self.ln_f]  # the LayerNorm that reads each stream
        h = norms[0](x)
        routings = []
        for block, next_norm in zip(self.blocks, norms[1:]):
            x, h, routing = block(x, h, next_norm)
            if routing is not None:
                routings.append(routing)
        with breakdown.part("output layer, loss"):
            return self._output(h, targets, keep_logits, routings)

    def _output(self, x: Tensor, targets: Any, keep_logits: bool, routings: list[Routing]) -> ModelOutput:
        """The tied output layer and the loss of forward()."""
        batch, length, _ = x.shape
        if targets is None or keep_logits or batch * length * self.config.vocab_size <= CHUNKED_LOSS_LOGITS:
            logits = x @ self.wte.weight.transpose()  # tied: the output layer is the embedding matrix
            if targets is None:
                return ModelOutput(logits, None, None, routings)
            # Logits the caller does not keep are overwritten by their gradient in the backward (0.77 GiB at
            # bench train-step's shapes that the step's peak no longer holds twice).
            lm_loss = ops.cross_entropy(logits.reshape(batch * length, self.config.vocab_size), targets.reshape(-1),
                                        overwrite_logits=not keep_logits)
        else:
            logits = None
            lm_loss = ops.lm_head_cross_entropy(x.reshape(batch * length, self.config.n_embd), self.wte.weight,
                                                targets.reshape(-1))
        loss = lm_loss
        for routing in routings:  # GShard / DeepSpeed: the auxiliary losses of all MoE layers add up
            loss = loss + self.config.aux_loss_coef * routing.aux_loss
            if routing.z_loss is not None:
                loss = loss + self.config.z_loss_coef * routing.z_loss
        return ModelOutput(logits if keep_logits else None, loss, lm_loss, routings)

    def num_parameters(self) -> int:
        return sum(parameter.size for parameter in self.parameters())
