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

#include <algorithm>
#include <type_traits>
#include <utility>

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
// variance. Sums are multiplied by `scale`. Other outputs (a stage's epilogue: parameter gradients,
// running statistics) provide the same two member functions.
struct MergeOut {
  float* data = nullptr;
  float* second = nullptr;
  int64_t fstride = 0, cstride = 1;
  float scale = 1.f;

  __device__ float* field(int f) const { return f == 1 && second != nullptr ? second : data + f * fstride; }
  __device__ void sum(int f, int64_t c, float s) const { field(f)[c * cstride] = s * scale; }
  __device__ void stats(int64_t c, float mean, float var) const {
    field(0)[c * cstride] = mean;
    field(1)[c * cstride] = var;
  }
};

// Zeroes a merge's arrival counters; called by every thread of the kernel that writes its partials.
__device__ __forceinline__ void zero_merge_counters(unsigned* counters, int64_t n) {
  if (blockIdx.x != 0 || blockIdx.y != 0 || blockIdx.z != 0) return;
  const int64_t threads = static_cast<int64_t>(blockDim.x) * blockDim.y * blockDim.z;
  const int64_t t = (static_cast<int64_t>(threadIdx.z) * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
  for (int64_t i = t; i < n; i += threads) counters[i] = 0u;
}

namespace merge_detail {

// Row r of a block takes the run's values r, r + kMergeRows, ... in order, then row 0 merges the
// rows' results in row order.
struct WelfordFields {
  using State = Welford;
  static constexpr bool kJoint = true;  // the three fields form one value
  __device__ static State load(const float* p, int64_t C) {
    State s;
    s.count = __ldcg(p);
    s.mean = __ldcg(p + C);
    s.m2 = __ldcg(p + 2 * C);
    return s;
  }
  __device__ static void store(float* p, int64_t C, const State& s) {
    p[0] = s.count;
    p[C] = s.mean;
    p[2 * C] = s.m2;
  }
  __device__ static State merge(const State& a, const State& b) { return Welford::merge(a, b); }
  template <class Out>
  __device__ static void finish(const Out& o, int /*f*/, int64_t c, const State& s) {
    o.stats(c, s.mean, s.count > 0.f ? s.m2 / s.count : 0.f);
  }
};

struct SumField {
  using State = float;
  static constexpr bool kJoint = false;
  __device__ static State load(const float* p, int64_t /*C*/) { return __ldcg(p); }
  __device__ static void store(float* p, int64_t /*C*/, const State& s) { *p = s; }
  __device__ static State merge(const State& a, const State& b) { return a + b; }
  template <class Out>
  __device__ static void finish(const Out& o, int f, int64_t c, const State& s) {
    o.sum(f, c, s);
  }
};

// Values first, first + kMergeRows, ... < end of a column with `stride` floats between values,
// merged in order by this thread, then across the rows in row order; the total lands in row 0.
template <class Op>
__device__ typename Op::State merge_column(const float* base, int64_t stride, int64_t C, int64_t first, int64_t end,
                                           bool active, typename Op::State (&rows)[kMergeRows][kMergeLanes]) {
  const int lane = threadIdx.x, row = threadIdx.y;
  typename Op::State acc{};
  if (active) {
    for (int64_t p = first + row; p < end; p += kMergeRows) acc = Op::merge(acc, Op::load(base + p * stride, C));
  }
  rows[row][lane] = acc;
  __syncthreads();
  if (row == 0) {
    for (int r = 1; r < kMergeRows; ++r) acc = Op::merge(acc, rows[r][lane]);
  }
  __syncthreads();  // rows may be reused
  return acc;
}

// Grid (ctiles * segments, joint ? 1 : fields): block (tile, run, field).
template <class Op, class Out>
__global__ void __launch_bounds__(kMergeLanes* kMergeRows)
    merge_kernel(const float* __restrict__ ws, MergePlan m, float* level1, unsigned* counters, Out out) {
  __shared__ typename Op::State rows[kMergeRows][kMergeLanes];
  __shared__ bool last;
  const int lane = threadIdx.x, row = threadIdx.y;
  const int64_t ctile = blockIdx.x % m.ctiles, seg = blockIdx.x / m.ctiles;
  const int f = static_cast<int>(blockIdx.y);
  const int64_t C = m.channels;
  const int64_t c = ctile * kMergeLanes + lane;
  const bool active = c < C;
  const int64_t offset = (Op::kJoint ? 0 : f * C) + c;  // of (partial 0, field f, channel c)
  const int64_t stride = m.fields * C;                  // floats from one partial to the next

  const int64_t p0 = seg * m.seg_len;
  typename Op::State acc =
      merge_column<Op>(ws + offset, stride, C, p0, std::min(m.parts, p0 + m.seg_len), active, rows);
  if (m.segments == 1) {
    if (row == 0 && active) Op::finish(out, f, c, acc);
    return;
  }
  if (row == 0 && active) Op::store(level1 + seg * stride + offset, C, acc);
  __threadfence();  // this block's run result is visible device-wide before its arrival counts
  __syncthreads();
  if (row == 0 && lane == 0) last = atomicAdd(counters + f * m.ctiles + ctile, 1u) == m.segments - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  acc = merge_column<Op>(level1 + offset, stride, C, 0, m.segments, active, rows);
  if (row == 0 && active) Op::finish(out, f, c, acc);
}

// Whether an output takes Welford merges (stats) and sums (sum).
template <class Out, class = void>
struct TakesStats : std::false_type {};
template <class Out>
struct TakesStats<Out, std::void_t<decltype(std::declval<const Out&>().stats(int64_t{}, 0.f, 0.f))>>
    : std::true_type {};
template <class Out, class = void>
struct TakesSums : std::false_type {};
template <class Out>
struct TakesSums<Out, std::void_t<decltype(std::declval<const Out&>().sum(0, int64_t{}, 0.f))>> : std::true_type {};

}  // namespace merge_detail

// Merges ws[(p * plan.fields + f) * C + c], p < plan.parts, into `out`; `scratch` holds
// plan.scratch_bytes() with the counters zeroed by the partials' kernel.
template <class Out>
cudaError_t launch_merge(const float* ws, const MergePlan& m, void* scratch, const Out& out, cudaStream_t stream) {
  const int64_t fields = m.welford ? 1 : m.fields;
  const int64_t blocks = m.ctiles * m.segments;
  if (m.parts <= 0 || m.channels <= 0 || fields <= 0 || fields > 65535 || blocks > 0x7fffffff) {
    return cudaErrorInvalidValue;
  }
  if (m.segments > 1 && scratch == nullptr) return cudaErrorInvalidValue;
  float* level1 = static_cast<float*>(scratch);
  unsigned* counters = m.segments > 1 ? m.counter_ptr(scratch) : nullptr;
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(fields));
  const dim3 block(kMergeLanes, kMergeRows);
  if (m.welford) {
    if constexpr (merge_detail::TakesStats<Out>::value) {
      return launch(merge_detail::merge_kernel<merge_detail::WelfordFields, Out>, grid, block, 0, stream, ws, m,
                    level1, counters, out);
    }
  } else {
    if constexpr (merge_detail::TakesSums<Out>::value) {
      return launch(merge_detail::merge_kernel<merge_detail::SumField, Out>, grid, block, 0, stream, ws, m, level1,
                    counters, out);
    }
  }
  return cudaErrorInvalidValue;  // this output cannot take this merge
}

}  // namespace nvae
