// The tensor cores' bf16 product, PTX's mma.m16n8k16 (sm_80 and later), and how a warp loads its pieces
// of the three matrices from tiles in shared memory (inline PTX).
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
  int id, g, q;
  __device__ Lane() : id(threadIdx.x % 32), g(threadIdx.x % 32 / 4), q(threadIdx.x % 4) {}
};

// ldmatrix: a warp loads four 8 x 8 bf16 matrices from shared memory in one instruction, lanes 8i .. 8i + 7
// naming the 16-byte rows of matrix i, and every lane gets one register of each matrix: plainly, row g,
// columns 2q and 2q + 1 (the pieces of `a` above, and of `b` held transposed); transposed (.trans), rows
// 2q and 2q + 1 of column g (the pieces of `b` held as it is). Without it a lane gathers its pieces two
// bf16 at a time, and the transposed ones one bf16 at a time.
template <bool TRANSPOSED>
__device__ __forceinline__ void load_matrices(unsigned& m0, unsigned& m1, unsigned& m2, unsigned& m3,
                                              const bf16* row) {
  if constexpr (TRANSPOSED)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(m0), "=r"(m1), "=r"(m2), "=r"(m3) : "r"(shared_address(row)));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(m0), "=r"(m1), "=r"(m2), "=r"(m3) : "r"(shared_address(row)));
}

// The tiles are row-major bf16 arrays in shared memory with rows of STRIDE elements, each row 16-byte
// aligned (STRIDE a multiple of 8, the tile aligned), and the columns asked for a multiple of 8.
// a = tile[row .. row + 15][col .. col + 15]: matrices (rows +0, cols +0), (+8, +0), (+0, +8), (+8, +8).
template <int STRIDE>
__device__ __forceinline__ void load_a(unsigned a[4], const bf16 (*tile)[STRIDE], int row, int col, Lane lane) {
  load_matrices<false>(a[0], a[1], a[2], a[3],
                       &tile[row + lane.id % 8 + 8 * (lane.id / 8 % 2)][col + 8 * (lane.id / 16)]);
}
// b of two products side by side, b[0] columns col .. col + 7 and b[1] columns col + 8 .. col + 15, over
// K rows row .. row + 15: the tile holds b as it is (K rows, N columns); the matrices as load_a's,
// transposed.
template <int STRIDE>
__device__ __forceinline__ void load_b(unsigned b[2][2], const bf16 (*tile)[STRIDE], int row, int col, Lane lane) {
  load_matrices<true>(b[0][0], b[0][1], b[1][0], b[1][1],
                      &tile[row + lane.id % 8 + 8 * (lane.id / 8 % 2)][col + 8 * (lane.id / 16)]);
}
// The same two b when the tile holds b's columns as its rows, as a product with keys (q @ k^T) wants
// them: b[0] has the columns tile[row .. row + 7], b[1] tile[row + 8 .. row + 15], over K = the tile's
// columns col .. col + 15. Matrices (+0, +0), (+0, +8), (+8, +0), (+8, +8).
template <int STRIDE>
__device__ __forceinline__ void load_b_transposed(unsigned b[2][2], const bf16 (*tile)[STRIDE], int row, int col,
                                                  Lane lane) {
  load_matrices<false>(b[0][0], b[0][1], b[1][0], b[1][1],
                       &tile[row + lane.id % 8 + 8 * (lane.id / 16)][col + 8 * (lane.id / 8 % 2)]);
}
// a = the 16 x 16 matrix whose columns 0-7 are the sums `left` and 8-15 the sums `right`, in bf16
__device__ __forceinline__ void a_from_sums(unsigned a[4], const float left[4], const float right[4]) {
  a[0] = pair(left[0], left[1]);
  a[1] = pair(left[2], left[3]);
  a[2] = pair(right[0], right[1]);
  a[3] = pair(right[2], right[3]);
}
