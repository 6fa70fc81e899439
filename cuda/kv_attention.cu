// Attention over a KV cache (cuda/kv_attention.py is the reference and states the math). A cache is
// [slots, H, L, D]; row i of a call lives in slot slot[i], holds start[i] positions already, and brings T
// new tokens.
#include "common.cuh"

// One block per (row, new token, head), a thread per element of the head's D: copies k and v of that
// token and head to its position start + t of the row's slot. Positions at or past L are skipped (a
// padding row's, which no query reads).
template <typename T>
__global__ void write_cache(T* __restrict__ cache_k, T* __restrict__ cache_v, const T* __restrict__ k,
                            const T* __restrict__ v, const long long* __restrict__ slot,
                            const long long* __restrict__ start, int heads, int length, int width, int context) {
  const long long item = blockIdx.x;  // (row, head, t) in k's [n, H, T] order
  const int t = (int)(item % length), head = (int)(item / length % heads);
  const long long row = item / length / heads;
  const long long position = start[row] + t;
  if (position >= context) return;
  const long long target = ((slot[row] * heads + head) * context + position) * width;
  for (int d = threadIdx.x; d < width; d += blockDim.x) {
    cache_k[target + d] = k[item * width + d];
    cache_v[target + d] = v[item * width + d];
  }
}

// One block per (row, new token) on x and head on y; its query attends to positions 0 .. start + t of
// the row's slot (`seen` of them):
//   1. scores: each warp takes positions in turn, lane l multiplying elements l, l + 32, ... of the
//      query and the key; the warp's sum is the score, kept in shared memory (scores [L] floats);
//   2. softmax over the scores: a block max and a block sum of exponentials;
//   3. out: thread d adds up probs[s] * v[s, d] over the positions (each position's row of v read
//      coalesced across the threads).
// Everything in float32; the keys and values of one (slot, head) are contiguous [L, D].
template <typename T>
__global__ void cached_attention(const T* __restrict__ q, const T* __restrict__ cache_k, const T* __restrict__ cache_v,
                                 const long long* __restrict__ slot, const long long* __restrict__ start,
                                 T* __restrict__ out, int heads, int length, int width, int context, float scale) {
  extern __shared__ float scores[];  // [context]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const long long row = blockIdx.x / length;
  const int t = (int)(blockIdx.x % length), head = blockIdx.y;
  const long long query = ((row * heads + head) * length + t) * width;  // q and out are [n, H, T, D]
  const long long base = (slot[row] * heads + head) * (long long)context * width;
  const int seen = (int)min((long long)context, start[row] + t + 1);

  for (int s = warp; s < seen; s += warps) {
    float dot = 0.0f;
    for (int d = lane; d < width; d += 32) dot += to_float(q[query + d]) * to_float(cache_k[base + (long long)s * width + d]);
    dot = warp_sum(dot);
    if (lane == 0) scores[s] = dot * scale;
  }
  __syncthreads();
  float local_max = -infinity();
  for (int s = threadIdx.x; s < seen; s += blockDim.x) local_max = fmaxf(local_max, scores[s]);
  const float row_max = block_reduce<true>(local_max);
  float local_sum = 0.0f;
  for (int s = threadIdx.x; s < seen; s += blockDim.x) {
    scores[s] = __expf(scores[s] - row_max);
    local_sum += scores[s];
  }
  const float inverse = 1.0f / block_reduce<false>(local_sum);  // its barriers also publish the exponentials
  for (int d = threadIdx.x; d < width; d += blockDim.x) {
    float sum = 0.0f;
    for (int s = 0; s < seen; ++s) sum += scores[s] * to_float(cache_v[base + (long long)s * width + d]);
    out[query + d] = from_float<T>(sum * inverse);
  }
}
