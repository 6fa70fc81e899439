// Philox4x32-10 uniform numbers, and Gumbel noise drawn from them (cuda/philox.py is the reference and states
// the construction). The key is read from device memory (key_slot), the counter is an argument: a CUDA graph
// that replays a draw keeps its counter and reads whatever key the slot holds at the replay.
#include "common.cuh"
#include "philox.cuh"

// out[i] = number i of the draw: word i % 4 of philox(key, counter + i / 4). A thread per counter,
// its four numbers stored as one 16-byte vector (out is 16-byte aligned: a fresh allocation).
extern "C" __global__ void philox_uniform(float* __restrict__ out, long long size,
                                          const unsigned long long* __restrict__ key_slot, unsigned long long counter) {
  const unsigned long long key = *key_slot;
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
                                        const unsigned long long* __restrict__ key_slot, unsigned long long counter,
                                        float tiny) {
  const unsigned long long key = *key_slot;
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
