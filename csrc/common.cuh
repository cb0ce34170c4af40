// Shared device helpers for nvae_fast kernels: dtype tags, float conversion, aligned vectors,
// Swish, and the grid-size heuristics. Torch-free: everything here is plain CUDA C++.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include "nvae_fast.h"

namespace nvae {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Element i of a vector whose dtype is known only at run time (parameters, running statistics).
__device__ __forceinline__ float load_as(DType dtype, const void* p, int64_t i) {
  switch (dtype) {
    case DType::kFloat16: return to_float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16: return to_float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_as(DType dtype, void* p, int64_t i, float v) {
  switch (dtype) {
    case DType::kFloat16: static_cast<__half*>(p)[i] = from_float<__half>(v); break;
    case DType::kBFloat16: static_cast<__nv_bfloat16*>(p)[i] = from_float<__nv_bfloat16>(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}

// N elements of T moved by one instruction (16 bytes for N = 16 / sizeof(T)).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float (&out)[N]) {
  const Vec<T, N> raw = *reinterpret_cast<const Vec<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(raw.v[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const float (&in)[N]) {
  Vec<T, N> raw;
#pragma unroll
  for (int i = 0; i < N; ++i) raw.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Vec<T, N>*>(p) = raw;
}

// 1 / (1 + e^-v) with the hardware exponential and reciprocal (a few ulp): an IEEE division would
// call its slow-path subroutine, whose register saves spill in the kernels that hold many
// accumulators. v -> -inf gives 1 / inf = 0.
__device__ __forceinline__ float sigmoidf_fast(float v) { return __fdividef(1.f, 1.f + __expf(-v)); }

// d/dz [z * sigmoid(z)] = s * (1 + z * (1 - s)).
__device__ __forceinline__ float swish_grad(float z) {
  const float s = sigmoidf_fast(z);
  return s * (1.f + z * (1.f - s));
}

// Widest vector (in elements) that divides `extent` and keeps every access of `ptrs` 16-byte aligned.
template <typename T>
inline int pick_vec(int64_t extent, std::initializer_list<const void*> ptrs) {
  constexpr int kMax = 16 / static_cast<int>(sizeof(T));
  for (const void* p : ptrs) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  }
  return extent % kMax == 0 ? kMax : 1;
}

// The current device's multiprocessors (1 when it cannot be queried).
int sm_count();

// Dynamic shared memory per block (bytes) that a kernel may use on the current device and still
// fit `blocks_per_sm` blocks on one multiprocessor: the default 48 KiB at least, more through the
// per-kernel opt-in (sm_80: up to 81 KiB for two blocks, sm_90: up to 113 KiB).
int64_t smem_per_block(int blocks_per_sm);

constexpr size_t kDefaultSmem = 48 * 1024;  // dynamic shared memory any launch may use without opt-in

// Lets `kernel` launch with `bytes` of dynamic shared memory on the current device (the opt-in
// attribute, set once per kernel and device; nothing to do up to kDefaultSmem).
cudaError_t allow_dynamic_smem(const void* kernel, size_t bytes);

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Byte offsets of the pieces of a workspace start on 256-byte boundaries.
inline size_t aligned_bytes(int64_t bytes) { return static_cast<size_t>(ceil_div(bytes, 256) * 256); }

// Division rounding towards minus infinity (b > 0), for window origins left of the image.
__host__ __device__ __forceinline__ int64_t floor_div(int64_t a, int64_t b) {
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

#ifdef __CUDACC__
// The block's dynamic shared memory as floats. Host-compiler builds of the kernels (the CPU
// emulation in tests/cuda_emulation/) provide their own definitions of this and of launch().
__device__ __forceinline__ float* shared_floats() {
  extern __shared__ __align__(16) float nvae_dynamic_smem[];
  return nvae_dynamic_smem;
}

// Launches kernel<<<grid, block, smem_bytes, stream>>>(args...) and returns the launch's error.
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
                   Args&&... args) {
  if (smem_bytes > kDefaultSmem) {
    const cudaError_t err = allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem_bytes);
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, block, smem_bytes, stream>>>(static_cast<Params>(args)...);
  return cudaGetLastError();
}
#endif

}  // namespace nvae

#define NVAE_DISPATCH_DTYPE(dtype, T, ...)              \
  switch (dtype) {                                     \
    case ::nvae::DType::kFloat32: {                    \
      using T = float;                                 \
      __VA_ARGS__;                                     \
      break;                                           \
    }                                                  \
    case ::nvae::DType::kFloat16: {                    \
      using T = __half;                                \
      __VA_ARGS__;                                     \
      break;                                           \
    }                                                  \
    case ::nvae::DType::kBFloat16: {                   \
      using T = __nv_bfloat16;                         \
      __VA_ARGS__;                                     \
      break;                                           \
    }                                                  \
    default:                                           \
      return cudaErrorInvalidValue;                    \
  }
