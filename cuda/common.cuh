// Shared by every minimoe .cu file: a bf16 storage type and conversions, with no header dependency.
//
// bf16 is the top half of an IEEE float32: 1 sign, 8 exponent, 7 mantissa bits. Kernels load bf16,
// compute in float32 and round back to nearest-even when they store, so a kernel templated on T
// (float or bf16) does the same float32 arithmetic for both storage types.
#pragma once

struct bf16 {
  unsigned short bits;
};

// +infinity without <math_constants.h> (this header depends on no CUDA header; of the .cu files only gating.cu
// includes one, <cooperative_groups.h>, for its grid barrier).
__device__ __forceinline__ float infinity() { return __int_as_float(0x7f800000); }

// The 32-bit shared-memory address of a pointer into shared memory, as PTX's shared-memory instructions
// (cp.async, ldmatrix, wgmma's descriptors) take it. The compiler's own conversion (PTX's cvta.to.shared), which
// it sees through: the address of tile + offset is then the tile's address + offset, worked out once.
__device__ __forceinline__ unsigned shared_address(const void* pointer) {
  return (unsigned)__cvta_generic_to_shared(pointer);
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16 x) { return __uint_as_float(((unsigned int)x.bits) << 16); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
// Rounded to nearest, ties to even: one instruction from sm_80 on (a NaN becomes the canonical 0x7fff), else
// by integer arithmetic on the bits (a NaN becomes 0x7fc0).
template <> __device__ __forceinline__ bf16 from_float<bf16>(float x) {
  bf16 out;
#if __CUDA_ARCH__ >= 800
  asm("cvt.rn.bf16.f32 %0, %1;\n" : "=h"(out.bits) : "f"(x));
#else
  unsigned int bits = __float_as_uint(x);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {  // NaN stays a (quiet) NaN
    out.bits = 0x7fc0;
    return out;
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);
  out.bits = (unsigned short)(bits >> 16);
#endif
  return out;
}

// Row<T, VEC>: load and store `per_load` consecutive elements of a row as floats: one 16-byte vector
// (8 bf16 or 4 float) when VEC (the row length in bytes is a multiple of 16 and rows start 16-byte
// aligned), else one element.
template <typename T, bool VEC> struct Row {
  static constexpr int per_load = VEC ? 16 / sizeof(T) : 1;
  // Load `per_load` consecutive elements starting at element index i as floats.
  __device__ static void load(const T* row, int i, float* out) {
    if constexpr (VEC) {
      union { uint4 vector; T elements[per_load]; } bits;
      bits.vector = *reinterpret_cast<const uint4*>(row + i);
#pragma unroll
      for (int j = 0; j < per_load; ++j) out[j] = to_float(bits.elements[j]);
    } else {
      out[0] = to_float(row[i]);
    }
  }
  __device__ static void store(T* row, int i, const float* values) {
    if constexpr (VEC) {
      union { uint4 vector; T elements[per_load]; } bits;
#pragma unroll
      for (int j = 0; j < per_load; ++j) bits.elements[j] = from_float<T>(values[j]);
      *reinterpret_cast<uint4*>(row + i) = bits.vector;
    } else {
      row[i] = from_float<T>(values[0]);
    }
  }
};

// GELU, tanh approximation (cuda/gelu.py states the formulas), through 0.5 (1 + tanh(u)) = sigmoid(2u):
// gelu(x) = x sigmoid(2u), gelu'(x) = s + x s (1 - s) 2 du/dx with s = sigmoid(2u). The same function,
// but with no cancellation in 1 + tanh(u) for negative x, and one exponential instead of a tanh.
__device__ __forceinline__ float gelu_sigmoid_of(float x) {  // sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3)
  return __fdividef(1.0f, 1.0f + __expf(-1.5957691216057308f * (x + 0.044715f * x * x * x)));
}
__device__ __forceinline__ float gelu_tanh(float x) { return x * gelu_sigmoid_of(x); }
__device__ __forceinline__ float gelu_tanh_grad(float x) {
  const float s = gelu_sigmoid_of(x);
  return s + x * s * (1.0f - s) * 1.5957691216057308f * (1.0f + 3.0f * 0.044715f * x * x);
}

// Block-wide sum and max of one float per thread (blockDim.x a multiple of 32, at most 1024); every
// thread gets the result. Uses 32 floats of shared memory; safe to call repeatedly.
// warp_sum / warp_max reduce over aligned groups of `lanes` lanes (a power of two; the whole warp by
// default): butterflies with offsets below `lanes` never leave the group.
__device__ __forceinline__ float warp_sum(float value, int lanes = 32) {
  for (int offset = lanes / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}
__device__ __forceinline__ float warp_max(float value, int lanes = 32) {
  for (int offset = lanes / 2; offset > 0; offset /= 2)
    value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
  return value;
}
template <bool MAX> __device__ __forceinline__ float block_reduce(float value) {
  __shared__ float partial[32];
  value = MAX ? warp_max(value) : warp_sum(value);
  __syncthreads();  // a previous call may still be reading `partial`
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = value;
  __syncthreads();
  // Every warp (not only the first) reduces the per-warp results, so every thread gets the total.
  const int lane = threadIdx.x % 32;
  value = lane < blockDim.x / 32 ? partial[lane] : (MAX ? -infinity() : 0.0f);
  return MAX ? warp_max(value) : warp_sum(value);
}
