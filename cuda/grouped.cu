// Rows grouped by expert (cuda/grouped.py is the reference and states the layout): the grouping, a linear
// layer per expert over its rows only, and the weighted combine of each row's choices.
#include "common.cuh"

// One block: a counting sort of the P pairs by expert (values 0..E, E = no expert). counts [E + 1] in
// shared memory by atomics, an exclusive scan of them (offsets), then each pair's place: its expert's
// offset plus the number of earlier pairs of the same expert (a loop over them: stable, deterministic).
extern "C" __global__ void group_rows(const long long* __restrict__ experts, int pairs, int num_experts,
                                      long long* __restrict__ order, long long* __restrict__ rank,
                                      long long* __restrict__ offsets) {
  extern __shared__ long long start[];  // [E + 1]: counts, then each expert's first place
  for (int e = threadIdx.x; e <= num_experts; e += blockDim.x) start[e] = 0;
  __syncthreads();
  for (int p = threadIdx.x; p < pairs; p += blockDim.x) atomicAdd((unsigned long long*)&start[experts[p]], 1ull);
  __syncthreads();
  if (threadIdx.x == 0) {
    long long sum = 0;
    for (int e = 0; e <= num_experts; ++e) {
      const long long count = start[e];
      start[e] = sum;
      offsets[e] = sum;  // offsets[E]: how many pairs have a real expert
      sum += count;
    }
  }
  __syncthreads();
  for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
    const long long expert = experts[p];
    long long place = start[expert];
    for (int q = 0; q < p; ++q) place += experts[q] == expert;
    rank[p] = place;
    order[place] = p;
  }
}

// y[r] = x[r] @ weight[e] (+ bias[e]) (GELU) for the rows r of expert e = blockIdx.y, COLUMNS output
// columns per block (blockIdx.x). A block whose expert has no rows returns before reading anything.
// The rows go ROWS at a time; for each group of rows the K axis goes in chunks of CHUNK: the chunk of the
// rows' x is staged in shared memory (float), and warp w multiplies its quarter of the chunk: lane l
// holds output columns 2l and 2l + 1 of the block for every row (ROWS x 2 float32 sums in registers),
// reading each weight row's 64 columns coalesced, once per group of rows. The four warps' sums meet in
// shared memory, in a fixed order, before the bias, the GELU and the store.
constexpr int COLUMNS = 64, ROWS = 8, CHUNK = 256, WARPS = 4;

template <typename T>
__global__ void __launch_bounds__(WARPS * 32)
    grouped_linear(const T* __restrict__ x, const long long* __restrict__ offsets, const T* __restrict__ weight,
                   const T* __restrict__ bias, T* __restrict__ y, int width, int features, int gelu) {
  __shared__ float staged[ROWS][CHUNK];
  __shared__ float partial[WARPS][ROWS][COLUMNS];
  const int expert = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const long long first_row = offsets[expert], end_row = offsets[expert + 1];
  if (first_row == end_row) return;
  const int first_column = blockIdx.x * COLUMNS;
  const T* w = weight + (long long)expert * width * features;
  for (long long row0 = first_row; row0 < end_row; row0 += ROWS) {
    const int rows = (int)min((long long)ROWS, end_row - row0);
    float sums[ROWS][2] = {};
    for (int chunk = 0; chunk < width; chunk += CHUNK) {
      const int chunk_width = min(CHUNK, width - chunk);
      __syncthreads();  // the previous chunk's reads of `staged` are done
      for (int i = threadIdx.x; i < ROWS * CHUNK; i += blockDim.x) {
        const int r = i / CHUNK, c = i % CHUNK;
        staged[r][c] = r < rows && c < chunk_width ? to_float(x[(row0 + r) * width + chunk + c]) : 0.0f;
      }
      __syncthreads();
      const int quarter = (chunk_width + WARPS - 1) / WARPS;
      const int begin = warp * quarter, end = min(chunk_width, begin + quarter);
#pragma unroll 4
      for (int kk = begin; kk < end; ++kk) {
        const T* w_row = w + (long long)(chunk + kk) * features + first_column + 2 * lane;
        const int column = first_column + 2 * lane;
        const float w0 = column < features ? to_float(w_row[0]) : 0.0f;
        const float w1 = column + 1 < features ? to_float(w_row[1]) : 0.0f;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          sums[r][0] += staged[r][kk] * w0;
          sums[r][1] += staged[r][kk] * w1;
        }
      }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) partial[warp][r][2 * lane] = sums[r][0], partial[warp][r][2 * lane + 1] = sums[r][1];
    __syncthreads();
    for (int i = threadIdx.x; i < rows * COLUMNS; i += blockDim.x) {
      const int r = i / COLUMNS, c = i % COLUMNS, column = first_column + c;
      if (column >= features) continue;
      float value = 0.0f;
      for (int v = 0; v < WARPS; ++v) value += partial[v][r][c];
      if (bias) value += to_float(bias[(long long)expert * features + column]);
      if (gelu) value = gelu_tanh(value);
      y[(row0 + r) * features + column] = from_float<T>(value);
    }
  }
}

// y[i] = sum over the row's real choices j of weight[i, j] * out[rank[i k + j]]; one block per row, a
// thread per element of the row (strided), float32 sums.
template <typename T>
__global__ void combine_pairs(const T* __restrict__ out, const long long* __restrict__ rank,
                              const long long* __restrict__ expert_index, const float* __restrict__ weight,
                              T* __restrict__ y, int k, int width, int num_experts) {
  const long long row = blockIdx.x;
  for (int d = threadIdx.x; d < width; d += blockDim.x) {
    float sum = 0.0f;
    for (int j = 0; j < k; ++j) {
      const long long pair = row * k + j;
      if (expert_index[pair] < num_experts) sum += weight[pair] * to_float(out[rank[pair] * width + d]);
    }
    y[row * width + d] = from_float<T>(sum);
  }
}
