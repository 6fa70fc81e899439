// The tensor cores' bf16 product, PTX's mma.m16n8k16 (sm_80 and later), and how a warp loads its pieces
// of the three matrices from tiles in shared memory. No header dependency (inline PTX).
//
// One product: sums [16 x 8] += a [16 x 16] @ b [16 x 8], bf16 inputs, float32 sums. The 32 lanes of the
// warp each hold pieces of the three matrices, two bf16 to a register (the first in the low half). With
// g = lane / 4 and q = lane % 4, a lane holds
//   a:    a[0] = row g, columns 2q, 2q+1;  a[1] = row g+8, columns 2q, 2q+1;
//         a[2] = row g, columns 2q+8, 2q+9;  a[3] = row g+8, columns 2q+8, 2q+9
//   b:    b[0] = rows 2q, 2q+1 of column g;  b[1] = rows 2q+8, 2q+9 of column g
//   sums: sums[0], sums[1] = row g, columns 2q, 2q+1;  sums[2], sums[3] = row g+8, the same columns
// So the sums of two products side by side (columns 0-7 and 8-15) are, rounded to bf16, the `a` of a next
// product (a_from_sums): attention's probabilities go from one product to the next without leaving the
// registers.
#pragma once
#include "common.cuh"

__device__ __forceinline__ void mma_16x8x16(float sums[4], const unsigned a[4], const unsigned b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(sums[0]), "+f"(sums[1]), "+f"(sums[2]), "+f"(sums[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ unsigned pair(bf16 low, bf16 high) { return low.bits | ((unsigned)high.bits << 16); }
__device__ __forceinline__ unsigned pair(float low, float high) {
  return pair(from_float<bf16>(low), from_float<bf16>(high));
}

struct Lane {  // a lane's place in the fragments above
  int g, q;
  __device__ Lane() : g(threadIdx.x % 32 / 4), q(threadIdx.x % 4) {}
};

// The tiles are row-major bf16 arrays in shared memory with rows of STRIDE elements.
// a = tile[row .. row + 15][col .. col + 15]
template <int STRIDE>
__device__ __forceinline__ void load_a(unsigned a[4], const bf16 (*tile)[STRIDE], int row, int col, Lane lane) {
  const int r = row + lane.g, c = col + 2 * lane.q;
  a[0] = pair(tile[r][c], tile[r][c + 1]);
  a[1] = pair(tile[r + 8][c], tile[r + 8][c + 1]);
  a[2] = pair(tile[r][c + 8], tile[r][c + 9]);
  a[3] = pair(tile[r + 8][c + 8], tile[r + 8][c + 9]);
}
// b = tile[row .. row + 15][col .. col + 7]: the tile holds b as it is (K rows, N columns)
template <int STRIDE>
__device__ __forceinline__ void load_b(unsigned b[2], const bf16 (*tile)[STRIDE], int row, int col, Lane lane) {
  const int r = row + 2 * lane.q, c = col + lane.g;
  b[0] = pair(tile[r][c], tile[r + 1][c]);
  b[1] = pair(tile[r + 8][c], tile[r + 9][c]);
}
// b = the transpose of tile[row .. row + 7][col .. col + 15]: the tile holds b's columns as its rows, as
// a product with keys (q @ k^T) wants them
template <int STRIDE>
__device__ __forceinline__ void load_b_transposed(unsigned b[2], const bf16 (*tile)[STRIDE], int row, int col,
                                                  Lane lane) {
  const int r = row + lane.g, c = col + 2 * lane.q;
  b[0] = pair(tile[r][c], tile[r][c + 1]);
  b[1] = pair(tile[r][c + 8], tile[r][c + 9]);
}
// a = the 16 x 16 matrix whose columns 0-7 are the sums `left` and 8-15 the sums `right`, in bf16
__device__ __forceinline__ void a_from_sums(unsigned a[4], const float left[4], const float right[4]) {
  a[0] = pair(left[0], left[1]);
  a[1] = pair(left[2], left[3]);
  a[2] = pair(right[0], right[1]);
  a[3] = pair(right[2], right[3]);
}
