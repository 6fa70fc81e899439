// The causal masked softmax of attention (cuda/attention.py is the reference): the score matrices come
// from cuBLAS, this kernel turns each row into probabilities in one pass, and back.
#include "common.cuh"

// probs[r, s] = softmax_s(scale * scores[r, s]) over s <= t, 0 for s > t, where t = r % length is the
// query's position (rows are [batch * heads * length], each `length` long). One warp per row; float32
// arithmetic whatever the storage type; the masked tail is written as zeros without being read.
template <typename T>
__global__ void causal_softmax_forward(const T* __restrict__ scores, T* __restrict__ probs, long long rows,
                                       int length, float scale) {
  const long long row = blockIdx.x * (long long)(blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const int visible = (int)(row % length) + 1;
  const T* in = scores + row * length;
  T* out = probs + row * length;
  float row_max = -infinity();
  for (int s = lane; s < visible; s += 32) row_max = fmaxf(row_max, scale * to_float(in[s]));
  row_max = warp_max(row_max);
  float total = 0.0f;
  for (int s = lane; s < visible; s += 32) total += __expf(scale * to_float(in[s]) - row_max);
  const float inverse = 1.0f / warp_sum(total);
  for (int s = lane; s < length; s += 32)
    out[s] = from_float<T>(s < visible ? __expf(scale * to_float(in[s]) - row_max) * inverse : 0.0f);
}

// d scores = scale * p * (g - sum_s g_s p_s) (masked entries have p = 0, so their gradient is 0).
template <typename T>
__global__ void causal_softmax_backward(const T* __restrict__ grad_probs, const T* __restrict__ probs,
                                        T* __restrict__ grad_scores, long long rows, int length, float scale) {
  const long long row = blockIdx.x * (long long)(blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const int visible = (int)(row % length) + 1;
  const T* g = grad_probs + row * length;
  const T* p = probs + row * length;
  float dot = 0.0f;
  for (int s = lane; s < visible; s += 32) dot += to_float(g[s]) * to_float(p[s]);
  dot = warp_sum(dot);
  for (int s = lane; s < length; s += 32)
    grad_scores[row * length + s] =
        from_float<T>(s < visible ? scale * to_float(p[s]) * (to_float(g[s]) - dot) : 0.0f);
}
