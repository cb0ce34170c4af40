// The two-level merge of per-channel partials (see reduce.cuh).
#include <cmath>

#include "reduce.cuh"

namespace nvae {
namespace {

// Row r of a block takes the run's values r, r + kRows, ... in order, then row 0 merges the kRows
// results in row order.
constexpr int kLanes = kMergeLanes;
constexpr int kRows = kMergeRows;
constexpr int64_t kOneLevel = kRows;  // up to this many partials, a single run (one value per row)

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
  __device__ static void finish(const MergeOut& o, int /*f*/, int64_t c, const State& s) {
    o.data[c * o.cstride] = s.mean;
    float* var = o.second != nullptr ? o.second : o.data + o.fstride;
    var[c * o.cstride] = s.count > 0.f ? s.m2 / s.count : 0.f;
  }
};

struct SumField {
  using State = float;
  static constexpr bool kJoint = false;
  __device__ static State load(const float* p, int64_t /*C*/) { return __ldcg(p); }
  __device__ static void store(float* p, int64_t /*C*/, const State& s) { *p = s; }
  __device__ static State merge(const State& a, const State& b) { return a + b; }
  __device__ static void finish(const MergeOut& o, int f, int64_t c, const State& s) {
    float* field = f == 1 && o.second != nullptr ? o.second : o.data + f * o.fstride;
    field[c * o.cstride] = s * o.scale;
  }
};

// Values first, first + kRows, ... < end of a column with `stride` floats between values, merged in
// order by this thread, then across the kRows rows in row order; the total lands in row 0.
template <class Op>
__device__ typename Op::State merge_column(const float* base, int64_t stride, int64_t C, int64_t first, int64_t end,
                                           bool active, typename Op::State (&rows)[kRows][kLanes]) {
  const int lane = threadIdx.x, row = threadIdx.y;
  typename Op::State acc{};
  if (active) {
    for (int64_t p = first + row; p < end; p += kRows) acc = Op::merge(acc, Op::load(base + p * stride, C));
  }
  rows[row][lane] = acc;
  __syncthreads();
  if (row == 0) {
    for (int r = 1; r < kRows; ++r) acc = Op::merge(acc, rows[r][lane]);
  }
  __syncthreads();  // rows may be reused
  return acc;
}

// Grid (ctiles * segments, joint ? 1 : fields): block (tile, run, field).
template <class Op>
__global__ void __launch_bounds__(kLanes* kRows)
    merge_kernel(const float* __restrict__ ws, MergePlan m, float* level1, unsigned* counters, MergeOut out) {
  __shared__ typename Op::State rows[kRows][kLanes];
  __shared__ bool last;
  const int lane = threadIdx.x, row = threadIdx.y;
  const int64_t ctile = blockIdx.x % m.ctiles, seg = blockIdx.x / m.ctiles;
  const int f = static_cast<int>(blockIdx.y);
  const int64_t C = m.channels;
  const int64_t c = ctile * kLanes + lane;
  const bool active = c < C;
  const int64_t offset = (Op::kJoint ? 0 : f * C) + c;  // of (partial 0, field f, channel c)
  const int64_t stride = m.fields * C;                  // floats from one partial to the next

  const int64_t p0 = seg * m.seg_len;
  typename Op::State acc = merge_column<Op>(ws + offset, stride, C, p0, std::min(m.parts, p0 + m.seg_len), active,
                                            rows);
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

}  // namespace

MergePlan merge_plan(int64_t parts, int fields, int64_t channels, bool welford) {
  MergePlan m;
  m.parts = parts;
  m.fields = welford ? 3 : fields;
  m.channels = channels;
  m.welford = welford;
  m.ctiles = ceil_div(channels, kLanes);
  if (parts <= kOneLevel) {
    m.seg_len = std::max<int64_t>(parts, 1);
    m.segments = 1;
  } else {
    const auto root = static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(parts))));
    m.seg_len = kRows * ceil_div(root, kRows);
    m.segments = ceil_div(parts, m.seg_len);
  }
  return m;
}

cudaError_t launch_merge(const float* ws, const MergePlan& m, void* scratch, const MergeOut& out,
                         cudaStream_t stream) {
  const int64_t fields = m.welford ? 1 : m.fields;
  const int64_t blocks = m.ctiles * m.segments;
  if (m.parts <= 0 || m.channels <= 0 || fields <= 0 || fields > 65535 || blocks > 0x7fffffff) {
    return cudaErrorInvalidValue;
  }
  if (m.segments > 1 && scratch == nullptr) return cudaErrorInvalidValue;
  float* level1 = static_cast<float*>(scratch);
  unsigned* counters = m.segments > 1 ? m.counter_ptr(scratch) : nullptr;
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(fields));
  auto* kernel = m.welford ? merge_kernel<WelfordFields> : merge_kernel<SumField>;
  return launch(kernel, grid, dim3(kLanes, kRows), 0, stream, ws, m, level1, counters, out);
}

}  // namespace nvae
