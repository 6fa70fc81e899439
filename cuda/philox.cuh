// Philox4x32-10 (cuda/philox.py states the construction): included by the kernels that draw random numbers.
#pragma once

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
