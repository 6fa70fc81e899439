// AdamW over every parameter in one launch, and the global gradient norm's sum of squares in one
// launch (cuda/adamw.py is the reference and states the update).
//
// The tensors are described by device tables (pointers, sizes, flags, one entry per tensor) and cut
// into chunks of `chunk` elements; block b handles chunk b, whose tensor and first element are
// chunk_tensor[b] and chunk_start[b]. Values, moments and master weights are float32; a gradient is
// float32 or bf16 (grad_is_bf16); a bf16 working copy, when there is one, receives the updated value
// rounded to bf16. The learning rate and bias corrections are read from device memory (hyper), as is the
// gradients' scale: a CUDA graph of the update replays with the values of the step it runs.
#include "common.cuh"

__device__ __forceinline__ float load_grad(unsigned long long grad, int is_bf16, long long i) {
  return is_bf16 ? to_float(reinterpret_cast<const bf16*>(grad)[i]) : reinterpret_cast<const float*>(grad)[i];
}

extern "C" __global__ void adamw_multi_tensor(
    const unsigned long long* __restrict__ values, const unsigned long long* __restrict__ exp_avgs,
    const unsigned long long* __restrict__ exp_avg_sqs, const unsigned long long* __restrict__ grads,
    const unsigned long long* __restrict__ working, const int* __restrict__ grad_is_bf16,
    const float* __restrict__ weight_decay, const long long* __restrict__ sizes, const int* __restrict__ chunk_tensor,
    const long long* __restrict__ chunk_start, int chunk, float beta1, float beta2, float eps,
    const float* __restrict__ hyper, const float* __restrict__ grad_scale) {
  const float scale = grad_scale[0];
  if (!isfinite(scale)) return;  // a non-finite loss or gradient norm: the step changes nothing
  const float lr = hyper[0], bias_correction1 = hyper[1], bias_correction2 = hyper[2];
  const int tensor = chunk_tensor[blockIdx.x];
  const long long start = chunk_start[blockIdx.x];
  const long long end = min(start + chunk, sizes[tensor]);
  float* value = reinterpret_cast<float*>(values[tensor]);
  float* m = reinterpret_cast<float*>(exp_avgs[tensor]);
  float* v = reinterpret_cast<float*>(exp_avg_sqs[tensor]);
  bf16* copy = reinterpret_cast<bf16*>(working[tensor]);
  const float decay = weight_decay[tensor];
  for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
    const float g = load_grad(grads[tensor], grad_is_bf16[tensor], i) * scale;
    const float m_new = beta1 * m[i] + (1.0f - beta1) * g;
    const float v_new = beta2 * v[i] + (1.0f - beta2) * g * g;
    float p = value[i] * (1.0f - lr * decay);
    p -= (lr / bias_correction1) * m_new / (sqrtf(v_new / bias_correction2) + eps);
    m[i] = m_new;
    v[i] = v_new;
    value[i] = p;
    if (copy) copy[i] = from_float<bf16>(p);
  }
}

// partial[b] = sum of g^2 over chunk b (float32 accumulation); the caller adds the chunks.
extern "C" __global__ void sum_of_squares_multi_tensor(const unsigned long long* __restrict__ grads,
                                                       const int* __restrict__ grad_is_bf16,
                                                       const long long* __restrict__ sizes,
                                                       const int* __restrict__ chunk_tensor,
                                                       const long long* __restrict__ chunk_start, int chunk,
                                                       float* __restrict__ partial) {
  const int tensor = chunk_tensor[blockIdx.x];
  const long long start = chunk_start[blockIdx.x];
  const long long end = min(start + chunk, sizes[tensor]);
  float sum = 0.0f;
  for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
    const float g = load_grad(grads[tensor], grad_is_bf16[tensor], i);
    sum += g * g;
  }
  sum = block_reduce<false>(sum);
  if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}
