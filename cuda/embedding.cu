// An embedding table's gradient plus the rows one lookup read (cuda/embedding.py is the reference):
// grad[indices[i]] += rows[i], summed in float32 where an index repeats, then one rounding to T per
// element. Three launches over the lookup's n rows, none over the table, each a thread per element of a row:
//   zero_row_sums     the float32 sums of the rows the indices name are 0 (scratch holds garbage elsewhere)
//   scatter_row_sums  every row added into its index's sums (atomics: a repeated index's adds come in no
//                     fixed order, so its sum can differ in the last bit from run to run)
//   add_row_sums      each sum added into the gradient by one thread: atomicExch takes the sum and leaves 0,
//                     so a repeated index's other threads find 0 and write nothing
// And a GPT's input: the token embedding plus the position embedding in one pass, and the position table's
// gradient (the sum over the batch), each a thread per piece of a row (16 bytes where the rows allow).
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

// out[b, t] = token_table[tokens[b, t]] + position_table[t] for rows = B * T rows of `width`, the sum of the
// two float values rounded once to T (as a separate add of the two lookups rounds it).
template <typename T, bool VEC>
__global__ void embed_tokens_and_positions(const T* __restrict__ token_table, const T* __restrict__ position_table,
                                           const long long* __restrict__ tokens, T* __restrict__ out, long long rows,
                                           int length, int width) {
  using R = Row<T, VEC>;
  const int pieces = width / R::per_load;
  const long long piece = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (piece >= rows * pieces) return;
  const long long row = piece / pieces;
  const int i = piece % pieces * R::per_load;
  float token[R::per_load], position[R::per_load];
  R::load(token_table + tokens[row] * width, i, token);
  R::load(position_table + row % length * width, i, position);
#pragma unroll
  for (int j = 0; j < R::per_load; ++j) token[j] += position[j];
  R::store(out + row * width, i, token);
}

// The position table's gradient [table_rows, width]: row t < length the sum over the batch of grad[b, t]
// (float32 sums in batch order, one rounding), the rows past the sequence 0.
template <typename T, bool VEC>
__global__ void sum_position_gradients(const T* __restrict__ grad, T* __restrict__ grad_table, int batch, int length,
                                       int table_rows, int width) {
  using R = Row<T, VEC>;
  const int pieces = width / R::per_load;
  const long long piece = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (piece >= (long long)table_rows * pieces) return;
  const int t = piece / pieces, i = piece % pieces * R::per_load;
  float sums[R::per_load] = {};
  for (int b = 0; b < batch && t < length; ++b) {
    float values[R::per_load];
    R::load(grad + ((long long)b * length + t) * width, i, values);
#pragma unroll
    for (int j = 0; j < R::per_load; ++j) sums[j] += values[j];
  }
  R::store(grad_table + (long long)t * width, i, sums);
}
