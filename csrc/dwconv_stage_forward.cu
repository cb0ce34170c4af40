// Depthwise stage, forward: launch of dw::forward_kernel and the deterministic statistics merge.
#include "dwconv_stage.cuh"

namespace nvae {
namespace {

using dw::ForwardPlan;
using dw::Geometry;

struct ForwardArgs {
  const void* a;
  const float *scale, *shift, *weight;
  void* c;
  float* partials;  // (tiles, 3, C)
  unsigned* counters;
  int64_t n_counters;
};

template <typename T, int K>
cudaError_t launch_forward(const Geometry& g, const ForwardArgs& x, bool vec, cudaStream_t stream) {
  if (g.blocks() > 0x7fffffff) return cudaErrorInvalidConfiguration;
  auto* kernel = g.stride == 1 ? dw::forward_kernel<T, K, 1> : dw::forward_kernel<T, K, 2>;
  return launch(kernel, dim3(static_cast<unsigned>(g.blocks())), dim3(dw::kThreads), static_cast<size_t>(g.smem_bytes),
                stream, g, static_cast<const T*>(x.a), x.scale, x.shift, x.weight, static_cast<T*>(x.c), x.partials,
                x.counters, x.n_counters, vec);
}

}  // namespace

size_t dwconv_stage_forward_workspace_bytes(const DwConvShape& shape) {
  if (!dw::supported(shape)) return 0;
  return dw::forward_plan(shape, dw::current_device()).bytes;
}

cudaError_t dwconv_stage_forward(const void* a, DType dtype, const DwConvShape& shape, const float* scale,
                                 const float* shift, const float* weight, void* c, float* mean_c, float* var_c,
                                 void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (!dw::supported(shape)) return cudaErrorInvalidValue;
  const ForwardPlan p = dw::forward_plan(shape, dw::current_device());
  if (workspace_bytes < p.bytes) return cudaErrorInvalidValue;
  const Geometry& g = p.geo;
  void* scratch = static_cast<char*>(workspace) + p.scratch_offset;
  const ForwardArgs x{a, scale, shift, weight, c, static_cast<float*>(workspace), p.merge.counter_ptr(scratch),
                      p.merge.counters()};
  cudaError_t err = cudaSuccess;
  NVAE_DISPATCH_DTYPE(dtype, T, {
    const bool vec = pick_vec<T>(g.c, {a, c}) > 1;
    switch (g.k) {
      case 3: err = launch_forward<T, 3>(g, x, vec, stream); break;
      case 5: err = launch_forward<T, 5>(g, x, vec, stream); break;
      case 7: err = launch_forward<T, 7>(g, x, vec, stream); break;
      default: err = launch_forward<T, 11>(g, x, vec, stream); break;
    }
  });
  if (err != cudaSuccess) return err;
  MergeOut out;
  out.data = mean_c;
  out.second = var_c;
  return launch_merge(x.partials, p.merge, scratch, out, stream);
}

}  // namespace nvae
