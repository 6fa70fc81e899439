// Rows grouped by expert (cuda/grouped.py is the reference and states the layout): the grouping, a linear
// layer per expert over its rows only (on CUDA cores, and for bf16 on the tensor cores), and the weighted
// combine of each row's choices.
#include "common.cuh"
#include "tensor_cores.cuh"
#include "async_copy.cuh"

// -D defines (build.py's compile_options) from cuda/grouped.py, which sizes the launches with them:
// COLUMNS and WARPS of grouped_linear, MMA_COLUMNS, MMA_WARPS and MMA_CHUNK of grouped_linear_mma.
#if !defined(COLUMNS) || !defined(WARPS) || !defined(MMA_COLUMNS) || !defined(MMA_WARPS) || !defined(MMA_CHUNK)
#error "grouped.cu's constants come from cuda/grouped.py: compile it through minimoe.cuda.build"
#endif

// One block: a counting sort of the P pairs by expert (values 0..E, E = no expert). counts [E + 1] in
// shared memory by atomics, an exclusive scan of them (offsets; each expert's count also added to
// counter[e] when a counter is given), then each pair's place: its expert's offset plus the number of
// earlier pairs of the same expert (a loop over them: stable and deterministic).
extern "C" __global__ void group_rows(const long long* __restrict__ experts, int pairs, int num_experts,
                                      long long* __restrict__ order, long long* __restrict__ rank,
                                      long long* __restrict__ offsets, long long* __restrict__ counter) {
  extern __shared__ long long start[];  // [E + 1]: counts, then each expert's first place
  for (int e = threadIdx.x; e <= num_experts; e += blockDim.x) start[e] = 0;
  __syncthreads();
  for (int p = threadIdx.x; p < pairs; p += blockDim.x) atomicAdd((unsigned long long*)&start[experts[p]], 1ull);
  __syncthreads();
  if (threadIdx.x == 0) {
    long long sum = 0;
    for (int e = 0; e <= num_experts; ++e) {
      const long long count = start[e];
      if (counter && e < num_experts) counter[e] += count;
      start[e] = sum;
      offsets[e] = sum;  // offsets[E]: how many pairs have a real expert
      sum += count;
    }
  }
  __syncthreads();
  for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
    const long long expert = experts[p];
    long long place = start[expert];
    for (int q = 0; q < p; ++q) place += experts[q] == expert;
    rank[p] = place;
    order[place] = p;
  }
}

// A block's float32 sum for y[row, column]: with K split over blocks (gridDim.z > 1) its slice's partial
// sum, for grouped_linear_finish; else the finished value, (+ bias[e]) (GELU).
template <typename T>
__device__ __forceinline__ void store_sum(float value, long long row, int column, int expert, const T* bias, T* y,
                                          float* partial, long long rows_total, int features, int gelu) {
  const long long out_index = row * features + column;
  if (gridDim.z > 1) {
    partial[blockIdx.z * rows_total * features + out_index] = value;
    return;
  }
  if (bias) value += to_float(bias[(long long)expert * features + column]);
  if (gelu) value = gelu_tanh(value);
  y[out_index] = from_float<T>(value);
}

// y[r] = x[source(r)] @ weight[e] (+ bias[e]) (GELU) for the rows r of expert e, source(r) = order[r] /
// choices when `order` is given (the pairs' rows, gathered on the way), else r.
//
// Block (column tile, expert, K slice) = (blockIdx.x, blockIdx.y, blockIdx.z): COLUMNS output columns, the
// K rows z * slice .. (z + 1) * slice - 1 of the expert's weight. A block whose expert has no rows returns
// before reading anything. Decode steps have few rows, so the weights' bytes are the cost, and they must
// be read by many blocks at once with many loads in flight: splitting K gives every matrix hundreds of
// blocks (the split is a function of the shapes alone, so a row's sums do not depend on the batch), and
// each lane reads 8 consecutive columns of a weight row in one 16-byte load (VEC: rows are whole 16-byte
// vectors; else element by element).
// The rows go ROWS at a time; the slice goes in chunks of CHUNK: the chunk of the rows' x is staged in
// shared memory (float), and warp w takes its quarter of the chunk: lane l holds output columns 8l ..
// 8l + 7 of the tile for every row (ROWS x 8 float32 sums in registers). The four warps' sums meet in
// shared memory in a fixed order; with one slice the block applies the bias and GELU and stores y, else
// it stores its float32 sums in partial [slices, R, N] for grouped_linear_finish.
constexpr int PER_LANE = 8, ROWS = 8, CHUNK = 256;

template <typename T, bool VEC>
__global__ void __launch_bounds__(WARPS * 32)
    grouped_linear(const T* __restrict__ x, const long long* __restrict__ order, int choices,
                   const long long* __restrict__ offsets, const T* __restrict__ weight, const T* __restrict__ bias,
                   T* __restrict__ y, float* __restrict__ partial, long long rows_total, int width, int features,
                   int slice, int gelu) {
  using R = Row<T, VEC>;
  __shared__ float staged[ROWS][CHUNK];
  __shared__ float sums_of[WARPS][ROWS][COLUMNS];
  const int expert = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const long long first_row = offsets[expert], end_row = offsets[expert + 1];
  if (first_row == end_row) return;
  const int first_column = blockIdx.x * COLUMNS, column = first_column + PER_LANE * lane;
  const int k_begin = blockIdx.z * slice, k_end = min(width, k_begin + slice);
  const T* w = weight + (long long)expert * width * features;
  for (long long row0 = first_row; row0 < end_row; row0 += ROWS) {
    const int rows = (int)min((long long)ROWS, end_row - row0);
    float sums[ROWS][PER_LANE] = {};
    for (int chunk = k_begin; chunk < k_end; chunk += CHUNK) {
      const int chunk_width = min(CHUNK, k_end - chunk);
      __syncthreads();  // the previous chunk's reads of `staged` are done
      for (int i = threadIdx.x; i < ROWS * CHUNK; i += blockDim.x) {
        const int r = i / CHUNK, c = i % CHUNK;
        float value = 0.0f;
        if (r < rows && c < chunk_width) {
          const long long source = order ? order[row0 + r] / choices : row0 + r;
          value = to_float(x[source * width + chunk + c]);
        }
        staged[r][c] = value;
      }
      __syncthreads();
      const int quarter = (chunk_width + WARPS - 1) / WARPS;
      const int begin = warp * quarter, end = min(chunk_width, begin + quarter);
#pragma unroll 4
      for (int kk = begin; kk < end; ++kk) {
        const T* w_row = w + (long long)(chunk + kk) * features;
        float w_values[PER_LANE];
        if (VEC && column < features) {
#pragma unroll
          for (int j = 0; j < PER_LANE; j += R::per_load) R::load(w_row, column + j, w_values + j);
        } else {
#pragma unroll
          for (int j = 0; j < PER_LANE; ++j) w_values[j] = column + j < features ? to_float(w_row[column + j]) : 0.0f;
        }
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          const float x_value = staged[r][kk];
#pragma unroll
          for (int j = 0; j < PER_LANE; ++j) sums[r][j] += x_value * w_values[j];
        }
      }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int j = 0; j < PER_LANE; ++j) sums_of[warp][r][PER_LANE * lane + j] = sums[r][j];
    __syncthreads();
    for (int i = threadIdx.x; i < rows * COLUMNS; i += blockDim.x) {
      const int r = i / COLUMNS, c = i % COLUMNS, out_column = first_column + c;
      if (out_column >= features) continue;
      float value = 0.0f;
      for (int v = 0; v < WARPS; ++v) value += sums_of[v][r][c];
      store_sum(value, row0 + r, out_column, expert, bias, y, partial, rows_total, features, gelu);
    }
  }
}

// The same product on the tensor cores, for bf16 (the GPU engine's type) when K and N are multiples of 8
// (rows of whole 16-byte vectors). At 16 to 64 rows per expert (decode batches of 8 to 256) the CUDA-core
// kernel above spends its time on multiply-adds; one mma_16x8x16 (tensor_cores.cuh) does 2048 of them in
// one instruction.
//
// Block (column tile, expert, K slice) as above, with MMA_COLUMNS = 64 columns: warp w owns the 16
// columns 16w .. 16w + 15 of the tile (two 8-column halves). The block takes its expert's rows MMA_ROWS =
// 64 at a time, each warp holding the float32 sums of its columns for every 16 of them. Per chunk of
// MMA_CHUNK rows of K, the block stages the rows' x [64, MMA_CHUNK] and the weight's [MMA_CHUNK, 64] in
// shared memory (zeros past the rows, the slice and the columns, which add nothing), then each warp
// multiplies its strip of the weight by every tile of 16 rows. A row's sums depend on its own x and on the
// fixed tiling of K alone, never on the other rows of its tile: results do not depend on the batch.
//
// The block's time is memory latency, not arithmetic, so the chunks are copied by cp.async (async_copy.cuh)
// into two buffers: the next chunk's copies are in flight while the tensor cores multiply this one. The
// pairs' source rows are looked up once per 64 rows, not once per load.
constexpr int MMA_ROWS = 64, TILE = 16, VECTOR = 8;  // TILE: the rows and K of one product; VECTOR: bf16 per 16 bytes
constexpr int PAD = 8;  // a row of a staged tile is 16 bytes longer: its rows start in different banks
constexpr int MMA_THREADS = MMA_WARPS * 32;
static_assert(MMA_WARPS * TILE == MMA_COLUMNS && MMA_CHUNK % TILE == 0, "a warp per 16 columns; whole products of K");

struct Staged {  // one chunk in shared memory
  bf16 x[MMA_ROWS][MMA_CHUNK + PAD];
  bf16 w[MMA_CHUNK][MMA_COLUMNS + PAD];
};

// Start copying the chunk at K rows k0 .. into `staged`: the `rows` rows of x are x + source[r] * width
// (source in shared memory); w_tile points at K row 0 of the tile's first column, columns_left columns
// on. Zeros past the rows, the slice and the columns.
__device__ __forceinline__ void stage_chunk(Staged& staged, const bf16* x, const long long* source, int rows,
                                            const bf16* w_tile, int k0, int k_end, int width, int columns_left,
                                            int features) {
  for (int i = threadIdx.x; i < MMA_ROWS * MMA_CHUNK / VECTOR; i += MMA_THREADS) {
    const int r = i / (MMA_CHUNK / VECTOR), c = i % (MMA_CHUNK / VECTOR) * VECTOR;
    const bool real = r < rows && k0 + c < k_end;
    copy_async(&staged.x[r][c], real ? x + source[r] * width + k0 + c : x, real);
  }
  for (int i = threadIdx.x; i < MMA_CHUNK * MMA_COLUMNS / VECTOR; i += MMA_THREADS) {
    const int r = i / (MMA_COLUMNS / VECTOR), c = i % (MMA_COLUMNS / VECTOR) * VECTOR;
    const bool real = k0 + r < k_end && c < columns_left;
    copy_async(&staged.w[r][c], real ? w_tile + (long long)(k0 + r) * features + c : w_tile, real);
  }
  commit_copies();
}

__global__ void __launch_bounds__(MMA_THREADS, 6)  // six blocks to an SM, as many as shared memory holds
    grouped_linear_mma(const bf16* __restrict__ x, const long long* __restrict__ order, int choices,
                       const long long* __restrict__ offsets, const bf16* __restrict__ weight,
                       const bf16* __restrict__ bias, bf16* __restrict__ y, float* __restrict__ partial,
                       long long rows_total, int width, int features, int slice, int gelu) {
  // The two staged chunks and, after the last chunk, the float32 sums share one piece of shared memory.
  __shared__ __align__(16) union {
    Staged staged[2];
    float sums[MMA_ROWS][MMA_COLUMNS + PAD];
  } tile;
  __shared__ long long source[MMA_ROWS];  // the x row of each of the 64 rows
  const int expert = blockIdx.y, warp = threadIdx.x / 32;
  const Lane lane;
  const long long first_row = offsets[expert], end_row = offsets[expert + 1];
  if (first_row == end_row) return;
  const int first_column = blockIdx.x * MMA_COLUMNS;
  const int k_begin = blockIdx.z * slice, k_end = min(width, k_begin + slice);
  const bf16* w = weight + (long long)expert * width * features + first_column;
  for (long long row0 = first_row; row0 < end_row; row0 += MMA_ROWS) {
    const int rows = (int)min((long long)MMA_ROWS, end_row - row0), row_tiles = (rows + TILE - 1) / TILE;
    __syncthreads();  // the previous rows' epilogue is done with `tile`
    for (int r = threadIdx.x; r < rows; r += MMA_THREADS) source[r] = order ? order[row0 + r] / choices : row0 + r;
    __syncthreads();
    const int columns_left = features - first_column;
    stage_chunk(tile.staged[0], x, source, rows, w, k_begin, k_end, width, columns_left, features);
    float sums[MMA_ROWS / TILE][2][4] = {};  // [tile of 16 rows][8-column half of the warp's strip][piece]
    for (int chunk = k_begin, buffer = 0; chunk < k_end; chunk += MMA_CHUNK, buffer ^= 1) {
      if (chunk + MMA_CHUNK < k_end) {  // the next chunk's copies fly while this one is multiplied
        stage_chunk(tile.staged[buffer ^ 1], x, source, rows, w, chunk + MMA_CHUNK, k_end, width, columns_left,
                    features);
        wait_copies<1>();
      } else {
        wait_copies<0>();
      }
      __syncthreads();  // every thread's copies of this chunk have landed
      const Staged& staged = tile.staged[buffer];
#pragma unroll
      for (int kk = 0; kk < MMA_CHUNK; kk += TILE) {
        unsigned strip[2][2];  // the warp's two 16 x 8 pieces of the weight at rows kk .. kk + 15
        load_b(strip, staged.w, kk, TILE * warp, lane);
#pragma unroll
        for (int t = 0; t < MMA_ROWS / TILE; ++t) {
          if (t >= row_tiles) break;
          unsigned rows_x[4];
          load_a(rows_x, staged.x, TILE * t, kk, lane);
          mma_16x8x16(sums[t][0], rows_x, strip[0]);
          mma_16x8x16(sums[t][1], rows_x, strip[1]);
        }
      }
      __syncthreads();  // every warp is done with this buffer before the next chunk but one is copied into it
    }
#pragma unroll
    for (int t = 0; t < MMA_ROWS / TILE; ++t)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = TILE * t + lane.g, c = TILE * warp + 8 * half + 2 * lane.q;
        tile.sums[r][c] = sums[t][half][0];
        tile.sums[r][c + 1] = sums[t][half][1];
        tile.sums[r + 8][c] = sums[t][half][2];
        tile.sums[r + 8][c + 1] = sums[t][half][3];
      }
    __syncthreads();
    for (int i = threadIdx.x; i < rows * MMA_COLUMNS; i += MMA_THREADS) {
      const int r = i / MMA_COLUMNS, c = i % MMA_COLUMNS, out_column = first_column + c;
      if (out_column >= features) continue;
      store_sum(tile.sums[r][c], row0 + r, out_column, expert, bias, y, partial, rows_total, features, gelu);
    }
  }
}

// y = the sum of the slices' partial sums (in slice order) (+ bias[e]) (GELU), a thread per element of
// the rows that have an expert; a row's expert found by a binary search of the offsets.
template <typename T>
__global__ void grouped_linear_finish(const float* __restrict__ partial, int slices, const long long* __restrict__ offsets,
                                      int num_experts, const T* __restrict__ bias, T* __restrict__ y,
                                      long long rows_total, int features, int gelu) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long row = i / features;
  if (row >= offsets[num_experts]) return;
  float value = 0.0f;
  for (int z = 0; z < slices; ++z) value += partial[z * rows_total * features + i];
  if (bias) {
    int low = 0, high = num_experts;  // the expert e with offsets[e] <= row < offsets[e + 1]
    while (high - low > 1) {
      const int middle = (low + high) / 2;
      if (offsets[middle] <= row) low = middle; else high = middle;
    }
    value += to_float(bias[(long long)low * features + i % features]);
  }
  if (gelu) value = gelu_tanh(value);
  y[i] = from_float<T>(value);
}

// y[i] = sum over the row's real choices j of weight[i, j] * out[rank[i k + j]]; one block per row, a
// thread per element of the row (strided), float32 sums.
template <typename T>
__global__ void combine_pairs(const T* __restrict__ out, const long long* __restrict__ rank,
                              const long long* __restrict__ expert_index, const float* __restrict__ weight,
                              T* __restrict__ y, int k, int width, int num_experts) {
  const long long row = blockIdx.x;
  for (int d = threadIdx.x; d < width; d += blockDim.x) {
    float sum = 0.0f;
    for (int j = 0; j < k; ++j) {
      const long long pair = row * k + j;
      if (expert_index[pair] < num_experts) sum += weight[pair] * to_float(out[rank[pair] * width + d]);
    }
    y[row * width + d] = from_float<T>(sum);
  }
}
