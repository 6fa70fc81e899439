// Philox4x32-10 uniform numbers, and Gumbel noise drawn from them (cuda/philox.py is the reference and states
// the construction).
#include "common.cuh"

constexpr unsigned int MULTIPLIER_0 = 0xD2511F53u, MULTIPLIER_1 = 0xCD9E8D57u;  // the round's two products
constexpr unsigned int WEYL_0 = 0x9E3779B9u, WEYL_1 = 0xBB67AE85u;  // the key's bump between rounds

// The four words of philox(key, counter) for a 64-bit counter (the counter's upper two words are 0).
__device__ __forceinline__ uint4 philox(unsigned long long counter, unsigned long long key) {
  unsigned int x0 = (unsigned int)counter, x1 = (unsigned int)(counter >> 32), x2 = 0u, x3 = 0u;
  unsigned int k0 = (unsigned int)key, k1 = (unsigned int)(key >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    if (round > 0) k0 += WEYL_0, k1 += WEYL_1;
    const unsigned int high0 = __umulhi(MULTIPLIER_0, x0), low0 = MULTIPLIER_0 * x0;
    const unsigned int high1 = __umulhi(MULTIPLIER_1, x2), low1 = MULTIPLIER_1 * x2;
    x0 = high1 ^ x1 ^ k0, x1 = low1, x2 = high0 ^ x3 ^ k1, x3 = low0;
  }
  return make_uint4(x0, x1, x2, x3);
}

// The top 24 bits of a word as a float in [0, 1): exact in float32.
__device__ __forceinline__ float to_unit(unsigned int word) { return (float)(word >> 8) * 5.9604644775390625e-08f; }

// out[i] = number i of the draw: word i % 4 of philox(key, counter + i / 4). A thread per counter,
// its four numbers stored as one 16-byte vector (out is 16-byte aligned: a fresh allocation).
extern "C" __global__ void philox_uniform(float* __restrict__ out, long long size, unsigned long long key,
                                          unsigned long long counter) {
  const long long groups = (size + 3) / 4;
  for (long long group = blockIdx.x * (long long)blockDim.x + threadIdx.x; group < groups;
       group += (long long)gridDim.x * blockDim.x) {
    const uint4 words = philox(counter + group, key);
    const float4 numbers = make_float4(to_unit(words.x), to_unit(words.y), to_unit(words.z), to_unit(words.w));
    if (group * 4 + 4 <= size) {
      reinterpret_cast<float4*>(out)[group] = numbers;
    } else {
      const float tail[3] = {numbers.x, numbers.y, numbers.z};
      for (long long i = group * 4; i < size; ++i) out[i] = tail[i - group * 4];
    }
  }
}

// noisy[i] = logits[i] - log(-log(max(u_i, tiny))) for u the draw from (key, counter): Gumbel noise added
// to the gate's logits (cuda/philox.py's gumbel_noisy), the uniform numbers never stored. A thread per
// counter, as philox_uniform.
extern "C" __global__ void gumbel_noisy(const float* __restrict__ logits, float* __restrict__ noisy, long long size,
                                        unsigned long long key, unsigned long long counter, float tiny) {
  const long long groups = (size + 3) / 4;
  for (long long group = blockIdx.x * (long long)blockDim.x + threadIdx.x; group < groups;
       group += (long long)gridDim.x * blockDim.x) {
    const uint4 words = philox(counter + group, key);
    const unsigned int word[4] = {words.x, words.y, words.z, words.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const long long index = group * 4 + i;
      if (index < size) noisy[index] = logits[index] - logf(-logf(fmaxf(to_unit(word[i]), tiny)));
    }
  }
}
