// Depthwise stage, backward: the per-kernel-size launcher. It is a template instantiated once per
// kernel size in dwconv_stage_backward_k<K>.cu, so the heavily unrolled kernels compile in parallel;
// dwconv_stage_backward.cu holds the API entry points and the merges.
#pragma once

#include "dwconv_stage.cuh"

namespace nvae {
namespace dw {

// The two kernels' arguments: the same tensors and parameters, their own partials and counters.
struct BackwardArgs {
  StageArgs input, weight;
  DType dtype;
};

template <typename T, int K, int S, int U>
cudaError_t launch_input_grad(const Geometry& g, const StageArgs& x, bool vec, cudaStream_t stream) {
  if (g.blocks() > 0x7fffffff) return cudaErrorInvalidConfiguration;
  return launch(input_grad_kernel<T, K, S, U>, dim3(static_cast<unsigned>(g.blocks())), dim3(kThreads),
                static_cast<size_t>(g.smem_bytes), stream, g, x, vec);
}

template <typename T, int K, int S>
cudaError_t launch_weight_grad(const Geometry& g, const StageArgs& x, bool vec, cudaStream_t stream) {
  if (g.blocks() > 0x7fffffff) return cudaErrorInvalidConfiguration;
  return launch(weight_grad_kernel<T, K, S>, dim3(static_cast<unsigned>(g.blocks())), dim3(kThreads),
                static_cast<size_t>(g.smem_bytes), stream, g, x, vec);
}

// Both backward kernels for kernel size K (the merges are launched by the caller).
template <int K>
cudaError_t launch_backward(const BackwardPlan& p, const BackwardArgs& x, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  NVAE_DISPATCH_DTYPE(x.dtype, T, {
    const StageArgs& in = x.input;
    const bool vec = pick_vec<T>(p.input.c, {in.dc, in.z, in.a, in.out}) > 1;
    if (p.input.stride == 2) {
      err = launch_input_grad<T, K, 2, 1>(p.input, in, vec, stream);
      if (err == cudaSuccess) err = launch_weight_grad<T, K, 2>(p.weight, x.weight, vec, stream);
    } else {
      err = p.input.up ? launch_input_grad<T, K, 1, 2>(p.input, in, vec, stream)
                       : launch_input_grad<T, K, 1, 1>(p.input, in, vec, stream);
      if (err == cudaSuccess) err = launch_weight_grad<T, K, 1>(p.weight, x.weight, vec, stream);
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
