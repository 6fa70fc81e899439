"""The GPT's forward for generation: new tokens of many sequences at once, each attending to its own
KV cache, with the MoE layers routed without drops and computed on the chosen experts only.

    tokens [n, T] of n sequences (slots slot[n], each already holding start[n] positions)
      -> token + position embeddings -> per block:
           LayerNorm -> q, k, v -> k, v written into the cache at start .. start + T - 1
           -> attention of q over the cache (cuda/kv_attention.py) -> projection, residual (+ LayerNorm)
           -> MLP, or MoE: gate -> dropless top-k (padding rows masked out) -> the chosen
           experts on their rows (cuda/grouped.py) -> combine (+ the residual MLP), residual
           (+ the next LayerNorm: the next block's or the final one) -> hidden [n, T, d]

The same function serves prefill (start 0, T the longest prompt, shorter ones padded and masked) and
decode (T = 1). It is the model's math (model.py) over the model's own parameters, with no tape: only
the attention reads a cache, and the MoE routes as an MoE layer in evaluation would if it had room for
every token (drop_tokens false). The tests check it against GPT.forward over the whole sequence.

Which kernels: a decode step's few rows go through kernels whose rows do not depend on each other (a
sequence's numbers are the same in any batch) and that launch without host reads (the step is captured
as a CUDA graph, engine.py); a prefill's many rows go through cuBLAS, and its MoE through the training
layer's dispatch into an [E, C, d] buffer (the fewest rows the experts need, read once on the host).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

import minimoe.cuda.bias_gelu as bias_gelu_kernels
import minimoe.cuda.dispatch as dispatch_kernels
import minimoe.cuda.flash_attention as flash_attention_kernels
import minimoe.cuda.gating as gating_kernels
import minimoe.cuda.grouped as grouped_kernels
import minimoe.cuda.kv_attention as kv_attention_kernels
import minimoe.cuda.layernorm as layernorm_kernels
from minimoe import backend
from minimoe.backend import array_module, is_gpu
from minimoe.cuda.gemm import matmul
from minimoe.cuda.softmax import softmax_forward
from minimoe.model import GPT
from minimoe.moe.exchange import rows_back_home, rows_to_expert_ranks
from minimoe.moe.layer import MoE
from minimoe.nn import MLP, LayerNorm, Linear

GEMM_ROWS = 256  # more rows than this (a prefill) go through cuBLAS and the [E, C, d] experts


class CacheError(ValueError):
    """A cache that cannot be had (one line for the user: it names the bytes it needs)."""


@dataclass
class KVCache:
    """Keys and values of every layer for `slots` sequences of up to `context` positions:
    keys[layer] and values[layer] are [slots, H, context, D]. One extra slot, the last, takes the writes
    of padding rows, so that a padded batch never writes into a sequence's slot."""

    keys: list[Any]
    values: list[Any]
    expert_tokens: list[Any]  # per MoE layer [E]: the tokens each expert has received (the server's metrics)

    @property
    def slots(self) -> int:
        return self.keys[0].shape[0] - 1

    @property
    def scratch_slot(self) -> int:
        return self.keys[0].shape[0] - 1

    @staticmethod
    def allocate(model: GPT, slots: int, dtype: Any) -> KVCache:
        config = model.config
        head_width = config.n_embd // config.n_head
        shape = (slots + 1, config.n_head, config.block_size, head_width)
        needed = 2 * config.n_layer * int(np.prod(shape)) * np.dtype(dtype).itemsize
        xp = backend.xp
        if xp is not np:
            free, _ = xp.cuda.runtime.memGetInfo()
            if needed > free:
                raise CacheError(f"a KV cache of {slots} slots x {config.block_size} positions needs {needed:,} bytes "
                                 f"of GPU memory, {free:,} are free: use fewer slots")
        try:
            keys = [xp.zeros(shape, dtype=dtype) for _ in range(config.n_layer)]
            values = [xp.zeros(shape, dtype=dtype) for _ in range(config.n_layer)]
        except (MemoryError, ValueError) as error:
            raise CacheError(f"a KV cache of {slots} slots x {config.block_size} positions needs {needed:,} bytes: "
                             f"{error}; use fewer slots") from None
        expert_tokens = [xp.zeros(count, dtype=np.int64) for count in config.experts_in_block() if count]
        return KVCache(keys, values, expert_tokens)


def forward_cached(model: GPT, cache: KVCache, tokens: Any, slot: Any, start: Any, token_mask: Any) -> Any:
    """hidden [n, T, d] after the final LayerNorm for tokens [n, T] of the sequences in slots slot [n] that
    hold start [n] positions; token_mask [n, T] marks the real tokens (the rest is padding). Several
    tokens a row (T > 1) are a prefill: every start is 0, so a row's attention is its prompt's own causal
    attention, which the flash kernels compute where they apply (bf16 on the GPU) rather than the cache's
    kernel, a block per query."""
    config = model.config
    n, length = tokens.shape
    xp = array_module(tokens)
    positions = xp.minimum(start[:, None] + xp.arange(length), config.block_size - 1)
    x = model.wte.weight.data[tokens] + model.wpe.weight.data[positions]
    heads, width = config.n_head, config.n_embd
    expert_tokens = iter(cache.expert_tokens)
    norms = [block.ln_1 for block in model.blocks] + [model.ln_f]  # as in Block.forward: each residual
    h = layer_norm(x, norms[0])  # add runs with the LayerNorm that reads its sum
    for layer, (block, next_norm) in enumerate(zip(model.blocks, norms[1:])):
        qkv = linear(h, block.attn.qkv).reshape(n, length, 3, heads, width // heads)
        kv_attention_kernels.write_cache(cache.keys[layer], cache.values[layer], qkv, slot, start)
        if length > 1 and flash_attention_kernels.runs_on_kernels(qkv):  # a prefill: the prompts' causal
            attended = flash_attention_kernels.packed_attention_forward(qkv)[0]  # attention, tiles of 64 queries
        else:
            attended = kv_attention_kernels.cached_attention(qkv, cache.keys[layer], cache.values[layer], slot, start)
        x, h = add_layer_norm(x, linear(attended.reshape(n, length, width), block.attn.proj), block.ln_2)
        feed_forward = block.mlp
        if isinstance(feed_forward, MoE):
            y = moe(h, feed_forward, token_mask, next(expert_tokens))
        else:
            y = mlp(h, feed_forward)
        x, h = add_layer_norm(x, y, next_norm)
    return h


def layer_norm(x: Any, norm: LayerNorm) -> Any:
    return layernorm_kernels.layernorm_forward(x, norm.weight.data, norm.bias.data, norm.eps)[0]


def add_layer_norm(x: Any, addend: Any, norm: LayerNorm) -> tuple[Any, Any]:
    """(x + addend, norm of it), one kernel on the GPU."""
    return layernorm_kernels.add_layernorm_forward(x, addend, norm.weight.data, norm.bias.data, norm.eps)[:2]


def linear(x: Any, layer: Linear, gelu: bool = False) -> Any:
    """x [..., K] @ weight [K, N] + bias (then GELU)."""
    return dense(x, layer.weight.data, None if layer.bias is None else layer.bias.data, gelu)


def dense(x: Any, weight: Any, bias: Any = None, gelu: bool = False) -> Any:
    """x [..., K] @ weight [K, N] (+ bias) (then GELU): cuBLAS for many rows on the GPU, else the grouped
    kernel with one group (rows independent of each other, no host work)."""
    rows = x.reshape(-1, x.shape[-1])
    if is_gpu(x) and len(rows) > GEMM_ROWS:
        y = matmul(rows, weight)
        if bias is not None or gelu:
            bias = bias if bias is not None else array_module(y).zeros(y.shape[-1], y.dtype)
            y = (bias_gelu_kernels.bias_gelu_forward if gelu else bias_gelu_kernels.bias_add_forward)(y, bias)
    else:
        y = grouped_kernels.grouped_linear(rows, _one_group(len(rows), backend.device()), weight[None],
                                           None if bias is None else bias[None], gelu)
    return y.reshape(*x.shape[:-1], weight.shape[-1])


@functools.cache
def _one_group(rows: int, device: str) -> Any:
    """The offsets [0, rows] of one group, made once per row count (before a CUDA graph captures its use:
    a copy from the host cannot be captured)."""
    return backend.asarray(np.array([0, rows], dtype=np.int64))


def mlp(x: Any, block_mlp: MLP) -> Any:
    return linear(linear(x, block_mlp.fc, gelu=True), block_mlp.proj)


def moe(x: Any, layer: MoE, token_mask: Any, expert_tokens: Any) -> Any:
    """The MoE layer with room for every token: each real token's k experts (DeepSpeed-MoE sec. 5:
    inference never drops a token), padding tokens routed nowhere; expert_tokens [E] counts them."""
    rows = x.reshape(-1, x.shape[-1])
    # float32, as the gate computes in training, by the training gate's kernel, whose rows are independent
    logits = gating_kernels.gate_logits(rows, layer.gate.weight.data)
    expert_index, weight = gating_kernels.dropless_choices(logits, layer.settings.k, token_mask.reshape(-1))
    grouping = grouped_kernels.group_rows(expert_index, len(expert_tokens), counter=expert_tokens)
    experts = layer.experts
    parameters = (experts.fc_weight.data, experts.fc_bias.data, experts.proj_weight.data, experts.proj_bias.data)
    parallel = layer.expert_parallel is not None and layer.expert_parallel.size > 1
    if parallel or (is_gpu(rows) and len(rows) > GEMM_ROWS):
        y = buffered_experts(rows, expert_index, weight, grouping, parameters,
                             layer.expert_parallel if parallel else None)
    else:
        y = grouped_kernels.sparse_experts(rows, expert_index, weight, grouping, *parameters)
    if layer.residual_mlp is not None:  # Residual MoE: the learned per-token mix of the two
        coefficient = linear(rows, layer.coefficient)
        mix = softmax_forward(coefficient.astype(np.promote_types(coefficient.dtype, np.float32))).astype(y.dtype)
        y = y * mix[:, 0:1] + mlp(rows, layer.residual_mlp) * mix[:, 1:2]
    return y.reshape(x.shape)


def buffered_experts(rows: Any, expert_index: Any, weight: Any, grouping: tuple[Any, Any, Any],
                     parameters: tuple[Any, ...], comm: Any) -> Any:
    """The experts over a dispatch buffer [E, C, d], as the training layer runs them, with C the fullest
    expert's load (agreed over the expert-parallel group `comm`, whose ranks hold E / ep experts each and
    exchange the buffer's rows, exchange.py). The table comes from the grouping: a pair's position is its
    place among its expert's pairs."""
    fc_weight, fc_bias, proj_weight, proj_bias = parameters
    _, rank, offsets = grouping
    num_experts = len(offsets) - 1
    xp = array_module(rows)
    counts = backend.to_numpy(offsets[1:] - offsets[:-1])
    if comm is not None:  # every rank's buffer has the same C, the fullest expert's over the group
        counts = comm.all_reduce(counts, op="max")
    capacity = max(int(counts.max()), 1)
    real = expert_index < num_experts
    expert = xp.where(real, expert_index, 0)
    position = xp.where(real, rank.reshape(expert_index.shape) - offsets[expert], -1)
    buffer = dispatch_kernels.dispatch(rows, expert, position, num_experts, capacity)
    if comm is not None:
        buffer = rows_to_expert_ranks(buffer, comm)
    hidden = bias_gelu_kernels.bias_gelu_forward(matmul(buffer, fc_weight), fc_bias)
    out = bias_gelu_kernels.bias_add_forward(matmul(hidden, proj_weight), proj_bias)
    if comm is not None:
        out = rows_back_home(out, comm)
    return dispatch_kernels.combine(out, expert, position, weight.astype(out.dtype))
