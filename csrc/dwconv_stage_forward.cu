// Depthwise stage, forward: launch of dw::forward_kernel and the deterministic statistics merge,
// for the plain and the fused contract.
#include "dwconv_stage.cuh"

namespace nvae {
namespace {

using dw::ForwardPlan;
using dw::Geometry;
using dw::StageArgs;

template <typename T, int K>
cudaError_t launch_forward(const Geometry& g, const StageArgs& x, bool vec, cudaStream_t stream) {
  if (g.blocks() > 0x7fffffff) return cudaErrorInvalidConfiguration;
  auto* kernel = g.stride == 1 ? dw::forward_kernel<T, K, 1> : dw::forward_kernel<T, K, 2>;
  return launch(kernel, dim3(static_cast<unsigned>(g.blocks())), dim3(dw::kThreads), static_cast<size_t>(g.smem_bytes),
                stream, g, x, vec);
}

// The forward kernel; `x` has its tensors and BN1, the partials and counters are set here unless
// `statistics` is false.
cudaError_t run_forward(const ForwardPlan& p, StageArgs x, DType dtype, bool statistics, void* workspace,
                        cudaStream_t stream) {
  const Geometry& g = p.geo;
  if (statistics) {
    x.partials = static_cast<float*>(workspace);
    x.counters = p.merge.counter_ptr(static_cast<char*>(workspace) + p.scratch_offset);
    x.n_counters = p.merge.counters();
  }
  cudaError_t err = cudaSuccess;
  NVAE_DISPATCH_DTYPE(dtype, T, {
    const bool vec = pick_vec<T>(g.c, {x.a, x.out}) > 1;
    switch (g.k) {
      case 3: err = launch_forward<T, 3>(g, x, vec, stream); break;
      case 5: err = launch_forward<T, 5>(g, x, vec, stream); break;
      case 7: err = launch_forward<T, 7>(g, x, vec, stream); break;
      default: err = launch_forward<T, 11>(g, x, vec, stream); break;
    }
  });
  return err;
}

}  // namespace

size_t dwconv_stage_forward_workspace_bytes(const DwConvShape& shape) {
  if (!dw::supported(shape)) return 0;
  return dw::forward_plan(shape, dw::current_device()).bytes;
}

cudaError_t dwconv_stage_forward(const void* a, DType dtype, const DwConvShape& shape, const float* scale,
                                 const float* shift, const void* weight, DType weight_dtype, void* c, float* mean_c,
                                 float* var_c, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (!dw::supported(shape) || scale == nullptr || shift == nullptr) return cudaErrorInvalidValue;
  const ForwardPlan p = dw::forward_plan(shape, dw::current_device());
  if (workspace_bytes < p.bytes) return cudaErrorInvalidValue;
  StageArgs x;
  x.a = a;
  x.out = c;
  x.scale = scale;
  x.shift = shift;
  x.weight = weight;
  x.weight_dtype = weight_dtype;
  cudaError_t err = run_forward(p, x, dtype, true, workspace, stream);
  if (err != cudaSuccess) return err;
  MergeOut out;
  out.data = mean_c;
  out.second = var_c;
  return launch_merge(static_cast<const float*>(workspace), p.merge, static_cast<char*>(workspace) + p.scratch_offset,
                      out, stream);
}

cudaError_t dwconv_stage_forward_fused(const void* a, DType dtype, const DwConvShape& shape, const BatchNormArgs& bn1,
                                       const void* weight, DType weight_dtype, void* c, float* stats,
                                       const RunningUpdate& running, void* workspace, size_t workspace_bytes,
                                       cudaStream_t stream) {
  if (!dw::supported(shape) || bn1.weight == nullptr || bn1.bias == nullptr || bn1.mean == nullptr ||
      bn1.var == nullptr || (stats == nullptr && running.mean != nullptr) ||
      (running.mean == nullptr) != (running.var == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const ForwardPlan p = dw::forward_plan(shape, dw::current_device());
  const bool statistics = stats != nullptr;
  if (statistics && workspace_bytes < p.bytes) return cudaErrorInvalidValue;
  StageArgs x;
  x.a = a;
  x.out = c;
  x.bn1 = bn1;
  x.weight = weight;
  x.weight_dtype = weight_dtype;
  cudaError_t err = run_forward(p, x, dtype, statistics, workspace, stream);
  if (err != cudaSuccess || !statistics) return err;
  return launch_merge(static_cast<const float*>(workspace), p.merge, static_cast<char*>(workspace) + p.scratch_offset,
                      dw::StatsOut{stats, shape.c, running}, stream);
}

}  // namespace nvae
