// The torch-free C++ API of nvae_fast's CUDA kernels: raw device pointers, sizes and a stream.
// Every entry point validates what it can, launches asynchronously on `stream`, and returns the
// launch's cudaError_t (cudaSuccess or the first error). Python (nvae_fast/kernels/cuda/) checks
// tensors, allocates outputs and workspaces, and maps dtypes; csrc/bindings.cpp is the glue.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace nvae {

// Element types the kernels read and write; accumulation is always fp32.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// A 4-D activation (N, C, H, W) stored densely either as NCHW or as channels-last (NHWC).
// hw = H * W; for the elementwise and reduction kernels H and W never need to be apart.
struct ActShape {
  int64_t n;
  int64_t c;
  int64_t hw;
  bool channels_last;
};

// ---- BatchNorm + Swish (nvae_fast/ops/bn_swish.py) --------------------------------------------
//
// Training forward:  mean, var = bn_stats(x);  (Python folds weight, bias, mean, var into per-channel
//                    scale, shift);  y = swish(x * scale + shift) = bn_swish_forward(x, scale, shift).
// Backward:          g = dy * swish'(x * scale + shift)
//                    sum_g[c] = sum g,  sum_gxmu[c] = sum g * (x - mean)      (bn_swish_backward_reduce)
//                    dx = scale * g + coef_xmu * (x - mean) + coef_const       (bn_swish_backward_apply)
// All per-channel vectors are fp32 arrays of length C.

// Bytes of scratch memory the two reductions below need for this shape on the current device.
size_t bn_reduce_workspace_bytes(const ActShape& shape);

// Per-channel mean and biased variance of x (Welford partials per block, merged deterministically).
cudaError_t bn_stats(const void* x, DType dtype, const ActShape& shape, float* mean, float* var,
                     void* workspace, size_t workspace_bytes, cudaStream_t stream);

cudaError_t bn_swish_forward(const void* x, void* y, DType dtype, const ActShape& shape, const float* scale,
                             const float* shift, cudaStream_t stream);

cudaError_t bn_swish_backward_reduce(const void* dy, const void* x, DType dtype, const ActShape& shape,
                                     const float* scale, const float* shift, const float* mean, float* sum_g,
                                     float* sum_gxmu, void* workspace, size_t workspace_bytes,
                                     cudaStream_t stream);

cudaError_t bn_swish_backward_apply(const void* dy, const void* x, void* dx, DType dtype, const ActShape& shape,
                                    const float* scale, const float* shift, const float* mean,
                                    const float* coef_xmu, const float* coef_const, cudaStream_t stream);

}  // namespace nvae
