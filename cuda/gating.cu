// GPU top-k gating (cuda/gating.py is the specification and states every rule): gate_logits computes
// the gate's logits; then one launch, gate_route, does softmax, top-k, the per-expert positions, the
// capacity drop, the combine weights and the load-balancing statistics.
//
// The positions are a scan over the tokens: a token's position in its expert's buffer counts the earlier
// tokens that chose the same expert, and a second choice queues behind *all* first choices. Each block
// owns one tile of consecutive tokens; it ranks its tile's choices locally and writes its per-expert
// counts, and after a grid-wide barrier the counts are scanned over the tiles, so that every block learns
// the counts of the tiles before its own. The barrier is cooperative_groups' grid.sync(): sound because a
// cooperative launch keeps every block of the grid resident at once (cuda/gating.py sizes the grid from
// the occupancy), and the driver provides its memory, so nothing needs zeroing before the launch.
//
// Phases (B = a grid barrier), each a __device__ function named in brackets, called in this order by
// gate_route at the end of the file:
//   1. per tile: softmax and the k choices of each token (a group of lanes per token); each warp takes
//      consecutive tokens and ranks each choice column among its own earlier choices as it goes
//      [choose_and_rank]; the tile's probability sums for me, the warps' offsets in the tile (a scan
//      over their counts) [tile_sums]                                                                 B
//      (random token selection: rank the first choices in priority order instead [rank_tile]          B)
//   2. tile offsets, a scan transposed: one warp per (choice column, expert) runs over the tiles' counts
//      in order and writes each tile's exclusive prefix and the column's total (more warps add up the
//      probability sums for me) [tile_offsets]                                                        B
//      every block then reads its own tile's prefixes and the totals (each expert's load: the dropless
//      capacity [route_capacity], the second choices' queue offset)
//      (random token selection: mark the first C of each expert in priority order as kept
//      [keep_by_priority]                                                                             B
//      and rank the kept ones again in token order [rank_tile]                                        B
//      and scan their counts the same way [tile_offsets]                                              B)
//   3. per tile: position = rank in warp + the warp's offset in the tile + counts of earlier tiles (+ all
//      first choices, for second choices), -1 at or past the capacity; the weights
//      [clear_empty_slots, positions_and_weights]; the last tile's block writes the statistics
//      [write_statistics].
#include <cooperative_groups.h>

#include "common.cuh"

// The constants this file shares with its launcher are defined once, in cuda/gating.py, and arrive as
// -D defines (build.py's compile_options): GATE_TOKENS, LOGITS_THREADS, EXPERTS_PER_PASS, GRAD_TOKENS,
// GRAD_TILE, PER_LANE, STAGE_ENTRIES, ROUTE_THREADS, CHUNKS. Each is explained where it is used.
#if !defined(GATE_TOKENS) || !defined(LOGITS_THREADS) || !defined(EXPERTS_PER_PASS) || !defined(GRAD_TOKENS) || \
    !defined(GRAD_TILE) || !defined(PER_LANE) || !defined(STAGE_ENTRIES) || !defined(ROUTE_THREADS) || !defined(CHUNKS)
#error "gating.cu's constants come from cuda/gating.py: compile it through minimoe.cuda.build"
#endif

constexpr int WARP = 32;

// The gate's logits [T, E] = x [T, d] @ weight [d, E] in float32. DeepSpeed's gate casts its input to
// float32 and keeps its weight in float32; here the cast happens in registers as x is read, instead of a
// float32 copy of x being written and read back by a GEMM (E is far too narrow for the tensor cores to
// matter: reading x is the cost). A block of LOGITS_THREADS threads takes GATE_TOKENS tokens, and
// EXPERTS_PER_PASS experts at a time: thread t reads elements t, t + LOGITS_THREADS, ... of each token's
// row (coalesced), and the same weight rows serve the block's tokens; the threads' partial sums meet in
// warp_sum, then the warps' in shared memory, added in warp order. So every token's logits take the same
// sums in the same order whatever the number of tokens (inference needs a sequence's logits the same alone
// or in a batch), and even one token is spread over the whole block (a decode step of one sequence).
// `vector`: E is a multiple of 4 and the weight 16-byte aligned, so a weight row's experts load as float4.
template <typename T>
__global__ void __launch_bounds__(LOGITS_THREADS)
    gate_logits(const T* __restrict__ x, const float* __restrict__ weight, float* __restrict__ logits, int tokens,
                int width, int experts, int vector) {
  constexpr int WARPS = LOGITS_THREADS / WARP;
  __shared__ float warp_sums[WARPS][GATE_TOKENS][EXPERTS_PER_PASS];
  const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
  const long long first_token = (long long)blockIdx.x * GATE_TOKENS;
  const int rows = (int)min((long long)GATE_TOKENS, tokens - first_token);
  for (int first_expert = 0; first_expert < experts; first_expert += EXPERTS_PER_PASS) {
    float sums[GATE_TOKENS][EXPERTS_PER_PASS] = {};
    for (int i = threadIdx.x; i < width; i += LOGITS_THREADS) {
      const float* weight_row = weight + (long long)i * experts + first_expert;
      float w[EXPERTS_PER_PASS];
#pragma unroll
      for (int e = 0; e < EXPERTS_PER_PASS; e += 4) {
        if (vector && first_expert + e + 4 <= experts) {
          const float4 four = *reinterpret_cast<const float4*>(weight_row + e);
          w[e] = four.x, w[e + 1] = four.y, w[e + 2] = four.z, w[e + 3] = four.w;
        } else {
#pragma unroll
          for (int j = e; j < e + 4; ++j) w[j] = first_expert + j < experts ? weight_row[j] : 0.0f;
        }
      }
#pragma unroll
      for (int r = 0; r < GATE_TOKENS; ++r) {
        const float value = r < rows ? to_float(x[(first_token + r) * width + i]) : 0.0f;
#pragma unroll
        for (int e = 0; e < EXPERTS_PER_PASS; ++e) sums[r][e] += value * w[e];
      }
    }
    __syncthreads();  // the previous pass's warp_sums are read
#pragma unroll
    for (int r = 0; r < GATE_TOKENS; ++r)
#pragma unroll
      for (int e = 0; e < EXPERTS_PER_PASS; ++e) {
        const float sum = warp_sum(sums[r][e]);
        if (lane == 0) warp_sums[warp][r][e] = sum;
      }
    __syncthreads();
    for (int entry = threadIdx.x; entry < GATE_TOKENS * EXPERTS_PER_PASS; entry += LOGITS_THREADS) {
      const int r = entry / EXPERTS_PER_PASS, e = entry % EXPERTS_PER_PASS;
      float sum = 0.0f;
      for (int w = 0; w < WARPS; ++w) sum += warp_sums[w][r][e];
      if (r < rows && first_expert + e < experts) logits[(first_token + r) * experts + first_expert + e] = sum;
    }
  }
}

// Backward of gate_logits, in the same precision: grad_x = grad_logits @ weight^T, written in x's dtype
// (the cast done in registers, not by a float32 [T, d] copy), and the weight's gradient x^T @ grad_logits.
// gate_logits_grad_x: block b takes GRAD_TOKENS tokens and its threads stride over the d columns; each
// weight row (E floats, cached) serves all of the block's tokens.
template <typename T>
__global__ void gate_logits_grad_x(const float* __restrict__ grad_logits, const float* __restrict__ weight,
                                   T* __restrict__ grad_x, int tokens, int width, int experts) {
  const long long first_token = (long long)blockIdx.x * GRAD_TOKENS;
  const int rows = (int)min((long long)GRAD_TOKENS, tokens - first_token);
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    float sums[GRAD_TOKENS] = {};
    for (int e = 0; e < experts; ++e) {
      const float w = weight[(long long)i * experts + e];
#pragma unroll
      for (int r = 0; r < GRAD_TOKENS; ++r)
        sums[r] += r < rows ? grad_logits[(first_token + r) * experts + e] * w : 0.0f;
    }
#pragma unroll
    for (int r = 0; r < GRAD_TOKENS; ++r)
      if (r < rows) grad_x[(first_token + r) * width + i] = from_float<T>(sums[r]);
  }
}

// gate_logits_grad_weight: block (tile, column block) sums x[t, i] * grad_logits[t, e] over the tile's
// GRAD_TILE tokens for its columns i (one per thread) and EXPERTS_PER_PASS experts at a time, and writes
// partial[tile][i][e]; the caller adds the tiles up in a fixed order (no float atomics: the result
// does not depend on scheduling). The token loop is unrolled so that several loads of x are in flight.
template <typename T>
__global__ void gate_logits_grad_weight(const T* __restrict__ x, const float* __restrict__ grad_logits,
                                        float* __restrict__ partial, int tokens, int width, int experts) {
  const int tile = blockIdx.x;
  const int i = blockIdx.y * blockDim.x + threadIdx.x;
  if (i >= width) return;
  const long long first_token = (long long)tile * GRAD_TILE;
  const int rows = (int)min((long long)GRAD_TILE, tokens - first_token);
  for (int first_expert = 0; first_expert < experts; first_expert += EXPERTS_PER_PASS) {
    float sums[EXPERTS_PER_PASS] = {};
#pragma unroll 8
    for (int r = 0; r < rows; ++r) {
      const long long token = first_token + r;
      const float value = to_float(x[token * width + i]);
#pragma unroll
      for (int e = 0; e < EXPERTS_PER_PASS; ++e)
        if (first_expert + e < experts) sums[e] += value * grad_logits[token * experts + first_expert + e];
    }
#pragma unroll
    for (int e = 0; e < EXPERTS_PER_PASS; ++e)
      if (first_expert + e < experts) partial[((long long)tile * width + i) * experts + first_expert + e] = sums[e];
  }
}

// Phase 1 spreads a token's E scores over a group of `lanes` lanes (a power of two, at most 32), PER_LANE
// each, in quads of 4 consecutive experts dealt to the lanes in turn: lane m of the group holds quads
// m, m + lanes, m + 2 lanes, m + 3 lanes (expert_of). So the group's j-th 16-byte load reads 16 * lanes
// consecutive bytes of the row, whole 32-byte sectors; with 16 consecutive experts per lane each load
// would touch half of every sector and the next load the other half. A warp takes 32 / lanes tokens at
// once. Each lane loads its PER_LANE values at once (16-byte vectors where rows allow): that many loads in
// flight per lane is what keeps the memory busy. Reductions over a group are common.cuh's warp_sum /
// warp_max over `lanes` lanes, and group_argmax below.

// Phase 1 parks each choice's expert, rank and probability in shared memory for phase 3 when the tile has
// at most STAGE_ENTRIES choices (tokens * k): phase 3 then reads them there rather than from L2, and the
// outputs are written once.

// ROUTE_THREADS: the threads of a gate_route block. The launch bound caps the registers at 65536 / 512 =
// 128 per thread, so that a block always fits on an SM: the cooperative launch needs every block
// resident, and the kernel sits near that cap.

// The expert whose score lane `member` of a group holds in its slot j.
__device__ __forceinline__ int expert_of(int member, int j, int lanes) { return (j / 4 * lanes + member) * 4 + j % 4; }

// argmax over a group; ties keep the lowest expert index, as NumPy's argmax does. `logit` travels with
// the winner.
__device__ __forceinline__ void group_argmax(float& value, int& index, float& logit, int lanes) {
  for (int offset = lanes / 2; offset > 0; offset /= 2) {
    const float other_value = __shfl_xor_sync(0xffffffffu, value, offset);
    const int other_index = __shfl_xor_sync(0xffffffffu, index, offset);
    const float other_logit = __shfl_xor_sync(0xffffffffu, logit, offset);
    if (other_value > value || (other_value == value && other_index < index)) {
      value = other_value;
      index = other_index;
      logit = other_logit;
    }
  }
}

// This lane's part of a token's row of `source` ([T, E]): -inf past E and for a token past the tile
// (valid false). `vector`: E is a multiple of 4 and the rows 16-byte aligned.
__device__ __forceinline__ void load_part(float (&values)[PER_LANE], const float* source, long long token, bool valid,
                                          int experts, int member, int lanes, bool vector) {
  const float* row = source + token * experts;
#pragma unroll
  for (int j = 0; j < PER_LANE; j += 4) {
    const int first_expert = expert_of(member, j, lanes);
    if (valid && vector && first_expert + 4 <= experts) {
      const float4 four = *reinterpret_cast<const float4*>(row + first_expert);
      values[j] = four.x, values[j + 1] = four.y, values[j + 2] = four.z, values[j + 3] = four.w;
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i)
        values[j + i] = valid && first_expert + i < experts ? row[first_expert + i] : -infinity();
    }
  }
}

// The expert with the largest score, `excluded` left out, and its logit (every lane of the group gets
// both): the logit gives the chosen probability without a search of the row for it. The loop keeps the
// winning slot, not the expert, and compares against the excluded expert's slot: the fewest instructions
// per score, which is what phase 1 spends its issue slots on. Slots past E hold -inf and never win; a row
// with no finite score (not a gate's output) takes the lowest expert not excluded, so that the index
// stays in range.
__device__ __forceinline__ int group_choice(const float (&scores)[PER_LANE], const float (&logits)[PER_LANE],
                                            int experts, int member, int lanes, int excluded, float& logit) {
  // expert_of inverted by shifts and masks (lanes is a power of two; a division by it would cost ~20
  // instructions): quad q = e / 4 sits on lane q % lanes, in slots 4 (q / lanes) to 4 (q / lanes) + 3.
  const int quad = excluded >> 2, lane_bits = __ffs(lanes) - 1;
  const bool mine = excluded >= 0 && (quad & (lanes - 1)) == member;
  const int excluded_slot = mine ? (quad >> lane_bits) * 4 + (excluded & 3) : -1;
  float best = -infinity();
  int slot = -1;
  logit = -infinity();
#pragma unroll
  for (int j = 0; j < PER_LANE; ++j)
    if (scores[j] > best && j != excluded_slot) {
      best = scores[j];
      slot = j;
      logit = logits[j];
    }
  int index = slot < 0 ? experts : expert_of(member, slot, lanes);
  group_argmax(best, index, logit, lanes);
  return index < experts ? index : (excluded == 0 ? 1 : 0);
}

// Inclusive sum over lanes 0..lane of one int per lane (a Hillis-Steele scan by shuffles).
__device__ __forceinline__ int warp_inclusive_scan(int value) {
  const int lane = threadIdx.x % WARP;
  for (int offset = 1; offset < WARP; offset *= 2) {
    const int other = __shfl_up_sync(0xffffffffu, value, offset);
    if (lane >= offset) value += other;
  }
  return value;
}

// Phase 1's ranking: the choice `expert` of each group leader's token (lanes in token order) ranked among
// this warp's choices of the same expert so far; count [E] holds how many the warp has seen of each. Lanes
// with the same expert find each other with __match_any_sync; the lowest of them advances the count.
// Returns the rank on the leader lanes.
__device__ __forceinline__ int rank_in_warp(int expert, bool leader, int* count) {
  const int lane = threadIdx.x % WARP;
  const unsigned peers = __match_any_sync(0xffffffffu, leader ? expert : -1);
  const unsigned below = peers & ((1u << lane) - 1u);
  const int rank = leader ? count[expert] + __popc(below) : -1;
  __syncwarp();  // every leader has read the count
  if (leader && below == 0) count[expert] += __popc(peers);
  __syncwarp();
  return rank;
}

// Random token selection (top-1): ranks the first choices of entries [begin, end), taken in the given
// order (token = order ? order[i] : i), among the entries of the same expert; entries whose keep flag is 0
// take no part and get rank -1. Rounds of blockDim.x entries: inside a warp __match_any_sync finds the
// lanes with the same expert and the rank is the number of such lanes below; warps are offset by the
// counts of the warps before them and by the earlier rounds (a scan over the warps per expert in shared
// memory, scan [warps][E], running [E]). Writes the rank to position[token] and the tile's count per
// expert to tile_counts[e * tiles] (counts [E][tiles], tile_counts pointing at this tile's column).
__device__ void rank_tile(const long long* expert_index, const long long* order, const unsigned char* keep,
                          long long begin, long long end, int experts, long long* position, int* tile_counts,
                          int tiles, int* scan, int* running) {
  const int warps = blockDim.x / WARP, warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
  __syncthreads();  // the shared arrays may still be read by the previous phase
  for (int e = threadIdx.x; e < experts; e += blockDim.x) running[e] = 0;
  for (long long round = begin; round < end; round += blockDim.x) {
    for (int j = threadIdx.x; j < warps * experts; j += blockDim.x) scan[j] = 0;
    __syncthreads();
    const long long i = round + threadIdx.x;
    long long token = -1;
    int expert = -1;
    if (i < end) {
      token = order ? order[i] : i;
      if (!keep || keep[token]) expert = (int)expert_index[token];
    }
    const unsigned peers = __match_any_sync(0xffffffffu, expert);
    const int rank_in_warp = __popc(peers & ((1u << lane) - 1u));
    if (expert >= 0 && rank_in_warp == 0) scan[warp * experts + expert] = __popc(peers);
    __syncthreads();
    for (int e = threadIdx.x; e < experts; e += blockDim.x) {  // exclusive scan over the warps
      int total = running[e];
      for (int w = 0; w < warps; ++w) {
        const int count = scan[w * experts + e];
        scan[w * experts + e] = total;
        total += count;
      }
      running[e] = total;
    }
    __syncthreads();
    if (token >= 0) position[token] = expert >= 0 ? scan[warp * experts + expert] + rank_in_warp : -1;
    __syncthreads();  // the next round clears `scan`
  }
  for (int e = threadIdx.x; e < experts; e += blockDim.x) tile_counts[(long long)e * tiles] = running[e];
}

// Phase 2: the tiles' offsets. counts [columns][E][tiles] holds each tile's count per expert of each
// choice column, a row of tiles per (column, expert); one warp of the grid takes one row: lane l holds
// tiles l, l + 32, ... (CHUNKS chunks of 32 consecutive tiles, all loaded at once: coalesced, independent
// loads, one round trip to L2), the warp scans the chunks in order and writes each tile's exclusive
// prefix back in place of its count and the row's total to totals[column][e]. (So a launch has at most
// 32 * CHUNKS tiles, cuda/gating.py's MAX_TILES.) The rows go to the blocks in turn (warp 0 of every
// block first): a warp's loads of a row are cheap, but many warps of one SM would queue at its load unit.
// With prob_sums [E + 1][tiles] given, E + 1 more warps add up each expert's probability sums (and, row E,
// the tiles' counts of used tokens) into prob_totals[e] in a fixed order (lane by lane over the chunks, then the butterfly), so the sum does not
// depend on scheduling. After the grid barrier each block copies its tile's prefixes to before
// [columns][E] and the totals to total [columns][E] (shared memory).

__device__ void tile_offsets(const cooperative_groups::grid_group& grid, int* counts, int* totals, int columns,
                             const float* prob_sums, float* prob_totals, int tiles, int tile, int experts,
                             int* before, int* total) {
  const int warps = blockDim.x / WARP, lane = threadIdx.x % WARP;
  const int rows = columns * experts, items = rows + (prob_sums ? experts + 1 : 0);  // + the used-token counts
  for (int item = threadIdx.x / WARP * gridDim.x + blockIdx.x; item < items; item += gridDim.x * warps) {
    if (item >= rows) {  // an expert's probability sums
      const float* row = prob_sums + (long long)(item - rows) * tiles;
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < CHUNKS; ++j) sum += j * WARP + lane < tiles ? row[j * WARP + lane] : 0.0f;
      sum = warp_sum(sum);
      if (lane == 0) prob_totals[item - rows] = sum;
      continue;
    }
    int* row = counts + (long long)item * tiles;
    int count[CHUNKS];
#pragma unroll
    for (int j = 0; j < CHUNKS; ++j) count[j] = j * WARP + lane < tiles ? row[j * WARP + lane] : 0;
    int carried = 0;
#pragma unroll
    for (int j = 0; j < CHUNKS; ++j) {
      if (j * WARP >= tiles) break;  // uniform over the warp
      const int inclusive = warp_inclusive_scan(count[j]);
      if (j * WARP + lane < tiles) row[j * WARP + lane] = carried + inclusive - count[j];
      carried += __shfl_sync(0xffffffffu, inclusive, WARP - 1);
    }
    if (lane == 0) totals[item] = carried;
  }
  grid.sync();
  for (int j = threadIdx.x; j < rows; j += blockDim.x) {
    before[j] = counts[(long long)j * tiles + tile];
    total[j] = totals[j];
  }
  __syncthreads();
}

// What gate_route reads and writes: its arguments as one value, so that each phase below takes them
// whole (the phases are inlined: this costs nothing at run time). Layouts:
// source_token [E * C] (null when dropless): the token in each buffer slot, -1 where none (dispatch.py's
// source_tokens).
// workspace (int, needs no initial values): [0] the capacity used, then per-tile counts per expert
// (overwritten by their exclusive prefixes over the tiles) counts [k + 1][E][tiles]: the k choice columns,
// then the kept first choices (random token selection); and their totals [k + 1][E].
// statistics (float): first_fraction [E], aux_loss, dropped, used tokens, prob_totals [E + 1] (sum over the
// used tokens of p[t, e], then the number of used tokens), then prob_sums [E + 1][tiles], each tile's.
// token_mask [T] (null: every token used): a token whose entry is 0 (padding) takes no rank, position or
// weight and no part in the statistics, whose means run over the used tokens.
// (cuda/gating.py sizes and reads the two packed buffers by the same layouts: route_buffer_sizes and
// RouteStatistics.)
struct RouteArgs {
  const float* logits;
  const float* first_scores;   // null: choose on the logits
  const float* second_scores;  // null: choose on the logits
  const long long* order;      // random token selection's priority order; null: none
  const unsigned char* token_mask;
  int tokens, experts, lanes, vector, k;
  long long capacity;  // < 0: dropless
  float* probs;
  long long* expert_index;
  long long* position;
  float* weight;
  unsigned char* keep;
  int* workspace;
  long long* tokens_per_expert;
  float* statistics;
  long long* source_token;
};

// The block's shared memory: the stage (phase 1's choices for phase 3), then warp_offsets [warps][2][E]
// (each warp's counts, then their exclusive prefixes in the tile), scan [warps][E] (rank_tile's, and the
// per-warp probability sums), running [E], before [2][E], total [2][E], warp_used [warps] (each warp's
// count of used tokens). cuda/gating.py's route_shared_bytes adds up the same sizes.
struct RouteShared {
  long long* stage_expert;  // [STAGE_ENTRIES]
  long long* stage_rank;    // [STAGE_ENTRIES]
  float* stage_prob;        // [STAGE_ENTRIES]
  int *warp_offsets, *scan, *running, *before, *total, *warp_used;
};

__device__ __forceinline__ RouteShared carve_shared(long long* shared, int warps, int experts) {
  RouteShared s;
  s.stage_expert = shared;
  s.stage_rank = s.stage_expert + STAGE_ENTRIES;
  s.stage_prob = (float*)(s.stage_rank + STAGE_ENTRIES);
  s.warp_offsets = (int*)(s.stage_prob + STAGE_ENTRIES);
  s.scan = s.warp_offsets + warps * 2 * experts;
  s.running = s.scan + warps * experts;
  s.before = s.running + experts;
  s.total = s.before + 2 * experts;
  s.warp_used = s.total + 2 * experts;
  return s;
}

// The block's tile: tokens [begin, end), tile `index` of `count` (the grid), tiles of equal size but the
// last (the size rounds up).
struct Tile {
  int index, count;
  long long begin, end;
};

// Where phase 1 leaves each choice's expert, its rank in the warp and its probability for phase 3: the
// stage when the tile's choices fit, else the outputs that phase 3 then overwrites; indexed from the
// tile's first token either way.
struct Parked {
  long long* expert;
  long long* rank;
  float* prob;
};

// Phase 1 for one warp's tokens [warp_begin, warp_end) of the tile, a group of lanes per token: the
// choices (on the logits, or on the noisy scores when given, loaded only then), their ranks among the
// warp's earlier choices of the same expert (warp_counts [2][E]; random token selection ranks after the
// barrier instead), the softmax row written to probs, the chosen probabilities parked for phase 3.
// Adds this lane's share of the used tokens' probabilities to prob_sum; returns the warp's used tokens.
__device__ __forceinline__ int choose_and_rank(const RouteArgs& a, const Tile& tile, const Parked& parked, bool staged,
                                               long long warp_begin, long long warp_end, int* warp_counts,
                                               float (&prob_sum)[PER_LANE]) {
  const int lane = threadIdx.x % WARP, lanes = a.lanes, experts = a.experts, k = a.k;
  const int groups = WARP / lanes, group = lane / lanes, member = lane % lanes;
  int used_in_warp = 0;
  for (long long batch = warp_begin; batch < warp_end; batch += groups) {
    const long long token = batch + group;  // the loop is warp-uniform: every lane takes part in the shuffles
    const bool valid = token < warp_end, writer = valid && member == 0;
    // A masked token is routed (its choices are written) but ranked nowhere: its rank stays -1.
    const bool used = valid && (!a.token_mask || a.token_mask[token]), leader = used && member == 0;
    used_in_warp += __popc(__ballot_sync(0xffffffffu, leader));
    float values[PER_LANE], scores[PER_LANE];
    load_part(values, a.logits, token, valid, experts, member, lanes, a.vector);
    if (a.first_scores) load_part(scores, a.first_scores, token, valid, experts, member, lanes, a.vector);
    float first_logit, second_logit = 0.0f;
    const int first = a.first_scores ? group_choice(scores, values, experts, member, lanes, -1, first_logit)
                                     : group_choice(values, values, experts, member, lanes, -1, first_logit);
    const long long entry = (token - tile.begin) * k;
    if (writer) {  // (unstaged, parked.expert is expert_index itself)
      a.expert_index[token * k] = first;
      if (staged) parked.expert[entry] = first;
    }
    if (!a.order) {
      const int rank = rank_in_warp(first, leader, warp_counts);
      if (writer) parked.rank[entry] = rank;
    }
    if (k == 2) {
      if (a.second_scores) load_part(scores, a.second_scores, token, valid, experts, member, lanes, a.vector);
      const int second = a.second_scores ? group_choice(scores, values, experts, member, lanes, first, second_logit)
                                         : group_choice(values, values, experts, member, lanes, first, second_logit);
      const int rank = rank_in_warp(second, leader, warp_counts + experts);
      if (writer) {
        a.expert_index[token * k + 1] = second;
        if (staged) parked.expert[entry + 1] = second;
        parked.rank[entry + 1] = rank;
      }
    }
    float row_max = -infinity();
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) row_max = fmaxf(row_max, values[j]);
    row_max = warp_max(row_max, lanes);
    float row_sum = 0.0f;
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) {
      values[j] = __expf(values[j] - row_max);  // 0 past E (-inf)
      row_sum += values[j];
    }
    row_sum = warp_sum(row_sum, lanes);
    if (!valid) continue;
    const float inverse = 1.0f / row_sum;  // one division, not PER_LANE (IEEE division is a subroutine)
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) {
      values[j] *= inverse;
      prob_sum[j] += used ? values[j] : 0.0f;
    }
    // The chosen experts' probabilities: the same operations as their entries of the row above, so the
    // same numbers.
    if (writer) {
      parked.prob[entry] = __expf(first_logit - row_max) * inverse;
      if (k == 2) parked.prob[entry + 1] = __expf(second_logit - row_max) * inverse;
    }
    // Streaming stores (evict first): the probabilities are read again only by the backward, long after,
    // so they should not push out of L2 what is read soon (the table and the inverse table that phase 3
    // writes and dispatch reads next); dev/notes.md has what they saved.
    float* row = a.probs + token * experts;
#pragma unroll
    for (int j = 0; j < PER_LANE; j += 4) {
      const int first_expert = expert_of(member, j, lanes);
      if (a.vector && first_expert + 4 <= experts) {
        __stcs(reinterpret_cast<float4*>(row + first_expert),
               make_float4(values[j], values[j + 1], values[j + 2], values[j + 3]));
      } else {
#pragma unroll
        for (int i = 0; i < 4; ++i)
          if (first_expert + i < experts) __stcs(row + first_expert + i, values[j + i]);
      }
    }
  }
  return used_in_warp;
}

// The end of phase 1, over the block: the tile's probability sums (over the groups of a warp by
// butterflies, per warp in shared memory, then over the warps in a fixed order) into prob_sums [E + 1]
// [tiles] (row E: the tile's used tokens), and the warps' counts per column and expert turned into the
// warps' offsets within the tile (an exclusive scan; all 0 with random token selection, which ranked
// nothing yet), whose sums are the tile's counts [k][E][tiles].
__device__ __forceinline__ void tile_sums(const RouteArgs& a, const Tile& tile, const RouteShared& shared,
                                          float (&prob_sum)[PER_LANE], int used_in_warp, int* counts,
                                          float* prob_sums) {
  const int warps = blockDim.x / WARP, warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
  const int lanes = a.lanes, experts = a.experts, group = lane / lanes, member = lane % lanes;
#pragma unroll
  for (int j = 0; j < PER_LANE; ++j)
    for (int offset = lanes; offset < WARP; offset *= 2)
      prob_sum[j] += __shfl_xor_sync(0xffffffffu, prob_sum[j], offset);
  float* warp_prob_sums = (float*)shared.scan;
#pragma unroll
  for (int j = 0; j < PER_LANE; ++j)
    if (group == 0 && expert_of(member, j, lanes) < experts)
      warp_prob_sums[warp * experts + expert_of(member, j, lanes)] = prob_sum[j];
  if (lane == 0) shared.warp_used[warp] = used_in_warp;
  __syncthreads();
  // Side by side: threads [0, E) the probability sums, threads [E, (k + 1) E) the warps' offsets, one more
  // thread the used tokens.
  for (int j = threadIdx.x; j <= (a.k + 1) * experts; j += blockDim.x) {
    if (j == (a.k + 1) * experts) {
      int sum = 0;
      for (int w = 0; w < warps; ++w) sum += shared.warp_used[w];
      prob_sums[(long long)experts * tile.count + tile.index] = (float)sum;
      continue;
    }
    if (j < experts) {
      float sum = 0.0f;
      for (int w = 0; w < warps; ++w) sum += warp_prob_sums[w * experts + j];
      prob_sums[(long long)j * tile.count + tile.index] = sum;
      continue;
    }
    const int item = j - experts;  // column * E + expert
    int sum = 0;
    for (int w = 0; w < warps; ++w) {
      const int count = shared.warp_offsets[w * 2 * experts + item];
      shared.warp_offsets[w * 2 * experts + item] = sum;
      sum += count;
    }
    if (!a.order) counts[(long long)item * tile.count + tile.index] = sum;
  }
}

// The capacity this launch uses: the given one, or (dropless) the fullest expert's load, first and
// second choices together (total [2][E]: the columns' totals).
__device__ __forceinline__ long long route_capacity(const RouteArgs& a, const int* total) {
  if (a.capacity >= 0) return a.capacity;
  long long fullest = 1;
  for (int e = 0; e < a.experts; ++e) fullest = max(fullest, (long long)total[e] + (a.k == 2 ? total[a.experts + e] : 0));
  return fullest;
}

// Random token selection: the first C first choices of each expert in priority order are kept (their
// rank in priority order, plus the earlier tiles' counts, below C); keep[token] says which.
__device__ __forceinline__ void keep_by_priority(const RouteArgs& a, const Tile& tile, const int* before,
                                                 long long capacity) {
  for (long long i = tile.begin + threadIdx.x; i < tile.end; i += blockDim.x) {
    const long long token = a.order[i];
    const long long rank = a.position[token * a.k];
    a.keep[token] = rank >= 0 && rank + before[a.expert_index[token * a.k]] < capacity;
  }
}

// Dispatch's inverse table (fixed capacity only): expert e keeps its first min(load, C) slots, which
// phase 3 fills with their tokens; the rest stay empty (-1). Experts go to the blocks in turn, so that
// every slot is written once.
__device__ __forceinline__ void clear_empty_slots(const RouteArgs& a, const Tile& tile, const int* first_total,
                                                  const int* total, long long capacity) {
  for (int e = tile.index; e < a.experts; e += tile.count) {
    const long long load = (long long)first_total[e] + (a.k == 2 ? total[a.experts + e] : 0);
    for (long long slot = min(load, capacity) + threadIdx.x; slot < capacity; slot += blockDim.x)
      a.source_token[e * capacity + slot] = -1;
  }
}

// Phase 3: positions and weights of the tile's tokens from what phase 1 parked: position = rank in warp
// + the warp's offset in the tile + counts of earlier tiles (+ all first choices, for second choices),
// -1 at or past the capacity. Both choices' loads are issued before anything is stored, so that they
// are in flight together.
__device__ __forceinline__ void positions_and_weights(const RouteArgs& a, const Tile& tile, const Parked& parked,
                                                      const int* warp_offsets, long long warp_tokens,
                                                      const int* before, const int* first_total, long long capacity) {
  const int experts = a.experts, k = a.k;
  for (long long token = tile.begin + threadIdx.x; token < tile.end; token += blockDim.x) {
    const int* warp_offset = warp_offsets + (token - tile.begin) / warp_tokens * 2 * experts;  // phase 1's warp
    long long expert[2] = {0, 0}, rank[2] = {-1, -1};
    float chosen[2] = {0.0f, 0.0f};
#pragma unroll
    for (int c = 0; c < 2; ++c)
      if (c < k) {
        const long long entry = (token - tile.begin) * k + c;
        expert[c] = parked.expert[entry];
        rank[c] = parked.rank[entry];
        chosen[c] = parked.prob[entry];
      }
    float chosen_sum = 0.0f;
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      if (c == k) break;
      const int e = (int)expert[c];
      const long long queued = rank[c] < 0 ? -1
                               : rank[c] + warp_offset[c * experts + e] + before[c * experts + e] +
                                     (c == 1 ? first_total[e] : 0);
      const bool kept = queued >= 0 && queued < capacity;
      a.position[token * k + c] = kept ? queued : -1;
      if (kept && a.source_token) a.source_token[e * capacity + queued] = token;
      chosen[c] = kept ? chosen[c] : 0.0f;
      chosen_sum += chosen[c];
    }
    // top-1: w = p[first]; top-2: the kept probabilities over their sum, clamped below by float32 epsilon.
    const float denominator = k == 1 ? 1.0f : fmaxf(chosen_sum, 1.1920928955078125e-07f);
    for (int c = 0; c < k; ++c) a.weight[token * k + c] = chosen[c] / denominator;
  }
}

// Statistics (GShard Algorithm 1): ce from the first choices before drops, me from phase 2's
// probability totals; and the fraction of the T * k choices dropped: expert e keeps min(C, its load),
// since second choices queue behind first choices and random token selection keeps C of the first choices.
__device__ __forceinline__ void write_statistics(const RouteArgs& a, const int* first_total, const int* total,
                                                 const float* prob_totals, long long capacity) {
  const int experts = a.experts;
  const float used_tokens = prob_totals[experts], denominator = fmaxf(used_tokens, 1.0f);
  float aux = 0.0f, kept = 0.0f;
  for (int e = threadIdx.x; e < experts; e += blockDim.x) {
    const long long load = (long long)first_total[e] + (a.k == 2 ? total[experts + e] : 0);
    a.tokens_per_expert[e] = load;
    kept += (float)min(load, capacity);
    const float fraction = (float)first_total[e] / denominator;
    a.statistics[e] = fraction;  // first_fraction
    aux += prob_totals[e] / denominator * fraction;
  }
  aux = block_reduce<false>(aux);
  kept = block_reduce<false>(kept);
  if (threadIdx.x == 0) {
    a.statistics[experts] = experts * aux;
    a.statistics[experts + 1] = 1.0f - kept / (denominator * a.k);
    a.statistics[experts + 2] = used_tokens;
  }
}

// The kernel: the phases of the header comment, in order, each a function above.
extern "C" __global__ void __launch_bounds__(ROUTE_THREADS)
    gate_route(const float* __restrict__ logits, const float* __restrict__ first_scores,
               const float* __restrict__ second_scores, const long long* __restrict__ order,
               const unsigned char* __restrict__ token_mask, int tokens, int experts,
               int lanes, int vector, int k, long long capacity, float* __restrict__ probs,
               long long* __restrict__ expert_index, long long* __restrict__ position, float* __restrict__ weight,
               unsigned char* __restrict__ keep, int* __restrict__ workspace, long long* __restrict__ tokens_per_expert,
               float* __restrict__ statistics, long long* __restrict__ source_token) {
  const cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  const RouteArgs a{logits, first_scores, second_scores, order, token_mask, tokens, experts, lanes, vector, k,
                    capacity, probs, expert_index, position, weight, keep, workspace, tokens_per_expert,
                    statistics, source_token};
  extern __shared__ long long shared_memory[];
  const int warps = blockDim.x / WARP, warp = threadIdx.x / WARP;
  const RouteShared shared = carve_shared(shared_memory, warps, experts);
  __shared__ long long used_capacity;
  const long long tile_size = ((long long)tokens + gridDim.x - 1) / gridDim.x;
  Tile tile;
  tile.index = blockIdx.x, tile.count = gridDim.x;
  tile.begin = min((long long)tokens, tile.index * tile_size), tile.end = min((long long)tokens, tile.begin + tile_size);
  int* counts = workspace + 1;
  int* kept_counts = counts + k * tile.count * experts;
  int* totals = counts + (k + 1) * tile.count * experts;
  float* prob_totals = statistics + experts + 3;
  float* prob_sums = prob_totals + experts + 1;
  // (Random token selection ranks the first choices in priority order, across the tiles: its ranks are
  // in `position`, so it parks in the outputs.)
  const bool staged = !order && (tile.end - tile.begin) * k <= STAGE_ENTRIES;
  const Parked parked{staged ? shared.stage_expert : expert_index + tile.begin * k,
                      staged ? shared.stage_rank : position + tile.begin * k,
                      staged ? shared.stage_prob : weight + tile.begin * k};

  // Phase 1: each warp takes consecutive tokens of the tile, so that it ranks its choices in token order
  // as it goes.
  const long long warp_tokens = (tile.end - tile.begin + warps - 1) / warps;
  const long long warp_begin = min(tile.end, tile.begin + warp * warp_tokens);
  const long long warp_end = min(tile.end, warp_begin + warp_tokens);
  int* warp_counts = shared.warp_offsets + warp * 2 * experts;  // [2][E]
  for (int j = threadIdx.x % WARP; j < 2 * experts; j += WARP) warp_counts[j] = 0;
  __syncwarp();
  float prob_sum[PER_LANE];
#pragma unroll
  for (int j = 0; j < PER_LANE; ++j) prob_sum[j] = 0.0f;
  const int used_in_warp = choose_and_rank(a, tile, parked, staged, warp_begin, warp_end, warp_counts, prob_sum);
  tile_sums(a, tile, shared, prob_sum, used_in_warp, counts, prob_sums);
  grid.sync();
  // Random token selection (top-1): rank the first choices in priority order (entries [begin, end) of
  // the order, whose tokens lie anywhere, hence after the barrier).
  if (order) {
    rank_tile(expert_index, order, token_mask, tile.begin, tile.end, experts, position, counts + tile.index,
              tile.count, shared.scan, shared.running);
    grid.sync();
  }

  // Phase 2: the tiles' offsets and the totals, which every block needs (the second choices' queue
  // offset, and the dropless capacity).
  const int* first_total = shared.total;
  tile_offsets(grid, counts, totals, k, prob_sums, prob_totals, tile.count, tile.index, experts, shared.before,
               shared.total);
  if (threadIdx.x == 0) {
    used_capacity = route_capacity(a, shared.total);
    if (tile.index == 0) workspace[0] = (int)used_capacity;
  }
  __syncthreads();
  // Random token selection: keep the first C of each expert in priority order, then number the kept ones
  // in token order, as DeepSpeed's top1gating numbers them.
  if (order) {
    keep_by_priority(a, tile, shared.before, used_capacity);
    grid.sync();
    rank_tile(expert_index, nullptr, keep, tile.begin, tile.end, experts, position, kept_counts + tile.index,
              tile.count, shared.scan, shared.running);
    grid.sync();
    tile_offsets(grid, kept_counts, totals + k * experts, 1, nullptr, nullptr, tile.count, tile.index, experts,
                 shared.before, shared.scan);
  }
  if (source_token) clear_empty_slots(a, tile, first_total, shared.total, used_capacity);

  // Phase 3, then the statistics, by the last tile's block: its tile is the shortest (the tile size
  // rounds up), so it finishes phase 3 first.
  positions_and_weights(a, tile, parked, shared.warp_offsets, warp_tokens, shared.before, first_total, used_capacity);
  if (tile.index == tile.count - 1) write_statistics(a, first_total, shared.total, prob_totals, used_capacity);
}

// Backward of the combine weights to the logits, one warp per token (cuda/gating.py's
// gate_weight_backward states the math). With g the weight gradient and the kept choices' probabilities
// a_c = p[e_c] kept_c: top-1 dL/da = g; top-2 dL/da_c = (g_c - sum_i g_i w_i) / s, s = max(a_1 + a_2, eps)
// (g_c / s where s was clamped). Then dL/dp[e] = sum_c [e == e_c] dL/da_c, and through the softmax
// dL/dz[e] = p[e] (dL/dp[e] - sum_e' dL/dp[e'] p[e']).
// The load-balancing loss's gradient joins before the softmax's backward where grad_aux_loss is given
// (cuda/gating.py's aux_loss_backward): every used token's dL/dp[e] gains c_e = g_aux w ce_e / U (w the
// aux weight, U the used tokens), so that GateRoute's backward is one launch. grad_weight null: the
// combine weights did not reach the loss.
extern "C" __global__ void gate_weight_backward(const float* __restrict__ grad_weight, const float* __restrict__ probs,
                                                const long long* __restrict__ expert_index,
                                                const long long* __restrict__ position, const float* __restrict__ weight,
                                                const float* __restrict__ grad_aux_loss, float aux_weight,
                                                const float* __restrict__ used_tokens,
                                                const float* __restrict__ choice_fraction,
                                                const unsigned char* __restrict__ token_mask,
                                                float* __restrict__ grad_logits, int tokens, int experts, int k) {
  const int token = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
  const int lane = threadIdx.x % WARP;
  if (token >= tokens) return;  // the whole warp
  const float* p = probs + (long long)token * experts;
  int chosen[2] = {-1, -1};
  float grad_chosen[2] = {0.0f, 0.0f}, kept[2] = {0.0f, 0.0f}, total = 0.0f, dot = 0.0f;
  if (grad_weight) {
    for (int c = 0; c < k; ++c) {
      const long long slot = (long long)token * k + c;
      chosen[c] = (int)expert_index[slot];
      kept[c] = position[slot] >= 0 ? 1.0f : 0.0f;
      total += p[chosen[c]] * kept[c];
      dot += grad_weight[slot] * weight[slot];
    }
    const float eps = 1.1920928955078125e-07f;
    for (int c = 0; c < k; ++c) {
      const float g = grad_weight[(long long)token * k + c];
      if (k == 1) grad_chosen[c] = g * kept[c];
      else grad_chosen[c] = (total < eps ? g / eps : (g - dot) / total) * kept[c];
    }
  }
  const bool balancing = grad_aux_loss && (!token_mask || token_mask[token]);
  const float aux_scale = balancing ? *grad_aux_loss * aux_weight / fmaxf(*used_tokens, 1.0f) : 0.0f;
  float through = 0.0f;  // sum_e dL/dp[e] p[e]: the chosen entries, then the balancing row
  for (int c = 0; c < k; ++c) through += grad_chosen[c] * (chosen[c] >= 0 ? p[chosen[c]] : 0.0f);
  if (balancing) {
    float row = 0.0f;
    for (int e = lane; e < experts; e += WARP) row += aux_scale * choice_fraction[e] * p[e];
    through += warp_sum(row);
  }
  for (int e = lane; e < experts; e += WARP) {
    float grad_p = balancing ? aux_scale * choice_fraction[e] : 0.0f;
    for (int c = 0; c < k; ++c) grad_p += e == chosen[c] ? grad_chosen[c] : 0.0f;
    grad_logits[(long long)token * experts + e] = p[e] * (grad_p - through);
  }
}

// Dropless routing for inference (cuda/gating.py's dropless_choices): one warp per token, lane l holding
// experts l, l + 32, ... of the row. The row's softmax, then k rounds of a warp argmax that skips the
// experts already chosen (on the logits for k <= 2, as top1gating / top2gating choose, on the
// probabilities for k >= 3, as topkgating does; the lowest expert among equals); weights p for top-1,
// the chosen probabilities over their sum (clamped below by float32 epsilon) for k >= 2. A masked token
// gets the choice E (no expert) and weight 0.
extern "C" __global__ void dropless_choices(const float* __restrict__ logits, const unsigned char* __restrict__ token_mask,
                                            int tokens, int experts, int k, long long* __restrict__ expert_index,
                                            float* __restrict__ weight) {
  const long long token = (long long)blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
  const int lane = threadIdx.x % WARP;
  if (token >= tokens) return;  // the whole warp
  const float* row = logits + token * experts;
  if (token_mask && !token_mask[token]) {
    for (int c = lane; c < k; c += WARP) expert_index[token * k + c] = experts, weight[token * k + c] = 0.0f;
    return;
  }
  float row_max = -infinity();
  for (int e = lane; e < experts; e += WARP) row_max = fmaxf(row_max, row[e]);
  row_max = warp_max(row_max);
  float row_sum = 0.0f;
  for (int e = lane; e < experts; e += WARP) row_sum += __expf(row[e] - row_max);
  const float inverse = 1.0f / warp_sum(row_sum);
  float chosen_sum = 0.0f;
  for (int c = 0; c < k; ++c) {
    float best = -infinity();
    int best_expert = experts;
    for (int e = lane; e < experts; e += WARP) {
      bool taken = false;
      for (int previous = 0; previous < c; ++previous) taken |= expert_index[token * k + previous] == e;
      const float score = k <= 2 ? row[e] : __expf(row[e] - row_max) * inverse;
      if (!taken && (score > best || best_expert == experts)) best = score, best_expert = e;
    }
    for (int offset = WARP / 2; offset > 0; offset /= 2) {
      const float other = __shfl_xor_sync(0xffffffffu, best, offset);
      const int other_expert = __shfl_xor_sync(0xffffffffu, best_expert, offset);
      if (other_expert < experts && (best_expert == experts || other > best || (other == best && other_expert < best_expert)))
        best = other, best_expert = other_expert;
    }
    const float probability = __expf(row[best_expert] - row_max) * inverse;
    if (lane == 0) expert_index[token * k + c] = best_expert, weight[token * k + c] = probability;
    __syncwarp();  // the next round reads the choices lane 0 wrote
    chosen_sum += probability;
  }
  const float denominator = k == 1 ? 1.0f : fmaxf(chosen_sum, 1.1920928955078125e-07f);
  for (int c = lane; c < k; c += WARP) weight[token * k + c] /= denominator;
}
