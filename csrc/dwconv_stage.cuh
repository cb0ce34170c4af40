// The depthwise stage of the fused generative cell (contract: nvae_fast/ops/dwconv_stage.py):
// tiling plans, shared-memory window loaders and the three kernels. Launch code lives in
// dwconv_stage_forward.cu and dwconv_stage_backward.cu.
//
// Every kernel works on channels-last tensors, one image n, one tile of positions and one slice
// of 32 channels per block of 256 threads (8 warps). Lane l of every warp owns channel c0 + l, so
// shared-memory reads of a warp are 32 consecutive floats (conflict-free) and every branch on a
// spatial coordinate is warp-uniform. Global loads and stores of a window go through 16-byte
// vectors (4 x fp32, 8 x fp16/bf16) when C allows, scalar otherwise; the window is kept in fp32.
//
//   forward       b = swish(a * scale + shift) on the tile plus its halo (nearest-2x upsampled
//                 view of a with `upsample`) -> c = dwconv(b); Welford partials of c per channel.
//   input grad    db = transposed dwconv(dc) at the conv input resolution, summed over each 2x2
//                 block with `upsample`; g = db * swish'(a * scale + shift); partial sums of g and
//                 g * (a - mean_a) per channel.
//   weight grad   dweight[c, ky, kx] = sum over outputs of dc * b at the tap's offset; each block
//                 sums all K * K taps over a run of tiles in registers, then one partial per block.
// BN1 + Swish (or its derivative) is evaluated once per element of a that a block stages: with
// `upsample` the window loader computes it at a's resolution and copies it to the 2 x 2 positions
// it covers. Only the halo of a tile is evaluated again by the neighbouring tile.
// The same kernels serve both contracts: BN1's scale / shift come as vectors or are folded from its
// tensors per block, and in the fused backward dc is rebuilt from dz and z with BN2's backward as
// the windows load it (never stored). Partials are merged in a fixed order by reduce.cuh's
// two-level merge, whose output the fused contract extends with the running-statistics update and
// the parameter gradients: deterministic, no atomics on values. Each thread computes kRun
// neighbouring outputs of a row (register blocking), so one window value read from shared memory
// feeds up to K multiply-adds.
#pragma once

#include <algorithm>
#include <limits>

#include "common.cuh"
#include "reduce.cuh"

namespace nvae {
namespace dw {

constexpr int kThreads = 256;
constexpr int kMinBlocks = 2;  // blocks per SM: a stated budget of 128 registers per thread
constexpr int kWarps = kThreads / 32;
constexpr int kSlice = 32;                  // channels per block, one per lane
constexpr int kRun = 4;                     // outputs per thread along a row
constexpr int kMaxTileRows = 64;
constexpr int kMaxTileCols = 32;

enum class Pass : int { kForward, kInputGrad, kWeightGrad };

// The per-channel coefficients a block keeps in shared memory (see load_coefs): BN1's scale, shift
// and mean; BN2's backward scale, kx, kc and mean (fused backward).
enum Coef : int { kScale1, kShift1, kMean1, kScaleZ, kKxZ, kKcZ, kMeanZ, kCoefs };

inline bool supported(const DwConvShape& s) {
  const bool k_ok = s.k == 3 || s.k == 5 || s.k == 7 || s.k == 11;
  const bool stride_ok = s.stride == 1 || (s.stride == 2 && !s.upsample);
  return s.n > 0 && s.c > 0 && s.h > 0 && s.w > 0 && k_ok && stride_ok;
}

// Rows of taps one weight-grad thread accumulates in registers (tap_rows(K) * K floats). With
// K = 11 the 121 taps split into four groups of 3 rows (the last one 2), each taken by two of the
// block's warps: 33 accumulators leave the registers the window loader needs while they are live.
// A window value read from shared memory feeds kRun multiply-adds per tap row either way.
__host__ __device__ constexpr int tap_rows(int k) { return k <= 7 ? k : 3; }
__host__ __device__ constexpr int tap_groups(int k) { return (k + tap_rows(k) - 1) / tap_rows(k); }

// One launch's geometry: the problem, the tile and the shared-memory layout. Passed by value.
// Block b takes channel block b % cblocks and the run of tiles_per_run tiles starting at tile
// (b / cblocks) * tiles_per_run; runs of more than one tile only in the weight grad.
struct Geometry {
  int64_t n, c;            // batch, channels
  int64_t h, w;            // a (low resolution with upsample)
  int64_t hi, wi;          // conv input: (2h, 2w) with upsample, else (h, w)
  int64_t ho, wo;          // conv output
  int k, pad, stride, up;  // up = 1 with upsample (window rows map to source row >> 1), else 0
  int th, tw;              // tile: output positions (forward, weight grad) or positions of a (input grad)
  int win_h, win_w;        // the halo window of the tile (b, or dc for the input grad)
  int64_t tiles_y, tiles_x, cblocks;
  int64_t tiles_per_run, runs;
  // Shared memory: coefficients (kCoefs * kSlice floats), the filters (K * K * kSlice, forward and
  // input grad), the window at window_offset floats, the second buffer (output / a / dc tile) at
  // window_offset + second_offset.
  int64_t window_offset;
  int64_t second_offset;
  int64_t smem_bytes;

  __host__ __device__ int64_t tiles() const { return n * tiles_y * tiles_x; }
  __host__ __device__ int64_t blocks() const { return runs * cblocks; }
};

inline void window_dims(Pass pass, int k, int stride, int up, int th, int tw, int& win_h, int& win_w) {
  if (pass != Pass::kInputGrad) {  // the input positions the tile's outputs read
    win_h = (th - 1) * stride + k;
    win_w = (tw - 1) * stride + k;
  } else if (stride == 1) {  // the outputs that read the tile's (upsampled) positions
    win_h = (th << up) + k - 1;
    win_w = (tw << up) + k - 1;
  } else {  // floor((y + pad) / 2) - floor((y0 - pad) / 2) + 1 over the tile's rows y, at most this
    win_h = (th + k - 2) / 2 + 2;
    win_w = (tw + k - 2) / 2 + 2;
  }
}

// Positions (of kSlice floats) of the scratch that the end-of-block reduction reuses the window for.
inline int scratch_positions(Pass pass, int k) {
  switch (pass) {
    case Pass::kForward: return kWarps * 3;       // Welford count, mean, m2 per warp
    case Pass::kInputGrad: return kWarps * 2;     // sum g, sum g * (a - mean) per warp
    case Pass::kWeightGrad: return k * k;         // the block's sum of every tap
  }
  return 0;
}

// Cost model of a tile, in multiply-add units per channel: staging a window position costs a global
// load, BN + Swish and a shared-memory store (kStageCost; BN + Swish and the load are shared by the
// 2 x 2 positions of one element of a with upsample), an output position K * K multiply-adds, with
// idle warps counted as lost time.
constexpr double kStageCost = 8.0;

// What a plan needs to know of the device: multiprocessors, and the dynamic shared memory a block
// may use with kMinBlocks blocks per multiprocessor (smem_per_block).
struct DeviceLimits {
  int sms;
  int64_t smem_per_block;
};

inline DeviceLimits current_device() { return DeviceLimits{sm_count(), smem_per_block(kMinBlocks)}; }

inline Geometry base_geometry(const DwConvShape& s) {
  Geometry g{};
  g.n = s.n;
  g.c = s.c;
  g.h = s.h;
  g.w = s.w;
  g.k = s.k;
  g.pad = s.k / 2;
  g.stride = s.stride;
  g.up = s.upsample ? 1 : 0;
  g.hi = s.h << g.up;
  g.wi = s.w << g.up;
  g.ho = (g.hi + 2 * g.pad - s.k) / s.stride + 1;
  g.wo = (g.wi + 2 * g.pad - s.k) / s.stride + 1;
  g.cblocks = ceil_div(s.c, kSlice);
  return g;
}

// Chooses the tile (th, tw), and for the weight grad the runs of tiles per block, that minimise the
// modelled time of the pass on the device's multiprocessors holding kMinBlocks blocks each: a pass
// with fewer blocks than that leaves multiprocessors idle, so small images get small tiles, and the
// largest tiles that fit the shared memory keep the halo (evaluated again by each neighbour) small.
// The weight grad sums runs of tiles per block into one partial; its runs fill whole waves of
// blocks where the tiles allow (at least one block per multiprocessor, or more when the channel
// blocks alone exceed a wave).
inline Geometry plan(Pass pass, const DwConvShape& s, const DeviceLimits& dev) {
  Geometry g = base_geometry(s);
  const int k = s.k;
  const int64_t span_y = pass == Pass::kInputGrad ? g.h : g.ho;
  const int64_t span_x = pass == Pass::kInputGrad ? g.w : g.wo;
  const int macs_per_position = k * k * (pass == Pass::kInputGrad ? (1 << (2 * g.up)) : 1);
  const double stage_cost = pass == Pass::kInputGrad ? kStageCost : kStageCost / (1 << (2 * g.up)) + 1.0;
  const int groups = pass == Pass::kWeightGrad ? tap_groups(k) : 1;
  const int scratch = scratch_positions(pass, k);
  const int64_t prefix = (kCoefs + (pass == Pass::kWeightGrad ? 0 : k * k)) * kSlice;  // floats before the window
  const int64_t capacity = static_cast<int64_t>(std::max(dev.sms, 1)) * kMinBlocks;
  double best = std::numeric_limits<double>::infinity();
  for (int tw = kRun; tw <= kMaxTileCols; tw *= 2) {
    if (tw > kRun && tw / 2 >= span_x) break;  // the previous width already spans the image
    const int64_t rows_max = std::min<int64_t>(span_y, kMaxTileRows);
    for (int th = 1; th <= rows_max; ++th) {
      int win_h = 0, win_w = 0;
      window_dims(pass, k, s.stride, g.up, th, tw, win_h, win_w);
      const int64_t first = std::max<int64_t>(static_cast<int64_t>(win_h) * win_w, scratch);
      const int64_t bytes = (prefix + (first + th * tw) * kSlice) * static_cast<int64_t>(sizeof(float));
      if (bytes > dev.smem_per_block) break;
      const int64_t tiles = s.n * ceil_div(span_y, th) * ceil_div(span_x, tw);
      const int busy_warps = static_cast<int>(std::min<int64_t>(th * tw / kRun, kWarps / groups)) * groups;
      const double tile_cost = stage_cost * win_h * win_w +
                               static_cast<double>(th) * tw * macs_per_position * kWarps / busy_warps;
      int64_t tiles_per_run = 1;
      double time = tile_cost * static_cast<double>(std::max(tiles * g.cblocks, capacity)) / capacity;
      if (pass == Pass::kWeightGrad) {
        // Per block: the merge of the warps' taps through shared memory and one partial of K * K taps.
        const double block_cost = static_cast<double>(k) * k * (kWarps / groups + 2);
        time = std::numeric_limits<double>::infinity();
        const int64_t min_waves = ceil_div(g.cblocks, capacity);
        for (int64_t waves = min_waves; waves < min_waves + 4; ++waves) {
          const int64_t runs_wanted = std::clamp<int64_t>(waves * capacity / g.cblocks, 1, tiles);
          const int64_t per_run = ceil_div(tiles, runs_wanted);
          const int64_t blocks = ceil_div(tiles, per_run) * g.cblocks;
          const double t = static_cast<double>(ceil_div(blocks, capacity)) * (per_run * tile_cost + block_cost);
          if (t < time) {
            time = t;
            tiles_per_run = per_run;
          }
        }
      }
      if (time < best) {
        best = time;
        g.th = th;
        g.tw = tw;
        g.win_h = win_h;
        g.win_w = win_w;
        g.window_offset = prefix;
        g.second_offset = first * kSlice;
        g.smem_bytes = bytes;
        g.tiles_per_run = tiles_per_run;
      }
    }
  }
  g.tiles_y = ceil_div(span_y, g.th);
  g.tiles_x = ceil_div(span_x, g.tw);
  g.runs = ceil_div(g.tiles(), g.tiles_per_run);
  return g;
}

// BN1 + Swish evaluations per element of a (per channel) that a pass of geometry g makes: 1 for
// the input grad (its tiles of a have no halo), 1 plus the halo's share for the others.
inline double evaluations_per_element(Pass pass, const Geometry& g) {
  if (pass == Pass::kInputGrad) return 1.0;
  // Elements of a along one axis that the windows of `tiles` tiles of `extent` outputs cover.
  auto covered = [&](int64_t tiles, int extent, int window, int64_t size) {
    int64_t sum = 0;
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t lo = t * extent * g.stride - g.pad;  // first window position, conv-input coordinates
      const int64_t first = std::max<int64_t>(floor_div(lo, 1 << g.up), 0);
      const int64_t last = std::min<int64_t>(floor_div(lo + window - 1, 1 << g.up), size - 1);
      sum += std::max<int64_t>(last - first + 1, 0);
    }
    return sum;
  };
  const double rows = static_cast<double>(covered(g.tiles_y, g.th, g.win_h, g.h));
  const double cols = static_cast<double>(covered(g.tiles_x, g.tw, g.win_w, g.w));
  return rows * cols / (static_cast<double>(g.h) * g.w);
}

// The workspaces: partials, then (256-byte aligned) their merge's scratch; the backward holds the
// input-grad pieces, then the weight-grad pieces.
struct ForwardPlan {
  Geometry geo;
  MergePlan merge;
  size_t scratch_offset, bytes;
};

inline ForwardPlan forward_plan(const DwConvShape& s, const DeviceLimits& dev) {
  ForwardPlan p;
  p.geo = plan(Pass::kForward, s, dev);
  p.merge = merge_plan(p.geo.tiles(), 3, s.c, true);
  p.scratch_offset = aligned_bytes(p.geo.tiles() * 3 * s.c * static_cast<int64_t>(sizeof(float)));
  p.bytes = p.scratch_offset + p.merge.scratch_bytes();
  return p;
}

struct BackwardPlan {
  Geometry input, weight;
  MergePlan input_merge, weight_merge;
  size_t input_scratch_offset, weight_offset, weight_scratch_offset, bytes;
};

inline BackwardPlan backward_plan(const DwConvShape& s, const DeviceLimits& dev) {
  BackwardPlan p;
  p.input = plan(Pass::kInputGrad, s, dev);
  p.weight = plan(Pass::kWeightGrad, s, dev);
  p.input_merge = merge_plan(p.input.tiles(), 2, s.c, false);
  p.weight_merge = merge_plan(p.weight.runs, s.k * s.k, s.c, false);
  const int64_t f = sizeof(float);
  p.input_scratch_offset = aligned_bytes(p.input.tiles() * 2 * s.c * f);
  p.weight_offset = p.input_scratch_offset + aligned_bytes(static_cast<int64_t>(p.input_merge.scratch_bytes()));
  p.weight_scratch_offset = p.weight_offset + aligned_bytes(p.weight.runs * s.k * s.k * s.c * f);
  p.bytes = p.weight_scratch_offset + p.weight_merge.scratch_bytes();
  return p;
}

// ---- what the kernels read ---------------------------------------------------------------------

// The tensors and per-channel parameters of a pass: BN1 as scale / shift / mean_a vectors (plain
// contract) or as a BatchNorm's tensors folded in the kernel (fused contract, scale == nullptr);
// dc read as is, or rebuilt from dz (in `dc`) and z with BN2's backward (fused, z != nullptr).
struct StageArgs {
  const void* a = nullptr;
  const void* dc = nullptr;
  const void* z = nullptr;
  void* out = nullptr;           // c (forward) or g (input grad)
  float* partials = nullptr;     // null in the fused forward without statistics (eval)
  unsigned* counters = nullptr;  // of the partials' merge, zeroed by the kernel
  int64_t n_counters = 0;
  const float* scale = nullptr;
  const float* shift = nullptr;
  const float* mean_a = nullptr;
  BatchNormArgs bn1, bn_z;
  BatchNormGrad grad_z;
  const void* weight = nullptr;  // the filter (C, 1, K, K), contiguous
  DType weight_dtype = DType::kFloat32;
};

// Per-channel coefficients of the block's channels, computed once per block into shared memory:
// coef[k * kSlice + j] for channel c0 + j (zero past C). As the contract's reference computes them:
// scale = weight * rsqrt(var + eps), shift = bias - mean * scale; BN2's backward
// kx = -scale * invstd^2 * sums[1] / count, kc = -scale * sums[0] / count (0 in eval).
__device__ __forceinline__ void load_coefs(const StageArgs& x, int64_t C, int64_t c0, float* coef) {
  const int j = threadIdx.x;
  if (j >= kSlice) return;
  const int64_t c = c0 + j;
  float v[kCoefs] = {};
  if (c < C) {
    if (x.scale != nullptr) {
      v[kScale1] = x.scale[c];
      v[kShift1] = x.shift[c];
      v[kMean1] = x.mean_a != nullptr ? x.mean_a[c] : 0.f;
    } else {
      const float invstd = rsqrtf(x.bn1.var[c] + x.bn1.eps);
      v[kScale1] = load_as(x.bn1.param_dtype, x.bn1.weight, c) * invstd;
      v[kShift1] = load_as(x.bn1.param_dtype, x.bn1.bias, c) - x.bn1.mean[c] * v[kScale1];
      v[kMean1] = x.bn1.mean[c];
    }
    if (x.z != nullptr) {
      const float invstd = rsqrtf(x.bn_z.var[c] + x.bn_z.eps);
      const float scale = load_as(x.bn_z.param_dtype, x.bn_z.weight, c) * invstd;
      v[kScaleZ] = scale;
      v[kMeanZ] = x.bn_z.mean[c];
      if (x.grad_z.training) {
        const auto count = static_cast<float>(x.grad_z.count);
        v[kKxZ] = -scale * invstd * invstd * x.grad_z.sums[C + c] / count;
        v[kKcZ] = -scale * x.grad_z.sums[c] / count;
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kCoefs; ++k) coef[k * kSlice + j] = v[k];
}

// The block's filters, filt[t * kSlice + j] = tap t of channel c0 + j (channel C - 1 past C: those
// results are never stored), from the (C, K * K) parameter in its dtype.
template <int K>
__device__ __forceinline__ void load_filters(const StageArgs& x, int64_t C, int64_t c0, float* filt) {
  for (int i = threadIdx.x; i < K * K * kSlice; i += kThreads) {
    const int t = i / kSlice, j = i - t * kSlice;
    const int64_t c = std::min<int64_t>(c0 + j, C - 1);
    filt[i] = load_as(x.weight_dtype, x.weight, c * K * K + t);
  }
}

// The lane's K x K filter. Up to 7 x 7 it lives in registers; an 11 x 11 filter (121 registers)
// is read a row at a time from shared memory instead, in a loop over rows that stays rolled
// (unrolled, the compiler would hoist all 121 loads into registers again), which keeps the kernels
// free of spills.
template <int K>
struct Filter {
  static constexpr bool kInRegisters = K <= 7;
  static constexpr int kRowUnroll = kInRegisters ? K : 1;
  float tap[kInRegisters ? K * K : 1];
  const float* column;  // filt + lane: tap t at column[t * kSlice]

  __device__ __forceinline__ Filter(const float* filt, int lane) : column(filt + lane) {
    if constexpr (kInRegisters) {
#pragma unroll
      for (int t = 0; t < K * K; ++t) tap[t] = column[t * kSlice];
    }
  }

  __device__ __forceinline__ void row(int ky, float (&out)[K]) const {
#pragma unroll
    for (int kx = 0; kx < K; ++kx) out[kx] = kInRegisters ? tap[ky * K + kx] : column[(ky * K + kx) * kSlice];
  }
};

// ---- shared-memory windows ---------------------------------------------------------------------

template <int VEC>
__device__ __forceinline__ void put_floats(float* dst, const float (&v)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int i = 0; i < VEC; i += 4) *reinterpret_cast<float4*>(dst + i) = make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) dst[i] = v[i];
  }
}

template <int VEC>
__device__ __forceinline__ void get_floats(const float* src, float (&v)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int i = 0; i < VEC; i += 4) {
      const float4 q = *reinterpret_cast<const float4*>(src + i);
      v[i] = q.x;
      v[i + 1] = q.y;
      v[i + 2] = q.z;
      v[i + 3] = q.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = src[i];
  }
}

// What a window loader computes from an element v of src (the block's coefficients in `coef`):
//   kRaw    v
//   kSwish  swish(v * scale1 + shift1): BN1 + Swish of a
//   kDc     dc itself, or (z given) dc = scale_z * v + kx_z * (z - mean_z) + kc_z rounded to T
enum class Load : int { kRaw, kSwish, kDc };

// buf[(r * cols + q) * kSlice + j] = f(src[(y >> up, x >> up), c0 + j]) for window position (r, q),
// y = y0 + r, x = x0 + q, f as `L` says. Zero where (y, x) falls outside the (upsampled) image
// [0, src_h << up) x [0, src_w << up) and for channels >= C: the conv's zero padding. src (and z)
// point at image n (src_h x src_w x C, channels-last). The loop runs over the elements of src the
// window covers, so f is evaluated once per element and copied to the up to 2 x 2 window positions
// it covers with upsample. kGroups = kSlice / VEC threads share an element; each keeps one channel
// group for the whole loop.
template <Load L, int VEC, typename T>
__device__ __forceinline__ void load_window_impl(const T* __restrict__ src, const T* __restrict__ z, int64_t C,
                                                 int64_t src_h, int64_t src_w, int up, int64_t c0, int64_t y0,
                                                 int64_t x0, int rows, int cols, const float* coef, float* buf) {
  constexpr int kGroups = kSlice / VEC;
  const int group = threadIdx.x % kGroups;
  const int64_t cg = c0 + group * VEC;
  const bool channels_ok = cg < C;  // VEC > 1 only when C % VEC == 0: then the whole vector is in range
  const float* cf = coef + group * VEC;  // coefficient k of element e at cf[k * kSlice + e]
  const int rep = 1 << up;               // window positions per element of src, along each axis
  const int64_t sy0 = floor_div(y0, rep), sx0 = floor_div(x0, rep);
  const int src_rows = static_cast<int>(floor_div(y0 + rows - 1, rep) - sy0 + 1);
  const int src_cols = static_cast<int>(floor_div(x0 + cols - 1, rep) - sx0 + 1);
  for (int idx = threadIdx.x / kGroups; idx < src_rows * src_cols; idx += kThreads / kGroups) {
    const int i = idx / src_cols;
    const int j = idx - i * src_cols;
    const int64_t sy = sy0 + i, sx = sx0 + j;
    float v[VEC];
    if (channels_ok && sy >= 0 && sy < src_h && sx >= 0 && sx < src_w) {
      const int64_t offset = (sy * src_w + sx) * C + cg;
      load_vec<T, VEC>(src + offset, v);
      if constexpr (L == Load::kSwish) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float zv = fmaf(v[e], cf[kScale1 * kSlice + e], cf[kShift1 * kSlice + e]);
          v[e] = zv * sigmoidf_fast(zv);
        }
      } else if constexpr (L == Load::kDc) {
        if (z != nullptr) {
          float zv[VEC];
          load_vec<T, VEC>(z + offset, zv);
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const float d = cf[kScaleZ * kSlice + e] * v[e] +
                            cf[kKxZ * kSlice + e] * (zv[e] - cf[kMeanZ * kSlice + e]) + cf[kKcZ * kSlice + e];
            v[e] = to_float(from_float<T>(d));
          }
        }
      }
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[e] = 0.f;
    }
    const int r0 = static_cast<int>(sy * rep - y0), q0 = static_cast<int>(sx * rep - x0);
    for (int r = std::max(r0, 0); r < std::min(r0 + rep, rows); ++r) {
      for (int q = std::max(q0, 0); q < std::min(q0 + rep, cols); ++q) {
        put_floats<VEC>(buf + (r * cols + q) * kSlice + group * VEC, v);
      }
    }
  }
}

template <Load L, typename T>
__device__ __forceinline__ void load_window(bool vec, const T* src, const T* z, int64_t C, int64_t src_h,
                                            int64_t src_w, int up, int64_t c0, int64_t y0, int64_t x0, int rows,
                                            int cols, const float* coef, float* buf) {
  if (vec) {
    load_window_impl<L, 16 / sizeof(T), T>(src, z, C, src_h, src_w, up, c0, y0, x0, rows, cols, coef, buf);
  } else {
    load_window_impl<L, 1, T>(src, z, C, src_h, src_w, up, c0, y0, x0, rows, cols, coef, buf);
  }
}

// dst[(y0 + r, x0 + q), c0 + j] = buf[(r * cols + q) * kSlice + j], rounded to T, for positions
// inside dst_h x dst_w and channels < C. dst points at image n (channels-last); y0, x0 >= 0.
template <int VEC, typename T>
__device__ __forceinline__ void store_tile_impl(const float* buf, int rows, int cols, T* __restrict__ dst, int64_t C,
                                                int64_t dst_h, int64_t dst_w, int64_t c0, int64_t y0, int64_t x0) {
  constexpr int kGroups = kSlice / VEC;
  const int group = threadIdx.x % kGroups;
  const int64_t cg = c0 + group * VEC;
  if (cg >= C) return;  // no barrier follows in this function
  for (int idx = threadIdx.x / kGroups; idx < rows * cols; idx += kThreads / kGroups) {
    const int r = idx / cols;
    const int q = idx - r * cols;
    const int64_t y = y0 + r, x = x0 + q;
    if (y < dst_h && x < dst_w) {
      float v[VEC];
      get_floats<VEC>(buf + idx * kSlice + group * VEC, v);
      store_vec<T, VEC>(dst + (y * dst_w + x) * C + cg, v);
    }
  }
}

template <typename T>
__device__ __forceinline__ void store_tile(bool vec, const float* buf, int rows, int cols, T* dst, int64_t C,
                                           int64_t dst_h, int64_t dst_w, int64_t c0, int64_t y0, int64_t x0) {
  if (vec) {
    store_tile_impl<16 / sizeof(T), T>(buf, rows, cols, dst, C, dst_h, dst_w, c0, y0, x0);
  } else {
    store_tile_impl<1, T>(buf, rows, cols, dst, C, dst_h, dst_w, c0, y0, x0);
  }
}

// Block index -> (image, tile row, tile column, channel block); channel blocks vary fastest.
struct TileIndex {
  int64_t n, ty, tx, cb, tile;  // tile = (n * tiles_y + ty) * tiles_x + tx
  __device__ __forceinline__ TileIndex(const Geometry& g, int64_t block) {
    cb = block % g.cblocks;
    tile = block / g.cblocks;
    tx = tile % g.tiles_x;
    const int64_t rest = tile / g.tiles_x;
    ty = rest % g.tiles_y;
    n = rest / g.tiles_y;
  }
};

// ---- forward -----------------------------------------------------------------------------------

// Grid: n * tiles_y * tiles_x * cblocks blocks of kThreads. Writes c and, unless x.partials is
// null, Welford partials partials[(tile * 3 + {count, mean, m2}) * C + c] of the fp32 (unrounded)
// outputs; zeroes the arrival counters of their merge.
template <typename T, int K, int S>
__global__ void __launch_bounds__(kThreads, kMinBlocks) forward_kernel(Geometry g, StageArgs x, bool vec) {
  zero_merge_counters(x.counters, x.n_counters);
  float* coef = shared_floats();
  float* filt = coef + kCoefs * kSlice;
  float* win = coef + g.window_offset;
  float* tile_out = win + g.second_offset;
  const TileIndex ti(g, blockIdx.x);
  const int64_t C = g.c;
  const int64_t c0 = ti.cb * kSlice;
  const int64_t oy0 = ti.ty * g.th, ox0 = ti.tx * g.tw;

  load_coefs(x, C, c0, coef);
  load_filters<K>(x, C, c0, filt);
  __syncthreads();
  load_window<Load::kSwish>(vec, static_cast<const T*>(x.a) + ti.n * g.h * g.w * C, static_cast<const T*>(nullptr),
                            C, g.h, g.w, g.up, c0, oy0 * S - g.pad, ox0 * S - g.pad, g.win_h, g.win_w, coef, win);
  __syncthreads();

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t c = c0 + lane;
  const Filter<K> f(filt, lane);
  Welford stats;
  const int segs_x = g.tw / kRun;
  for (int seg = warp; seg < g.th * segs_x; seg += kWarps) {
    const int sy = seg / segs_x, sx = seg - sy * segs_x;
    float acc[kRun] = {};
#pragma unroll Filter<K>::kRowUnroll
    for (int ky = 0; ky < K; ++ky) {
      float taps[K];
      f.row(ky, taps);
      const float* row = win + ((sy * S + ky) * g.win_w + sx * kRun * S) * kSlice + lane;
#pragma unroll
      for (int m = 0; m < S * (kRun - 1) + K; ++m) {
        const float v = row[m * kSlice];
#pragma unroll
        for (int r = 0; r < kRun; ++r) {
          const int kx = m - S * r;
          if (kx >= 0 && kx < K) acc[r] = fmaf(taps[kx], v, acc[r]);
        }
      }
    }
    const bool row_ok = c < C && oy0 + sy < g.ho;
#pragma unroll
    for (int r = 0; r < kRun; ++r) {
      tile_out[(sy * g.tw + sx * kRun + r) * kSlice + lane] = acc[r];
      if (row_ok && ox0 + sx * kRun + r < g.wo) stats.push(acc[r]);
    }
  }
  __syncthreads();  // tile_out complete; the window is free for the statistics scratch

  store_tile(vec, tile_out, g.th, g.tw, static_cast<T*>(x.out) + ti.n * g.ho * g.wo * C, C, g.ho, g.wo, c0, oy0,
             ox0);
  if (x.partials == nullptr) return;  // uniform across the block: no barrier is skipped by some threads only
  win[(warp * 3 + 0) * kSlice + lane] = stats.count;
  win[(warp * 3 + 1) * kSlice + lane] = stats.mean;
  win[(warp * 3 + 2) * kSlice + lane] = stats.m2;
  __syncthreads();
  if (warp == 0 && c < C) {
    Welford acc;
    for (int w = 0; w < kWarps; ++w) {
      Welford part;
      part.count = win[(w * 3 + 0) * kSlice + lane];
      part.mean = win[(w * 3 + 1) * kSlice + lane];
      part.m2 = win[(w * 3 + 2) * kSlice + lane];
      acc = Welford::merge(acc, part);
    }
    x.partials[(ti.tile * 3 + 0) * C + c] = acc.count;
    x.partials[(ti.tile * 3 + 1) * C + c] = acc.mean;
    x.partials[(ti.tile * 3 + 2) * C + c] = acc.m2;
  }
}

// ---- input gradient ----------------------------------------------------------------------------

// Tiles cover positions of a. For a conv-input position i (row or column) the output o that tap k
// connects it to satisfies o * S - pad + k = i. U = 2 with upsample (S = 1): the kRun positions of
// a thread are 2 x 2kRun conv-input positions, summed per 2 x 2 block. Grid as forward_kernel.
// Writes g and partials[(tile * 2 + {sum g, sum g * (a - mean)}) * C + c] of the fp32 g, and zeroes
// the arrival counters of their merge.
// With U = 2 and K >= 7 a thread's 2 x 2kRun accumulators and window columns exceed the 128-register
// budget (152 bytes of spills per thread at K = 7 under kMinBlocks = 2): one block per SM instead.
template <typename T, int K, int S, int U>
__global__ void __launch_bounds__(kThreads, (U == 2 && K >= 7) ? 1 : kMinBlocks)
    input_grad_kernel(Geometry g, StageArgs x, bool vec) {
  static_assert(S == 1 || U == 1, "stride 2 with upsample is not supported");
  zero_merge_counters(x.counters, x.n_counters);
  constexpr int P = K / 2;
  // Window columns a thread reads, relative to its run's first column (see the m loop below).
  constexpr int kCols = S == 1 ? U * kRun + K - 1 : (kRun - 1 + P) / 2 + (P + 1) / 2 + 1;
  float* coef = shared_floats();
  float* filt = coef + kCoefs * kSlice;
  float* win = coef + g.window_offset;
  float* tile_a = win + g.second_offset;
  const TileIndex ti(g, blockIdx.x);
  const int64_t C = g.c;
  const int64_t c0 = ti.cb * kSlice;
  const int64_t ly0 = ti.ty * g.th, lx0 = ti.tx * g.tw;  // lx0 is even: tw is a multiple of kRun
  // Window origin in output coordinates: the first output any position of the tile receives from.
  const int64_t wy0 = S == 1 ? ly0 * U - P : floor_div(ly0 - P, 2);
  const int64_t wx0 = S == 1 ? lx0 * U - P : floor_div(lx0 - P, 2);

  load_coefs(x, C, c0, coef);
  load_filters<K>(x, C, c0, filt);
  __syncthreads();
  const int64_t out_image = ti.n * g.ho * g.wo * C;
  const T* z = x.z != nullptr ? static_cast<const T*>(x.z) + out_image : nullptr;
  load_window<Load::kDc>(vec, static_cast<const T*>(x.dc) + out_image, z, C, g.ho, g.wo, 0, c0, wy0, wx0, g.win_h,
                         g.win_w, coef, win);
  load_window<Load::kRaw>(vec, static_cast<const T*>(x.a) + ti.n * g.h * g.w * C, static_cast<const T*>(nullptr), C,
                          g.h, g.w, 0, c0, ly0, lx0, g.th, g.tw, coef, tile_a);
  __syncthreads();

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t c = c0 + lane;
  const bool c_ok = c < C;
  const Filter<K> f(filt, lane);
  const float sc = coef[kScale1 * kSlice + lane], sh = coef[kShift1 * kSlice + lane];
  const float mu = coef[kMean1 * kSlice + lane];
  float sum_g = 0.f, sum_gxmu = 0.f;
  const int segs_x = g.tw / kRun;
  for (int seg = warp; seg < g.th * segs_x; seg += kWarps) {
    const int sy = seg / segs_x, sx = seg - sy * segs_x;
    float acc[kRun] = {};
#pragma unroll
    for (int dy = 0; dy < U; ++dy) {
#pragma unroll Filter<K>::kRowUnroll
      for (int ky = 0; ky < K; ++ky) {
        int row;
        if constexpr (S == 1) {
          row = (sy * U + dy) + 2 * P - ky;  // o = i + P - ky, i = (ly0 + sy) * U + dy
        } else {
          const int64_t t = ly0 + sy + P - ky;  // 2 o = i + P - ky
          if (t & 1) continue;
          row = static_cast<int>((t >> 1) - wy0);
        }
        float taps[K];
        f.row(ky, taps);
        const float* rp = win + (row * g.win_w + (S == 1 ? sx * kRun * U : sx * kRun / 2)) * kSlice + lane;
#pragma unroll
        for (int m = 0; m < kCols; ++m) {
          const float v = rp[m * kSlice];
#pragma unroll
          for (int j = 0; j < U * kRun; ++j) {
            // Column j of the run (conv-input column i = U * (lx0 + sx * kRun) + j) meets window
            // column m through tap kx: S = 1: m = j + 2P - kx;  S = 2: m = (j + P - kx) / 2 + (P + 1) / 2.
            const int kx = S == 1 ? j + 2 * P - m : j + P - 2 * (m - (P + 1) / 2);
            if (kx >= 0 && kx < K) acc[j / U] = fmaf(taps[kx], v, acc[j / U]);
          }
        }
      }
    }
    const bool row_ok = c_ok && ly0 + sy < g.h;
#pragma unroll
    for (int r = 0; r < kRun; ++r) {
      if (row_ok && lx0 + sx * kRun + r < g.w) {
        float* pa = tile_a + (sy * g.tw + sx * kRun + r) * kSlice + lane;
        const float av = *pa;
        const float gv = acc[r] * swish_grad(fmaf(av, sc, sh));
        sum_g += gv;
        sum_gxmu = fmaf(gv, av - mu, sum_gxmu);
        *pa = gv;  // only this thread reads or writes this element
      }
    }
  }
  __syncthreads();  // tile_a holds g; the window is free for the sums scratch

  store_tile(vec, tile_a, g.th, g.tw, static_cast<T*>(x.out) + ti.n * g.h * g.w * C, C, g.h, g.w, c0, ly0, lx0);
  win[(warp * 2 + 0) * kSlice + lane] = sum_g;
  win[(warp * 2 + 1) * kSlice + lane] = sum_gxmu;
  __syncthreads();
  if (warp == 0 && c_ok) {
    float s0 = 0.f, s1 = 0.f;
    for (int w = 0; w < kWarps; ++w) {
      s0 += win[(w * 2 + 0) * kSlice + lane];
      s1 += win[(w * 2 + 1) * kSlice + lane];
    }
    x.partials[(ti.tile * 2 + 0) * C + c] = s0;
    x.partials[(ti.tile * 2 + 1) * C + c] = s1;
  }
}

// ---- weight gradient ---------------------------------------------------------------------------

// Grid: cblocks * runs blocks; block (cb, run) sums tiles [run * tiles_per_run, +tiles_per_run) for
// every tap and writes partials[(run * K * K + ky * K + kx) * C + c], and zeroes the arrival
// counters of their merge. The warps split into tap_groups(K) groups of tap rows; every group walks
// all of a tile's outputs, so each window is loaded (and BN + Swish evaluated) once.
template <typename T, int K, int S>
__global__ void __launch_bounds__(kThreads, kMinBlocks) weight_grad_kernel(Geometry g, StageArgs x, bool vec) {
  constexpr int KR = tap_rows(K);
  constexpr int kGroupWarps = kWarps / tap_groups(K);
  static_assert(kWarps % tap_groups(K) == 0, "tap groups must split the warps evenly");
  zero_merge_counters(x.counters, x.n_counters);
  float* coef = shared_floats();
  float* win = coef + g.window_offset;
  float* tile_dc = win + g.second_offset;
  const int64_t C = g.c;
  const int64_t cb = blockIdx.x % g.cblocks;
  const int64_t run = blockIdx.x / g.cblocks;
  const int64_t c0 = cb * kSlice;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int ky0 = warp / kGroupWarps * KR;  // the warp's first tap row
  const int group_warp = warp % kGroupWarps;
  const int segs_x = g.tw / kRun;
  load_coefs(x, C, c0, coef);  // the first barrier of the tile loop publishes them

  float acc[KR][K] = {};
  const int64_t t_end = std::min<int64_t>((run + 1) * g.tiles_per_run, g.tiles());
  for (int64_t tile = run * g.tiles_per_run; tile < t_end; ++tile) {
    const int64_t tx = tile % g.tiles_x, rest = tile / g.tiles_x;
    const int64_t ty = rest % g.tiles_y, n = rest / g.tiles_y;
    const int64_t oy0 = ty * g.th, ox0 = tx * g.tw;
    __syncthreads();  // the previous tile's windows are no longer read
    load_window<Load::kSwish>(vec, static_cast<const T*>(x.a) + n * g.h * g.w * C, static_cast<const T*>(nullptr), C,
                              g.h, g.w, g.up, c0, oy0 * S - g.pad, ox0 * S - g.pad, g.win_h, g.win_w, coef, win);
    const int64_t out_image = n * g.ho * g.wo * C;
    const T* z = x.z != nullptr ? static_cast<const T*>(x.z) + out_image : nullptr;
    load_window<Load::kDc>(vec, static_cast<const T*>(x.dc) + out_image, z, C, g.ho, g.wo, 0, c0, oy0, ox0, g.th,
                           g.tw, coef, tile_dc);
    __syncthreads();
    for (int seg = group_warp; seg < g.th * segs_x; seg += kGroupWarps) {
      const int sy = seg / segs_x, sx = seg - sy * segs_x;
      float d[kRun];  // zero outside the output (the window load pads dc with zeros)
#pragma unroll
      for (int r = 0; r < kRun; ++r) d[r] = tile_dc[(sy * g.tw + sx * kRun + r) * kSlice + lane];
#pragma unroll
      for (int kr = 0; kr < KR; ++kr) {
        const int ky = ky0 + kr;
        if (ky >= K) break;
        const float* row = win + ((sy * S + ky) * g.win_w + sx * kRun * S) * kSlice + lane;
#pragma unroll
        for (int m = 0; m < S * (kRun - 1) + K; ++m) {
          const float v = row[m * kSlice];
#pragma unroll
          for (int r = 0; r < kRun; ++r) {
            const int kx = m - S * r;
            if (kx >= 0 && kx < K) acc[kr][kx] = fmaf(d[r], v, acc[kr][kx]);
          }
        }
      }
    }
  }
  // Windows free: each group's warps add their taps in warp order into win[(ky * K + kx) * kSlice + lane].
  __syncthreads();
  for (int w = 0; w < kGroupWarps; ++w) {
    if (group_warp == w) {
#pragma unroll
      for (int kr = 0; kr < KR; ++kr) {
        const int ky = ky0 + kr;
        if (ky >= K) break;
#pragma unroll
        for (int kx = 0; kx < K; ++kx) {
          float* s = win + (ky * K + kx) * kSlice + lane;
          *s = (w == 0 ? 0.f : *s) + acc[kr][kx];
        }
      }
    }
    __syncthreads();
  }
  for (int i = threadIdx.x; i < K * K * kSlice; i += kThreads) {
    const int64_t c = c0 + i % kSlice;
    if (c < C) x.partials[(run * K * K + i / kSlice) * C + c] = win[i];
  }
}

// ---- the merges' outputs in the fused contract -----------------------------------------------------

// a + w (b - a) as torch's lerp computes it.
__device__ __forceinline__ float lerp(float a, float b, float w) {
  const float diff = b - a;
  return w < 0.5f ? a + w * diff : b - diff * (1.f - w);
}

// v rounded to dtype and back.
__device__ __forceinline__ float round_as(DType dtype, float v) {
  switch (dtype) {
    case DType::kFloat16: return to_float(from_float<__half>(v));
    case DType::kBFloat16: return to_float(from_float<__nv_bfloat16>(v));
    default: return v;
  }
}

// The forward's statistics, out[c] = mean, out[C + c] = var, and BN2's running update (RunningUpdate
// in nvae_fast.h: running.lerp_(batch.to(dtype), momentum) per vector, num_batches_tracked += 1).
struct StatsOut {
  float* out;
  int64_t C;
  RunningUpdate running;

  __device__ void stats(int64_t c, float mean, float var) const {
    out[c] = mean;
    out[C + c] = var;
    const RunningUpdate& r = running;
    if (r.mean == nullptr) return;
    store_as(r.dtype, r.mean, c, lerp(load_as(r.dtype, r.mean, c), round_as(r.dtype, mean), r.momentum));
    store_as(r.dtype, r.var, c, lerp(load_as(r.dtype, r.var, c), round_as(r.dtype, var * r.unbias), r.momentum));
    if (c == 0 && r.num_batches_tracked != nullptr) *r.num_batches_tracked += 1;  // once per launch
  }
};

// BN1's backward sums, sums[f * C + c], and its parameter gradients in their dtype:
// grad_weight = sums[1] * rsqrt(var + eps), grad_bias = sums[0].
struct InputSumsOut {
  float* sums;
  int64_t C;
  BatchNormArgs bn1;
  void* grad_weight;
  void* grad_bias;

  __device__ void sum(int f, int64_t c, float s) const {
    sums[f * C + c] = s;
    if (f == 0) {
      store_as(bn1.param_dtype, grad_bias, c, s);
    } else {
      store_as(bn1.param_dtype, grad_weight, c, s * rsqrtf(bn1.var[c] + bn1.eps));
    }
  }
};

// dweight[c * K * K + t] in the filter's dtype.
struct TapsOut {
  void* dweight;
  DType dtype;
  int taps;

  __device__ void sum(int t, int64_t c, float s) const { store_as(dtype, dweight, c * taps + t, s); }
};

}  // namespace dw
}  // namespace nvae
