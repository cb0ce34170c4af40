// Deterministic per-channel reductions: kernels write one fp32 partial per (work unit, field,
// channel) into a workspace laid out as ws[(p * fields + f) * C + c], and a merge kernel combines
// the partials of each (field, channel) in a fixed order. No atomics touch the values, so results
// are bitwise reproducible on a given device and launch geometry. The geometry can depend on the
// pointers' alignment (the vector width of the BN kernels), so an aligned tensor and an offset view
// of the same values may differ in the last bits.
//
// The merge is two-level in one launch. Level 1: the P partials are cut into `segments` runs of
// `seg_len` (about sqrt(P) each); one block per (channel tile, field, run) merges its run. Level 2:
// the block that finishes a (channel tile, field) last, told by an arrival counter, merges the
// run results in run order. Which block runs level 2 varies from launch to launch; the order of
// every sum does not. Per thread this walks about sqrt(P) / 4 values serially instead of P / 8,
// and level 1 spreads the reads over ceil(C / 32) * fields * segments blocks.
//
// The counters must be zero when the merge starts. The kernel that writes the partials zeroes them
// (zero_merge_counters, from its first block): it completes before the merge starts on the stream.
#pragma once

#include "common.cuh"

namespace nvae {

// Count, mean and M2 (sum of squared deviations) of a stream of values: Welford's update, and
// Chan's formula to merge two summaries. Accurate for data far from zero, unlike sum / sum-of-squares.
struct Welford {
  float count = 0.f, mean = 0.f, m2 = 0.f;

  __device__ __forceinline__ void push(float x) {
    count += 1.f;
    const float delta = x - mean;
    mean += delta / count;
    m2 = fmaf(delta, x - mean, m2);
  }

  __device__ __forceinline__ static Welford merge(const Welford& a, const Welford& b) {
    Welford r;
    r.count = a.count + b.count;
    if (r.count == 0.f) return r;
    const float delta = b.mean - a.mean;
    const float wb = b.count / r.count;
    r.mean = fmaf(delta, wb, a.mean);
    r.m2 = a.m2 + b.m2 + delta * delta * a.count * wb;
    return r;
  }
};

// A merge block is kMergeLanes channels x kMergeRows rows.
constexpr int kMergeLanes = 32;
constexpr int kMergeRows = 8;

// How a merge splits its partials. Welford merges read fields (count, mean, m2) together and write
// (mean, biased variance); sums merge each field on its own.
struct MergePlan {
  int64_t parts = 0, fields = 0, channels = 0;
  bool welford = false;
  int64_t seg_len = 0, segments = 0;  // level 1: run s merges partials [s * seg_len, (s + 1) * seg_len)
  int64_t ctiles = 0;                 // channel tiles of kMergeLanes

  int64_t blocks() const { return ctiles * segments * (welford ? 1 : fields); }
  // Values one thread merges one after another, over both levels.
  int64_t serial_loads() const {
    return ceil_div(seg_len, kMergeRows) + (segments > 1 ? ceil_div(segments, kMergeRows) : 0);
  }

  int64_t level1_floats() const { return segments > 1 ? segments * fields * channels : 0; }
  int64_t counters() const { return segments > 1 ? ctiles * (welford ? 1 : fields) : 0; }
  // Scratch after the partials: the run results, then the arrival counters.
  size_t scratch_bytes() const { return static_cast<size_t>(level1_floats() + counters()) * sizeof(float); }
  unsigned* counter_ptr(void* scratch) const {
    return reinterpret_cast<unsigned*>(static_cast<float*>(scratch) + level1_floats());
  }
};

MergePlan merge_plan(int64_t parts, int fields, int64_t channels, bool welford);

// Where a merge writes: result f of channel c goes to field(f)[c * cstride], field(f) = data + f * fstride,
// except result 1 when `second` is set (two separate vectors). Welford: result 0 = mean, 1 = biased
// variance. Sums are multiplied by `scale`.
struct MergeOut {
  float* data = nullptr;
  float* second = nullptr;
  int64_t fstride = 0, cstride = 1;
  float scale = 1.f;
};

// Zeroes a merge's arrival counters; called by every thread of the kernel that writes its partials.
__device__ __forceinline__ void zero_merge_counters(unsigned* counters, int64_t n) {
  if (blockIdx.x != 0 || blockIdx.y != 0 || blockIdx.z != 0) return;
  const int64_t threads = static_cast<int64_t>(blockDim.x) * blockDim.y * blockDim.z;
  const int64_t t = (static_cast<int64_t>(threadIdx.z) * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
  for (int64_t i = t; i < n; i += threads) counters[i] = 0u;
}

// Merges ws[(p * plan.fields + f) * C + c], p < plan.parts, into `out`; `scratch` holds
// plan.scratch_bytes() with the counters zeroed by the partials' kernel.
cudaError_t launch_merge(const float* ws, const MergePlan& plan, void* scratch, const MergeOut& out,
                         cudaStream_t stream);

}  // namespace nvae
