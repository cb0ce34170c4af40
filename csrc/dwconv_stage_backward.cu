// Depthwise stage, backward: entry points (kernels per size in dwconv_stage_backward_k<K>.cu) and
// the deterministic merges of their partials.
#include "dwconv_stage_backward.cuh"

namespace nvae {

size_t dwconv_stage_backward_workspace_bytes(const DwConvShape& shape) {
  if (!dw::supported(shape)) return 0;
  return dw::backward_plan(shape).bytes;
}

cudaError_t dwconv_stage_backward(const void* dc, const void* a, DType dtype, const DwConvShape& shape,
                                  const float* scale, const float* shift, const float* mean_a, const float* weight,
                                  void* g, float* sums, float* dweight, void* workspace, size_t workspace_bytes,
                                  cudaStream_t stream) {
  if (!dw::supported(shape)) return cudaErrorInvalidValue;
  const dw::BackwardPlan p = dw::backward_plan(shape);
  if (workspace_bytes < p.bytes) return cudaErrorInvalidValue;
  dw::BackwardArgs x{dc, a, dtype, scale, shift, mean_a, weight, g, static_cast<float*>(workspace),
                     reinterpret_cast<float*>(static_cast<char*>(workspace) + p.weight_offset)};
  cudaError_t err;
  switch (shape.k) {
    case 3: err = dw::launch_backward<3>(p, x, stream); break;
    case 5: err = dw::launch_backward<5>(p, x, stream); break;
    case 7: err = dw::launch_backward<7>(p, x, stream); break;
    default: err = dw::launch_backward<11>(p, x, stream); break;
  }
  if (err != cudaSuccess) return err;
  err = launch_finalize_sums(x.input_partials, p.input.tiles(), 2, shape.c, sums, shape.c, 1, 1.f, stream);
  if (err != cudaSuccess) return err;
  const int taps = shape.k * shape.k;
  return launch_finalize_sums(x.weight_partials, p.chunks, taps, shape.c, dweight, 1, taps, 1.f, stream);
}

}  // namespace nvae
