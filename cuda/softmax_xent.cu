// Fused softmax + cross-entropy (cuda/softmax_xent.py is the reference and states the formulas).
// logits [rows, vocab] in bf16 or float32; everything else float32.
#include "common.cuh"

// One block per row, in one pass: each thread keeps the running maximum m of the logits it has read and
// the sum s of exp(z - m), rescaling s by exp(m_old - m_new) when the maximum grows (the online softmax
// of Milakov and Gimelshein, 2018); the block then combines the threads' (m, s) pairs into the row's
// logsumexp, and the row's loss is lse - z[target] (0 for an ignored row). The probabilities are never
// stored: the backward rebuilds them from the logits and the logsumexp. Loads are 16-byte vectors where
// a row is a whole number of them (VEC).
template <typename T, bool VEC>
__global__ void cross_entropy_forward(const T* __restrict__ logits, const long long* __restrict__ targets,
                                      float* __restrict__ row_loss, float* __restrict__ logsumexp, int vocab,
                                      long long ignore_index) {
  using R = Row<T, VEC>;
  const long long row = blockIdx.x;
  const T* z = logits + row * vocab;
  float running_max = -infinity(), running_sum = 0.0f;
  for (int v = threadIdx.x * R::per_load; v < vocab; v += blockDim.x * R::per_load) {
    float values[R::per_load];
    R::load(z, v, values);
    float new_max = running_max;
#pragma unroll
    for (int j = 0; j < R::per_load; ++j) new_max = fmaxf(new_max, values[j]);
    float chunk_sum = 0.0f;
#pragma unroll
    for (int j = 0; j < R::per_load; ++j) chunk_sum += __expf(values[j] - new_max);
    // The first chunk has nothing to rescale (and exp(-inf - -inf) would be NaN).
    running_sum = (running_max == -infinity() ? 0.0f : running_sum * __expf(running_max - new_max)) + chunk_sum;
    running_max = new_max;
  }
  const float row_max = block_reduce<true>(running_max);
  // A thread that read nothing holds (-inf, 0), which adds 0.
  const float total =
      block_reduce<false>(running_max == -infinity() ? 0.0f : running_sum * __expf(running_max - row_max));
  if (threadIdx.x == 0) {
    const float lse = row_max + __logf(total);
    const long long target = targets[row];
    logsumexp[row] = lse;
    row_loss[row] = target == ignore_index ? 0.0f : lse - to_float(z[target]);
  }
}

// d loss / d z[v] = (exp(z[v] - lse) - [v == target]) * scale for valid rows, 0 for ignored ones;
// scale = d loss / d mean loss divided by the number of valid rows (a device scalar: no host sync).
// grad_logits may be logits itself (each element is read, then written, by one thread): not __restrict__.
template <typename T, bool VEC>
__global__ void cross_entropy_backward(const T* logits, const long long* __restrict__ targets,
                                       const float* __restrict__ logsumexp, const float* __restrict__ scale,
                                       T* grad_logits, int vocab, long long ignore_index) {
  using R = Row<T, VEC>;
  const long long row = blockIdx.x;
  const long long target = targets[row];
  const float factor = target == ignore_index ? 0.0f : scale[0];
  const float lse = logsumexp[row];
  for (int v = threadIdx.x * R::per_load; v < vocab; v += blockDim.x * R::per_load) {
    float values[R::per_load];
    R::load(logits + row * vocab, v, values);
#pragma unroll
    for (int j = 0; j < R::per_load; ++j)
      values[j] = (__expf(values[j] - lse) - (v + j == target ? 1.0f : 0.0f)) * factor;
    R::store(grad_logits + row * vocab, v, values);
  }
}
