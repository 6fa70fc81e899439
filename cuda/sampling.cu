// Sampling the next token of each row (cuda/sampling.py is the reference and states the rules). One block
// per row: the row's z = logits / T and probabilities in shared memory, then each thread decides for its
// tokens whether they are allowed (by counting the tokens ordered before them and adding up their
// probabilities: O(V^2) per row, nothing for the byte vocabularies of minimoe, V <= 256), and the block
// picks the allowed token with the largest z + Gumbel noise.
#include "common.cuh"
#include "philox.cuh"

// The largest (value, index) of the block, the lowest index among equal values; every thread gets it.
__device__ __forceinline__ int block_argmax(float value, int index) {
  __shared__ float best_values[32];
  __shared__ int best_indices[32];
  for (int offset = 16; offset > 0; offset /= 2) {
    const float other_value = __shfl_xor_sync(0xffffffffu, value, offset);
    const int other_index = __shfl_xor_sync(0xffffffffu, index, offset);
    if (other_value > value || (other_value == value && other_index < index)) value = other_value, index = other_index;
  }
  __syncthreads();  // an earlier call may still be reading the arrays
  if (threadIdx.x % 32 == 0) best_values[threadIdx.x / 32] = value, best_indices[threadIdx.x / 32] = index;
  __syncthreads();
  value = -infinity(), index = 0x7fffffff;
  for (int w = 0; w < blockDim.x / 32; ++w)
    if (best_values[w] > value || (best_values[w] == value && best_indices[w] < index))
      value = best_values[w], index = best_indices[w];
  return index;
}

// Shared memory: z [V], then p [V].
template <typename T>
__global__ void sample_tokens(const T* __restrict__ logits, const float* __restrict__ temperature,
                              const int* __restrict__ top_k, const float* __restrict__ top_p,
                              const unsigned long long* __restrict__ key, const long long* __restrict__ position,
                              long long* __restrict__ tokens, int vocab, int counters_per_position, float tiny) {
  extern __shared__ float shared[];
  float* z = shared;
  float* p = shared + vocab;
  const long long row = blockIdx.x;
  const T* logit = logits + row * vocab;
  const float t = temperature[row];
  if (t == 0.0f) {  // greedy
    float best = -infinity();
    int best_index = 0x7fffffff;
    for (int e = threadIdx.x; e < vocab; e += blockDim.x) {
      const float value = to_float(logit[e]);
      if (value > best) best = value, best_index = e;  // e rises: the first of equals is kept
    }
    const int token = block_argmax(best, best_index);
    if (threadIdx.x == 0) tokens[row] = token;
    return;
  }
  float local_max = -infinity();
  for (int e = threadIdx.x; e < vocab; e += blockDim.x) {
    z[e] = to_float(logit[e]) / t;
    local_max = fmaxf(local_max, z[e]);
  }
  const float z_max = block_reduce<true>(local_max);
  float local_sum = 0.0f;
  for (int e = threadIdx.x; e < vocab; e += blockDim.x) {
    p[e] = __expf(z[e] - z_max);
    local_sum += p[e];
  }
  const float inverse = 1.0f / block_reduce<false>(local_sum);  // its barriers publish z and p
  const int k = top_k[row];
  const float nucleus = top_p[row];
  const unsigned long long first_counter = (unsigned long long)position[row] * counters_per_position;
  float best = -infinity();
  int best_index = 0x7fffffff;
  for (int e = threadIdx.x; e < vocab; e += blockDim.x) {
    int ahead = 0;  // tokens ordered before e: larger z, or equal z and a lower index
    float mass_ahead = 0.0f;
    for (int j = 0; j < vocab; ++j)
      if (z[j] > z[e] || (z[j] == z[e] && j < e)) ++ahead, mass_ahead += p[j];
    const bool allowed = (k == 0 || ahead < k) && (nucleus >= 1.0f || mass_ahead * inverse < nucleus);
    const uint4 words = philox(first_counter + e / 4, key[row]);
    const unsigned int word = e % 4 == 0 ? words.x : e % 4 == 1 ? words.y : e % 4 == 2 ? words.z : words.w;
    const float score = z[e] - logf(-logf(fmaxf(to_unit(word), tiny)));
    if (allowed && score > best) best = score, best_index = e;
  }
  const int token = block_argmax(best, best_index);
  if (threadIdx.x == 0) tokens[row] = token;
}
