// Fused softmax + cross-entropy (cuda/softmax_xent.py is the reference and states the formulas).
// logits [rows, vocab] in bf16 or float32; everything else float32.
#include "common.cuh"

// One block per row: the row maximum, then sum exp(z - max) (block reductions), then
// logsumexp and the row's loss lse - z[target] (0 for an ignored row). The probabilities are never
// stored: the backward rebuilds them from the logits and the logsumexp.
template <typename T>
__global__ void cross_entropy_forward(const T* __restrict__ logits, const long long* __restrict__ targets,
                                      float* __restrict__ row_loss, float* __restrict__ logsumexp, int vocab,
                                      long long ignore_index) {
  const long long row = blockIdx.x;
  const T* z = logits + row * vocab;
  float row_max = -infinity();
  for (int v = threadIdx.x; v < vocab; v += blockDim.x) row_max = fmaxf(row_max, to_float(z[v]));
  row_max = block_reduce<true>(row_max);
  float total = 0.0f;
  for (int v = threadIdx.x; v < vocab; v += blockDim.x) total += __expf(to_float(z[v]) - row_max);
  total = block_reduce<false>(total);
  if (threadIdx.x == 0) {
    const float lse = row_max + __logf(total);
    const long long target = targets[row];
    logsumexp[row] = lse;
    row_loss[row] = target == ignore_index ? 0.0f : lse - to_float(z[target]);
  }
}

// d loss / d z[v] = (exp(z[v] - lse) - [v == target]) * scale for valid rows, 0 for ignored ones;
// scale = d loss / d mean loss divided by the number of valid rows (a device scalar: no host sync).
template <typename T>
__global__ void cross_entropy_backward(const T* __restrict__ logits, const long long* __restrict__ targets,
                                       const float* __restrict__ logsumexp, const float* __restrict__ scale,
                                       T* __restrict__ grad_logits, int vocab, long long ignore_index) {
  const long long row = blockIdx.x;
  const long long target = targets[row];
  const float factor = target == ignore_index ? 0.0f : scale[0];
  const float lse = logsumexp[row];
  for (int v = threadIdx.x; v < vocab; v += blockDim.x) {
    const float p = __expf(to_float(logits[row * vocab + v]) - lse);
    grad_logits[row * vocab + v] = from_float<T>((p - (v == target ? 1.0f : 0.0f)) * factor);
  }
}
