// Residual-normal latent groups (contract: nvae_fast/ops/normal_kl.py, C++ API: nvae_fast.h).
//
// One kernel template covers the six entry points. Each block takes one image n, a slice of
// channels and a run of H * W positions; every tensor is read through its own strides, so the
// torch.chunk views of the model need no copy. Two thread mappings keep the reads coalesced:
// channels across the 32 lanes when the leading input has unit channel stride (channels-last
// params), else positions across the lanes (NCHW). The forward KL passes reduce per block into
// partials (kl per channel; kl, log_q, log_p per image) merged in a fixed order by reduce.cu's
// two-level merge: one pass over the data, deterministic, no atomics on values. The backward passes and the
// sampling are element-wise.
#include <algorithm>

#include "common.cuh"
#include "reduce.cuh"

namespace nvae {
namespace {

constexpr int kLanes = 32;
constexpr int kRows = 8;
constexpr int kThreads = kLanes * kRows;
constexpr int kMinBlocks = 2;  // blocks per SM: a stated budget of 128 registers per thread
constexpr float kHalfLog2Pi = 0.91893853320467274f;
constexpr float kSigmaMin = 0.01f;

enum class Mode : int { kKLForward, kKLBackward, kFlowForward, kFlowBackward, kSampleForward, kSampleBackward };

constexpr bool reduces(Mode m) { return m == Mode::kKLForward || m == Mode::kFlowForward; }

// Block decomposition shared by the launch code and the workspace size.
struct Layout {
  bool channel_fast;  // lanes <-> channels (else lanes <-> positions)
  int64_t cslice;     // channels per block: 32 or 8
  int64_t cblocks, hblocks, hw_per_block;
  int64_t blocks() const { return cblocks * hblocks; }  // per image
};

const Strided4& leading(const NormalKLArgs& a, Mode m) {
  switch (m) {
    case Mode::kKLForward:
    case Mode::kKLBackward: return a.mu_q;
    case Mode::kFlowForward:
    case Mode::kFlowBackward: return a.log_sigma_q;
    default: return a.eps;
  }
}

Layout layout_of(const NormalKLArgs& a, Mode m) {
  Layout l;
  const int64_t hw = a.h * a.w;
  l.channel_fast = a.c > 1 && leading(a, m).stride[1] == 1;
  l.cslice = l.channel_fast ? kLanes : kRows;
  l.cblocks = ceil_div(a.c, l.cslice);
  // Enough blocks to fill the device a few times over, each with at least ~1024 elements.
  const int64_t min_positions = l.channel_fast ? kRows * 4 : kLanes * 4;
  const int64_t want = ceil_div(4LL * sm_count(), a.n * l.cblocks);
  l.hblocks = std::max<int64_t>(1, std::min(want, ceil_div(hw, min_positions)));
  l.hw_per_block = ceil_div(hw, l.hblocks);
  l.hblocks = ceil_div(hw, l.hw_per_block);
  return l;
}

// The reducing modes' workspace: the per-channel partials, the per-image partials, then
// (256-byte aligned) the scratch of each one's merge.
struct ReducePlan {
  MergePlan channel, image;  // kl_diag over (n, hb) partials; (kl, log_q, log_p) per image over (cb, hb)
  size_t image_offset, channel_scratch_offset, image_scratch_offset, bytes;
};

ReducePlan reduce_plan(const NormalKLArgs& a, const Layout& l) {
  ReducePlan p;
  p.channel = merge_plan(a.n * l.hblocks, 1, a.c, false);
  p.image = merge_plan(l.blocks(), 3, a.n, false);
  const int64_t f = sizeof(float);
  p.image_offset = aligned_bytes(a.n * l.hblocks * a.c * f);
  p.channel_scratch_offset = p.image_offset + aligned_bytes(l.blocks() * 3 * a.n * f);
  p.image_scratch_offset = p.channel_scratch_offset + aligned_bytes(static_cast<int64_t>(p.channel.scratch_bytes()));
  p.bytes = p.image_scratch_offset + p.image.scratch_bytes();
  return p;
}

// Where a reducing launch writes its partials and the arrival counters it zeroes for the merges.
struct Partials {
  float* channel = nullptr;
  float* image = nullptr;
  unsigned* channel_counters = nullptr;
  unsigned* image_counters = nullptr;
  int64_t n_channel_counters = 0, n_image_counters = 0;
};

// fp32 views of the strided tensors.
template <typename T>
struct View {
  const Strided4& v;
  __device__ __forceinline__ int64_t offset(int64_t n, int64_t c, int64_t h, int64_t w) const {
    return n * v.stride[0] + c * v.stride[1] + h * v.stride[2] + w * v.stride[3];
  }
  __device__ __forceinline__ float load(int64_t n, int64_t c, int64_t h, int64_t w) const {
    return to_float(static_cast<const T*>(v.data)[offset(n, c, h, w)]);
  }
  __device__ __forceinline__ void store(int64_t n, int64_t c, int64_t h, int64_t w, float x) const {
    static_cast<T*>(v.data)[offset(n, c, h, w)] = from_float<T>(x);
  }
};

// The official Normal's clamps: mu' = 5 tanh(mu / 5); l = 5 tanh(log_sigma / 5), sigma = e^l + 0.01.
struct Clamped {
  float mu, l, el, sigma, log_sigma;  // log_sigma = log(sigma) = l + log1p(0.01 / e^l), without cancellation
  __device__ __forceinline__ void set(float mu_raw, float log_sigma_raw) {
    mu = 5.f * tanhf(mu_raw * 0.2f);
    l = 5.f * tanhf(log_sigma_raw * 0.2f);
    el = expf(l);
    sigma = el + kSigmaMin;
    log_sigma = l + log1pf(kSigmaMin / el);
  }
  __device__ __forceinline__ void set_standard() {
    mu = 0.f;
    l = 0.f;
    el = 1.f;
    sigma = 1.f + kSigmaMin;
    log_sigma = log1pf(kSigmaMin);
  }
  // d/d(raw) from d/d(mu') and d/d(sigma).
  __device__ __forceinline__ float dmu_raw(float dmu) const { return dmu * (1.f - mu * mu * 0.04f); }
  __device__ __forceinline__ float dlog_sigma_raw(float dsigma) const { return dsigma * el * (1.f - l * l * 0.04f); }
};

struct ElementSums {
  float kl = 0.f, log_q = 0.f, log_p = 0.f;
};

// Upstream gradients of the reductions for element (n, c): kl carries grad_kl_all[n] + grad_kl_diag[c] / N.
struct ReducedGrads {
  float kl, log_q, log_p;
  __device__ __forceinline__ ReducedGrads(const NormalKLArgs& a, int64_t n, int64_t c) {
    kl = (a.grad_kl_all ? a.grad_kl_all[n] : 0.f) + (a.grad_kl_diag ? a.grad_kl_diag[c] / static_cast<float>(a.n) : 0.f);
    log_q = a.grad_log_q ? a.grad_log_q[n] : 0.f;
    log_p = a.grad_log_p ? a.grad_log_p[n] : 0.f;
  }
};

template <typename T, Mode M>
__device__ __forceinline__ void element(const NormalKLArgs& a, int64_t n, int64_t c, int64_t h, int64_t w,
                                        ElementSums& out) {
  const bool prior = a.mu_p.data != nullptr;
  if constexpr (M == Mode::kSampleForward || M == Mode::kSampleBackward) {
    Clamped d;
    if (a.mu.data != nullptr) {
      d.set(View<T>{a.mu}.load(n, c, h, w), View<T>{a.log_sigma}.load(n, c, h, w));
    } else {
      d.set_standard();
    }
    const float e = View<T>{a.eps}.load(n, c, h, w);
    if constexpr (M == Mode::kSampleForward) {
      View<T>{a.z_out}.store(n, c, h, w, fmaf(a.temperature * d.sigma, e, d.mu));
    } else {
      const float gz = a.grad_z.data ? View<T>{a.grad_z}.load(n, c, h, w) : 0.f;
      View<T>{a.d_mu}.store(n, c, h, w, d.dmu_raw(gz));
      View<T>{a.d_log_sigma}.store(n, c, h, w, d.dlog_sigma_raw(gz * a.temperature * e));
    }
  } else {
    float mp_raw = 0.f, lsp_raw = 0.f;
    Clamped p;
    if (prior) {
      mp_raw = View<T>{a.mu_p}.load(n, c, h, w);
      lsp_raw = View<T>{a.log_sigma_p}.load(n, c, h, w);
      p.set(mp_raw, lsp_raw);
    } else {
      p.set_standard();
    }
    const bool residual = prior && a.residual;
    const float e = View<T>{a.eps}.load(n, c, h, w);
    float lsq_raw = View<T>{a.log_sigma_q}.load(n, c, h, w);
    if (residual) lsq_raw += lsp_raw;

    if constexpr (M == Mode::kKLForward || M == Mode::kKLBackward) {
      float mq_raw = View<T>{a.mu_q}.load(n, c, h, w);
      if (residual) mq_raw += mp_raw;
      Clamped q;
      q.set(mq_raw, lsq_raw);
      const float z = fmaf(q.sigma, e, q.mu);
      const float inv_sp = 1.f / p.sigma;
      const float u = (q.mu - p.mu) * inv_sp;  // standardised mean difference
      const float v = q.sigma * inv_sp;        // sigma ratio
      const float wz = (z - p.mu) * inv_sp;    // z standardised under the prior
      if constexpr (M == Mode::kKLForward) {
        View<T>{a.z_out}.store(n, c, h, w, z);
        out.kl = 0.5f * (u * u + v * v) - 0.5f - (q.log_sigma - p.log_sigma);
        out.log_q = -0.5f * e * e - kHalfLog2Pi - q.log_sigma;  // (z - mu_q') / sigma_q = eps
        out.log_p = -0.5f * wz * wz - kHalfLog2Pi - p.log_sigma;
      } else {
        const ReducedGrads g(a, n, c);
        // log_q = -eps^2/2 - const - log sigma_q once z = mu_q' + sigma_q eps is substituted.
        const float gz = (a.grad_z.data ? View<T>{a.grad_z}.load(n, c, h, w) : 0.f) - g.log_p * wz * inv_sp;
        const float d_mq = g.kl * u * inv_sp + gz;
        const float d_sq = g.kl * (v * inv_sp - 1.f / q.sigma) - g.log_q / q.sigma + gz * e;
        const float d_mq_raw = q.dmu_raw(d_mq);
        const float d_lsq_raw = q.dlog_sigma_raw(d_sq);
        View<T>{a.d_mu_q}.store(n, c, h, w, d_mq_raw);
        View<T>{a.d_log_sigma_q}.store(n, c, h, w, d_lsq_raw);
        if (prior) {
          const float d_mp = -g.kl * u * inv_sp + g.log_p * wz * inv_sp;
          const float d_sp = (g.kl * (1.f - u * u - v * v) + g.log_p * (wz * wz - 1.f)) * inv_sp;
          View<T>{a.d_mu_p}.store(n, c, h, w, p.dmu_raw(d_mp) + (residual ? d_mq_raw : 0.f));
          View<T>{a.d_log_sigma_p}.store(n, c, h, w, p.dlog_sigma_raw(d_sp) + (residual ? d_lsq_raw : 0.f));
        }
      }
    } else {  // flows: z is the flowed sample, log_det the flows' log-determinant
      Clamped q;
      q.set(0.f, lsq_raw);
      const float z = View<T>{a.z}.load(n, c, h, w);
      const float inv_sp = 1.f / p.sigma;
      const float wz = (z - p.mu) * inv_sp;
      if constexpr (M == Mode::kFlowForward) {
        out.log_q = -0.5f * e * e - kHalfLog2Pi - q.log_sigma - View<T>{a.log_det}.load(n, c, h, w);
        out.log_p = -0.5f * wz * wz - kHalfLog2Pi - p.log_sigma;
        out.kl = out.log_q - out.log_p;
      } else {
        const ReducedGrads g(a, n, c);
        const float gq = g.kl + g.log_q;  // d/d log_q of the loss (kl = log_q - log_p)
        const float gp = g.log_p - g.kl;  // d/d log_p
        const float d_lsq_raw = q.dlog_sigma_raw(-gq / q.sigma);
        View<T>{a.d_log_sigma_q}.store(n, c, h, w, d_lsq_raw);
        View<T>{a.d_log_det}.store(n, c, h, w, -gq);
        View<T>{a.d_z}.store(n, c, h, w, -gp * wz * inv_sp);
        if (prior) {
          const float d_mp = gp * wz * inv_sp;
          const float d_sp = gp * (wz * wz - 1.f) * inv_sp;
          View<T>{a.d_mu_p}.store(n, c, h, w, p.dmu_raw(d_mp));
          View<T>{a.d_log_sigma_p}.store(n, c, h, w, p.dlog_sigma_raw(d_sp) + (residual ? d_lsq_raw : 0.f));
        }
      }
    }
  }
}

// Grid: n * cblocks * hblocks blocks of (32, 8). Reducing modes write
// ws.channel[(n * hblocks + hb) * C + c] (kl over the block's positions) and
// ws.image[((cb * hblocks + hb) * 3 + {kl, log_q, log_p}) * N + n] (over the block's elements), and
// zero the arrival counters of their merges.
template <typename T, Mode M, bool kChannelFast>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    normal_kl_kernel(NormalKLArgs a, int64_t cblocks, int64_t hblocks, int64_t hw_per_block, Partials ws) {
  if constexpr (reduces(M)) {
    zero_merge_counters(ws.channel_counters, ws.n_channel_counters);
    zero_merge_counters(ws.image_counters, ws.n_image_counters);
  }
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t hb = blockIdx.x % hblocks;
  const int64_t cb = (blockIdx.x / hblocks) % cblocks;
  const int64_t n = blockIdx.x / hblocks / cblocks;
  const int64_t hw_end = std::min<int64_t>((hb + 1) * hw_per_block, a.h * a.w);
  // The thread's channel is fixed; it walks positions with a stride of the other block dimension.
  const int64_t c = kChannelFast ? cb * kLanes + tx : cb * kRows + ty;
  const int64_t first = hb * hw_per_block + (kChannelFast ? ty : tx);
  const int step = kChannelFast ? kRows : kLanes;

  ElementSums acc;
  if (c < a.c) {
    for (int64_t hw = first; hw < hw_end; hw += step) {
      const int64_t h = hw / a.w, w = hw - h * a.w;
      ElementSums e;
      element<T, M>(a, n, c, h, w, e);
      if constexpr (reduces(M)) {
        acc.kl += e.kl;
        acc.log_q += e.log_q;
        acc.log_p += e.log_p;
      }
    }
  }
  if constexpr (reduces(M)) {
    __shared__ float red[4][kThreads];
    const int t = ty * kLanes + tx;
    red[0][t] = acc.kl;  // per channel
    red[1][t] = acc.kl;  // per image, tree-summed below
    red[2][t] = acc.log_q;
    red[3][t] = acc.log_p;
    __syncthreads();
    const bool writer = kChannelFast ? ty == 0 : tx == 0;
    if (writer && c < a.c) {
      float s = 0.f;
      for (int i = 0; i < (kChannelFast ? kRows : kLanes); ++i) s += red[0][kChannelFast ? i * kLanes + tx : ty * kLanes + i];
      ws.channel[(n * hblocks + hb) * a.c + c] = s;
    }
    for (int s = kThreads / 2; s > 0; s /= 2) {
      if (t < s) {
#pragma unroll
        for (int f = 1; f < 4; ++f) red[f][t] += red[f][t + s];
      }
      __syncthreads();
    }
    if (t < 3) ws.image[((cb * hblocks + hb) * 3 + t) * a.n + n] = red[t + 1][0];
  }
}

template <Mode M>
cudaError_t run(const NormalKLArgs& a, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (a.n <= 0 || a.c <= 0 || a.h <= 0 || a.w <= 0) return cudaErrorInvalidValue;
  const Layout l = layout_of(a, M);
  const int64_t blocks = a.n * l.blocks();
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const ReducePlan p = reduce_plan(a, l);
  Partials ws;
  char* base = static_cast<char*>(workspace);
  if constexpr (reduces(M)) {
    if (workspace == nullptr || a.sums_n == nullptr || a.kl_diag == nullptr || workspace_bytes < p.bytes) {
      return cudaErrorInvalidValue;
    }
    ws.channel = reinterpret_cast<float*>(base);
    ws.image = reinterpret_cast<float*>(base + p.image_offset);
    ws.channel_counters = p.channel.counter_ptr(base + p.channel_scratch_offset);
    ws.image_counters = p.image.counter_ptr(base + p.image_scratch_offset);
    ws.n_channel_counters = p.channel.counters();
    ws.n_image_counters = p.image.counters();
  }
  const dim3 grid(static_cast<unsigned>(blocks)), block(kLanes, kRows);
  cudaError_t err = cudaSuccess;
  NVAE_DISPATCH_DTYPE(a.dtype, T, {
    if (l.channel_fast) {
      err = launch(normal_kl_kernel<T, M, true>, grid, block, 0, stream, a, l.cblocks, l.hblocks, l.hw_per_block, ws);
    } else {
      err = launch(normal_kl_kernel<T, M, false>, grid, block, 0, stream, a, l.cblocks, l.hblocks, l.hw_per_block,
                   ws);
    }
  });
  if (err != cudaSuccess || !reduces(M)) return err;
  MergeOut kl_diag;  // mean over images of the per-image sums
  kl_diag.data = a.kl_diag;
  kl_diag.scale = 1.f / static_cast<float>(a.n);
  err = launch_merge(ws.channel, p.channel, base + p.channel_scratch_offset, kl_diag, stream);
  if (err != cudaSuccess) return err;
  MergeOut sums_n;  // (3, N)
  sums_n.data = a.sums_n;
  sums_n.fstride = a.n;
  return launch_merge(ws.image, p.image, base + p.image_scratch_offset, sums_n, stream);
}

bool has(const Strided4& v) { return v.data != nullptr; }

}  // namespace

size_t normal_kl_workspace_bytes(const NormalKLArgs& args) {
  if (args.n <= 0 || args.c <= 0 || args.h <= 0 || args.w <= 0) return 0;
  size_t bytes = 0;
  for (Mode m : {Mode::kKLForward, Mode::kFlowForward}) bytes = std::max(bytes, reduce_plan(args, layout_of(args, m)).bytes);
  return bytes;
}

cudaError_t normal_kl_forward(const NormalKLArgs& a, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (has(a.mu_p) != has(a.log_sigma_p) || !has(a.mu_q) || !has(a.log_sigma_q) || !has(a.eps) || !has(a.z_out)) {
    return cudaErrorInvalidValue;
  }
  return run<Mode::kKLForward>(a, workspace, workspace_bytes, stream);
}

cudaError_t normal_kl_backward(const NormalKLArgs& a, cudaStream_t stream) {
  if (has(a.mu_p) != has(a.log_sigma_p) || !has(a.mu_q) || !has(a.log_sigma_q) || !has(a.eps) || !has(a.d_mu_q) ||
      !has(a.d_log_sigma_q) || (has(a.mu_p) && (!has(a.d_mu_p) || !has(a.d_log_sigma_p)))) {
    return cudaErrorInvalidValue;
  }
  return run<Mode::kKLBackward>(a, nullptr, 0, stream);
}

cudaError_t flow_kl_forward(const NormalKLArgs& a, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (has(a.mu_p) != has(a.log_sigma_p) || !has(a.log_sigma_q) || !has(a.eps) || !has(a.z) || !has(a.log_det)) {
    return cudaErrorInvalidValue;
  }
  return run<Mode::kFlowForward>(a, workspace, workspace_bytes, stream);
}

cudaError_t flow_kl_backward(const NormalKLArgs& a, cudaStream_t stream) {
  if (has(a.mu_p) != has(a.log_sigma_p) || !has(a.log_sigma_q) || !has(a.eps) || !has(a.z) || !has(a.log_det) ||
      !has(a.d_log_sigma_q) || !has(a.d_z) || !has(a.d_log_det) ||
      (has(a.mu_p) && (!has(a.d_mu_p) || !has(a.d_log_sigma_p)))) {
    return cudaErrorInvalidValue;
  }
  return run<Mode::kFlowBackward>(a, nullptr, 0, stream);
}

cudaError_t normal_sample_forward(const NormalKLArgs& a, cudaStream_t stream) {
  if (has(a.mu) != has(a.log_sigma) || !has(a.eps) || !has(a.z_out)) return cudaErrorInvalidValue;
  return run<Mode::kSampleForward>(a, nullptr, 0, stream);
}

cudaError_t normal_sample_backward(const NormalKLArgs& a, cudaStream_t stream) {
  if (!has(a.mu) || !has(a.log_sigma) || !has(a.eps) || !has(a.d_mu) || !has(a.d_log_sigma)) {
    return cudaErrorInvalidValue;
  }
  return run<Mode::kSampleBackward>(a, nullptr, 0, stream);
}

}  // namespace nvae
