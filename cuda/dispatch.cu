// Combine (gather by the mapping table) and its backward; cuda/dispatch.py is the reference and holds
// the Numba CUDA dispatch (scatter) kernel. Table: expert_index, position [tokens, k] (int64, position
// -1 = dropped); slot = expert * capacity + position indexes the rows of the [E * C, width] buffer.
//
// One block per token; its threads stride over the row in 16-byte vectors (8 bf16 or 4 float) when
// the row length allows (VEC = true, common.cuh's Row), else element by element. Sums run in float32.
#include "common.cuh"

// y[t] = sum_c weight[t, c] * rows[slot(t, c)] over kept choices (weight == nullptr: 1).
// Memory: reads k rows per token, writes one row.
template <typename T, bool VEC>
__global__ void combine_rows(const T* __restrict__ rows, const long long* __restrict__ expert_index,
                             const long long* __restrict__ position, const float* __restrict__ weight,
                             T* __restrict__ y, int k, int capacity, int width) {
  using R = Row<T, VEC>;
  const int token = blockIdx.x;
  for (int i = threadIdx.x * R::per_load; i < width; i += blockDim.x * R::per_load) {
    float sum[R::per_load] = {};
    for (int c = 0; c < k; ++c) {
      const long long pos = position[token * k + c];
      if (pos < 0) continue;
      const float w = weight ? weight[token * k + c] : 1.0f;
      float values[R::per_load];
      R::load(rows + (expert_index[token * k + c] * capacity + pos) * width, i, values);
#pragma unroll
      for (int j = 0; j < R::per_load; ++j) sum[j] += w * values[j];
    }
    R::store(y + (long long)token * width, i, sum);
  }
}

// Backward of combine, both outputs in one pass over grad_y[t]:
//   grad_rows[slot(t, c)] = weight[t, c] * grad_y[t]          (a scaled dispatch; grad_rows pre-zeroed)
//   grad_weight[t, c]     = <grad_y[t], rows[slot(t, c)]>      (0 where dropped)
// The dot product is a block reduction: per-thread partial sums, then warp shuffles, then shared memory.
template <typename T, bool VEC>
__global__ void combine_backward(const T* __restrict__ grad_y, const T* __restrict__ rows,
                                 const long long* __restrict__ expert_index, const long long* __restrict__ position,
                                 const float* __restrict__ weight, T* __restrict__ grad_rows,
                                 float* __restrict__ grad_weight, int k, int capacity, int width) {
  using R = Row<T, VEC>;
  __shared__ float warp_sums[32];
  const int token = blockIdx.x;
  const T* grad_row = grad_y + (long long)token * width;
  for (int c = 0; c < k; ++c) {
    const long long pos = position[token * k + c];
    if (pos < 0) {  // uniform across the block: every thread reads the same table entry
      if (threadIdx.x == 0) grad_weight[token * k + c] = 0.0f;
      continue;
    }
    const long long slot = expert_index[token * k + c] * capacity + pos;
    const float w = weight[token * k + c];
    float dot = 0.0f;
    for (int i = threadIdx.x * R::per_load; i < width; i += blockDim.x * R::per_load) {
      float g[R::per_load], r[R::per_load], scaled[R::per_load];
      R::load(grad_row, i, g);
      R::load(rows + slot * width, i, r);
#pragma unroll
      for (int j = 0; j < R::per_load; ++j) {
        dot += g[j] * r[j];
        scaled[j] = w * g[j];
      }
      R::store(grad_rows + slot * width, i, scaled);
    }
    for (int offset = 16; offset > 0; offset /= 2) dot += __shfl_down_sync(0xffffffffu, dot, offset);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x / 32] = dot;
    __syncthreads();
    if (threadIdx.x < 32) {
      dot = threadIdx.x < blockDim.x / 32 ? warp_sums[threadIdx.x] : 0.0f;
      for (int offset = 16; offset > 0; offset /= 2) dot += __shfl_down_sync(0xffffffffu, dot, offset);
      if (threadIdx.x == 0) grad_weight[token * k + c] = dot;
    }
    __syncthreads();  // warp_sums is reused by the next choice
  }
}

// The inverse of the table: source[slot(t, c)] = t for every kept choice (source is pre-filled with -1,
// the mark of an empty slot). One thread per (token, choice); kept slots are distinct, so no two threads
// write one entry.
extern "C" __global__ void invert_table(const long long* __restrict__ expert_index, const long long* __restrict__ position,
                                        long long* __restrict__ source, int entries, int k, long long capacity) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < entries && position[i] >= 0) source[expert_index[i] * capacity + position[i]] = i / k;
}
