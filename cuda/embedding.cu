// An embedding table's gradient plus the rows one lookup read (cuda/embedding.py is the reference):
// grad[indices[i]] += rows[i], summed in float32 where an index repeats, then one rounding to T per
// element. Three launches over the lookup's n rows, none over the table, each a thread per element of a row:
//   zero_row_sums     the float32 sums of the rows the indices name are 0 (scratch holds garbage elsewhere)
//   scatter_row_sums  every row added into its index's sums (atomics: a repeated index's adds come in no
//                     fixed order, so its sum can differ in the last bit from run to run)
//   add_row_sums      each sum added into the gradient by one thread: atomicExch takes the sum and leaves 0,
//                     so a repeated index's other threads find 0 and write nothing
#include "common.cuh"

extern "C" __global__ void zero_row_sums(float* __restrict__ sums, const long long* __restrict__ indices,
                                         long long size, int width) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < size; i += (long long)gridDim.x * blockDim.x)
    sums[indices[i / width] * width + i % width] = 0.0f;
}

template <typename T>
__global__ void scatter_row_sums(const T* __restrict__ rows, const long long* __restrict__ indices,
                                 float* __restrict__ sums, long long size, int width) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < size; i += (long long)gridDim.x * blockDim.x)
    atomicAdd(&sums[indices[i / width] * width + i % width], to_float(rows[i]));
}

template <typename T>
__global__ void add_row_sums(T* __restrict__ grad, const long long* __restrict__ indices, float* __restrict__ sums,
                             long long size, int width) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < size; i += (long long)gridDim.x * blockDim.x) {
    const long long element = indices[i / width] * width + i % width;
    const float sum = atomicExch(&sums[element], 0.0f);
    if (sum != 0.0f) grad[element] = from_float<T>(to_float(grad[element]) + sum);  // (adding 0 changes nothing)
  }
}
