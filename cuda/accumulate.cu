// out = a + b over equal-shaped arrays: the tape's sum of two gradients of one tensor (cuda/accumulate.py
// is the reference). Float32 arithmetic, one rounding to T, as an elementwise add does; 16-byte vectors
// where the size and the addresses allow (CuPy's own bf16 add moves 2 bytes a thread and ran at a
// quarter of the copy rate).
#include "common.cuh"

template <typename T, bool VEC>
__global__ void add_gradients(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out, long long size) {
  using R = Row<T, VEC>;
  const long long stride = (long long)gridDim.x * blockDim.x * R::per_load;
  for (long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * R::per_load; i < size; i += stride) {
    float sum[R::per_load], addend[R::per_load];
    R::load(a + i, 0, sum);
    R::load(b + i, 0, addend);
#pragma unroll
    for (int j = 0; j < R::per_load; ++j) sum[j] += addend[j];
    R::store(out + i, 0, sum);
  }
}
