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

// Two floats rounded to bf16 as common.cuh's from_float rounds them (to nearest, ties to even; a NaN becomes
// 0x7fff) and packed, `low` in the low half, in one instruction: the tensor-core kernels round every product's
// weights this way.
__device__ __forceinline__ unsigned pair(float low, float high) {
  unsigned packed;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(packed) : "f"(high), "f"(low));  // the first source: the high half
  return packed;
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

// Where the loads find element (row, col) of a tile in shared memory: a row-major bf16 array with rows of
// STRIDE elements, each row 16-byte aligned (STRIDE a multiple of 8, the tile aligned), or a SwizzledTile
// (below). The columns asked for are a multiple of 8.
template <int ROWS, int STRIDE>
__device__ __forceinline__ const bf16* element(const bf16 (&tile)[ROWS][STRIDE], int row, int col) {
  return &tile[row][col];
}

// A tile of ROWS rows of up to 64 bf16, 128 bytes a row, whose 16-byte pieces are permuted within their row:
// piece p of row r lies at p ^ (r % 8). ldmatrix's eight rows of one piece then fall in eight different
// banks without padding, and it is the layout that wgmma's 128-byte swizzle reads (below): the hardware
// applies the same XOR to address bits 4-6 with bits 7-9, so the tile must be 1024-byte aligned.
template <int ROWS> struct SwizzledTile {
  bf16 data[ROWS * 64];
};
template <int ROWS>
__device__ __forceinline__ const bf16* element(const SwizzledTile<ROWS>& tile, int row, int col) {
  return &tile.data[row * 64 + ((col / 8) ^ (row % 8)) * 8 + col % 8];
}
template <int ROWS> __device__ __forceinline__ bf16* element(SwizzledTile<ROWS>& tile, int row, int col) {
  return const_cast<bf16*>(element(static_cast<const SwizzledTile<ROWS>&>(tile), row, col));
}

// a = tile[row .. row + 15][col .. col + 15]: matrices (rows +0, cols +0), (+8, +0), (+0, +8), (+8, +8).
template <class Tile>
__device__ __forceinline__ void load_a(unsigned a[4], const Tile& tile, int row, int col, Lane lane) {
  load_matrices<false>(a[0], a[1], a[2], a[3],
                       element(tile, row + lane.id % 8 + 8 * (lane.id / 8 % 2), col + 8 * (lane.id / 16)));
}
// b of two products side by side, b[0] columns col .. col + 7 and b[1] columns col + 8 .. col + 15, over
// K rows row .. row + 15: the tile holds b as it is (K rows, N columns); the matrices as load_a's,
// transposed.
template <class Tile>
__device__ __forceinline__ void load_b(unsigned b[2][2], const Tile& tile, int row, int col, Lane lane) {
  load_matrices<true>(b[0][0], b[0][1], b[1][0], b[1][1],
                      element(tile, row + lane.id % 8 + 8 * (lane.id / 8 % 2), col + 8 * (lane.id / 16)));
}
// The same two b when the tile holds b's columns as its rows, as a product with keys (q @ k^T) wants
// them: b[0] has the columns tile[row .. row + 7], b[1] tile[row + 8 .. row + 15], over K = the tile's
// columns col .. col + 15. Matrices (+0, +0), (+0, +8), (+8, +0), (+8, +8).
template <class Tile>
__device__ __forceinline__ void load_b_transposed(unsigned b[2][2], const Tile& tile, int row, int col, Lane lane) {
  load_matrices<false>(b[0][0], b[0][1], b[1][0], b[1][1],
                       element(tile, row + lane.id % 8 + 8 * (lane.id / 16), col + 8 * (lane.id / 8 % 2)));
}
// a = the 16 x 16 matrix whose columns 0-7 are the sums `left` and 8-15 the sums `right`, in bf16
__device__ __forceinline__ void a_from_sums(unsigned a[4], const float left[4], const float right[4]) {
  a[0] = pair(left[0], left[1]);
  a[1] = pair(left[2], left[3]);
  a[2] = pair(right[0], right[1]);
  a[3] = pair(right[2], right[3]);
}

// Hopper's warpgroup product, wgmma (PTX's wgmma.mma_async, sm_90a: compiled where NVRTC's target is sm_90a,
// which build.py chooses on such a device for the files registered as architecture-specific). The four
// warps of a warpgroup (128 threads) multiply together, sums [64 x 64] = a [64 x 16] @ b [16 x 64] (+ sums):
//   a: from registers, warp w holding rows 16 w .. 16 w + 15 as mma_16x8x16's a (so a_from_sums and
//      load_a make it);
//   b: read by the tensor cores themselves from a SwizzledTile, through a descriptor of its address;
//   sums: warp w's rows, as eight mma_16x8x16 sums side by side (sums[n] = columns 8 n .. 8 n + 7).
// The products run asynchronously:
//   keep(sums); wgmma_fence();  wgmma_64x64x16(...) ...;  wgmma_commit();   // one group, issued
//   ... other work, which touches neither those sums nor the a registers ...
//   wgmma_wait<N>(); keep(sums); keep(a);   // every group but the N latest has finished; the sums written
// keep(sums) tells the compiler that the sums change there, so that it moves no use of them across the
// fence or the wait. keep(a) is a real instruction, an identity byte permute of each register of a: ptxas
// (CUDA 13) freed the registers of an a held across a loop (flash attention's own rows) once the
// iteration's last wgmma had issued, and filled them with other values (seen in its SASS: the next
// iteration's product read the previous one's probabilities); an empty asm never reaches ptxas, and the
// permute keeps the registers live up to the wait.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define WGMMA 1

// The descriptor of 16 rows x 64 columns of a SwizzledTile starting at element (row, col), row a multiple of 8
// (where the swizzle's pattern starts over) and col of 8: bits 0-13 the address / 16, 16-29 the leading byte
// offset / 16 (unused by this layout), 32-45 the stride byte offset / 16 (1024: from one group of 8 rows to the
// next), 62-63 the swizzle (1: 128 bytes). b held as it is (K rows, N columns; "MN-major") starts at row 16 k
// of the tile; b held transposed (N rows, K columns; "K-major", as rows_times_rows reads keys) at column 16 k
// of row 0, 32 bytes on. The tile's descriptor plus the start's offset / 16: a CTA's shared addresses are
// below 256 KB, so the sum stays within the 14 bits, and the compiler works the tile's part out once.
template <int ROWS>
__device__ __forceinline__ unsigned long long tile_descriptor(const SwizzledTile<ROWS>& tile, int row, int col) {
  const unsigned long long start =
      (shared_address(tile.data) >> 4) | (1ull << 16) | ((1024ull >> 4) << 32) | (1ull << 62);
  return start + (row * 64 + col) * sizeof(bf16) / 16;
}

template <int N> __device__ __forceinline__ void keep(float (&sums)[N][4]) {
#pragma unroll
  for (int n = 0; n < N; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) asm volatile("" : "+f"(sums[n][i]));
}
template <int N> __device__ __forceinline__ void keep(unsigned (&a)[N][4]) {
#pragma unroll
  for (int n = 0; n < N; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) asm volatile("prmt.b32 %0, %0, 0, 0x3210;" : "+r"(a[n][i]));
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
// Commit the products issued since the last commit as one group (an empty group when there are none).
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int PENDING> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(PENDING) : "memory");
}

// sums = a @ b (+ sums where `accumulate`), b through its descriptor: HELD_AS_IS, b is held as it is
// (MN-major), else transposed (K-major). (ptxas turns a known `accumulate` into the instruction's own flag.)
template <bool HELD_AS_IS>
__device__ __forceinline__ void wgmma_64x64x16(float s[8][4], const unsigned a[4], unsigned long long b,
                                               bool accumulate) {
  asm volatile(
      "{\n.reg .pred accumulate;\nsetp.ne.b32 accumulate, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, accumulate, 1, 1, %38;\n}\n"
      : "+f"(s[0][0]), "+f"(s[0][1]), "+f"(s[0][2]), "+f"(s[0][3]), "+f"(s[1][0]), "+f"(s[1][1]), "+f"(s[1][2]),
        "+f"(s[1][3]), "+f"(s[2][0]), "+f"(s[2][1]), "+f"(s[2][2]), "+f"(s[2][3]), "+f"(s[3][0]), "+f"(s[3][1]),
        "+f"(s[3][2]), "+f"(s[3][3]), "+f"(s[4][0]), "+f"(s[4][1]), "+f"(s[4][2]), "+f"(s[4][3]), "+f"(s[5][0]),
        "+f"(s[5][1]), "+f"(s[5][2]), "+f"(s[5][3]), "+f"(s[6][0]), "+f"(s[6][1]), "+f"(s[6][2]), "+f"(s[6][3]),
        "+f"(s[7][0]), "+f"(s[7][1]), "+f"(s[7][2]), "+f"(s[7][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"((int)accumulate), "n"(HELD_AS_IS ? 1 : 0));
}
#else
#define WGMMA 0
#endif
