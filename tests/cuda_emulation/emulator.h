// Host-compiler build of csrc/ for the CPU emulation tests (force-included before every source).
//
// A kernel launch runs the blocks one after another; each block runs its threads as real OS
// threads, so __syncthreads() is a real barrier and a missing one can show up as a race. Dynamic
// shared memory is filled with NaN before every block, so reading a value the block never wrote
// poisons the result; its size is limited as on an A100 (emulator.cpp), and a launch with more than
// 48 KiB fails unless the kernel's opt-in attribute allows it, as on a GPU. Static __shared__
// arrays become function statics (one block at a time).
// Global memory is host memory: the tests pass CPU tensors' pointers. Blocks never overlap, so the
// last-block pattern of the merges (a fence, then an arrival counter) always finds the final block
// of the grid last, and a memory-ordering mistake between blocks cannot show here: only a GPU can.
// Warp-level intrinsics are not emulated; the kernels under test use none.
#pragma once

#define __shared__ static
#define __launch_bounds__(...)

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <tuple>
#include <type_traits>
#include <utility>

using std::max;
using std::min;

extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

void __syncthreads();

inline float __expf(float x) { return std::exp(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}

inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }

inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

namespace nvae {

float* shared_floats();
cudaError_t allow_dynamic_smem(const void* kernel, size_t bytes);  // csrc/device.cu

namespace emu {
// Runs body() for every thread of every block; returns the launch's error (as CUDA would report it).
// More than 48 KiB of dynamic shared memory needs the kernel's opt-in attribute set before.
cudaError_t run(const void* kernel, dim3 grid, dim3 block, size_t smem_bytes, void (*body)(void*), void* ctx);
}  // namespace emu

// As csrc/common.cuh's launch(): the opt-in for more than 48 KiB, then the launch.
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t,
                   Args&&... args) {
  if (smem_bytes > 48 * 1024) {
    const cudaError_t err = allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem_bytes);
    if (err != cudaSuccess) return err;
  }
  struct Ctx {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...> params;
  } ctx{kernel, std::tuple<std::decay_t<Params>...>(static_cast<Params>(args)...)};
  return emu::run(reinterpret_cast<const void*>(kernel), grid, block, smem_bytes, [](void* p) {
    auto* c = static_cast<Ctx*>(p);
    std::apply(c->kernel, c->params);  // by-value kernel parameters: each thread gets its own copy
  }, &ctx);
}

}  // namespace nvae
