// What the launch plans ask of the current device: multiprocessors and shared memory.
#include <algorithm>
#include <map>
#include <mutex>
#include <utility>

#include "common.cuh"

namespace nvae {
namespace {

int attribute(cudaDeviceAttr attr, int fallback) {
  int device = 0;
  int value = 0;
  if (cudaGetDevice(&device) != cudaSuccess || cudaDeviceGetAttribute(&value, attr, device) != cudaSuccess) {
    cudaGetLastError();  // clear, so the caller's launch reports its own error
    return fallback;
  }
  return value;
}

}  // namespace

int sm_count() {
  const int count = attribute(cudaDevAttrMultiProcessorCount, 1);
  return count > 0 ? count : 1;
}

int64_t smem_per_block(int blocks_per_sm) {
  const int64_t optin = attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, 0);
  const int64_t per_sm = attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor, 0);
  const int64_t reserved = attribute(cudaDevAttrReservedSharedMemoryPerBlock, 0);
  const int64_t fits = per_sm / std::max(blocks_per_sm, 1) - reserved;
  return std::max<int64_t>(static_cast<int64_t>(kDefaultSmem), std::min(optin, fits));
}

cudaError_t allow_dynamic_smem(const void* kernel, size_t bytes) {
  if (bytes <= kDefaultSmem) return cudaSuccess;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, size_t> allowed;  // the attribute set so far
  const std::lock_guard<std::mutex> lock(mutex);
  size_t& current = allowed[{device, kernel}];
  if (current >= bytes) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err == cudaSuccess) current = bytes;
  return err;
}

}  // namespace nvae
