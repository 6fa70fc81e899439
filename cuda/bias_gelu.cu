// Fused bias + GELU for the first layer of every MLP and expert (cuda/bias_gelu.py is the reference).
#include "common.cuh"

// y[g, r, f] = gelu(x[g, r, f] + bias[g, f]) for x viewed as [groups, rows, features]
// (groups = experts, or 1 for a dense MLP). One thread per element, grid-stride: every access is
// coalesced, the bias row is tiny and stays in L1/L2, and GELU's tanh is one SFU instruction, so the
// kernel runs at memory speed: one read of x, one write of y.
template <typename T>
__global__ void bias_gelu_forward(const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y,
                                  long long total, long long rows_times_features, int features) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const long long group = i / rows_times_features;
    const float pre = to_float(x[i]) + to_float(bias[group * features + i % features]);
    y[i] = from_float<T>(gelu_tanh(pre));
  }
}

// grad_pre = grad_y * gelu'(x + bias): recomputes x + bias instead of storing it (one read of x and
// grad_y, one write). The bias gradient is the sum of grad_pre over rows, done by the caller.
template <typename T>
__global__ void bias_gelu_backward(const T* __restrict__ grad_y, const T* __restrict__ x,
                                   const T* __restrict__ bias, T* __restrict__ grad_pre, long long total,
                                   long long rows_times_features, int features) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const long long group = i / rows_times_features;
    const float pre = to_float(x[i]) + to_float(bias[group * features + i % features]);
    grad_pre[i] = from_float<T>(to_float(grad_y[i]) * gelu_tanh_grad(pre));
  }
}
