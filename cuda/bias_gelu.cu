// Fused bias + GELU for the first layer of every MLP and expert, and the bias add alone for the second
// (cuda/bias_gelu.py is the reference). x is viewed as [groups, rows_per_group, features] with bias
// [groups, features] (groups = experts, or 1 for a dense layer: then rows_per_group is every row).
// GELU is a template switch: with it off the same kernels add the bias and sum its gradient.
#include "common.cuh"

// y = gelu(x + bias), or x + bias. One block per row; threads stride over the features in 16-byte
// vectors. Each element is read once and written once, the bias row stays in L1/L2: the kernel runs at
// memory speed.
template <typename T, bool VEC, bool GELU>
__global__ void bias_forward(const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y,
                             int rows_per_group, int features) {
  using R = Row<T, VEC>;
  const long long row = blockIdx.x;
  const T* bias_row = bias + (row / rows_per_group) * features;
  for (int i = threadIdx.x * R::per_load; i < features; i += blockDim.x * R::per_load) {
    float values[R::per_load], shift[R::per_load];
    R::load(x + row * features, i, values);
    R::load(bias_row, i, shift);
#pragma unroll
    for (int j = 0; j < R::per_load; ++j) values[j] = GELU ? gelu_tanh(values[j] + shift[j]) : values[j] + shift[j];
    R::store(y + row * features, i, values);
  }
}

// The bias gradient's partial sums, and with GELU grad_pre = grad_y * gelu'(x + bias), recomputing
// x + bias instead of storing it (without GELU the gradient of x is grad_y itself: nothing to write).
// Block (tile, group) covers TILE consecutive rows of one group and writes the float32 column sums of
// its gradient rows to partial[group][tile][features]; the caller adds the tiles up (a small
// [groups, tiles, features] reduction instead of a second pass over the gradient).
constexpr int TILE = 32;

template <typename T, bool VEC, bool GELU>
__global__ void bias_backward(const T* __restrict__ grad_y, const T* __restrict__ x, const T* __restrict__ bias,
                              T* __restrict__ grad_pre, float* __restrict__ partial, int rows_per_group,
                              int features) {
  using R = Row<T, VEC>;
  const int tile = blockIdx.x, group = blockIdx.y, tiles = gridDim.x;
  const long long first_row = (long long)group * rows_per_group + (long long)tile * TILE;
  const int rows = min(TILE, rows_per_group - tile * TILE);
  const T* bias_row = bias + (long long)group * features;
  for (int i = threadIdx.x * R::per_load; i < features; i += blockDim.x * R::per_load) {
    float shift[R::per_load], column_sum[R::per_load] = {};
    if (GELU) R::load(bias_row, i, shift);
#pragma unroll 4  // four rows' loads in flight at once, not one latency per row
    for (int r = 0; r < rows; ++r) {
      const long long offset = (first_row + r) * features;
      float grad[R::per_load];
      R::load(grad_y + offset, i, grad);
      if (GELU) {
        float pre[R::per_load];
        R::load(x + offset, i, pre);
#pragma unroll
        for (int j = 0; j < R::per_load; ++j) grad[j] *= gelu_tanh_grad(pre[j] + shift[j]);
        R::store(grad_pre + offset, i, grad);
      }
#pragma unroll
      for (int j = 0; j < R::per_load; ++j) column_sum[j] += grad[j];
    }
#pragma unroll
    for (int j = 0; j < R::per_load; ++j) partial[((long long)group * tiles + tile) * features + i + j] = column_sum[j];
  }
}
