// GPU top-k gating (cuda/gating.py is the specification and states every rule). Three kernels:
//   gate_softmax_topk  softmax over the experts and the k choices of each token (one warp per token)
//   gate_rank_in_block each block ranks 1024 consecutive entries of one choice column, taken in a given
//                      order, among the entries of the same expert, and counts them per expert
//   gate_finish_rank   global rank = rank in block + the counts of earlier blocks (+ a queue offset for
//                      second choices) -> position or -1 past the capacity
//   gate_weights       the combine weights
// The per-expert positions are a scan over tokens; a scan across blocks needs the earlier blocks'
// counts, which is why ranking is split in two launches. The per-block counts also give the load of
// every expert (tokens_per_expert) and the dropless capacity.
#include "common.cuh"

constexpr int WARP = 32;

// One warp per token. Each lane holds experts lane, lane + 32, ...; max, sum and argmax are warp
// reductions. argmax keeps the lowest expert index among equal scores, as NumPy's argmax does.
__device__ __forceinline__ void warp_argmax(float& value, int& index) {
  for (int offset = WARP / 2; offset > 0; offset /= 2) {
    const float other_value = __shfl_xor_sync(0xffffffffu, value, offset);
    const int other_index = __shfl_xor_sync(0xffffffffu, index, offset);
    if (other_value > value || (other_value == value && other_index < index)) {
      value = other_value;
      index = other_index;
    }
  }
}

extern "C" __global__ void gate_softmax_topk(const float* __restrict__ logits, const float* __restrict__ first_scores,
                                             const float* __restrict__ second_scores, float* __restrict__ probs,
                                             long long* __restrict__ expert_index, int tokens, int experts, int k) {
  const int token = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
  const int lane = threadIdx.x % WARP;
  if (token >= tokens) return;  // whole warps leave together
  const float* row = logits + (long long)token * experts;
  float row_max = -infinity();
  for (int e = lane; e < experts; e += WARP) row_max = fmaxf(row_max, row[e]);
  for (int offset = WARP / 2; offset > 0; offset /= 2) row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffffu, row_max, offset));
  float total = 0.0f;
  for (int e = lane; e < experts; e += WARP) total += __expf(row[e] - row_max);
  for (int offset = WARP / 2; offset > 0; offset /= 2) total += __shfl_xor_sync(0xffffffffu, total, offset);
  for (int e = lane; e < experts; e += WARP) probs[(long long)token * experts + e] = __expf(row[e] - row_max) / total;

  const float* scores = first_scores ? first_scores + (long long)token * experts : row;
  float best = -infinity();
  int first = experts;
  for (int e = lane; e < experts; e += WARP)
    if (scores[e] > best || first == experts) { best = scores[e]; first = e; }
  warp_argmax(best, first);
  if (lane == 0) expert_index[(long long)token * k] = first;
  if (k == 2) {
    scores = second_scores ? second_scores + (long long)token * experts : row;
    best = -infinity();
    int second = experts;
    for (int e = lane; e < experts; e += WARP)
      if (e != first && (scores[e] > best || second == experts)) { best = scores[e]; second = e; }
    warp_argmax(best, second);
    if (lane == 0) expert_index[(long long)token * k + 1] = second;
  }
}

// Entry i of the order (token = order ? order[i] : i) chose expert e = expert_index[token * k + column];
// entries whose `keep` flag is 0 take no part. Each block ranks its 1024 entries: inside a warp,
// __match_any_sync finds the lanes with the same expert and the rank is the number of such lanes below;
// warps are then offset by the counts of the warps before them (a scan over 32 warps per expert in
// shared memory). Writes rank_in_block[i] and block_counts[block * experts + e].
extern "C" __global__ void gate_rank_in_block(const long long* __restrict__ expert_index, int k, int column,
                                              const long long* __restrict__ order, const unsigned char* __restrict__ keep,
                                              int entries, int experts, int* __restrict__ rank_in_block,
                                              int* __restrict__ block_counts) {
  extern __shared__ int warp_counts[];  // [warps][experts], then scanned in place to warp offsets
  const int warps = blockDim.x / WARP, warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
  for (int j = threadIdx.x; j < warps * experts; j += blockDim.x) warp_counts[j] = 0;
  __syncthreads();
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  int expert = -1;
  if (i < entries) {
    const long long token = order ? order[i] : i;
    if (!keep || keep[token]) expert = (int)expert_index[token * k + column];
  }
  const unsigned peers = __match_any_sync(0xffffffffu, expert);
  const int rank_in_warp = __popc(peers & ((1u << lane) - 1u));
  if (expert >= 0 && rank_in_warp == 0) warp_counts[warp * experts + expert] = __popc(peers);
  __syncthreads();
  for (int e = threadIdx.x; e < experts; e += blockDim.x) {  // exclusive scan over the warps, per expert
    int running = 0;
    for (int w = 0; w < warps; ++w) {
      const int count = warp_counts[w * experts + e];
      warp_counts[w * experts + e] = running;
      running += count;
    }
    block_counts[blockIdx.x * experts + e] = running;
  }
  __syncthreads();
  if (i < entries) rank_in_block[i] = expert >= 0 ? warp_counts[warp * experts + expert] + rank_in_warp : -1;
}

// Global rank = rank in block + the entries of the same expert in earlier blocks (a short loop over
// block_counts: at most T / 1024 blocks, read from cache) + queue_offset[e] (second choices queue
// behind all first choices). The rank becomes the position when it is below the capacity; in a
// `mark_only` pass (random token selection: ranking in priority order only decides which tokens are
// kept) it sets keep[token] instead.
extern "C" __global__ void gate_finish_rank(const long long* __restrict__ expert_index, int k, int column,
                                            const long long* __restrict__ order, const int* __restrict__ rank_in_block,
                                            const int* __restrict__ block_counts, const long long* __restrict__ queue_offset,
                                            int entries, int experts, int block_size, long long capacity, int mark_only,
                                            long long* __restrict__ position, unsigned char* __restrict__ keep) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= entries) return;
  const long long token = order ? order[i] : i;
  const int rank = rank_in_block[i];
  const int expert = (int)expert_index[token * k + column];
  long long global_rank = -1;
  if (rank >= 0) {
    global_rank = rank + (queue_offset ? queue_offset[expert] : 0);
    for (int b = 0; b < i / block_size; ++b) global_rank += block_counts[b * experts + expert];
  }
  const bool kept = global_rank >= 0 && global_rank < capacity;
  if (mark_only) keep[token] = kept;
  else position[token * k + column] = kept ? global_rank : -1;
}

// The load-balancing statistics in one block: per-expert totals of the per-block counts of each choice
// column (counts is [k][blocks][experts]), the first-choice fraction ce, and aux = E * sum_e me_e ce_e
// with me (mean_probs) computed beforehand. One launch in place of a dozen small array operations.
extern "C" __global__ void gate_statistics(const int* __restrict__ counts, const float* __restrict__ mean_probs,
                                           int k, int blocks, int experts, int tokens,
                                           long long* __restrict__ tokens_per_expert, long long* __restrict__ first_counts,
                                           float* __restrict__ first_fraction, float* __restrict__ aux_loss) {
  float aux = 0.0f;
  for (int e = threadIdx.x; e < experts; e += blockDim.x) {
    long long total = 0, first = 0;
    for (int c = 0; c < k; ++c) {
      long long column_total = 0;
      for (int b = 0; b < blocks; ++b) column_total += counts[((long long)c * blocks + b) * experts + e];
      if (c == 0) first = column_total;
      total += column_total;
    }
    tokens_per_expert[e] = total;
    first_counts[e] = first;
    first_fraction[e] = (float)first / tokens;
    aux += mean_probs[e] * ((float)first / tokens);
  }
  aux = block_reduce<false>(aux);
  if (threadIdx.x == 0) aux_loss[0] = experts * aux;
}

// Combine weights per token: top-1 w = p[first] (0 if dropped); top-2 the kept probabilities divided
// by their sum, clamped below by float32 epsilon.
extern "C" __global__ void gate_weights(const float* __restrict__ probs, const long long* __restrict__ expert_index,
                                        const long long* __restrict__ position, float* __restrict__ weight,
                                        int tokens, int experts, int k) {
  const int token = blockIdx.x * blockDim.x + threadIdx.x;
  if (token >= tokens) return;
  float chosen[2] = {0.0f, 0.0f};
  float total = 0.0f;
  for (int c = 0; c < k; ++c) {
    const long long slot = (long long)token * k + c;
    chosen[c] = position[slot] >= 0 ? probs[(long long)token * experts + expert_index[slot]] : 0.0f;
    total += chosen[c];
  }
  const float denominator = k == 1 ? 1.0f : fmaxf(total, 1.1920928955078125e-07f);
  for (int c = 0; c < k; ++c) weight[(long long)token * k + c] = chosen[c] / denominator;
}

// Backward of the combine weights to the logits, one warp per token (cuda/gating.py's
// gate_weight_backward states the math). With g the weight gradient and the kept choices' probabilities
// a_c = p[e_c] kept_c: top-1 dL/da = g; top-2 dL/da_c = (g_c - sum_i g_i w_i) / s, s = max(a_1 + a_2, eps)
// (g_c / s where s was clamped). Then dL/dp[e] = sum_c [e == e_c] dL/da_c, and through the softmax
// dL/dz[e] = p[e] (dL/dp[e] - sum_c dL/da_c p[e_c]); the sum needs only the k chosen entries.
extern "C" __global__ void gate_weight_backward(const float* __restrict__ grad_weight, const float* __restrict__ probs,
                                                const long long* __restrict__ expert_index,
                                                const long long* __restrict__ position, const float* __restrict__ weight,
                                                float* __restrict__ grad_logits, int tokens, int experts, int k) {
  const int token = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
  const int lane = threadIdx.x % WARP;
  if (token >= tokens) return;
  const float* p = probs + (long long)token * experts;
  int chosen[2] = {-1, -1};
  float grad_chosen[2] = {0.0f, 0.0f}, kept[2] = {0.0f, 0.0f}, total = 0.0f, dot = 0.0f;
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
  float through = 0.0f;  // sum_e dL/dp[e] p[e]
  for (int c = 0; c < k; ++c) through += grad_chosen[c] * p[chosen[c]];
  for (int e = lane; e < experts; e += WARP) {
    float grad_p = 0.0f;
    for (int c = 0; c < k; ++c) grad_p += e == chosen[c] ? grad_chosen[c] : 0.0f;
    grad_logits[(long long)token * experts + e] = p[e] * (grad_p - through);
  }
}
