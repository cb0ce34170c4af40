// BatchNorm + Swish: batch statistics, forward apply, and the two backward passes.
// Layouts: NCHW (reduce over N and HW per channel, vectorised along HW) and channels-last
// (a [M = N*H*W, C] matrix, vectorised along C). Reductions write one fp32 partial per
// (block row-chunk, channel) and reduce.cu's two-level merge combines them in a fixed order:
// deterministic, no atomics on values.
#include <algorithm>

#include "common.cuh"
#include "reduce.cuh"

namespace nvae {
namespace {

constexpr int kThreads = 256;

struct ChannelCoef {
  float scale = 0.f, shift = 0.f, mean = 0.f;
};

// Mean and M2 (sum of squared deviations) by Welford's update; partials merge by Chan's formula.
struct WelfordOp {
  static constexpr int kFields = 3;  // count, mean, m2
  static constexpr bool kWelford = true;
  static constexpr bool kUsesDy = false;
  struct State {
    float v[kFields] = {0.f, 0.f, 0.f};
  };
  __device__ static void update(State& s, float x, float /*dy*/, const ChannelCoef& /*coef*/) {
    s.v[0] += 1.f;
    const float delta = x - s.v[1];
    s.v[1] += delta / s.v[0];
    s.v[2] += delta * (x - s.v[1]);
  }
  __device__ static State merge(const State& a, const State& b) {
    State r;
    r.v[0] = a.v[0] + b.v[0];
    if (r.v[0] == 0.f) return r;
    const float delta = b.v[1] - a.v[1];
    const float wb = b.v[0] / r.v[0];
    r.v[1] = a.v[1] + delta * wb;
    r.v[2] = a.v[2] + b.v[2] + delta * delta * a.v[0] * wb;
    return r;
  }
};

// Sums of g and g * (x - mean), with g = dy * swish'(x * scale + shift): BN backward's two reductions.
struct BackwardSumsOp {
  static constexpr int kFields = 2;  // sum_g, sum_gxmu
  static constexpr bool kWelford = false;
  static constexpr bool kUsesDy = true;
  struct State {
    float v[kFields] = {0.f, 0.f};
  };
  __device__ static void update(State& s, float x, float dy, const ChannelCoef& k) {
    const float g = dy * swish_grad(fmaf(x, k.scale, k.shift));
    s.v[0] += g;
    s.v[1] = fmaf(g, x - k.mean, s.v[1]);
  }
  __device__ static State merge(const State& a, const State& b) {
    State r;
    r.v[0] = a.v[0] + b.v[0];
    r.v[1] = a.v[1] + b.v[1];
    return r;
  }
};

__device__ __forceinline__ ChannelCoef load_coef(const float* scale, const float* shift, const float* mean,
                                                 int64_t c) {
  ChannelCoef k;
  if (scale != nullptr) {
    k.scale = scale[c];
    k.shift = shift[c];
    k.mean = mean[c];
  }
  return k;
}

// Tree-merges rows 0..rows-1 of smem[row * stride + lane] into row 0 (rows a power of two); each
// thread owns `width` consecutive lanes starting at `lane`.
template <class Op>
__device__ void block_merge(typename Op::State* smem, int row, int lane, int width, int stride, int rows) {
  for (int s = rows / 2; s > 0; s /= 2) {
    __syncthreads();
    if (row < s) {
      for (int l = lane; l < lane + width; ++l) {
        smem[row * stride + l] = Op::merge(smem[row * stride + l], smem[(row + s) * stride + l]);
      }
    }
  }
  __syncthreads();
}

// ws[(chunk * kFields + f) * C + c]: the layout of reduce.cuh's merge.
template <class Op>
__device__ void write_partial(float* ws, const typename Op::State& s, int64_t chunk, int64_t C, int64_t c) {
#pragma unroll
  for (int f = 0; f < Op::kFields; ++f) ws[(chunk * Op::kFields + f) * C + c] = s.v[f];
}

// Channels-last: block (TX, TY) covers TX * VEC channels and one chunk of rows; grid (channel tiles, chunks).
template <class Op, typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    reduce_nhwc_partial(const T* __restrict__ x, const T* __restrict__ dy, int64_t M, int64_t C,
                        int64_t rows_per_chunk, const float* scale, const float* shift, const float* mean,
                        float* __restrict__ ws, unsigned* __restrict__ counters, int64_t n_counters) {
  zero_merge_counters(counters, n_counters);
  __shared__ typename Op::State smem[kThreads * VEC];
  const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x, TY = blockDim.y;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * TX + tx) * VEC;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t r1 = min(M, r0 + rows_per_chunk);

  typename Op::State st[VEC];
  if (c0 < C) {  // VEC > 1 only when C % VEC == 0, so the whole vector is in range
    ChannelCoef coef[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) coef[v] = load_coef(scale, shift, mean, c0 + v);
    for (int64_t r = r0 + ty; r < r1; r += TY) {
      float xv[VEC], dv[VEC] = {};
      load_vec<T, VEC>(x + r * C + c0, xv);
      if constexpr (Op::kUsesDy) load_vec<T, VEC>(dy + r * C + c0, dv);
#pragma unroll
      for (int v = 0; v < VEC; ++v) Op::update(st[v], xv[v], dv[v], coef[v]);
    }
  }
  const int stride = TX * VEC;
#pragma unroll
  for (int v = 0; v < VEC; ++v) smem[ty * stride + tx * VEC + v] = st[v];
  block_merge<Op>(smem, ty, tx * VEC, VEC, stride, TY);
  if (ty == 0 && c0 < C) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) write_partial<Op>(ws, smem[tx * VEC + v], blockIdx.y, C, c0 + v);
  }
}

// NCHW: block covers one channel and one chunk of its N * HW elements; grid (C, chunks).
template <class Op, typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    reduce_nchw_partial(const T* __restrict__ x, const T* __restrict__ dy, int64_t N, int64_t C, int64_t HW,
                        int64_t units_per_chunk, const float* scale, const float* shift, const float* mean,
                        float* __restrict__ ws, unsigned* __restrict__ counters, int64_t n_counters) {
  zero_merge_counters(counters, n_counters);
  __shared__ typename Op::State smem[kThreads];
  const int64_t c = blockIdx.x;
  const int64_t units_per_plane = HW / VEC;
  const int64_t u0 = static_cast<int64_t>(blockIdx.y) * units_per_chunk;
  const int64_t u1 = min(N * units_per_plane, u0 + units_per_chunk);
  const ChannelCoef coef = load_coef(scale, shift, mean, c);

  typename Op::State st;
  for (int64_t u = u0 + threadIdx.x; u < u1; u += kThreads) {
    const int64_t n = u / units_per_plane;
    const int64_t off = (n * C + c) * HW + (u - n * units_per_plane) * VEC;
    float xv[VEC], dv[VEC] = {};
    load_vec<T, VEC>(x + off, xv);
    if constexpr (Op::kUsesDy) load_vec<T, VEC>(dy + off, dv);
#pragma unroll
    for (int v = 0; v < VEC; ++v) Op::update(st, xv[v], dv[v], coef);
  }
  smem[threadIdx.x] = st;
  block_merge<Op>(smem, threadIdx.x, 0, 1, 1, kThreads);
  if (threadIdx.x == 0) write_partial<Op>(ws, smem[0], blockIdx.y, C, c);
}

// How many row-chunks a reduction splits into: enough blocks to fill the GPU a few times over,
// never fewer than ~32 rows (channels-last) or 2048 elements (NCHW) per chunk. Dtype-independent,
// so the workspace size is known before dispatch. The workspace holds the chunks' partials, then
// (256-byte aligned) the merge's scratch.
struct ReducePlan {
  int64_t chunks;
  MergePlan merge;
  size_t scratch_offset, bytes;
};

template <class Op>
ReducePlan reduce_plan(const ActShape& s) {
  const int64_t target_blocks = 4LL * sm_count();
  const int64_t m = s.n * s.hw;
  ReducePlan p;
  if (s.channels_last) {
    const int64_t channel_tiles = ceil_div(s.c, 256);
    p.chunks = std::max<int64_t>(1, std::min(ceil_div(target_blocks, channel_tiles), ceil_div(m, 32)));
  } else {
    p.chunks = std::max<int64_t>(1, std::min(ceil_div(target_blocks, s.c), ceil_div(m, 2048)));
  }
  p.merge = merge_plan(p.chunks, Op::kFields, s.c, Op::kWelford);
  p.scratch_offset = aligned_bytes(Op::kFields * p.chunks * s.c * static_cast<int64_t>(sizeof(float)));
  p.bytes = p.scratch_offset + p.merge.scratch_bytes();
  return p;
}

template <class Op, typename T, int VEC>
cudaError_t launch_partial(const T* x, const T* dy, const ActShape& s, const float* scale, const float* shift,
                           const float* mean, float* ws, const ReducePlan& p, unsigned* counters,
                           cudaStream_t stream) {
  const int64_t m = s.n * s.hw;
  const int64_t n_counters = p.merge.counters();
  if (s.channels_last) {
    int tx = 1;
    while (tx < 32 && tx * VEC < s.c) tx *= 2;
    const dim3 block(tx, kThreads / tx);
    const dim3 grid(static_cast<unsigned>(ceil_div(s.c, tx * VEC)), static_cast<unsigned>(p.chunks));
    return launch(reduce_nhwc_partial<Op, T, VEC>, grid, block, 0, stream, x, dy, m, s.c, ceil_div(m, p.chunks),
                  scale, shift, mean, ws, counters, n_counters);
  } else {
    const int64_t units = m / VEC;
    const dim3 grid(static_cast<unsigned>(s.c), static_cast<unsigned>(p.chunks));
    return launch(reduce_nchw_partial<Op, T, VEC>, grid, dim3(kThreads), 0, stream, x, dy, s.n, s.c, s.hw,
                  ceil_div(units, p.chunks), scale, shift, mean, ws, counters, n_counters);
  }
}

template <class Op>
cudaError_t channel_reduce(const void* x, const void* dy, DType dtype, const ActShape& s, const float* scale,
                           const float* shift, const float* mean, float* out0, float* out1, void* workspace,
                           size_t workspace_bytes, cudaStream_t stream) {
  if (s.n <= 0 || s.c <= 0 || s.hw <= 0) return cudaErrorInvalidValue;
  const ReducePlan p = reduce_plan<Op>(s);
  if (workspace_bytes < p.bytes) return cudaErrorInvalidValue;
  float* ws = static_cast<float*>(workspace);
  void* scratch = static_cast<char*>(workspace) + p.scratch_offset;
  unsigned* counters = p.merge.counter_ptr(scratch);
  cudaError_t err = cudaSuccess;
  NVAE_DISPATCH_DTYPE(dtype, T, {
    const T* xt = static_cast<const T*>(x);
    const T* dyt = static_cast<const T*>(dy);
    constexpr int kVec = 16 / sizeof(T);
    const int vec = pick_vec<T>(s.channels_last ? s.c : s.hw, {x, dy});
    if (vec == kVec) {
      err = launch_partial<Op, T, kVec>(xt, dyt, s, scale, shift, mean, ws, p, counters, stream);
    } else {
      err = launch_partial<Op, T, 1>(xt, dyt, s, scale, shift, mean, ws, p, counters, stream);
    }
  });
  if (err != cudaSuccess) return err;
  MergeOut out;
  out.data = out0;
  out.second = out1;
  return launch_merge(ws, p.merge, scratch, out, stream);
}

// y = swish(x * scale + shift), or (kBackward) dx = scale * g + coef_xmu * (x - mean) + coef_const.
// One thread per VEC elements, grid-stride; all VEC elements share a channel (NCHW) or are VEC
// consecutive channels (channels-last).
template <bool kBackward, typename T, int VEC, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads)
    elementwise(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ out, int64_t total_vecs, int64_t C,
                int64_t HW, const float* __restrict__ scale, const float* __restrict__ shift,
                const float* __restrict__ mean, const float* __restrict__ coef_xmu,
                const float* __restrict__ coef_const) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total_vecs;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t e0 = i * VEC;
    const int64_t c0 = kChannelsLast ? e0 % C : (e0 / HW) % C;
    float xv[VEC], res[VEC];
    load_vec<T, VEC>(x + e0, xv);
    if constexpr (kBackward) {
      float dv[VEC];
      load_vec<T, VEC>(dy + e0, dv);
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const int64_t c = kChannelsLast ? c0 + v : c0;
        const float g = dv[v] * swish_grad(fmaf(xv[v], scale[c], shift[c]));
        res[v] = fmaf(scale[c], g, fmaf(coef_xmu[c], xv[v] - mean[c], coef_const[c]));
      }
    } else {
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const int64_t c = kChannelsLast ? c0 + v : c0;
        const float z = fmaf(xv[v], scale[c], shift[c]);
        res[v] = z * sigmoidf_fast(z);
      }
    }
    store_vec<T, VEC>(out + e0, res);
  }
}

template <bool kBackward, typename T, int VEC>
cudaError_t launch_elementwise_vec(const T* x, const T* dy, T* out, const ActShape& s, const float* scale,
                                   const float* shift, const float* mean, const float* coef_xmu,
                                   const float* coef_const, cudaStream_t stream) {
  const int64_t total = s.n * s.c * s.hw / VEC;
  const auto blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(total, kThreads), 32LL * sm_count()));
  auto* kernel = s.channels_last ? elementwise<kBackward, T, VEC, true> : elementwise<kBackward, T, VEC, false>;
  return launch(kernel, dim3(blocks), dim3(kThreads), 0, stream, x, dy, out, total, s.c, s.hw, scale, shift, mean,
                coef_xmu, coef_const);
}

template <bool kBackward>
cudaError_t launch_elementwise(const void* x, const void* dy, void* out, DType dtype, const ActShape& s,
                               const float* scale, const float* shift, const float* mean, const float* coef_xmu,
                               const float* coef_const, cudaStream_t stream) {
  if (s.n <= 0 || s.c <= 0 || s.hw <= 0) return cudaErrorInvalidValue;
  cudaError_t err = cudaSuccess;
  NVAE_DISPATCH_DTYPE(dtype, T, {
    constexpr int kVec = 16 / sizeof(T);
    const T* xt = static_cast<const T*>(x);
    const T* dyt = static_cast<const T*>(dy);
    T* ot = static_cast<T*>(out);
    if (pick_vec<T>(s.channels_last ? s.c : s.hw, {x, dy, out}) == kVec) {
      err = launch_elementwise_vec<kBackward, T, kVec>(xt, dyt, ot, s, scale, shift, mean, coef_xmu, coef_const,
                                                       stream);
    } else {
      err = launch_elementwise_vec<kBackward, T, 1>(xt, dyt, ot, s, scale, shift, mean, coef_xmu, coef_const, stream);
    }
  });
  return err;
}

}  // namespace

size_t bn_reduce_workspace_bytes(const ActShape& shape) {
  return std::max(reduce_plan<WelfordOp>(shape).bytes, reduce_plan<BackwardSumsOp>(shape).bytes);
}

cudaError_t bn_stats(const void* x, DType dtype, const ActShape& shape, float* mean, float* var, void* workspace,
                     size_t workspace_bytes, cudaStream_t stream) {
  return channel_reduce<WelfordOp>(x, nullptr, dtype, shape, nullptr, nullptr, nullptr, mean, var, workspace,
                                   workspace_bytes, stream);
}

cudaError_t bn_swish_forward(const void* x, void* y, DType dtype, const ActShape& shape, const float* scale,
                             const float* shift, cudaStream_t stream) {
  return launch_elementwise<false>(x, nullptr, y, dtype, shape, scale, shift, nullptr, nullptr, nullptr, stream);
}

cudaError_t bn_swish_backward_reduce(const void* dy, const void* x, DType dtype, const ActShape& shape,
                                     const float* scale, const float* shift, const float* mean, float* sum_g,
                                     float* sum_gxmu, void* workspace, size_t workspace_bytes,
                                     cudaStream_t stream) {
  return channel_reduce<BackwardSumsOp>(x, dy, dtype, shape, scale, shift, mean, sum_g, sum_gxmu, workspace,
                                        workspace_bytes, stream);
}

cudaError_t bn_swish_backward_apply(const void* dy, const void* x, void* dx, DType dtype, const ActShape& shape,
                                    const float* scale, const float* shift, const float* mean,
                                    const float* coef_xmu, const float* coef_const, cudaStream_t stream) {
  return launch_elementwise<true>(x, dy, dx, dtype, shape, scale, shift, mean, coef_xmu, coef_const, stream);
}

}  // namespace nvae
