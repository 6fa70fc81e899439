// Copies from global to shared memory that do not wait: cp.async (sm_80 and later) moves 16 bytes with no
// register in between, so a thread issues all its copies of a tile at once and a block can work on one
// tile while the next is on its way. No header dependency (inline PTX).
//
//   copy_async(...) ... copy_async(...); commit_copies();   // the copies since the last commit: one group
//   wait_copies<N>();                                        // all but this thread's N latest groups landed
//   __syncthreads();                                         // ... and every other thread's
#pragma once
#include "common.cuh"

// Copy 16 bytes from global to shared memory, or write 16 zero bytes (reading nothing) where `real` is false.
__device__ __forceinline__ void copy_async(void* shared, const void* global, bool real) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(shared)), "l"(global),
               "r"(real ? 16 : 0));
}
__device__ __forceinline__ void commit_copies() { asm volatile("cp.async.commit_group;\n" ::); }
template <int PENDING>
__device__ __forceinline__ void wait_copies() { asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING)); }
