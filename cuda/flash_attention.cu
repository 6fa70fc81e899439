// Causal attention that never holds the [T, T] scores (FlashAttention, Dao et al. 2022, with the split of
// work of FlashAttention-2, Dao 2023). cuda/flash_attention.py is the reference: the same recurrence
// over blocks of keys in NumPy, and the formulas.
//
// q, k, v, out and their gradients: [B*H, T, HEAD] bf16 matrices, one per head, wherever a Layout puts
// them (q, k, v and their gradients share one, out and grad_out another: a packed qkv [B, T, 3, H, HEAD]
// is read in place, out written as [B, T, H, HEAD]); lse and delta: [B*H, T] float32, contiguous.
// A block of WARPS warps takes BLOCK rows (queries in the forward and in dq, keys in dk and dv), 16 rows
// per warp, holds them in registers, and walks over the other side in tiles of BLOCK rows staged in
// shared memory, the next tile's copies in flight during the products on this one. Every product runs on
// the tensor cores (tensor_cores.cuh) with float32 sums: on Hopper (sm_90a) as wgmma, the block's four warps
// one warpgroup that multiplies its 64 rows at once, reading the staged tile directly; elsewhere as
// mma.sync, each warp its 16 rows, the tile's pieces fetched by ldmatrix. Both leave the sums in one
// layout: a lane holds, of each 16-row piece, rows g and g + 8 (g = lane / 4), so a row's sums are spread
// over the 4 lanes of a quad, which warp_max(value, 4) and warp_sum(value, 4) reduce. Only the diagonal
// tile (and the tile past T) is masked; the blocks with the most tiles start first, so the short ones fill
// the last wave.
#include "common.cuh"
#include "tensor_cores.cuh"
#include "async_copy.cuh"

// -D defines (build.py's compile_options) from cuda/flash_attention.py, which sizes the grids with them.
#if !defined(BLOCK) || !defined(WARPS)
#error "flash_attention.cu's constants come from cuda/flash_attention.py: compile it through minimoe.cuda.build"
#endif
static_assert(BLOCK == 16 * WARPS, "a warp per 16 rows of the block");
static_assert(BLOCK == 64 && WARPS == 4, "wgmma: the block is one warpgroup, its products 64 x 64");

using Tile = SwizzledTile<BLOCK>;  // BLOCK rows of up to 64 bf16 (HEAD <= 64), 8 KB

// Where the matrices of an operand lie: row t of head y (= batch * heads + head) at element
// y / heads * batch + y % heads * head + t * row. Contiguous [B*H, T, HEAD]: row HEAD, batch T * HEAD
// (heads 1); q of a packed qkv [B, T, 3, H, HEAD]: row 3 * H * HEAD, head HEAD, batch T * row. The
// kernels take the strides as plain arguments (LAYOUTS below) and make their Layouts of them.
struct Layout {
  long long row, head, batch;
  int heads;
  __device__ long long offset(long long y) const { return y / heads * batch + y % heads * head; }
};
#define LAYOUT_ARGUMENTS                                                                                  \
  long long in_row, long long in_head, long long in_batch, int in_heads, long long out_row, long long out_head, \
      long long out_batch, int out_heads
#define LAYOUTS                                                  \
  const Layout inputs{in_row, in_head, in_batch, in_heads};       \
  const Layout outputs{out_row, out_head, out_batch, out_heads}

// tile = rows first .. first + BLOCK - 1 of one head's matrix (rows `row` elements apart), zeros past T:
// the copies are issued (async_copy.cuh), all of a thread's at once; the caller commits and waits for them.
// A thread copies the same places of every tile, a fixed number of passes over it: where a pass covers whole
// rows (HEAD of 16, 32 or 64), a thread's column is the same in each and its row moves on by the pass's rows,
// so that its addresses are one pointer plus multiples of one stride.
template <int HEAD>
__device__ void stage(Tile& tile, const bf16* __restrict__ matrix, long long row, int first, int length) {
  constexpr unsigned VECTORS = HEAD / 8, THREADS = WARPS * 32, PASSES = BLOCK * VECTORS / THREADS;  // 16 bytes: 8 bf16
  static_assert(BLOCK * VECTORS % THREADS == 0, "every thread copies as many vectors");
  const bf16* first_row = matrix + first * row;
#pragma unroll
  for (unsigned pass = 0; pass < PASSES; ++pass) {
    unsigned r, c;
    if constexpr (THREADS % VECTORS == 0) {
      r = threadIdx.x / VECTORS + pass * (THREADS / VECTORS);
      c = threadIdx.x % VECTORS * 8;
    } else {
      r = (threadIdx.x + pass * THREADS) / VECTORS;
      c = (threadIdx.x + pass * THREADS) % VECTORS * 8;
    }
    const bool real = first + (int)r < length;
    copy_async(element(tile, r, c), real ? first_row + r * row + c : matrix, real);
  }
}

// The warp's 16 rows row0 .. row0 + 15 of a staged tile as the `a` of products over HEAD, kept in registers
// for the whole kernel: the block's own rows (queries in the forward and in dq, keys and values in dk, dv).
template <int HEAD>
__device__ void load_rows(unsigned rows[HEAD / 16][4], const Tile& tile, int row0, Lane lane) {
#pragma unroll
  for (int kk = 0; kk < HEAD / 16; ++kk) load_a(rows[kk], tile, row0, 16 * kk, lane);
}

// The mma.sync form of the two products below: sums [16, N] += a [16, K] @ b, a the warp's K / 16 fragments in
// registers, b [K, N] read from a staged tile: one that holds b^T (TRANSPOSED: rows_times_rows' rows of k,
// v, q or dout, whose product is over their width) or b itself (weights_times_rows' tiles, whose product is
// over their rows).
template <int K, int N, bool TRANSPOSED>
__device__ __forceinline__ void mma_times_tile(float (&sums)[N / 8][4], const unsigned a[K / 16][4], const Tile& b,
                                               Lane lane) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk)
#pragma unroll
    for (int n = 0; n < N / 16; ++n) {
      unsigned columns[2][2];
      if constexpr (TRANSPOSED)
        load_b_transposed(columns, b, 16 * n, 16 * kk, lane);
      else
        load_b(columns, b, 16 * kk, 16 * n, lane);
      mma_16x8x16(sums[2 * n], a[kk], columns[0]);
      mma_16x8x16(sums[2 * n + 1], a[kk], columns[1]);
    }
}

// sums [16, BLOCK] = rows @ b^T: the warp's 16 rows (load_rows) against all BLOCK rows of the tile b, a
// product over HEAD. Scores q k^T (and k q^T), and the gradients' dout v^T (and v dout^T).
// sums [16, HEAD] += weights [16, BLOCK] @ b: weights in registers, as rows_times_rows leaves its sums
// (rounded to bf16 on the way), times all BLOCK rows of the tile b. Probabilities times values, and the
// gradients' p^T dout, ds k, ds^T q.
// On Hopper each is one group of wgmma, b read from the tile where it lies (HEAD = 64 for the second: its
// products are 64 columns wide), and runs on after the call returns, until products_done (below); the
// mma.sync forms finish before they return. weights_times_rows leaves the weights, in bf16 as the products'
// a, in `fragments`, which the caller keeps until products_done: wgmma reads them after the issue.
template <int HEAD>
__device__ void rows_times_rows(float (&sums)[BLOCK / 8][4], const unsigned rows[HEAD / 16][4], const Tile& b,
                                Lane lane) {
#if WGMMA
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < HEAD / 16; ++kk)
    wgmma_64x64x16<false>(sums, rows[kk], tile_descriptor(b, 0, 16 * kk), kk > 0);
  wgmma_commit();
#else
#pragma unroll
  for (int n = 0; n < BLOCK / 8; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) sums[n][i] = 0.0f;
  mma_times_tile<HEAD, BLOCK, true>(sums, rows, b, lane);
#endif
}

template <int HEAD>
__device__ void weights_times_rows(float (&sums)[HEAD / 8][4], const float weights[BLOCK / 8][4],
                                   unsigned (&fragments)[BLOCK / 16][4], const Tile& b, Lane lane) {
#pragma unroll
  for (int kt = 0; kt < BLOCK / 16; ++kt) a_from_sums(fragments[kt], weights[2 * kt], weights[2 * kt + 1]);
#if WGMMA
  if constexpr (HEAD == 64) {
    keep(sums);
    wgmma_fence();
#pragma unroll
    for (int kt = 0; kt < BLOCK / 16; ++kt)
      wgmma_64x64x16<true>(sums, fragments[kt], tile_descriptor(b, 16 * kt, 0), true);
    wgmma_commit();
  } else
#endif
  {
    mma_times_tile<BLOCK, HEAD, false>(sums, fragments, b, lane);
#if WGMMA
    wgmma_commit();  // an empty group: products_done counts this product as one too
#endif
  }
}

// Wait for the products issued (all but the PENDING latest: they finish in order), hand their sums back to
// the compiler as written and release their fragments; nothing to wait for with mma.sync. The block's own
// rows (load_rows) go through it too, at the end of each tile: the `a` of every rows_times_rows, they must
// stay in their registers from one tile to the next (keep in tensor_cores.cuh says why this is needed).
template <int PENDING, class... Registers> __device__ __forceinline__ void products_done(Registers&... registers) {
#if WGMMA
  wgmma_wait<PENDING>();
  (keep(registers), ...);
#endif
}

// The lane's place in sums [16, N] of the warp's rows: piece i of column group n is row `row0 + g + 8 (i / 2)`
// and column `8 n + 2 q + i % 2`.
__device__ __forceinline__ int sum_row(int row0, int i, Lane lane) { return row0 + lane.g + 8 * (i / 2); }
__device__ __forceinline__ int sum_column(int n, int i, Lane lane) { return 8 * n + 2 * lane.q + i % 2; }

// Stores the warp's rows of sums [16, HEAD] times `factor` (or divided by the row's divisor) into rows
// first + row of one head's matrix (rows `stride` elements apart), those before T.
template <int HEAD>
__device__ void store_rows(bf16* __restrict__ matrix, long long stride, const float sums[HEAD / 8][4], int first,
                           int row0, int length, const float factor[2], Lane lane) {
#pragma unroll
  for (int n = 0; n < HEAD / 8; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = first + sum_row(row0, i, lane);
      if (row < length) matrix[row * stride + sum_column(n, i, lane)] = from_float<bf16>(sums[n][i] * factor[i / 2]);
    }
}

// The walk over the other side's tiles, shared by the three kernels: two stages of two tiles each in
// shared memory, the next stage's copies in flight while the warps work on this one. Before the walk the
// block's own rows go through stage 1 into registers (load_rows), and the first tiles into stage 0.
//   own rows -> stage 1, commit; first tiles -> stage 0, commit; wait_copies<1>; sync; load_rows
//   per tile: sync (every warp done with the other stage); next tiles -> other stage, commit;
//             wait for this stage; sync; products
using Stages = Tile[2][2];

// Issue the copies of two tiles, rows first .. first + BLOCK - 1 of two matrices, into one stage, as one group.
template <int HEAD>
__device__ void stage_pair(Tile (&tiles)[2], const bf16* first_matrix, long long first_row,
                           const bf16* second_matrix, long long second_row, int first, int length) {
  stage<HEAD>(tiles[0], first_matrix, first_row, first, length);
  stage<HEAD>(tiles[1], second_matrix, second_row, first, length);
  commit_copies();
}

// Wait for this stage's copies (and with `next`, not for the group issued after them). wgmma reads shared
// memory through the async proxy, which sees a thread's copies only after its fence.proxy.async.
__device__ __forceinline__ void wait_for_stage(bool next) {
  if (next)
    wait_copies<1>();
  else
    wait_copies<0>();
#if WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
  __syncthreads();
}

// The scores go through exp2 rather than exp: exp(x) = exp2(x log2 e), so scale log2(e) is folded into the
// one multiply the scores take anyway, and the running max and lse live in log2 units inside the kernels.
constexpr float LOG2E = 1.4426950408889634f, LN2 = 0.6931471805599453f;

// Only the diagonal tile (and the last, past T) needs a mask: the functions that apply it take it as a template
// argument, and the kernels call the two compiled copies, so that the other tiles run none of its comparisons.

// The running max's part of one tile in the forward: each row's max over its scores s, the keys past the query
// set to -inf first where DIAGONAL (a query sees the keys up to itself: key 0 always, so no row is all -inf).
template <bool DIAGONAL>
__device__ __forceinline__ void tile_max_of(float (&tile_max)[2], float s[BLOCK / 8][4], int row0, Lane lane) {
#pragma unroll
  for (int n = 0; n < BLOCK / 8; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (DIAGONAL && sum_column(n, i, lane) > sum_row(row0, i, lane)) s[n][i] = -infinity();
      tile_max[i / 2] = fmaxf(tile_max[i / 2], s[n][i]);
    }
}

// out = softmax(scale q k^T, causal) v, and lse = each row's log-sum-exp of its scaled scores. Block
// (head, query block), the last query blocks (the most keys) first. The key tiles run from the first to the
// diagonal one (the last that a query of the block can see; the only one with keys past a query); for
// each, the online softmax: the running max m, the running sum l of exp(s - m) and the running out acc,
// rescaled by exp(m_old - m_new) whenever the max grows.
template <int HEAD>
__global__ void __launch_bounds__(WARPS * 32)
    flash_attention_forward(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                            bf16* __restrict__ out, float* __restrict__ lse, int length, float scale,
                            LAYOUT_ARGUMENTS) {
  LAYOUTS;
  __shared__ __align__(1024) Stages tiles;  // [stage][keys, values]
  const Lane lane;
  const int row0 = 16 * (threadIdx.x / 32), first_query = (gridDim.y - 1 - blockIdx.y) * BLOCK;
  const long long head = blockIdx.x, offset = inputs.offset(head);
  stage<HEAD>(tiles[1][0], q + offset, inputs.row, first_query, length);
  commit_copies();
  stage_pair<HEAD>(tiles[0], k + offset, inputs.row, v + offset, inputs.row, 0, length);
  wait_for_stage(true);
  unsigned q_rows[HEAD / 16][4];
  load_rows<HEAD>(q_rows, tiles[1][0], row0, lane);
  const float scale_log2 = scale * LOG2E;
  float row_max[2] = {-infinity(), -infinity()}, row_sum[2] = {0.0f, 0.0f};  // rows g and g + 8, log2 units
  float acc[HEAD / 8][4] = {};
  for (int first_key = 0, now = 0; first_key <= first_query; first_key += BLOCK, now ^= 1) {
    __syncthreads();  // every warp is done with the other stage
    const bool next = first_key + BLOCK <= first_query;
    if (next) stage_pair<HEAD>(tiles[now ^ 1], k + offset, inputs.row, v + offset, inputs.row, first_key + BLOCK, length);
    wait_for_stage(next);
    float s[BLOCK / 8][4];
    rows_times_rows<HEAD>(s, q_rows, tiles[now][0], lane);
    products_done<0>(s);
    float tile_max[2] = {-infinity(), -infinity()};  // of the unscaled scores: scale > 0 keeps their order
    if (first_key == first_query)
      tile_max_of<true>(tile_max, s, row0, lane);
    else
      tile_max_of<false>(tile_max, s, row0, lane);
    float rescale[2], tile_sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float new_max = fmaxf(row_max[r], warp_max(tile_max[r], 4) * scale_log2);
      rescale[r] = exp2f(row_max[r] - new_max);  // 0 on the first tile (m_old = -inf)
      row_max[r] = new_max;
    }
#pragma unroll
    for (int n = 0; n < BLOCK / 8; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // the scale and the max in one multiply-add
        s[n][i] = exp2f(s[n][i] * scale_log2 - row_max[i / 2]);
        tile_sum[i / 2] += s[n][i];
      }
#pragma unroll
    for (int r = 0; r < 2; ++r) row_sum[r] = row_sum[r] * rescale[r] + warp_sum(tile_sum[r], 4);
#pragma unroll
    for (int n = 0; n < HEAD / 8; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[n][i] *= rescale[i / 2];
    unsigned p_fragments[BLOCK / 16][4];
    weights_times_rows<HEAD>(acc, s, p_fragments, tiles[now][1], lane);  // acc += exp(s - m) v
    products_done<0>(acc, p_fragments, q_rows);
  }
  const float inverse[2] = {1.0f / row_sum[0], 1.0f / row_sum[1]};
  store_rows<HEAD>(out + outputs.offset(head), outputs.row, acc, first_query, row0, length, inverse, lane);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = first_query + row0 + lane.g + 8 * r;
    if (lane.q == 0 && row < length) lse[head * length + row] = (row_max[r] + log2f(row_sum[r])) * LN2;
  }
}

// The probabilities p = exp(scale s - lse[query]) of the scores s (in place), 0 where the key is past the
// query or the query past T (only where MASKED: the diagonal tile and the last); the warp's rows are queries
// (transposed = false) or keys (true). lse in log2 units.
template <bool MASKED>
__device__ __forceinline__ void probabilities(float s[BLOCK / 8][4], int first_row, int row0, int first_column,
                                              bool transposed, int length, float scale_log2, const float* row_lse,
                                              const float* column_lse, Lane lane) {
#pragma unroll
  for (int n = 0; n < BLOCK / 8; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = first_row + sum_row(row0, i, lane), column = first_column + sum_column(n, i, lane);
      const int query = transposed ? column : row, key = transposed ? row : column;
      const float lse = transposed ? column_lse[sum_column(n, i, lane)] : row_lse[i / 2];
      const float p = exp2f(s[n][i] * scale_log2 - lse);
      s[n][i] = !MASKED || (key <= query && query < length) ? p : 0.0f;
    }
}

// The scores' gradients ds = p (dp - delta[query]) from the probabilities' dp (in place).
__device__ __forceinline__ void score_gradients(float dp[BLOCK / 8][4], const float p[BLOCK / 8][4], bool transposed,
                                                const float* row_delta, const float* column_delta, Lane lane) {
#pragma unroll
  for (int n = 0; n < BLOCK / 8; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i)
      dp[n][i] = p[n][i] * (dp[n][i] - (transposed ? column_delta[sum_column(n, i, lane)] : row_delta[i / 2]));
}

// grad_k and grad_v of a block of keys: block (head, key block), the first key blocks (the most queries)
// first; the query tiles from the diagonal one to T. Per tile: p^T (keys x queries) from the saved lse,
// grad_v += p^T dout, dp^T = v dout^T, ds^T = p^T (dp^T - delta), grad_k += scale ds^T q.
template <int HEAD>
__global__ void __launch_bounds__(WARPS * 32)
    flash_attention_backward_keys(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                                  const bf16* __restrict__ grad_out, const float* __restrict__ lse,
                                  const float* __restrict__ delta, bf16* __restrict__ grad_k,
                                  bf16* __restrict__ grad_v, int length, float scale, LAYOUT_ARGUMENTS) {
  LAYOUTS;
  __shared__ __align__(1024) Stages tiles;  // [stage][queries, grad_out]
  __shared__ float lse_tile[2][BLOCK], delta_tile[2][BLOCK];  // log2 units
  const Lane lane;
  const int row0 = 16 * (threadIdx.x / 32), first_key = blockIdx.y * BLOCK;
  const long long head = blockIdx.x, offset = inputs.offset(head), out_offset = outputs.offset(head);
  // A stage's queries: q, grad_out, and their lse and delta (plain stores, seen after the stage's sync).
  const float *head_lse = lse + head * length, *head_delta = delta + head * length;
  auto stage_queries = [&](int now, int first_query) {
    stage_pair<HEAD>(tiles[now], q + offset, inputs.row, grad_out + out_offset, outputs.row, first_query, length);
    static_assert(BLOCK <= WARPS * 32, "a thread per query of the tile");
    const int i = threadIdx.x;
    if (i < BLOCK) {
      const bool real = first_query + i < length;
      lse_tile[now][i] = real ? head_lse[first_query + i] * LOG2E : 0.0f;
      delta_tile[now][i] = real ? head_delta[first_query + i] : 0.0f;
    }
  };
  stage_pair<HEAD>(tiles[1], k + offset, inputs.row, v + offset, inputs.row, first_key, length);
  stage_queries(0, first_key);
  wait_for_stage(true);
  unsigned k_rows[HEAD / 16][4], v_rows[HEAD / 16][4];
  load_rows<HEAD>(k_rows, tiles[1][0], row0, lane);
  load_rows<HEAD>(v_rows, tiles[1][1], row0, lane);
  const float scale_log2 = scale * LOG2E;
  float k_sums[HEAD / 8][4] = {}, v_sums[HEAD / 8][4] = {};
  for (int first_query = first_key, now = 0; first_query < length; first_query += BLOCK, now ^= 1) {
    __syncthreads();  // every warp is done with the other stage
    const bool next = first_query + BLOCK < length;
    if (next) stage_queries(now ^ 1, first_query + BLOCK);
    wait_for_stage(next);
    float p[BLOCK / 8][4], dp[BLOCK / 8][4];
    rows_times_rows<HEAD>(p, k_rows, tiles[now][0], lane);
    rows_times_rows<HEAD>(dp, v_rows, tiles[now][1], lane);  // on Hopper, under way during the probabilities
    products_done<1>(p);
    if (first_query == first_key || !next)
      probabilities<true>(p, first_key, row0, first_query, true, length, scale_log2, nullptr, lse_tile[now], lane);
    else
      probabilities<false>(p, first_key, row0, first_query, true, length, scale_log2, nullptr, lse_tile[now], lane);
    unsigned p_fragments[BLOCK / 16][4], ds_fragments[BLOCK / 16][4];
    weights_times_rows<HEAD>(v_sums, p, p_fragments, tiles[now][1], lane);  // under way during the score gradients
    products_done<1>(dp);
    score_gradients(dp, p, true, nullptr, delta_tile[now], lane);
    products_done<0>(v_sums, p_fragments);
    weights_times_rows<HEAD>(k_sums, dp, ds_fragments, tiles[now][0], lane);
    // before the next tile's sync, after which copies overwrite this stage
    products_done<0>(k_sums, ds_fragments, k_rows, v_rows);
  }
  const float by_scale[2] = {scale, scale}, by_one[2] = {1.0f, 1.0f};
  store_rows<HEAD>(grad_k + offset, inputs.row, k_sums, first_key, row0, length, by_scale, lane);
  store_rows<HEAD>(grad_v + offset, inputs.row, v_sums, first_key, row0, length, by_one, lane);
}

// grad_q of a block of queries: block (head, query block), the last query blocks first; the key tiles up
// to the diagonal one, as in the forward. First the block's delta[query] = sum_d grad_out[query, d]
// out[query, d], the softmax backward's term of each row, which it also writes for the key-side kernel
// (launched after it). Per tile: p from the saved lse, dp = dout v^T, ds = p (dp - delta), grad_q +=
// scale ds k. (A kernel of its own rather than atomic adds from the key blocks: the sums keep one order,
// so the gradients are the same bits from run to run.)
template <int HEAD>
__global__ void __launch_bounds__(WARPS * 32)
    flash_attention_backward_queries(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                     const bf16* __restrict__ v, const bf16* __restrict__ grad_out,
                                     const bf16* __restrict__ out, const float* __restrict__ lse,
                                     float* __restrict__ delta, bf16* __restrict__ grad_q, int length, float scale,
                                     LAYOUT_ARGUMENTS) {
  LAYOUTS;
  __shared__ __align__(1024) Stages tiles;  // [stage][keys, values]
  const Lane lane;
  const int row0 = 16 * (threadIdx.x / 32), first_query = (gridDim.y - 1 - blockIdx.y) * BLOCK;
  const long long head = blockIdx.x, offset = inputs.offset(head);
  stage_pair<HEAD>(tiles[1], q + offset, inputs.row, grad_out + outputs.offset(head), outputs.row, first_query,
                   length);
  stage_pair<HEAD>(tiles[0], k + offset, inputs.row, v + offset, inputs.row, 0, length);
  float row_lse[2], row_delta[2];  // lse in log2 units
#pragma unroll
  for (int r = 0; r < 2; ++r) {  // the quad of lanes that holds a row's sums shares its delta's 16-byte pieces
    const int row = first_query + row0 + lane.g + 8 * r;
    const long long start = outputs.offset(head) + row * outputs.row;
    float sum = 0.0f;
    for (int d = 8 * lane.q; d < HEAD && row < length; d += 32) {
      float g[8], o[8];
      Row<bf16, true>::load(grad_out + start, d, g);
      Row<bf16, true>::load(out + start, d, o);
#pragma unroll
      for (int j = 0; j < 8; ++j) sum += g[j] * o[j];
    }
    row_delta[r] = warp_sum(sum, 4);
    row_lse[r] = row < length ? lse[head * length + row] * LOG2E : 0.0f;
    if (lane.q == 0 && row < length) delta[head * length + row] = row_delta[r];
  }
  wait_for_stage(true);
  unsigned q_rows[HEAD / 16][4], grad_out_rows[HEAD / 16][4];
  load_rows<HEAD>(q_rows, tiles[1][0], row0, lane);
  load_rows<HEAD>(grad_out_rows, tiles[1][1], row0, lane);
  const float scale_log2 = scale * LOG2E;
  float q_sums[HEAD / 8][4] = {};
  for (int first_key = 0, now = 0; first_key <= first_query; first_key += BLOCK, now ^= 1) {
    __syncthreads();  // every warp is done with the other stage
    const bool next = first_key + BLOCK <= first_query;
    if (next) stage_pair<HEAD>(tiles[now ^ 1], k + offset, inputs.row, v + offset, inputs.row, first_key + BLOCK, length);
    wait_for_stage(next);
    float p[BLOCK / 8][4], dp[BLOCK / 8][4];
    rows_times_rows<HEAD>(p, q_rows, tiles[now][0], lane);
    rows_times_rows<HEAD>(dp, grad_out_rows, tiles[now][1], lane);  // on Hopper, under way during the next line
    products_done<1>(p);
    if (first_key == first_query)
      probabilities<true>(p, first_query, row0, first_key, false, length, scale_log2, row_lse, nullptr, lane);
    else
      probabilities<false>(p, first_query, row0, first_key, false, length, scale_log2, row_lse, nullptr, lane);
    products_done<0>(dp);
    score_gradients(dp, p, false, row_delta, nullptr, lane);
    unsigned ds_fragments[BLOCK / 16][4];
    weights_times_rows<HEAD>(q_sums, dp, ds_fragments, tiles[now][0], lane);
    products_done<0>(q_sums, ds_fragments, q_rows, grad_out_rows);
  }
  const float by_scale[2] = {scale, scale};
  store_rows<HEAD>(grad_q + offset, inputs.row, q_sums, first_query, row0, length, by_scale, lane);
}
