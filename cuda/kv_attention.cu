// Attention over a KV cache (cuda/kv_attention.py is the reference and states the math). A cache is
// [slots, H, L, D]; the new tokens come as qkv [n, T, 3, H, D]; row i of a call lives in slot slot[i] and
// holds start[i] positions already. Both kernels take one block per (row, new token) on x and head on y.
// VEC: D is a whole number of 16-byte vectors (common.cuh's Row), so a head's row loads as vectors.
#include "common.cuh"

// Copies the token's key and value of one head to position start + t of the row's slot; a position at or
// past L is skipped (a padding row's, which no query reads).
template <typename T, bool VEC>
__global__ void write_cache(T* __restrict__ cache_k, T* __restrict__ cache_v, const T* __restrict__ qkv,
                            const long long* __restrict__ slot, const long long* __restrict__ start, int length,
                            int heads, int width, int context) {
  const long long item = blockIdx.x, row = item / length;  // item = row * T + t
  const int head = blockIdx.y;
  const long long position = start[row] + item % length;
  if (position >= context) return;
  const long long target = ((slot[row] * heads + head) * context + position) * width;
  const T* key = qkv + ((item * 3 + 1) * heads + head) * width;
  const T* value = qkv + ((item * 3 + 2) * heads + head) * width;
  for (int d = threadIdx.x; d < width; d += blockDim.x) {
    cache_k[target + d] = key[d];
    cache_v[target + d] = value[d];
  }
}

// The query of token t attends to positions 0 .. start + t of the row's slot (`seen` of them):
//   1. the query, scaled by 1 / sqrt(D), into shared memory (float);
//   2. scores: thread j scores positions j, j + blockDim, ... whole, reading each key row along D in
//      16-byte vectors: many independent loads in flight per thread, scores [L] in shared memory;
//   3. softmax over the scores: a block max, then a block sum of exponentials;
//   4. out: a row of v is read by `lanes` threads, each loading per_load consecutive elements at once; the
//      block is `parts` such groups, and group p adds up probs[s] * v[s] over the positions s = p mod parts;
//      the groups' sums meet in shared memory.
// Shared memory: scores [L], query [D], then the groups' sums [parts][D] (parts * D <= blockDim * per_load).
template <typename T, bool VEC>
__global__ void cached_attention(const T* __restrict__ cache_k, const T* __restrict__ cache_v, const T* __restrict__ qkv,
                                 const long long* __restrict__ slot, const long long* __restrict__ start,
                                 T* __restrict__ out, int length, int heads, int width, int context, float scale) {
  using R = Row<T, VEC>;
  extern __shared__ float shared[];
  float* scores = shared;
  float* query = shared + context;
  float* sums = query + width;
  const long long item = blockIdx.x, row = item / length;
  const int head = blockIdx.y;
  const int seen = (int)min((long long)context, start[row] + item % length + 1);
  const T* q = qkv + (item * 3 * heads + head) * width;
  const long long base = (slot[row] * heads + head) * (long long)context * width;
  for (int d = threadIdx.x; d < width; d += blockDim.x) query[d] = to_float(q[d]) * scale;
  __syncthreads();

  float local_max = -infinity();
  for (int s = threadIdx.x; s < seen; s += blockDim.x) {
    const T* key = cache_k + base + (long long)s * width;
    float dot = 0.0f;
    for (int d = 0; d < width; d += R::per_load) {
      float k[R::per_load];
      R::load(key, d, k);
#pragma unroll
      for (int j = 0; j < R::per_load; ++j) dot += query[d + j] * k[j];
    }
    scores[s] = dot;
    local_max = fmaxf(local_max, dot);
  }
  const float row_max = block_reduce<true>(local_max);  // its barriers also publish the scores
  float local_sum = 0.0f;
  for (int s = threadIdx.x; s < seen; s += blockDim.x) {
    scores[s] = __expf(scores[s] - row_max);
    local_sum += scores[s];
  }
  const float inverse = 1.0f / block_reduce<false>(local_sum);  // and these the exponentials

  const int lanes = min((width + R::per_load - 1) / R::per_load, (int)blockDim.x);  // threads per row of v
  const int parts = (int)blockDim.x / lanes, part = (int)threadIdx.x / lanes;
  T* o = out + (item * heads + head) * width;  // out is [n, T, H, D]
  for (int d = ((int)threadIdx.x % lanes) * R::per_load; part < parts && d < width; d += lanes * R::per_load) {
    float sum[R::per_load] = {};
    for (int s = part; s < seen; s += parts) {
      float v[R::per_load];
      R::load(cache_v + base + (long long)s * width, d, v);
#pragma unroll
      for (int j = 0; j < R::per_load; ++j) sum[j] += scores[s] * v[j];
    }
#pragma unroll
    for (int j = 0; j < R::per_load; ++j) sums[part * width + d + j] = sum[j];
  }
  __syncthreads();
  for (int d = threadIdx.x; d < width; d += blockDim.x) {
    float sum = 0.0f;
    for (int p = 0; p < parts; ++p) sum += sums[p * width + d];
    o[d] = from_float<T>(sum * inverse);
  }
}
