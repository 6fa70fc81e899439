"""The autograd ops: each a Function with forward and backward side by side, and a plain function
that applies it.

Elementwise and shape ops are one line of array math that NumPy and CuPy share, so they live here.
Every op with real numerics calls its kernel family in minimoe.cuda and never branches on the backend:
the family picks the NumPy reference or the GPU kernel. Backward returns one gradient per positional
input of forward; broadcasting is undone by Tensor.backward (tensor.unbroadcast).
"""

from __future__ import annotations

import builtins
import itertools
from typing import Any

import numpy as np

import minimoe.cuda.attention as attention_kernels
import minimoe.cuda.bias_gelu as bias_gelu_kernels
import minimoe.cuda.distillation as distillation_kernels
import minimoe.cuda.dropout as dropout_kernels
import minimoe.cuda.embedding as embedding_kernels
import minimoe.cuda.epilogue as epilogue
import minimoe.cuda.flash_attention as flash_attention_kernels
import minimoe.cuda.gelu as gelu_kernels
import minimoe.cuda.gemm as gemm
import minimoe.cuda.layernorm as layernorm_kernels
import minimoe.cuda.softmax as softmax_kernels
import minimoe.cuda.softmax_xent as softmax_xent_kernels
from minimoe.backend import array_module
from minimoe.cuda.flash_attention import heads_of
from minimoe.tensor import Function, Tensor, is_grad_enabled

# ----------------------------------------------------------------------------- elementwise arithmetic


class Add(Function):
    def forward(ctx, a, b):
        return a + b

    def backward(ctx, grad):
        return grad, grad


def add(a: Any, b: Any) -> Tensor:
    return Add.apply(a, b)


class Sub(Function):
    def forward(ctx, a, b):
        return a - b

    def backward(ctx, grad):
        return grad, -grad


def sub(a: Any, b: Any) -> Tensor:
    return Sub.apply(a, b)


class Mul(Function):
    def forward(ctx, a, b):
        ctx.save(a, b)
        return a * b

    def backward(ctx, grad):
        a, b = ctx.saved
        return grad * b, grad * a


def mul(a: Any, b: Any) -> Tensor:
    return Mul.apply(a, b)


class Div(Function):
    def forward(ctx, a, b):
        ctx.save(a, b)
        return a / b

    def backward(ctx, grad):
        a, b = ctx.saved
        grad_a = grad / b
        return grad_a, -grad_a * a / b


def div(a: Any, b: Any) -> Tensor:
    return Div.apply(a, b)


class Neg(Function):
    def forward(ctx, a):
        return -a

    def backward(ctx, grad):
        return -grad


def neg(a: Tensor) -> Tensor:
    return Neg.apply(a)


class Cast(Function):
    """x in another floating dtype (bf16 activations <-> the float32 gate); the gradient casts back."""

    def forward(ctx, a, dtype):
        ctx.input_dtype = a.dtype
        return a.astype(dtype)

    def backward(ctx, grad):
        return grad.astype(ctx.input_dtype)


def cast(a: Tensor, dtype: Any) -> Tensor:
    return a if a.dtype == dtype else Cast.apply(a, dtype=dtype)


class Exp(Function):
    def forward(ctx, a):
        out = array_module(a).exp(a)
        ctx.save(out)
        return out

    def backward(ctx, grad):
        (out,) = ctx.saved
        return grad * out


def exp(a: Tensor) -> Tensor:
    return Exp.apply(a)


class Log(Function):
    def forward(ctx, a):
        ctx.save(a)
        return array_module(a).log(a)

    def backward(ctx, grad):
        (a,) = ctx.saved
        return grad / a


def log(a: Tensor) -> Tensor:
    return Log.apply(a)


# ----------------------------------------------------------------------------- matmul and shapes


class MatMul(Function):
    """a @ b with both operands at least 2-D: equal leading (batch) axes, or b a single matrix.

    The common case in a transformer, activations [..., k] times a weight [k, n], folds the leading
    axes into one so that forward and both gradients are single large GEMMs, not one per batch row.
    Gradients: grad_a = grad @ b^T, grad_b = a^T @ grad (cuda/gemm.py takes the transposes as flags).
    A b that is the transposed view of a matrix (the tied output layer's embedding^T) gets its gradient
    as the transpose of (grad^T @ a), the same product: transposed back by Transpose's backward, it is
    then contiguous, as the embedding's own gradient that the tape adds to it is."""

    def forward(ctx, a, b):
        if a.ndim < 2 or b.ndim < 2:
            raise ValueError(f"matmul needs operands of at least 2 dimensions, got {a.shape} and {b.shape}")
        ctx.save(a, b)
        if b.ndim == 2:
            return gemm.matmul(a.reshape(-1, a.shape[-1]), b).reshape(*a.shape[:-1], b.shape[-1])
        return gemm.matmul(a, b)

    def backward(ctx, grad):
        a, b = ctx.saved
        if b.ndim == 2:
            rows_a, rows_grad = a.reshape(-1, a.shape[-1]), grad.reshape(-1, grad.shape[-1])
            transposed_b = b.flags.f_contiguous and not b.flags.c_contiguous
            grad_b = (gemm.matmul(rows_grad, rows_a, transpose_a=True).T if transposed_b
                      else gemm.matmul(rows_a, rows_grad, transpose_a=True))
            return gemm.matmul(rows_grad, b, transpose_b=True).reshape(a.shape), grad_b
        return gemm.matmul(grad, b, transpose_b=True), gemm.matmul(a, grad, transpose_a=True)


def matmul(a: Tensor, b: Tensor) -> Tensor:
    return MatMul.apply(a, b)


class Reshape(Function):
    def forward(ctx, a, shape):
        ctx.input_shape = a.shape
        return a.reshape(shape)

    def backward(ctx, grad):
        return grad.reshape(ctx.input_shape)


def reshape(a: Tensor, shape: tuple[int, ...]) -> Tensor:
    return Reshape.apply(a, shape=tuple(shape))


class Transpose(Function):
    def forward(ctx, a, axes):
        ctx.axes = axes
        return a.transpose(axes)

    def backward(ctx, grad):
        if ctx.axes is None:
            return grad.transpose()
        inverse = [0] * len(ctx.axes)
        for position, axis in enumerate(ctx.axes):
            inverse[axis] = position
        return grad.transpose(inverse)


def transpose(a: Tensor, axes: tuple[int, ...] | None = None) -> Tensor:
    return Transpose.apply(a, axes=axes)


def _is_basic_index(index: Any) -> bool:
    """True for ints, slices, None and Ellipsis (NumPy basic indexing: a view, each element read once)."""
    parts = index if isinstance(index, tuple) else (index,)
    return all(part is None or part is Ellipsis or isinstance(part, (int, slice)) for part in parts)


class GetItem(Function):
    def forward(ctx, a, index):
        ctx.input_shape, ctx.index = a.shape, index
        return a[index]

    def backward(ctx, grad):
        xp = array_module(grad)
        full = xp.zeros(ctx.input_shape, dtype=grad.dtype)
        if _is_basic_index(ctx.index):
            full[ctx.index] = grad
        else:  # an integer array may name one element several times: gradients add up
            xp.add.at(full, ctx.index, grad)
        return full


def getitem(a: Tensor, index: Any) -> Tensor:
    if isinstance(index, Tensor):
        index = index.data
    return GetItem.apply(a, index=index)


class Concat(Function):
    def forward(ctx, *arrays, axis):
        ctx.axis = axis
        ctx.boundaries = list(itertools.accumulate(x.shape[axis] for x in arrays))[:-1]
        return array_module(arrays[0]).concatenate(arrays, axis=axis)

    def backward(ctx, grad):
        return tuple(array_module(grad).split(grad, ctx.boundaries, axis=ctx.axis))


def concat(tensors: list[Tensor], axis: int = 0) -> Tensor:
    return Concat.apply(*tensors, axis=axis)


def split(a: Tensor, sizes: list[int], axis: int = -1) -> list[Tensor]:
    """Pieces of `a` along `axis` with the given sizes (each a slice: backward writes its part back)."""
    if builtins.sum(sizes) != a.shape[axis]:
        raise ValueError(f"split sizes {sizes} do not add up to {a.shape[axis]} (axis {axis} of {a.shape})")
    pieces, start = [], 0
    for size in sizes:
        index = [slice(None)] * a.ndim
        index[axis] = slice(start, start + size)
        pieces.append(getitem(a, tuple(index)))
        start += size
    return pieces


# ----------------------------------------------------------------------------- reductions


class Sum(Function):
    def forward(ctx, a, axis, keepdims):
        ctx.input_shape, ctx.axis, ctx.keepdims = a.shape, axis, keepdims
        return a.sum(axis=axis, keepdims=keepdims)

    def backward(ctx, grad):
        if ctx.axis is not None and not ctx.keepdims:
            grad = array_module(grad).expand_dims(grad, ctx.axis)
        return array_module(grad).broadcast_to(grad, ctx.input_shape)


def sum(a: Tensor, axis: Any = None, keepdims: bool = False) -> Tensor:
    return Sum.apply(a, axis=axis, keepdims=keepdims)


def mean(a: Tensor, axis: Any = None, keepdims: bool = False) -> Tensor:
    return Sum.apply(a, axis=axis, keepdims=keepdims) * (1.0 / _reduced_count(a.shape, axis))


def _reduced_count(shape: tuple[int, ...], axis: Any) -> int:
    axes = range(len(shape)) if axis is None else (axis if isinstance(axis, tuple) else (axis,))
    count = 1
    for a in axes:
        count *= shape[a]
    return count


# ----------------------------------------------------------------------------- kernel-family ops


class Gelu(Function):
    def forward(ctx, x):
        ctx.save(x)
        return gelu_kernels.gelu_forward(x)

    def backward(ctx, grad):
        (x,) = ctx.saved
        return gelu_kernels.gelu_backward(grad, x)


def gelu(x: Tensor) -> Tensor:
    return Gelu.apply(x)


class Linear(Function):
    """x @ weight + bias as one node, so that on the GPU the bias rides in the product's epilogue and its
    gradient in the weight gradient's (cuda/epilogue.py); x [..., in], weight [in, out], bias [out]."""

    def forward(ctx, x, weight, bias):
        rows = x.reshape(-1, x.shape[-1])
        ctx.save(rows, weight, bias)
        ctx.input_shape = x.shape
        return epilogue.linear_forward(rows, weight, bias).reshape(*x.shape[:-1], weight.shape[1])

    def backward(ctx, grad):
        rows, weight, bias = ctx.saved
        grad_x, grad_weight, grad_bias = epilogue.linear_backward(grad.reshape(-1, grad.shape[-1]), rows, weight,
                                                                  bias)
        return grad_x.reshape(ctx.input_shape), grad_weight, grad_bias


def linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """x @ weight + bias for a 2-D weight and a 1-D bias, in one node."""
    return Linear.apply(x, weight, bias)


class MLP(Function):
    """gelu(x @ fc_weight + fc_bias) @ proj_weight + proj_bias, a transformer's feed-forward block, as one
    node: dense (x [..., d], 2-D weights, 1-D biases) or E experts at once (x [E, C, d], weights [E, d, f]
    and [E, f, d], biases [E, 1, f] and [E, 1, d]). It keeps the product before GELU from the forward, not
    the activation after it: the backward recomputes gelu in the pass that takes GELU's gradient (one
    more write, no more reads), so the activation, the MLP's largest array, is not held from the forward
    to the backward. (torch.compile makes the same trade for the PyTorch peer of bench train-step.)
    The 2-D products add their biases in cuBLASLt's epilogue where it runs (cuda/epilogue.py)."""

    def forward(ctx, x, fc_weight, fc_bias, proj_weight, proj_bias):
        rows = x.reshape(-1, x.shape[-1]) if fc_weight.ndim == 2 else x
        pre, pre_has_bias = epilogue.biased_product(rows, fc_weight, fc_bias)
        hidden = bias_gelu_kernels.bias_gelu_forward(pre, None if pre_has_bias else fc_bias)
        y = epilogue.linear_forward(hidden, proj_weight, proj_bias)
        ctx.save(rows, fc_weight, fc_bias, pre, proj_weight, proj_bias)
        ctx.pre_has_bias, ctx.input_shape = pre_has_bias, x.shape
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def backward(ctx, grad):
        rows, fc_weight, fc_bias, pre, proj_weight, proj_bias = ctx.saved
        grad_y = grad.reshape(-1, grad.shape[-1]) if fc_weight.ndim == 2 else grad
        grad_hidden = gemm.matmul(grad_y, proj_weight, transpose_b=True)
        grad_pre, grad_fc_bias, hidden = bias_gelu_kernels.bias_gelu_backward_recomputing(
            grad_hidden, pre, fc_bias, biased=ctx.pre_has_bias)
        grad_proj_weight, grad_proj_bias = epilogue.weight_gradients(hidden, grad_y, proj_bias)
        grad_x = gemm.matmul(grad_pre, fc_weight, transpose_b=True)
        return (grad_x.reshape(ctx.input_shape), gemm.matmul(rows, grad_pre, transpose_a=True), grad_fc_bias,
                grad_proj_weight, grad_proj_bias)


def mlp(x: Tensor, fc_weight: Tensor, fc_bias: Tensor, proj_weight: Tensor, proj_bias: Tensor) -> Tensor:
    """gelu(x @ fc_weight + fc_bias) @ proj_weight + proj_bias in one node (ops.MLP): dense or batched."""
    return MLP.apply(x, fc_weight, fc_bias, proj_weight, proj_bias)


class Softmax(Function):
    def forward(ctx, x):
        y = softmax_kernels.softmax_forward(x)
        ctx.save(y)
        return y

    def backward(ctx, grad):
        (y,) = ctx.saved
        return softmax_kernels.softmax_backward(grad, y)


def softmax(x: Tensor) -> Tensor:
    return Softmax.apply(x)


class LogSoftmax(Function):
    def forward(ctx, x):
        y = softmax_kernels.log_softmax_forward(x)
        ctx.save(y)
        return y

    def backward(ctx, grad):
        (y,) = ctx.saved
        return softmax_kernels.log_softmax_backward(grad, y)


def log_softmax(x: Tensor) -> Tensor:
    return LogSoftmax.apply(x)


class CrossEntropy(Function):
    def forward(ctx, logits, targets, ignore_index, overwrite_logits):
        loss, logsumexp = softmax_xent_kernels.cross_entropy_forward(logits, targets, ignore_index)
        ctx.save(logits, targets, logsumexp)
        ctx.ignore_index, ctx.overwrite_logits = ignore_index, overwrite_logits
        return loss

    def backward(ctx, grad):
        logits, targets, logsumexp = ctx.saved
        return softmax_xent_kernels.cross_entropy_backward(
            grad, logits, targets, logsumexp, ctx.ignore_index, out=logits if ctx.overwrite_logits else None), None


def cross_entropy(logits: Tensor, targets: Any, ignore_index: int = -100, overwrite_logits: bool = False) -> Tensor:
    """Mean cross-entropy of logits [N, V] against integer targets [N], skipping ignore_index rows.
    overwrite_logits: the backward writes the logits' gradient over the logits, for a caller that holds
    no other use of them (the model's loss in training: [B*T, V] is its largest array)."""
    if isinstance(targets, Tensor):
        targets = targets.data
    return CrossEntropy.apply(logits, targets, ignore_index=ignore_index, overwrite_logits=overwrite_logits)


LOGITS_PER_CHUNK = 1 << 27  # lm_head_cross_entropy's chunks hold at most this many logits (256 MiB in bf16)


class LMHeadCrossEntropy(Function):
    """cross_entropy(x @ weight^T, targets) without the [N, V] logits: the rows go `chunk_rows` at a time
    through the output layer and the fused softmax + cross-entropy (softmax_xent.py), keeping each
    chunk's logsumexp [rows]. The backward recomputes a chunk's logits and turns them into its gradients
    at once: grad x = grad_logits @ weight, grad weight += grad_logits^T @ x. One more product than the
    plain path (the logits twice), in exchange for never holding the logits or their gradient whole.
    The mean is over every valid row: chunk c's mean times its count of valid rows, summed, over the
    total count."""

    def forward(ctx, x, weight, targets, ignore_index, chunk_rows):
        xp = array_module(x)
        compute = np.promote_types(x.dtype, np.float32)
        chunks = [slice(first, first + chunk_rows) for first in range(0, len(x), chunk_rows)]
        counts = [xp.maximum((targets[rows] != ignore_index).sum(), 1).astype(compute) for rows in chunks]
        total = xp.maximum((targets != ignore_index).sum(), 1).astype(compute)
        loss, logsumexps = 0.0, []
        for rows, count in zip(chunks, counts):
            chunk_loss, logsumexp = softmax_xent_kernels.cross_entropy_forward(
                gemm.matmul(x[rows], weight, transpose_b=True), targets[rows], ignore_index)
            loss = loss + chunk_loss * count
            logsumexps.append(logsumexp)
        ctx.save(x, weight, targets)
        ctx.chunks, ctx.counts, ctx.total = chunks, counts, total
        ctx.logsumexps, ctx.ignore_index = logsumexps, ignore_index
        return (loss / total).astype(compute)

    def backward(ctx, grad):
        x, weight, targets = ctx.saved
        xp = array_module(x)
        grad_x = xp.empty_like(x)
        grad_weight = xp.zeros(weight.shape, dtype=np.promote_types(weight.dtype, np.float32))
        for rows, count, logsumexp in zip(ctx.chunks, ctx.counts, ctx.logsumexps):
            logits = gemm.matmul(x[rows], weight, transpose_b=True)
            grad_logits = softmax_xent_kernels.cross_entropy_backward(
                grad * count / ctx.total, logits, targets[rows], logsumexp, ctx.ignore_index, out=logits)
            grad_x[rows] = gemm.matmul(grad_logits, weight)
            grad_weight += gemm.matmul(grad_logits, x[rows], transpose_a=True).astype(grad_weight.dtype)
        return grad_x, grad_weight.astype(weight.dtype), None


def lm_head_cross_entropy(x: Tensor, weight: Tensor, targets: Any, ignore_index: int = -100,
                          chunk_rows: int | None = None) -> Tensor:
    """cross_entropy(x @ weight^T, targets) for x [N, d], weight [V, d] (the tied output layer), targets
    [N], without the [N, V] logits: at most LOGITS_PER_CHUNK of them exist at a time (chunk_rows rows)."""
    if isinstance(targets, Tensor):
        targets = targets.data
    chunk_rows = chunk_rows or max(1, LOGITS_PER_CHUNK // weight.shape[0])
    return LMHeadCrossEntropy.apply(x, weight, targets, ignore_index=ignore_index, chunk_rows=chunk_rows)


class Distillation(Function):
    """The knowledge-distillation loss of the student's logits against fixed teacher logits."""

    def forward(ctx, student, teacher, temperature):
        loss, student_lse, teacher_lse = distillation_kernels.distillation_forward(student, teacher, temperature)
        ctx.save(student, teacher, student_lse, teacher_lse)
        ctx.temperature = temperature
        return loss

    def backward(ctx, grad):
        return distillation_kernels.distillation_backward(grad, *ctx.saved, ctx.temperature), None


def distillation_loss(student: Tensor, teacher: Any, temperature: float) -> Tensor:
    """T^2 * mean over rows of KL(softmax(teacher / T) || softmax(student / T)) for logits [N, V]
    (teacher: an array, no gradient)."""
    return Distillation.apply(student, teacher.data if isinstance(teacher, Tensor) else teacher,
                              temperature=temperature)


class LayerNorm(Function):
    def forward(ctx, x, weight, bias, eps):
        y, mean, rstd = layernorm_kernels.layernorm_forward(x, weight, bias, eps)
        ctx.save(x, weight, mean, rstd)
        return y

    def backward(ctx, grad):
        x, weight, mean, rstd = ctx.saved
        return layernorm_kernels.layernorm_backward(grad, x, weight, mean, rstd)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    return LayerNorm.apply(x, weight, bias, eps=eps)


class AddLayerNorm(Function):
    """The residual add and the LayerNorm that reads its sum, in one kernel each way (layernorm.py)."""

    def forward(ctx, x, addend, weight, bias, eps):
        total, y, mean, rstd = layernorm_kernels.add_layernorm_forward(x, addend, weight, bias, eps)
        ctx.save(total, weight, mean, rstd)
        return total, y

    def backward(ctx, grad_total, grad_y):
        total, weight, mean, rstd = ctx.saved
        if grad_y is None:  # only the sum reached the loss
            return grad_total, grad_total, None, None
        grad_x, grad_weight, grad_bias = layernorm_kernels.layernorm_backward(grad_y, total, weight, mean, rstd,
                                                                              grad_total)
        return grad_x, grad_x, grad_weight, grad_bias


def add_layer_norm(x: Tensor, addend: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """(x + addend, layer_norm(x + addend)) for tensors of one shape."""
    return AddLayerNorm.apply(x, addend, weight, bias, eps=eps)


class Embedding(Function):
    def forward(ctx, weight, indices):
        ctx.save(indices)
        ctx.num_embeddings = weight.shape[0]
        return embedding_kernels.embedding_forward(weight, indices)

    def backward(ctx, grad):
        (indices,) = ctx.saved
        return embedding_kernels.embedding_backward(grad, indices, ctx.num_embeddings), None


def embedding_lookup(weight: Tensor, indices: Any) -> Tensor:
    if isinstance(indices, Tensor):
        indices = indices.data
    return Embedding.apply(weight, indices)


class TokenAndPositionEmbedding(Function):
    """A GPT's input: token_table[tokens] + position_table[:T] for tokens [B, T], in one node (one launch on
    the GPU). Gradients: the token table's as the lookup's (a RowGradient), the position table's the output
    gradient summed over the batch."""

    def forward(ctx, token_table, position_table, tokens):
        ctx.save(tokens)
        ctx.table_sizes = token_table.shape[0], position_table.shape[0]
        return embedding_kernels.token_and_position_forward(token_table, position_table, tokens)

    def backward(ctx, grad):
        (tokens,) = ctx.saved
        vocab, positions = ctx.table_sizes
        return (embedding_kernels.embedding_backward(grad, tokens, vocab),
                embedding_kernels.position_table_gradient(grad.reshape(-1, *grad.shape[-2:]), positions), None)


def token_and_position_embedding(token_table: Tensor, position_table: Tensor, tokens: Any) -> Tensor:
    """token_table[tokens] + position_table[:T] for tokens [B, T]: ops.TokenAndPositionEmbedding."""
    if isinstance(tokens, Tensor):
        tokens = tokens.data
    return TokenAndPositionEmbedding.apply(token_table, position_table, tokens)


class Dropout(Function):
    def forward(ctx, x, p):
        y, scaled_mask = dropout_kernels.dropout_forward(x, p)
        ctx.save(scaled_mask)
        return y

    def backward(ctx, grad):
        (scaled_mask,) = ctx.saved
        return dropout_kernels.dropout_backward(grad, scaled_mask)


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    if not training or p == 0.0:
        return x
    return Dropout.apply(x, p=p)


class CausalAttention(Function):
    """Causal self-attention of every head of a packed qkv [B, T, 3, H, D] (the qkv Linear's output,
    reshaped), out [B, T, H, D] (the heads side by side: [B, T, H * D] without a copy). Flash attention's
    kernels where they apply (bf16 on the GPU, head widths they are built for) read q, k and v where they
    lie and write the gradient straight into one packed [B, T, 3, H, D], so no head is transposed into a
    copy either way; their backward recomputes the probabilities from the saved log-sum-exp [B, H, T].
    Else the probabilities [B, H, T, T] are kept for the backward (cuda/attention.py)."""

    def forward(ctx, qkv):
        ctx.flash = flash_attention_kernels.runs_on_kernels(qkv)
        if ctx.flash:
            out, lse = flash_attention_kernels.packed_attention_forward(qkv)
            ctx.save(qkv, out, lse)
            return out
        out, probs = attention_kernels.causal_attention_forward(*heads_of(qkv))
        # Only a backward needs probs [B, H, T, T]; without a tape (generation) it is not kept.
        ctx.save(qkv, probs if is_grad_enabled() else None)
        return out.transpose(0, 2, 1, 3)

    def backward(ctx, grad):
        qkv = ctx.saved[0]
        grad_qkv = array_module(qkv).empty_like(qkv)
        grads, heads_grad = heads_of(grad_qkv), grad.transpose(0, 2, 1, 3)
        if ctx.flash:
            _, out, lse = ctx.saved
            flash_attention_kernels.flash_attention_backward(heads_grad, *heads_of(qkv), out.transpose(0, 2, 1, 3), lse,
                                                             grads=grads)
        else:
            head_grads = attention_kernels.causal_attention_backward(heads_grad, *heads_of(qkv), ctx.saved[1])
            for target, head_grad in zip(grads, head_grads):
                target[...] = head_grad
        return grad_qkv


def causal_attention(qkv: Tensor) -> Tensor:
    """[B, T, H, D] from the packed qkv [B, T, 3, H, D]."""
    return CausalAttention.apply(qkv)
