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

// One element's update (cuda/adamw.py states it): g the scaled gradient, p, m, v updated in place.
struct AdamW {
  float beta1, beta2, eps, lr, bias_correction1, bias_correction2, decay;
  __device__ __forceinline__ void update(float g, float& p, float& m, float& v) const {
    m = beta1 * m + (1.0f - beta1) * g;
    v = beta2 * v + (1.0f - beta2) * g * g;
    p = p * (1.0f - lr * decay) - (lr / bias_correction1) * m / (sqrtf(v / bias_correction2) + eps);
  }
};

__device__ __forceinline__ bool aligned(const void* pointer, int bytes) {
  return reinterpret_cast<unsigned long long>(pointer) % bytes == 0;
}

// The update is a pass over memory (about 28 bytes an element with a bf16 gradient and working copy), so
// each thread moves 4 consecutive elements at a time in 16-byte loads and stores (8-byte for the bf16
// arrays) where the tensor's arrays are aligned for it; the chunk's last few elements, and every element
// of a tensor that is not, go one at a time.
extern "C" __global__ void adamw_multi_tensor(
    const unsigned long long* __restrict__ values, const unsigned long long* __restrict__ exp_avgs,
    const unsigned long long* __restrict__ exp_avg_sqs, const unsigned long long* __restrict__ grads,
    const unsigned long long* __restrict__ working, const int* __restrict__ grad_is_bf16,
    const float* __restrict__ weight_decay, const long long* __restrict__ sizes, const int* __restrict__ chunk_tensor,
    const long long* __restrict__ chunk_start, int chunk, float beta1, float beta2, float eps,
    const float* __restrict__ hyper, const float* __restrict__ grad_scale) {
  const float scale = grad_scale[0];
  if (!isfinite(scale)) return;  // a non-finite loss or gradient norm: the step changes nothing
  const int tensor = chunk_tensor[blockIdx.x];
  const AdamW adamw{beta1, beta2, eps, hyper[0], hyper[1], hyper[2], weight_decay[tensor]};
  const long long start = chunk_start[blockIdx.x];
  const long long end = min(start + chunk, sizes[tensor]);
  float* value = reinterpret_cast<float*>(values[tensor]);
  float* m = reinterpret_cast<float*>(exp_avgs[tensor]);
  float* v = reinterpret_cast<float*>(exp_avg_sqs[tensor]);
  bf16* copy = reinterpret_cast<bf16*>(working[tensor]);
  const int is_bf16 = grad_is_bf16[tensor];
  const bool vectors = aligned(value + start, 16) && aligned(m + start, 16) && aligned(v + start, 16) &&
                       (is_bf16 ? aligned(reinterpret_cast<const bf16*>(grads[tensor]) + start, 8)
                                : aligned(reinterpret_cast<const float*>(grads[tensor]) + start, 16)) &&
                       (!copy || aligned(copy + start, 8));
  const long long vector_end = vectors ? start + (end - start) / 4 * 4 : start;
  for (long long i = start + 4 * threadIdx.x; i < vector_end; i += 4 * blockDim.x) {
    float4 p = *reinterpret_cast<const float4*>(value + i), m4 = *reinterpret_cast<const float4*>(m + i),
           v4 = *reinterpret_cast<const float4*>(v + i), g;
    if (is_bf16) {
      union { uint2 vector; bf16 elements[4]; } bits;
      bits.vector = *reinterpret_cast<const uint2*>(reinterpret_cast<const bf16*>(grads[tensor]) + i);
      g = make_float4(to_float(bits.elements[0]), to_float(bits.elements[1]), to_float(bits.elements[2]),
                      to_float(bits.elements[3]));
    } else {
      g = *reinterpret_cast<const float4*>(reinterpret_cast<const float*>(grads[tensor]) + i);
    }
    adamw.update(g.x * scale, p.x, m4.x, v4.x);
    adamw.update(g.y * scale, p.y, m4.y, v4.y);
    adamw.update(g.z * scale, p.z, m4.z, v4.z);
    adamw.update(g.w * scale, p.w, m4.w, v4.w);
    *reinterpret_cast<float4*>(value + i) = p;
    *reinterpret_cast<float4*>(m + i) = m4;
    *reinterpret_cast<float4*>(v + i) = v4;
    if (copy) {
      union { uint2 vector; bf16 elements[4]; } bits;
      bits.elements[0] = from_float<bf16>(p.x), bits.elements[1] = from_float<bf16>(p.y);
      bits.elements[2] = from_float<bf16>(p.z), bits.elements[3] = from_float<bf16>(p.w);
      *reinterpret_cast<uint2*>(copy + i) = bits.vector;
    }
  }
  for (long long i = vector_end + threadIdx.x; i < end; i += blockDim.x) {
    float p = value[i], m1 = m[i], v1 = v[i];
    adamw.update(load_grad(grads[tensor], is_bf16, i) * scale, p, m1, v1);
    value[i] = p;
    m[i] = m1;
    v[i] = v1;
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
