// Depthwise stage, backward: entry points (kernels per size in dwconv_stage_backward_k<K>.cu) and
// the deterministic merges of their partials.
#include "dwconv_stage_backward.cuh"

namespace nvae {
namespace {

MergeLaunch describe(const MergePlan& m) {
  MergeLaunch d;
  d.parts = m.parts;
  d.segments = m.segments;
  d.seg_len = m.seg_len;
  d.blocks = m.blocks();
  d.serial_loads = m.serial_loads();
  return d;
}

DwConvPassLaunch describe(dw::Pass pass, const dw::Geometry& g, const MergePlan& m) {
  DwConvPassLaunch d;
  d.blocks = g.blocks();
  d.th = g.th;
  d.tw = g.tw;
  d.tiles = g.tiles();
  d.tiles_per_block = g.tiles_per_run;
  d.smem_bytes = g.smem_bytes;
  d.evaluations = dw::evaluations_per_element(pass, g);
  d.merge = describe(m);
  return d;
}

}  // namespace

DwConvStageLaunch dwconv_stage_launch_plan(const DwConvShape& shape, int sms, int64_t smem_per_block) {
  DwConvStageLaunch d;
  if (!dw::supported(shape) || sms <= 0 || smem_per_block < static_cast<int64_t>(kDefaultSmem)) return d;
  const dw::DeviceLimits dev{sms, smem_per_block};
  const dw::ForwardPlan f = dw::forward_plan(shape, dev);
  const dw::BackwardPlan b = dw::backward_plan(shape, dev);
  d.forward = describe(dw::Pass::kForward, f.geo, f.merge);
  d.input_grad = describe(dw::Pass::kInputGrad, b.input, b.input_merge);
  d.weight_grad = describe(dw::Pass::kWeightGrad, b.weight, b.weight_merge);
  return d;
}

size_t dwconv_stage_backward_workspace_bytes(const DwConvShape& shape) {
  if (!dw::supported(shape)) return 0;
  return dw::backward_plan(shape, dw::current_device()).bytes;
}

cudaError_t dwconv_stage_backward(const void* dc, const void* a, DType dtype, const DwConvShape& shape,
                                  const float* scale, const float* shift, const float* mean_a, const float* weight,
                                  void* g, float* sums, float* dweight, void* workspace, size_t workspace_bytes,
                                  cudaStream_t stream) {
  if (!dw::supported(shape)) return cudaErrorInvalidValue;
  const dw::BackwardPlan p = dw::backward_plan(shape, dw::current_device());
  if (workspace_bytes < p.bytes) return cudaErrorInvalidValue;
  char* ws = static_cast<char*>(workspace);
  void* input_scratch = ws + p.input_scratch_offset;
  void* weight_scratch = ws + p.weight_scratch_offset;
  const dw::BackwardArgs x{dc, a, dtype, scale, shift, mean_a, weight, g, reinterpret_cast<float*>(ws),
                           reinterpret_cast<float*>(ws + p.weight_offset), p.input_merge.counter_ptr(input_scratch),
                           p.weight_merge.counter_ptr(weight_scratch), p.input_merge.counters(),
                           p.weight_merge.counters()};
  cudaError_t err;
  switch (shape.k) {
    case 3: err = dw::launch_backward<3>(p, x, stream); break;
    case 5: err = dw::launch_backward<5>(p, x, stream); break;
    case 7: err = dw::launch_backward<7>(p, x, stream); break;
    default: err = dw::launch_backward<11>(p, x, stream); break;
  }
  if (err != cudaSuccess) return err;
  MergeOut sums_out;  // (2, C): sum g, sum g * (a - mean_a)
  sums_out.data = sums;
  sums_out.fstride = shape.c;
  err = launch_merge(x.input_partials, p.input_merge, input_scratch, sums_out, stream);
  if (err != cudaSuccess) return err;
  MergeOut dweight_out;  // (C, K * K)
  dweight_out.data = dweight;
  dweight_out.fstride = 1;
  dweight_out.cstride = shape.k * shape.k;
  return launch_merge(x.weight_partials, p.weight_merge, weight_scratch, dweight_out, stream);
}

}  // namespace nvae
