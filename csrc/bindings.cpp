// pybind11 glue for nvae_fast._C. Tensors cross as (data pointer, dtype code, sizes); the stream is
// torch's current stream handle. Python (nvae_fast/kernels/cuda/) has already checked devices,
// dtypes, layouts and shapes; this layer re-checks what would crash a kernel and turns every CUDA
// error into a Python exception.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "nvae_fast.h"

namespace py = pybind11;

namespace {

using Ptr = uintptr_t;

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("nvae_fast._C.") + what + " failed: " + cudaGetErrorName(err) + " (" +
                             cudaGetErrorString(err) + ")");
  }
}

nvae::DType to_dtype(int code) {
  if (code < 0 || code > 2) throw std::invalid_argument("dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16)");
  return static_cast<nvae::DType>(code);
}

nvae::ActShape to_shape(int64_t n, int64_t c, int64_t hw, bool channels_last) {
  if (n <= 0 || c <= 0 || hw <= 0) throw std::invalid_argument("n, c and hw must all be positive");
  return nvae::ActShape{n, c, hw, channels_last};
}

void require(std::initializer_list<Ptr> ptrs, const char* what) {
  for (Ptr p : ptrs) {
    if (p == 0) throw std::invalid_argument(std::string(what) + ": null device pointer");
  }
}

void use_device(int device) { check_cuda(cudaSetDevice(device), "cudaSetDevice"); }

cudaStream_t stream_of(Ptr s) { return reinterpret_cast<cudaStream_t>(s); }

template <typename T>
T* as(Ptr p) {
  return reinterpret_cast<T*>(p);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "nvae_fast CUDA kernels (torch-free; called from nvae_fast.kernels.cuda)";

  m.def(
      "device_count",
      []() -> py::tuple {
        int count = 0;
        const cudaError_t err = cudaGetDeviceCount(&count);
        if (err != cudaSuccess) {
          cudaGetLastError();
          return py::make_tuple(0, std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err));
        }
        return py::make_tuple(count, std::string());
      },
      "(number of visible CUDA devices, error text or '')");

  m.def("cuda_runtime_version", []() {
    int v = 0;
    cudaRuntimeGetVersion(&v);
    return v;
  });

  m.def(
      "bn_reduce_workspace_bytes",
      [](int64_t n, int64_t c, int64_t hw, bool channels_last, int device) {
        use_device(device);
        return nvae::bn_reduce_workspace_bytes(to_shape(n, c, hw, channels_last));
      },
      py::arg("n"), py::arg("c"), py::arg("hw"), py::arg("channels_last"), py::arg("device"));

  m.def(
      "bn_stats",
      [](Ptr x, int dtype, int64_t n, int64_t c, int64_t hw, bool channels_last, Ptr mean, Ptr var, Ptr workspace,
         size_t workspace_bytes, int device, Ptr stream) {
        require({x, mean, var, workspace}, "bn_stats");
        use_device(device);
        check_cuda(nvae::bn_stats(as<const void>(x), to_dtype(dtype), to_shape(n, c, hw, channels_last),
                                  as<float>(mean), as<float>(var), as<void>(workspace), workspace_bytes,
                                  stream_of(stream)),
                   "bn_stats");
      },
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "bn_swish_forward",
      [](Ptr x, Ptr y, int dtype, int64_t n, int64_t c, int64_t hw, bool channels_last, Ptr scale, Ptr shift,
         int device, Ptr stream) {
        require({x, y, scale, shift}, "bn_swish_forward");
        use_device(device);
        check_cuda(nvae::bn_swish_forward(as<const void>(x), as<void>(y), to_dtype(dtype),
                                          to_shape(n, c, hw, channels_last), as<const float>(scale),
                                          as<const float>(shift), stream_of(stream)),
                   "bn_swish_forward");
      },
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "bn_swish_backward_reduce",
      [](Ptr dy, Ptr x, int dtype, int64_t n, int64_t c, int64_t hw, bool channels_last, Ptr scale, Ptr shift,
         Ptr mean, Ptr sum_g, Ptr sum_gxmu, Ptr workspace, size_t workspace_bytes, int device, Ptr stream) {
        require({dy, x, scale, shift, mean, sum_g, sum_gxmu, workspace}, "bn_swish_backward_reduce");
        use_device(device);
        check_cuda(nvae::bn_swish_backward_reduce(as<const void>(dy), as<const void>(x), to_dtype(dtype),
                                                  to_shape(n, c, hw, channels_last), as<const float>(scale),
                                                  as<const float>(shift), as<const float>(mean), as<float>(sum_g),
                                                  as<float>(sum_gxmu), as<void>(workspace), workspace_bytes,
                                                  stream_of(stream)),
                   "bn_swish_backward_reduce");
      },
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "bn_swish_backward_apply",
      [](Ptr dy, Ptr x, Ptr dx, int dtype, int64_t n, int64_t c, int64_t hw, bool channels_last, Ptr scale,
         Ptr shift, Ptr mean, Ptr coef_xmu, Ptr coef_const, int device, Ptr stream) {
        require({dy, x, dx, scale, shift, mean, coef_xmu, coef_const}, "bn_swish_backward_apply");
        use_device(device);
        check_cuda(nvae::bn_swish_backward_apply(
                       as<const void>(dy), as<const void>(x), as<void>(dx), to_dtype(dtype),
                       to_shape(n, c, hw, channels_last), as<const float>(scale), as<const float>(shift),
                       as<const float>(mean), as<const float>(coef_xmu), as<const float>(coef_const),
                       stream_of(stream)),
                   "bn_swish_backward_apply");
      },
      py::call_guard<py::gil_scoped_release>());
}
