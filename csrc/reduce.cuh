// Deterministic per-channel reductions: kernels write one fp32 partial per (work unit, field,
// channel) into a workspace laid out as ws[(p * fields + f) * C + c], and a finalize kernel merges
// the partials of each (field, channel) in a fixed order. No atomics, so results are bitwise
// reproducible on a given device and launch geometry. The geometry can depend on the pointers'
// alignment (the vector width of the BN kernels), so an aligned tensor and an offset view of the
// same values may differ in the last bits.
#pragma once

#include "common.cuh"

namespace nvae {

// Count, mean and M2 (sum of squared deviations) of a stream of values: Welford's update, and
// Chan's formula to merge two summaries. Accurate for data far from zero, unlike sum / sum-of-squares.
struct Welford {
  float count = 0.f, mean = 0.f, m2 = 0.f;

  __device__ __forceinline__ void push(float x) {
    count += 1.f;
    const float delta = x - mean;
    mean += delta / count;
    m2 = fmaf(delta, x - mean, m2);
  }

  __device__ __forceinline__ static Welford merge(const Welford& a, const Welford& b) {
    Welford r;
    r.count = a.count + b.count;
    if (r.count == 0.f) return r;
    const float delta = b.mean - a.mean;
    const float wb = b.count / r.count;
    r.mean = fmaf(delta, wb, a.mean);
    r.m2 = a.m2 + b.m2 + delta * delta * a.count * wb;
    return r;
  }
};

// mean[c], var[c] (biased) from Welford partials ws[(p * 3 + {count, mean, m2}) * C + c], p < P.
cudaError_t launch_finalize_welford(const float* ws, int64_t P, int64_t C, float* mean, float* var,
                                    cudaStream_t stream);

// out[f * out_fstride + c * out_cstride] = scale * sum_p ws[(p * F + f) * C + c], p < P, f < F.
cudaError_t launch_finalize_sums(const float* ws, int64_t P, int F, int64_t C, float* out, int64_t out_fstride,
                                 int64_t out_cstride, float scale, cudaStream_t stream);

}  // namespace nvae
