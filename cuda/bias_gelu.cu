// Fused bias + GELU for the first layer of every MLP and expert, and the bias add alone for the second
// (cuda/bias_gelu.py is the reference). x is viewed as [groups, rows_per_group, features] with bias
// [groups, features] (groups = experts, or 1 for a dense layer: then rows_per_group is every row).
// GELU is a template switch: with it off the same kernels add the bias and sum its gradient.
#include "common.cuh"

#if !defined(TILE) || !defined(WARPS)
#error "bias_gelu.cu's constants come from cuda/bias_gelu.py: compile it through minimoe.cuda.build"
#endif

// y = gelu(x + bias), or x + bias; with a null bias, gelu(x) (x already holds a sum with its bias). One
// block per row; threads stride over the features in 16-byte vectors. Each element is read once and
// written once, the bias row stays in L1/L2: the kernel runs at memory speed.
template <typename T, bool VEC, bool GELU>
__global__ void bias_forward(const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y,
                             int rows_per_group, int features) {
  using R = Row<T, VEC>;
  const long long row = blockIdx.x;
  for (int i = threadIdx.x * R::per_load; i < features; i += blockDim.x * R::per_load) {
    float values[R::per_load], shift[R::per_load] = {};
    R::load(x + row * features, i, values);
    if (bias) R::load(bias + (row / rows_per_group) * features, i, shift);
#pragma unroll
    for (int j = 0; j < R::per_load; ++j) values[j] = GELU ? gelu_tanh(values[j] + shift[j]) : values[j] + shift[j];
    R::store(y + row * features, i, values);
  }
}

// The bias gradient's partial sums, and with GELU grad_pre = grad_y * gelu'(x + bias), recomputing
// x + bias instead of storing it (without GELU the gradient of x is grad_y itself: nothing to write).
// A null bias: x already holds x + bias. A non-null `hidden` (GELU): the pass also writes gelu(x + bias),
// the activation that an MLP recomputes in its backward rather than keeping it from the forward.
// Block (row tile, column tile, group) covers TILE consecutive rows of one group and 32 lanes' columns
// (a 16-byte vector each where rows allow); warp w takes rows w, w + WARPS, ... of the tile, four rows'
// loads in flight. The warps' float32 column sums are added in shared memory in a fixed order and written
// to partial[group][tile][features]; cuda/partial_sums.py adds the tiles up (a small reduction instead of
// a second pass over the gradient). Many short tiles: 256 blocks of 32 rows each left most of the GPU's
// threads idle.
template <typename T, bool VEC, bool GELU>
__global__ void bias_backward(const T* __restrict__ grad_y, const T* __restrict__ x, const T* __restrict__ bias,
                              T* __restrict__ grad_pre, T* __restrict__ hidden, float* __restrict__ partial,
                              int rows_per_group, int features) {
  using R = Row<T, VEC>;
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
#pragma unroll 4
    for (int r = warp; r < rows; r += WARPS) {
      const long long offset = (first_row + r) * features;
      float grad[R::per_load];
      R::load(grad_y + offset, column, grad);
      if (GELU) {
        float pre[R::per_load];
        R::load(x + offset, column, pre);
#pragma unroll
        for (int j = 0; j < R::per_load; ++j) pre[j] += shift[j];
#pragma unroll
        for (int j = 0; j < R::per_load; ++j) grad[j] *= gelu_tanh_grad(pre[j]);
        R::store(grad_pre + offset, column, grad);
        if (hidden) {
#pragma unroll
          for (int j = 0; j < R::per_load; ++j) pre[j] = gelu_tanh(pre[j]);
          R::store(hidden + offset, column, pre);
        }
      }
#pragma unroll
      for (int j = 0; j < R::per_load; ++j) column_sum[j] += grad[j];
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
