// The CPU emulation of kernel launches and of the few CUDA runtime calls csrc/ makes (see emulator.h).
#include <atomic>
#include <barrier>
#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

namespace {

constexpr int kEmulatedSMs = 3;  // odd on purpose: exercises uneven work splits
// Shared memory as on an A100: 48 KiB per block by default, up to 163 KiB per block with the
// kernel's opt-in attribute, 164 KiB per multiprocessor, 1 KiB reserved per block.
constexpr size_t kSmemDefault = 48 * 1024;
constexpr int kSmemOptin = 163 * 1024;
constexpr int kSmemPerSM = 164 * 1024;
constexpr int kSmemReserved = 1024;
thread_local cudaError_t last_error = cudaSuccess;
std::vector<float> dynamic_smem;
std::mutex attributes_mutex;
std::map<const void*, int> max_dynamic_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize per kernel

}  // namespace

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

namespace {
// The barrier of the running block; ends counts arrivals from threads that finished the block,
// so a phase mixing them with __syncthreads() arrivals reveals a divergent barrier.
std::barrier<void (*)() noexcept>* block_barrier = nullptr;
std::atomic<int> ends{0};
std::atomic<bool> divergent{false};
int block_threads = 0;

void on_phase() noexcept {
  const int e = ends.exchange(0);
  if (e != 0 && e != block_threads) divergent = true;
}
}  // namespace

void __syncthreads() { block_barrier->arrive_and_wait(); }

namespace nvae {

float* shared_floats() { return dynamic_smem.data(); }

namespace emu {

cudaError_t run(const void* kernel, dim3 grid, dim3 block, size_t smem_bytes, void (*body)(void*), void* ctx) {
  const int64_t threads = int64_t(block.x) * block.y * block.z;
  const int64_t blocks = int64_t(grid.x) * grid.y * grid.z;
  if (threads <= 0 || threads > 1024 || block.z > 64 || grid.y > 65535 || grid.z > 65535 || blocks <= 0 ||
      grid.x > 0x7fffffffu) {
    last_error = cudaErrorInvalidConfiguration;
    return last_error;
  }
  size_t smem_limit = kSmemDefault;
  {
    const std::lock_guard<std::mutex> lock(attributes_mutex);
    const auto it = max_dynamic_smem.find(kernel);
    if (it != max_dynamic_smem.end()) smem_limit = std::max(smem_limit, static_cast<size_t>(it->second));
  }
  if (smem_bytes > smem_limit) {
    last_error = cudaErrorInvalidValue;
    return last_error;
  }
  blockDim = block;
  gridDim = grid;
  dynamic_smem.assign(smem_bytes / sizeof(float) + 4, std::numeric_limits<float>::quiet_NaN());
  block_threads = static_cast<int>(threads);
  divergent = false;
  std::barrier<void (*)() noexcept> bar(threads, &on_phase);
  block_barrier = &bar;
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int64_t t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      threadIdx = uint3{unsigned(t % block.x), unsigned(t / block.x % block.y), unsigned(t / block.x / block.y)};
      for (int64_t b = 0; b < blocks; ++b) {
        if (t == 0) std::fill(dynamic_smem.begin(), dynamic_smem.end(), std::numeric_limits<float>::quiet_NaN());
        bar.arrive_and_wait();  // smem poisoned, previous block finished
        blockIdx = uint3{unsigned(b % grid.x), unsigned(b / grid.x % grid.y), unsigned(b / grid.x / grid.y)};
        body(ctx);
        ends.fetch_add(1);
        bar.arrive_and_wait();
      }
      bar.arrive_and_drop();
    });
  }
  for (auto& th : pool) th.join();
  block_barrier = nullptr;
  if (divergent) {
    last_error = cudaErrorLaunchFailure;
    return last_error;
  }
  return cudaSuccess;
}

}  // namespace emu
}  // namespace nvae

// ---- the CUDA runtime calls of csrc/ and csrc/bindings.cpp: one emulated device ----

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = last_error;
  last_error = cudaSuccess;
  return e;
}

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidDevice; }

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = kEmulatedSMs; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = kSmemOptin; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = kSmemPerSM; return cudaSuccess;
    case cudaDevAttrReservedSharedMemoryPerBlock: *value = kSmemReserved; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value < 0 || value > kSmemOptin) return cudaErrorInvalidValue;
  const std::lock_guard<std::mutex> lock(attributes_mutex);
  max_dynamic_smem[func] = value;
  return cudaSuccess;
}

cudaError_t cudaRuntimeGetVersion(int* version) {
  *version = CUDART_VERSION;
  return cudaSuccess;
}

const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    default: return "cudaError (emulated)";
  }
}

const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaErrorLaunchFailure ? "divergent __syncthreads() in an emulated block" : cudaGetErrorName(error);
}
