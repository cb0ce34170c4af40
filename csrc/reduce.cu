// Finalize kernels of the deterministic per-channel reductions (see reduce.cuh).
#include "reduce.cuh"

namespace nvae {
namespace {

// Blocks are (kLanes channels) x (kRows partial streams): row r takes partials r, r + kRows, ... in
// order, then row 0 merges the kRows results in order. The order depends only on P.
constexpr int kLanes = 32;
constexpr int kRows = 8;

__global__ void __launch_bounds__(kLanes* kRows)
    finalize_welford_kernel(const float* __restrict__ ws, int64_t P, int64_t C, float* __restrict__ mean,
                            float* __restrict__ var) {
  __shared__ float rows[3][kRows][kLanes];  // count, mean, m2
  const int lane = threadIdx.x, row = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kLanes + lane;
  Welford acc;
  if (c < C) {
    for (int64_t p = row; p < P; p += kRows) {
      Welford part;
      part.count = ws[(p * 3 + 0) * C + c];
      part.mean = ws[(p * 3 + 1) * C + c];
      part.m2 = ws[(p * 3 + 2) * C + c];
      acc = Welford::merge(acc, part);
    }
  }
  rows[0][row][lane] = acc.count;
  rows[1][row][lane] = acc.mean;
  rows[2][row][lane] = acc.m2;
  __syncthreads();
  if (row == 0 && c < C) {
    for (int r = 1; r < kRows; ++r) {
      Welford part;
      part.count = rows[0][r][lane];
      part.mean = rows[1][r][lane];
      part.m2 = rows[2][r][lane];
      acc = Welford::merge(acc, part);
    }
    mean[c] = acc.mean;
    var[c] = acc.count > 0.f ? acc.m2 / acc.count : 0.f;
  }
}

__global__ void __launch_bounds__(kLanes* kRows)
    finalize_sums_kernel(const float* __restrict__ ws, int64_t P, int F, int64_t C, float* __restrict__ out,
                         int64_t out_fstride, int64_t out_cstride, float scale) {
  __shared__ float rows[kRows][kLanes];
  const int lane = threadIdx.x, row = threadIdx.y;
  const int f = blockIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kLanes + lane;
  float acc = 0.f;
  if (c < C) {
    for (int64_t p = row; p < P; p += kRows) acc += ws[(p * F + f) * C + c];
  }
  rows[row][lane] = acc;
  __syncthreads();
  if (row == 0 && c < C) {
    for (int r = 1; r < kRows; ++r) acc += rows[r][lane];
    out[f * out_fstride + c * out_cstride] = acc * scale;
  }
}

}  // namespace

cudaError_t launch_finalize_welford(const float* ws, int64_t P, int64_t C, float* mean, float* var,
                                    cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(C, kLanes)));
  return launch(finalize_welford_kernel, grid, dim3(kLanes, kRows), 0, stream, ws, P, C, mean, var);
}

cudaError_t launch_finalize_sums(const float* ws, int64_t P, int F, int64_t C, float* out, int64_t out_fstride,
                                 int64_t out_cstride, float scale, cudaStream_t stream) {
  if (F <= 0 || F > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(ceil_div(C, kLanes)), static_cast<unsigned>(F));
  return launch(finalize_sums_kernel, grid, dim3(kLanes, kRows), 0, stream, ws, P, F, C, out, out_fstride,
                out_cstride, scale);
}

}  // namespace nvae
