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

namespace {

// Both kernels on `x` (tensors and parameters set), each with its partials and counters in the
// workspace; then the merges into sums_out (the input grad's two sums) and taps_out (dweight).
template <class SumsOut>
cudaError_t run_backward(const DwConvShape& shape, dw::StageArgs x, DType dtype, void* workspace,
                         size_t workspace_bytes, const SumsOut& sums_out, const dw::TapsOut& taps_out,
                         cudaStream_t stream) {
  const dw::BackwardPlan p = dw::backward_plan(shape, dw::current_device());
  if (workspace_bytes < p.bytes) return cudaErrorInvalidValue;
  char* ws = static_cast<char*>(workspace);
  void* input_scratch = ws + p.input_scratch_offset;
  void* weight_scratch = ws + p.weight_scratch_offset;
  dw::BackwardArgs args{x, x, dtype};
  args.input.partials = reinterpret_cast<float*>(ws);
  args.input.counters = p.input_merge.counter_ptr(input_scratch);
  args.input.n_counters = p.input_merge.counters();
  args.weight.partials = reinterpret_cast<float*>(ws + p.weight_offset);
  args.weight.counters = p.weight_merge.counter_ptr(weight_scratch);
  args.weight.n_counters = p.weight_merge.counters();
  cudaError_t err;
  switch (shape.k) {
    case 3: err = dw::launch_backward<3>(p, args, stream); break;
    case 5: err = dw::launch_backward<5>(p, args, stream); break;
    case 7: err = dw::launch_backward<7>(p, args, stream); break;
    default: err = dw::launch_backward<11>(p, args, stream); break;
  }
  if (err != cudaSuccess) return err;
  err = launch_merge(args.input.partials, p.input_merge, input_scratch, sums_out, stream);
  if (err != cudaSuccess) return err;
  return launch_merge(args.weight.partials, p.weight_merge, weight_scratch, taps_out, stream);
}

}  // namespace

cudaError_t dwconv_stage_backward(const void* dc, const void* a, DType dtype, const DwConvShape& shape,
                                  const float* scale, const float* shift, const float* mean_a, const void* weight,
                                  DType weight_dtype, void* g, float* sums, float* dweight, void* workspace,
                                  size_t workspace_bytes, cudaStream_t stream) {
  if (!dw::supported(shape) || scale == nullptr || shift == nullptr || mean_a == nullptr) {
    return cudaErrorInvalidValue;
  }
  dw::StageArgs x;
  x.a = a;
  x.dc = dc;
  x.out = g;
  x.scale = scale;
  x.shift = shift;
  x.mean_a = mean_a;
  x.weight = weight;
  x.weight_dtype = weight_dtype;
  MergeOut sums_out;  // (2, C): sum g, sum g * (a - mean_a)
  sums_out.data = sums;
  sums_out.fstride = shape.c;
  return run_backward(shape, x, dtype, workspace, workspace_bytes, sums_out,
                      dw::TapsOut{dweight, DType::kFloat32, shape.k * shape.k}, stream);
}

cudaError_t dwconv_stage_backward_fused(const void* dz, const void* z, const BatchNormArgs& bn_z,
                                        const BatchNormGrad& grad_z, const void* a, DType dtype,
                                        const DwConvShape& shape, const BatchNormArgs& bn1, const void* weight,
                                        DType weight_dtype, void* g, float* sums, void* bn1_grad_weight,
                                        void* bn1_grad_bias, void* dweight, void* workspace, size_t workspace_bytes,
                                        cudaStream_t stream) {
  const auto complete = [](const BatchNormArgs& bn) {
    return bn.weight != nullptr && bn.bias != nullptr && bn.mean != nullptr && bn.var != nullptr;
  };
  if (!dw::supported(shape) || z == nullptr || !complete(bn_z) || !complete(bn1) ||
      (grad_z.training && (grad_z.sums == nullptr || grad_z.count <= 0))) {
    return cudaErrorInvalidValue;
  }
  dw::StageArgs x;
  x.a = a;
  x.dc = dz;
  x.z = z;
  x.out = g;
  x.bn1 = bn1;
  x.bn_z = bn_z;
  x.grad_z = grad_z;
  x.weight = weight;
  x.weight_dtype = weight_dtype;
  return run_backward(shape, x, dtype, workspace, workspace_bytes,
                      dw::InputSumsOut{sums, shape.c, bn1, bn1_grad_weight, bn1_grad_bias},
                      dw::TapsOut{dweight, weight_dtype, shape.k * shape.k}, stream);
}

}  // namespace nvae
