// LayerNorm over the last axis (cuda/layernorm.py is the reference and states the formulas).
// x is [rows, d]; statistics (mean, rstd) are float32 whatever the storage type.
#include "common.cuh"

#if !defined(WARPS_PER_BLOCK)
#error "layernorm.cu's constants come from cuda/layernorm.py: compile it through minimoe.cuda.build"
#endif

// A warp's walk over its row in pieces of R::per_load elements, lane l taking pieces l, l + 32, ...
// HELD > 0 (the row has at most 32 HELD pieces, bench train-step's 768 bf16 take 3): the lane's pieces
// are read once, into registers, and every pass walks the registers, so the row crosses memory once
// rather than once a pass. HELD = 0 (wider rows): every pass reads them again (from cache).
//   Walk<R, HELD, ARRAYS> walk(lane, width);  walk.pass(load, visit)
// load(i, values[ARRAYS][per_load]) fetches the piece at element i of each of the ARRAYS arrays the passes
// read; visit(i, values, piece) uses it, piece being its number among the lane's pieces (0, 1, ...: a
// constant once the loop over HELD pieces is unrolled, so it can index registers).
template <typename R, int HELD, int ARRAYS>
struct Walk {
  static constexpr int N = R::per_load;
  float held[HELD > 0 ? HELD : 1][ARRAYS][N];
  int lane, width;
  template <typename Load>
  __device__ Walk(int lane_, int width_, Load load) : lane(lane_), width(width_) {
    if constexpr (HELD > 0) {
#pragma unroll
      for (int k = 0; k < HELD; ++k)
        if ((32 * k + lane) * N < width) load((32 * k + lane) * N, held[k]);
    }
  }
  template <typename Load, typename Visit>
  __device__ void pass(Load load, Visit visit) {
    if constexpr (HELD > 0) {
#pragma unroll
      for (int k = 0; k < HELD; ++k)
        if ((32 * k + lane) * N < width) visit((32 * k + lane) * N, held[k], k);
    } else {
      for (int i = lane * N, k = 0; i < width; i += 32 * N, ++k) {
        float values[ARRAYS][N];
        load(i, values);
        visit(i, values, k);
      }
    }
  }
};

// One warp per row: the mean, then the variance of (x - mean) (two passes over the row, numerically safer
// than E[x^2] - E[x]^2), then y = (x - mean) * rstd * weight + bias. With `addend` (not null) the row is
// the residual sum x + addend, rounded to T as a separate add would store it, and the last pass also
// stores that sum (one launch and one pass over memory fewer than an add before the LayerNorm). Without
// HELD the passes recompute the sum rather than read `sum` back, which the read-only loads of x would not see.
template <typename T, bool VEC, int HELD>
__global__ void layernorm_forward(const T* __restrict__ x, const T* __restrict__ addend, const T* __restrict__ weight,
                                  const T* __restrict__ bias, T* __restrict__ y, T* __restrict__ sum,
                                  float* __restrict__ mean_out, float* __restrict__ rstd_out, int rows, int width,
                                  float eps) {
  using R = Row<T, VEC>;
  const long long row = blockIdx.x * (long long)(blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const long long row_start = row * width;
  auto load = [&](int i, float (*v)[R::per_load]) {
    R::load(x + row_start, i, v[0]);
    if (addend) {
      float a[R::per_load];
      R::load(addend + row_start, i, a);
#pragma unroll
      for (int j = 0; j < R::per_load; ++j) v[0][j] = to_float(from_float<T>(v[0][j] + a[j]));
    }
  };
  Walk<R, HELD, 1> walk(lane, width, load);
  float total = 0.0f;
  walk.pass(load, [&](int, float (*v)[R::per_load], int) {
#pragma unroll
    for (int j = 0; j < R::per_load; ++j) total += v[0][j];
  });
  const float mean = warp_sum(total) / width;
  float squares = 0.0f;
  walk.pass(load, [&](int, float (*v)[R::per_load], int) {
#pragma unroll
    for (int j = 0; j < R::per_load; ++j) squares += (v[0][j] - mean) * (v[0][j] - mean);
  });
  const float rstd = rsqrtf(warp_sum(squares) / width + eps);
  walk.pass(load, [&](int i, float (*v)[R::per_load], int) {
    float w[R::per_load], b[R::per_load], out[R::per_load];
    if (addend) R::store(sum + row_start, i, v[0]);
    R::load(weight, i, w);
    R::load(bias, i, b);
#pragma unroll
    for (int j = 0; j < R::per_load; ++j) out[j] = (v[0][j] - mean) * rstd * w[j] + b[j];
    R::store(y + row_start, i, out);
  });
  if (lane == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * weight, xhat = (x - mean) * rstd.
// One warp per row: two row reductions, then the write (dy and x held as the forward holds x). With
// `grad_sum` (not null: x is a residual sum whose other uses sent it this gradient) dx is rounded to T
// and grad_sum added, as the tape would add the two gradients of x.
//
// Where the row is held (HELD > 0), the kernel also sums the parameter gradients, dweight = sum dy * xhat
// and dbias = sum dy, while dy and x are in registers: a warp walks rows warp, warp + warps, ... (a few
// each) adding into registers for its own columns; then the block's warps add theirs in a fixed order
// into one row of partial_weight / partial_bias per block (sum_partials adds the blocks; no atomics, so
// the sums do not depend on timing). That spares layernorm_backward_params' second read of dy and x.
template <typename T, bool VEC, int HELD>
__global__ void layernorm_backward(const T* __restrict__ grad_y, const T* __restrict__ x,
                                   const T* __restrict__ weight, const float* __restrict__ mean,
                                   const float* __restrict__ rstd, const T* __restrict__ grad_sum,
                                   T* __restrict__ grad_x, float* __restrict__ partial_weight,
                                   float* __restrict__ partial_bias, int rows, int width) {
  using R = Row<T, VEC>;
  constexpr int N = R::per_load;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float weight_sums[HELD > 0 ? HELD : 1][N] = {}, bias_sums[HELD > 0 ? HELD : 1][N] = {};
  for (long long row = blockIdx.x * (long long)WARPS_PER_BLOCK + warp; row < rows;
       row += (long long)gridDim.x * WARPS_PER_BLOCK) {
    const float row_mean = mean[row], row_rstd = rstd[row];
    auto load = [&](int i, float (*v)[N]) {  // v[0]: dy, v[1]: x
      R::load(grad_y + row * width, i, v[0]);
      R::load(x + row * width, i, v[1]);
    };
    Walk<R, HELD, 2> walk(lane, width, load);
    float sum_g = 0.0f, sum_g_xhat = 0.0f;
    walk.pass(load, [&](int i, float (*v)[N], int) {
      float w[N];
      R::load(weight, i, w);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const float g = v[0][j] * w[j];
        sum_g += g;
        sum_g_xhat += g * (v[1][j] - row_mean) * row_rstd;
      }
    });
    const float mean_g = warp_sum(sum_g) / width, mean_g_xhat = warp_sum(sum_g_xhat) / width;
    walk.pass(load, [&](int i, float (*v)[N], int piece) {
      float w[N], out[N];
      R::load(weight, i, w);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const float xhat = (v[1][j] - row_mean) * row_rstd;
        out[j] = row_rstd * (v[0][j] * w[j] - mean_g - xhat * mean_g_xhat);
        if constexpr (HELD > 0) {
          weight_sums[piece][j] += v[0][j] * xhat;
          bias_sums[piece][j] += v[0][j];
        }
      }
      if (grad_sum) {
        float other[N];
        R::load(grad_sum + row * width, i, other);
#pragma unroll
        for (int j = 0; j < N; ++j) out[j] = to_float(from_float<T>(out[j])) + other[j];
      }
      R::store(grad_x + row * width, i, out);
    });
  }
  if constexpr (HELD > 0) {
    __shared__ float warp_rows[WARPS_PER_BLOCK][HELD * 32 * N];
    auto add_up = [&](const float (&sums)[HELD][N], float* __restrict__ partial) {
#pragma unroll
      for (int piece = 0; piece < HELD; ++piece)  // columns past the row's end hold zeros
#pragma unroll
        for (int j = 0; j < N; ++j) warp_rows[warp][(32 * piece + lane) * N + j] = sums[piece][j];
      __syncthreads();
      for (int column = threadIdx.x; column < width; column += blockDim.x) {
        float total = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS_PER_BLOCK; ++w) total += warp_rows[w][column];
        partial[(long long)blockIdx.x * width + column] = total;
      }
      __syncthreads();
    };
    add_up(weight_sums, partial_weight);
    add_up(bias_sums, partial_bias);
  }
}

// Partial parameter gradients of rows too wide to hold (layernorm_backward sums the others):
// thread = one column, block row y = one slice of the rows (every
// `slices`-th row). partial_weight[slice][col] = sum dy * xhat, partial_bias[slice][col] = sum dy; the
// caller adds the slices (deterministic: no atomics).
template <typename T>
__global__ void layernorm_backward_params(const T* __restrict__ grad_y, const T* __restrict__ x,
                                          const float* __restrict__ mean, const float* __restrict__ rstd,
                                          float* __restrict__ partial_weight, float* __restrict__ partial_bias,
                                          int rows, int width) {
  const int column = blockIdx.x * blockDim.x + threadIdx.x;
  const int slice = blockIdx.y, slices = gridDim.y;
  if (column >= width) return;
  float sum_weight = 0.0f, sum_bias = 0.0f;
#pragma unroll 4  // four rows' loads in flight at once
  for (long long row = slice; row < rows; row += slices) {
    const float dy = to_float(grad_y[row * width + column]);
    sum_weight += dy * (to_float(x[row * width + column]) - mean[row]) * rstd[row];
    sum_bias += dy;
  }
  partial_weight[(long long)slice * width + column] = sum_weight;
  partial_bias[(long long)slice * width + column] = sum_bias;
}
