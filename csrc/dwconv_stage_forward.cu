// Depthwise stage, forward: launch of dw::forward_kernel and the deterministic statistics merge.
#include "dwconv_stage.cuh"

namespace nvae {
namespace {

using dw::Geometry;

Geometry forward_plan(const DwConvShape& s) {
  return dw::plan(dw::Pass::kForward, s.n, s.c, s.h, s.w, s.k, s.stride, s.upsample);
}

template <typename T, int K, int S>
cudaError_t launch_forward(const Geometry& g, const T* a, const float* scale, const float* shift, const float* weight,
                           T* c, float* partials, bool vec, cudaStream_t stream) {
  const int64_t blocks = g.tiles() * g.cblocks;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  return launch(dw::forward_kernel<T, K, S>, dim3(static_cast<unsigned>(blocks)), dim3(dw::kThreads),
                static_cast<size_t>(g.smem_bytes), stream, g, a, scale, shift, weight, c, partials, vec);
}

template <typename T, int K>
cudaError_t launch_forward_k(const Geometry& g, const T* a, const float* scale, const float* shift,
                             const float* weight, T* c, float* partials, bool vec, cudaStream_t stream) {
  if (g.stride == 1) return launch_forward<T, K, 1>(g, a, scale, shift, weight, c, partials, vec, stream);
  return launch_forward<T, K, 2>(g, a, scale, shift, weight, c, partials, vec, stream);
}

}  // namespace

size_t dwconv_stage_forward_workspace_bytes(const DwConvShape& shape) {
  if (!dw::supported(shape)) return 0;
  const Geometry g = forward_plan(shape);
  return static_cast<size_t>(g.tiles() * 3 * g.c) * sizeof(float);
}

cudaError_t dwconv_stage_forward(const void* a, DType dtype, const DwConvShape& shape, const float* scale,
                                 const float* shift, const float* weight, void* c, float* mean_c, float* var_c,
                                 void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (!dw::supported(shape) || workspace_bytes < dwconv_stage_forward_workspace_bytes(shape)) return cudaErrorInvalidValue;
  const Geometry g = forward_plan(shape);
  float* partials = static_cast<float*>(workspace);
  cudaError_t err = cudaSuccess;
  NVAE_DISPATCH_DTYPE(dtype, T, {
    const T* at = static_cast<const T*>(a);
    T* ct = static_cast<T*>(c);
    const bool vec = pick_vec<T>(g.c, {a, c}) > 1;
    switch (g.k) {
      case 3: err = launch_forward_k<T, 3>(g, at, scale, shift, weight, ct, partials, vec, stream); break;
      case 5: err = launch_forward_k<T, 5>(g, at, scale, shift, weight, ct, partials, vec, stream); break;
      case 7: err = launch_forward_k<T, 7>(g, at, scale, shift, weight, ct, partials, vec, stream); break;
      default: err = launch_forward_k<T, 11>(g, at, scale, shift, weight, ct, partials, vec, stream); break;
    }
  });
  if (err != cudaSuccess) return err;
  return launch_finalize_welford(partials, g.tiles(), g.c, mean_c, var_c, stream);
}

}  // namespace nvae
