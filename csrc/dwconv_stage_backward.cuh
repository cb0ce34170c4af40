// Depthwise stage, backward: the launch plan and the per-kernel-size launcher. The launcher is a
// template instantiated once per kernel size in dwconv_stage_backward_k<K>.cu, so the heavily
// unrolled kernels compile in parallel; dwconv_stage_backward.cu holds the API entry points.
#pragma once

#include "dwconv_stage.cuh"

namespace nvae {
namespace dw {

// The workspace holds the input-grad partials, then (256-byte aligned) the weight-grad partials.
struct BackwardPlan {
  Geometry input, weight;
  int64_t tiles_per_chunk, chunks;  // weight grad: each block sums a run of tiles_per_chunk tiles
  size_t weight_offset, bytes;
};

inline BackwardPlan backward_plan(const DwConvShape& s) {
  BackwardPlan p;
  p.input = plan(Pass::kInputGrad, s.n, s.c, s.h, s.w, s.k, s.stride, s.upsample);
  p.weight = plan(Pass::kWeightGrad, s.n, s.c, s.h, s.w, s.k, s.stride, s.upsample);
  // Enough weight-grad blocks to fill the device a few times over.
  const int groups = (s.k + tap_rows(s.k) - 1) / tap_rows(s.k);
  const int64_t tiles = p.weight.tiles();
  const int64_t want = std::max<int64_t>(1, ceil_div(4LL * sm_count(), p.weight.cblocks * groups));
  p.tiles_per_chunk = ceil_div(tiles, std::min(want, tiles));
  p.chunks = ceil_div(tiles, p.tiles_per_chunk);
  p.weight_offset = static_cast<size_t>(ceil_div(p.input.tiles() * 2 * s.c * static_cast<int64_t>(sizeof(float)), 256) * 256);
  p.bytes = p.weight_offset + static_cast<size_t>(p.chunks * s.k * s.k * s.c) * sizeof(float);
  return p;
}

struct BackwardArgs {
  const void* dc;
  const void* a;
  DType dtype;
  const float *scale, *shift, *mean_a, *weight;
  void* g;
  float* input_partials;   // (tiles, 2, C)
  float* weight_partials;  // (chunks, K * K, C)
};

template <typename T, int K, int S, int U>
cudaError_t launch_input_grad(const Geometry& g, const BackwardArgs& x, bool vec, cudaStream_t stream) {
  const int64_t blocks = g.tiles() * g.cblocks;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  return launch(input_grad_kernel<T, K, S, U>, dim3(static_cast<unsigned>(blocks)), dim3(kThreads),
                static_cast<size_t>(g.smem_bytes), stream, g, static_cast<const T*>(x.dc), static_cast<const T*>(x.a),
                x.scale, x.shift, x.mean_a, x.weight, static_cast<T*>(x.g), x.input_partials, vec);
}

template <typename T, int K, int S>
cudaError_t launch_weight_grad(const BackwardPlan& p, const BackwardArgs& x, bool vec, cudaStream_t stream) {
  const int64_t groups = (K + tap_rows(K) - 1) / tap_rows(K);
  const int64_t blocks = p.weight.cblocks * groups * p.chunks;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  return launch(weight_grad_kernel<T, K, S>, dim3(static_cast<unsigned>(blocks)), dim3(kThreads),
                static_cast<size_t>(p.weight.smem_bytes), stream, p.weight, static_cast<const T*>(x.dc),
                static_cast<const T*>(x.a), x.scale, x.shift, x.weight_partials, p.tiles_per_chunk, vec);
}

// Both backward kernels for kernel size K (the finalize merges are launched by the caller).
template <int K>
cudaError_t launch_backward(const BackwardPlan& p, const BackwardArgs& x, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  NVAE_DISPATCH_DTYPE(x.dtype, T, {
    const bool vec = pick_vec<T>(p.input.c, {x.dc, x.a, x.g}) > 1;
    if (p.input.stride == 2) {
      err = launch_input_grad<T, K, 2, 1>(p.input, x, vec, stream);
      if (err == cudaSuccess) err = launch_weight_grad<T, K, 2>(p, x, vec, stream);
    } else {
      err = p.input.up ? launch_input_grad<T, K, 1, 2>(p.input, x, vec, stream)
                       : launch_input_grad<T, K, 1, 1>(p.input, x, vec, stream);
      if (err == cudaSuccess) err = launch_weight_grad<T, K, 1>(p, x, vec, stream);
    }
  });
  return err;
}

extern template cudaError_t launch_backward<3>(const BackwardPlan&, const BackwardArgs&, cudaStream_t);
extern template cudaError_t launch_backward<5>(const BackwardPlan&, const BackwardArgs&, cudaStream_t);
extern template cudaError_t launch_backward<7>(const BackwardPlan&, const BackwardArgs&, cudaStream_t);
extern template cudaError_t launch_backward<11>(const BackwardPlan&, const BackwardArgs&, cudaStream_t);

}  // namespace dw
}  // namespace nvae
