// The second stage of the two-stage parameter-gradient reductions (LayerNorm's weight and bias, a bias
// after a product): the first stage's blocks each sum a slice of rows into float32 partial sums, and this
// kernel adds the slices up, out[g][c] = sum over p of partial[g][p][c], written in the parameter's dtype
// (cuda/partial_sums.py is the reference).
//
// Block (column tile, group): 32 columns, a lane each; warp w adds parts w, w + WARPS, ... (coalesced
// 128-byte rows, four loads in flight), then warp 0 adds the warps' sums in a fixed order, so the result
// does not depend on timing.
#include "common.cuh"

#if !defined(WARPS)
#error "partial_sums.cu's constants come from cuda/partial_sums.py: compile it through minimoe.cuda.build"
#endif

template <typename T>
__global__ void sum_partials(const float* __restrict__ partial, T* __restrict__ out, int parts, int width) {
  __shared__ float warp_sums[WARPS][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int column = blockIdx.x * 32 + lane, group = blockIdx.y;
  float sum = 0.0f;
  if (column < width) {
    const float* source = partial + (long long)group * parts * width + column;
#pragma unroll 4
    for (int part = warp; part < parts; part += WARPS) sum += source[(long long)part * width];
  }
  warp_sums[warp][lane] = sum;
  __syncthreads();
  if (warp == 0 && column < width) {
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) total += warp_sums[w][lane];
    out[(long long)group * width + column] = from_float<T>(total);
  }
}
