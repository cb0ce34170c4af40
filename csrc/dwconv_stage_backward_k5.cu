// Depthwise stage, backward kernels for kernel size 5 (one file per size: they compile in parallel).
#include "dwconv_stage_backward.cuh"

namespace nvae {
namespace dw {
template cudaError_t launch_backward<5>(const BackwardPlan&, const BackwardArgs&, cudaStream_t);
}  // namespace dw
}  // namespace nvae
