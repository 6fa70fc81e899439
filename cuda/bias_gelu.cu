// Fused bias + GELU for the first layer of every MLP and expert, and the bias add alone for the second
// (cuda/bias_gelu.py is the reference). x is viewed as [groups, rows_per_group, features] with bias
// [groups, features] (groups = experts, or 1 for a dense layer: then rows_per_group is every row).
// GELU is a template switch: with it off the same kernels add the bias and sum its gradient.
#include "common.cuh"

#if !defined(TILE) || !defined(WARPS) || !defined(ROWS)
#error "bias_gelu.cu's constants come from cuda/bias_gelu.py: compile it through minimoe.cuda.build"
#endif

// y = gelu(x + bias), or x + bias; with a null bias, gelu(x) (x already holds a sum with its bias). A block
// takes ROWS consecutive rows; its threads stride over the features in 16-byte vectors, and a thread's
// vector of every row is loaded before any is used, so that ROWS loads are in flight at once. Each element
// is read once and written once, the bias rows stay in L1/L2: the kernel runs at memory speed.
template <typename T, bool VEC, bool GELU>
__global__ void bias_forward(const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y, int rows,
                             int rows_per_group, int features) {
  using R = Row<T, VEC>;
  const int first = blockIdx.x * ROWS, count = min(ROWS, rows - first);
  const T* bias_rows[ROWS];  // each row's group's bias (rows of one block may span two groups)
#pragma unroll
  for (int r = 0; r < ROWS; ++r) bias_rows[r] = bias ? bias + (long long)((first + r) / rows_per_group) * features : nullptr;
  for (int i = threadIdx.x * R::per_load; i < features; i += blockDim.x * R::per_load) {
    float values[ROWS][R::per_load];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)  // past the last row, that row again (unused): no branch between the loads
      R::load(x + (long long)(first + min(r, count - 1)) * features, i, values[r]);
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      if (r >= count) break;
      float shift[R::per_load] = {};
      if (bias) R::load(bias_rows[r], i, shift);
#pragma unroll
      for (int j = 0; j < R::per_load; ++j)
        values[r][j] = GELU ? gelu_tanh(values[r][j] + shift[j]) : values[r][j] + shift[j];
      R::store(y + (long long)(first + r) * features, i, values[r]);
    }
  }
}

// The bias gradient's partial sums, and with GELU grad_pre = grad_y * gelu'(x + bias), recomputing
// x + bias instead of storing it (without GELU the gradient of x is grad_y itself: nothing to write).
// A null bias: x already holds x + bias. A non-null `hidden` (GELU): the pass also writes gelu(x + bias),
// the activation that an MLP recomputes in its backward rather than keeping it from the forward.
// Block (row tile, column tile, group) covers TILE consecutive rows of one group and 32 lanes' columns
// (a 16-byte vector each where rows allow); warp w takes rows w, w + WARPS, ... of the tile, UNROLL of them
// at a time, whose loads are all issued before any is used (that many in flight per thread). The warps'
// float32 column sums are added in shared memory in a fixed order and written to
// partial[group][tile][features]; cuda/partial_sums.py adds the tiles up (a small reduction instead of a
// second pass over the gradient). Many short tiles: 256 blocks of 32 rows each left most of the GPU's
// threads idle.
template <typename T, bool VEC, bool GELU>
__global__ void bias_backward(const T* __restrict__ grad_y, const T* __restrict__ x, const T* __restrict__ bias,
                              T* __restrict__ grad_pre, T* __restrict__ hidden, float* __restrict__ partial,
                              int rows_per_group, int features) {
  using R = Row<T, VEC>;
  constexpr int UNROLL = 4;
  __shared__ float warp_sums[WARPS][32 * R::per_load];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int tile = blockIdx.x, tiles = gridDim.x, group = blockIdx.z;
  const int column = (blockIdx.y * 32 + lane) * R::per_load;
  const int rows = min(TILE, rows_per_group - tile * TILE);
  float column_sum[R::per_load] = {};
  if (column < features) {
    const long long first_row = (long long)group * rows_per_group + (long long)tile * TILE;
    float shift[R::per_load] = {};
    if (GELU && bias) R::load(bias + (long long)group * features, column, shift);
    for (int first = warp; first < rows; first += UNROLL * WARPS) {
      float grad[UNROLL][R::per_load], pre[UNROLL][R::per_load];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {  // past the tile's rows, its last row again (unused): no branch
        const long long offset = (first_row + min(first + u * WARPS, rows - 1)) * features;
        R::load(grad_y + offset, column, grad[u]);
        if (GELU) R::load(x + offset, column, pre[u]);
      }
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const int r = first + u * WARPS;
        if (r >= rows) break;
        const long long offset = (first_row + r) * features;
        if (GELU) {
#pragma unroll
          for (int j = 0; j < R::per_load; ++j) pre[u][j] += shift[j];
#pragma unroll
          for (int j = 0; j < R::per_load; ++j) grad[u][j] *= gelu_tanh_grad(pre[u][j]);
          R::store(grad_pre + offset, column, grad[u]);
          if (hidden) {
#pragma unroll
            for (int j = 0; j < R::per_load; ++j) pre[u][j] = gelu_tanh(pre[u][j]);
            R::store(hidden + offset, column, pre[u]);
          }
        }
#pragma unroll
        for (int j = 0; j < R::per_load; ++j) column_sum[j] += grad[u][j];
      }
    }
  }
#pragma unroll
  for (int j = 0; j < R::per_load; ++j) warp_sums[warp][lane * R::per_load + j] = column_sum[j];
  __syncthreads();
  if (warp == 0 && column < features) {
#pragma unroll
    for (int j = 0; j < R::per_load; ++j) {
      float total = 0.0f;
      for (int w = 0; w < WARPS; ++w) total += warp_sums[w][lane * R::per_load + j];
      partial[((long long)group * tiles + tile) * features + column + j] = total;
    }
  }
}
