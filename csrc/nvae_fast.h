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

// ---- Depthwise stage of the fused generative cell (nvae_fast/ops/dwconv_stage.py) ---------------
//
// a (N, C, H, W) channels-last in `dtype`; scale, shift, mean_a fp32 (C,); the filter `weight` is
// the (C, 1, K, K) parameter, contiguous, fp32 / fp16 / bf16 (`weight_dtype`).
// Forward:   b = swish(a * scale + shift), nearest-2x upsampled with `upsample`;
//            c = depthwise_conv(b, weight, stride, padding K / 2)       (N, C, Ho, Wo) channels-last
//            mean_c, var_c: fp32 batch mean and biased variance of c (before rounding to dtype)
// Backward:  dc (N, C, Ho, Wo) channels-last in `dtype`;
//            g = (transposed conv of dc, summed per 2x2 block with upsample) * swish'(a * scale + shift)
//            sums[0 * C + c] = sum g, sums[1 * C + c] = sum g * (a - mean_a)   (fp32 of the unrounded g)
//            dweight[c * K * K + ky * K + kx] = sum over n, outputs of dc * b at the tap   (fp32 (C, K, K))
// Ho = (Hi + 2 (K / 2) - K) / stride + 1 with Hi = 2H if upsample else H (same for W).
// Reductions are deterministic (fixed-order merges of per-block partials in the workspace).
//
// The fused contract (the same stage with the per-channel work between the cell's kernels inside it;
// nvae_fast/ops/stage_args.py): scale, shift are folded from BN1's tensors in the kernels, the
// statistics go to (2, C) with BN2's running-statistics update, and the backward rebuilds dc from
// BN2's backward, dc = scale_z * dz + kx_z * (z - mean_z) + kc_z (rounded to `dtype`, as the
// contract's reference does), writes BN1's parameter gradients and dweight in the parameters' dtype.

struct DwConvShape {
  int64_t n, c, h, w;  // a
  int k;               // 3, 5, 7 or 11
  int stride;          // 1 or 2
  bool upsample;       // stride 1 only
};

// One BatchNorm as a stage applies it: y = (x - mean) / sqrt(var + eps) * weight + bias, i.e.
// x * scale + shift with scale = weight * rsqrt(var + eps), shift = bias - mean * scale.
struct BatchNormArgs {
  const void* weight = nullptr;  // (C,) in param_dtype
  const void* bias = nullptr;
  DType param_dtype = DType::kFloat32;
  const float* mean = nullptr;  // (C,) fp32
  const float* var = nullptr;
  float eps = 1e-5f;
};

// The running statistics a stage updates once it has a BatchNorm's batch statistics, as
// torch.nn.BatchNorm2d does: running += momentum * (batch - running), the variance unbiased
// (var * unbias), num_batches_tracked += 1. mean == nullptr: no update.
struct RunningUpdate {
  void* mean = nullptr;  // (C,) in dtype
  void* var = nullptr;
  DType dtype = DType::kFloat32;
  int64_t* num_batches_tracked = nullptr;  // may be null
  float momentum = 0.1f;
  float unbias = 1.f;
};

// A BatchNorm's backward as a later stage applies it: dx = scale * g + kx * (x - mean) + kc with
// kx = -scale / (var + eps) * sums[1] / count, kc = -scale * sums[0] / count in training, 0 in eval.
struct BatchNormGrad {
  const float* sums = nullptr;  // (2, C) fp32: sum g, sum g * (x - mean)
  int64_t count = 1;
  bool training = true;
};

// Bytes of workspace each pass needs for this shape on the current device.
size_t dwconv_stage_forward_workspace_bytes(const DwConvShape& shape);
size_t dwconv_stage_backward_workspace_bytes(const DwConvShape& shape);

cudaError_t dwconv_stage_forward(const void* a, DType dtype, const DwConvShape& shape, const float* scale,
                                 const float* shift, const void* weight, DType weight_dtype, void* c, float* mean_c,
                                 float* var_c, void* workspace, size_t workspace_bytes, cudaStream_t stream);

cudaError_t dwconv_stage_backward(const void* dc, const void* a, DType dtype, const DwConvShape& shape,
                                  const float* scale, const float* shift, const float* mean_a, const void* weight,
                                  DType weight_dtype, void* g, float* sums, float* dweight, void* workspace,
                                  size_t workspace_bytes, cudaStream_t stream);

// Fused forward: c as above with scale, shift from bn1; stats (2, C) = (mean_c, var_c), or nullptr
// (eval: no statistics, one launch); `running` updated from them when set.
cudaError_t dwconv_stage_forward_fused(const void* a, DType dtype, const DwConvShape& shape, const BatchNormArgs& bn1,
                                       const void* weight, DType weight_dtype, void* c, float* stats,
                                       const RunningUpdate& running, void* workspace, size_t workspace_bytes,
                                       cudaStream_t stream);

// Fused backward: dc = BN2's backward of dz (N, C, Ho, Wo) with z = c (both channels-last in dtype),
// bn_z and grad_z; then the backward above with scale, shift from bn1 and mean_a = bn1.mean.
// sums (2, C) fp32; bn1_grad_weight = sums[1] * rsqrt(bn1.var + eps), bn1_grad_bias = sums[0] in
// bn1.param_dtype; dweight (C, 1, K, K) in weight_dtype.
cudaError_t dwconv_stage_backward_fused(const void* dz, const void* z, const BatchNormArgs& bn_z,
                                        const BatchNormGrad& grad_z, const void* a, DType dtype,
                                        const DwConvShape& shape, const BatchNormArgs& bn1, const void* weight,
                                        DType weight_dtype, void* g, float* sums, void* bn1_grad_weight,
                                        void* bn1_grad_bias, void* dweight, void* workspace, size_t workspace_bytes,
                                        cudaStream_t stream);

// The launch plan of the depthwise stage on a device with `sms` multiprocessors where a block may
// use `smem_per_block` bytes of dynamic shared memory (at least 48 KiB; the kernels take what lets
// two blocks share a multiprocessor: 81 KiB on sm_80, 113 KiB on sm_90): what each kernel launches
// and how its partials are merged. Nothing is launched; tests and benchmarks read it.
struct MergeLaunch {
  int64_t parts = 0;         // partials per (field, channel)
  int64_t segments = 0;      // level-1 runs (1: one level)
  int64_t seg_len = 0;       // partials per run
  int64_t blocks = 0;        // merge grid size
  int64_t serial_loads = 0;  // values one thread merges one after another, both levels
};

struct DwConvPassLaunch {
  int64_t blocks = 0;           // grid size
  int th = 0, tw = 0;           // tile: outputs (forward, weight grad) or positions of a (input grad)
  int64_t tiles = 0;            // over the batch
  int64_t tiles_per_block = 0;  // > 1 only for the weight grad's runs
  int64_t smem_bytes = 0;       // dynamic shared memory per block
  double evaluations = 0.0;     // BN1 + Swish (or its derivative) evaluations per element of a
  MergeLaunch merge;
};

struct DwConvStageLaunch {
  DwConvPassLaunch forward, input_grad, weight_grad;
};

DwConvStageLaunch dwconv_stage_launch_plan(const DwConvShape& shape, int sms, int64_t smem_per_block);

// ---- Residual-normal latent groups (nvae_fast/ops/normal_kl.py) ------------------------------------
//
// Every tensor is a strided (N, C, H, W) view in `dtype` (element strides, any order, may overlap
// for inputs); data == nullptr marks an absent tensor. A distribution (mu, log_sigma) means
// mu' = 5 tanh(mu / 5), sigma = exp(5 tanh(log_sigma / 5)) + 0.01; an absent prior is the standard
// one (mu' = 0, sigma = 1.01). Posterior q = (mu_p + mu_q, log_sigma_p + log_sigma_q) if residual
// (and a prior is given), else (mu_q, log_sigma_q). fp32 math throughout.
//
//   normal_kl_forward      reads mu_p, log_sigma_p, mu_q, log_sigma_q, eps;  writes z = mu_q' + sigma_q eps,
//                          sums_n and kl_diag of kl = 0.5 (((mu_q' - mu_p') / sigma_p)^2 + (sigma_q / sigma_p)^2)
//                          - 0.5 - log(sigma_q / sigma_p), log_q = log q(z), log_p = log p(z)
//   flow_kl_forward        reads mu_p, log_sigma_p, log_sigma_q, eps, z, log_det;  writes sums_n, kl_diag of
//                          log_q = -eps^2 / 2 - log(2 pi) / 2 - log sigma_q - log_det, log_p = log p(z), kl = log_q - log_p
//   normal_sample_forward  reads mu, log_sigma, eps;  writes z = mu' + temperature * sigma * eps
//   *_backward             the gradients of the forward outputs' sum against grad_z (element-wise, absent =
//                          zeros) and grad_kl_all, grad_log_q, grad_log_p (N,), grad_kl_diag (C,) (nullptr =
//                          zeros), written to the d_* views that are present.
// sums_n: fp32 (3, N) = kl_all, log_q, log_p (sums over C, H, W); kl_diag: fp32 (C,) = mean over N of
// sums over H, W of kl.

struct Strided4 {
  void* data = nullptr;
  int64_t stride[4] = {0, 0, 0, 0};
};

struct NormalKLArgs {
  DType dtype = DType::kFloat32;
  int64_t n = 0, c = 0, h = 0, w = 0;
  bool residual = true;
  float temperature = 1.f;
  Strided4 mu_p, log_sigma_p, mu_q, log_sigma_q, eps, z, log_det;  // inputs
  Strided4 mu, log_sigma;                                          // normal_sample's distribution
  Strided4 grad_z;                                                 // input of the backward passes
  const float* grad_kl_all = nullptr;
  const float* grad_log_q = nullptr;
  const float* grad_log_p = nullptr;
  const float* grad_kl_diag = nullptr;
  Strided4 z_out, d_mu_p, d_log_sigma_p, d_mu_q, d_log_sigma_q, d_z, d_log_det, d_mu, d_log_sigma;  // outputs
  float* sums_n = nullptr;
  float* kl_diag = nullptr;
};

// Bytes of workspace the two forward reductions need for this shape on the current device.
size_t normal_kl_workspace_bytes(const NormalKLArgs& args);

cudaError_t normal_kl_forward(const NormalKLArgs& args, void* workspace, size_t workspace_bytes, cudaStream_t stream);
cudaError_t normal_kl_backward(const NormalKLArgs& args, cudaStream_t stream);
cudaError_t flow_kl_forward(const NormalKLArgs& args, void* workspace, size_t workspace_bytes, cudaStream_t stream);
cudaError_t flow_kl_backward(const NormalKLArgs& args, cudaStream_t stream);
cudaError_t normal_sample_forward(const NormalKLArgs& args, cudaStream_t stream);
cudaError_t normal_sample_backward(const NormalKLArgs& args, cudaStream_t stream);

}  // namespace nvae
