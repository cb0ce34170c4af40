// pybind11 glue for nvae_fast._C. Tensors cross as (data pointer, dtype code, sizes); the stream is
// torch's current stream handle. Python (nvae_fast/kernels/cuda/) has already checked devices,
// dtypes, layouts and shapes; this layer re-checks what would crash a kernel and turns every CUDA
// error into a Python exception.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>

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

// Makes `device` current for one call and restores the caller's device afterwards: PyTorch reads the
// same per-thread runtime state, so a launch on a tensor of another GPU must not change it.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (device != previous_) {
      check_cuda(cudaSetDevice(device), "cudaSetDevice");
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    if (switched_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

cudaStream_t stream_of(Ptr s) { return reinterpret_cast<cudaStream_t>(s); }

template <typename T>
T* as(Ptr p) {
  return reinterpret_cast<T*>(p);
}

nvae::DwConvShape to_dw_shape(int64_t n, int64_t c, int64_t h, int64_t w, int k, int stride, bool upsample) {
  if (n <= 0 || c <= 0 || h <= 0 || w <= 0) throw std::invalid_argument("n, c, h and w must all be positive");
  if (k != 3 && k != 5 && k != 7 && k != 11) throw std::invalid_argument("kernel size must be 3, 5, 7 or 11");
  if (stride != 1 && stride != 2) throw std::invalid_argument("stride must be 1 or 2");
  if (stride == 2 && upsample) throw std::invalid_argument("upsample needs stride 1");
  return nvae::DwConvShape{n, c, h, w, k, stride, upsample};
}

// The fused depthwise stage's BatchNorm arguments from Python (see the bindings below).
using BatchNormSpec = std::tuple<Ptr, Ptr, int, Ptr, Ptr, float>;
using RunningSpec = std::tuple<Ptr, Ptr, int, Ptr, float, float>;
using GradSpec = std::tuple<Ptr, int64_t, bool>;

nvae::BatchNormArgs to_bn(const BatchNormSpec& spec, const char* what) {
  const auto& [weight, bias, dtype, mean, var, eps] = spec;
  require({weight, bias, mean, var}, what);
  if (!(eps >= 0.f)) throw std::invalid_argument(std::string(what) + ": eps must be >= 0");
  nvae::BatchNormArgs bn;
  bn.weight = as<const void>(weight);
  bn.bias = as<const void>(bias);
  bn.param_dtype = to_dtype(dtype);
  bn.mean = as<const float>(mean);
  bn.var = as<const float>(var);
  bn.eps = eps;
  return bn;
}

nvae::RunningUpdate to_running(const RunningSpec& spec) {
  const auto& [mean, var, dtype, num_batches_tracked, momentum, unbias] = spec;
  require({mean, var}, "running");
  nvae::RunningUpdate r;
  r.mean = as<void>(mean);
  r.var = as<void>(var);
  r.dtype = to_dtype(dtype);
  r.num_batches_tracked = as<int64_t>(num_batches_tracked);
  r.momentum = momentum;
  r.unbias = unbias;
  return r;
}

// NormalKLArgs from Python: views {name: (data pointer, (stride_n, stride_c, stride_h, stride_w))}
// and vectors {name: data pointer} for the fp32 reductions and their gradients.
using ViewSpec = std::pair<Ptr, std::array<int64_t, 4>>;

nvae::NormalKLArgs to_kl_args(int dtype, std::array<int64_t, 4> shape, bool residual, float temperature,
                              const std::map<std::string, ViewSpec>& views, const std::map<std::string, Ptr>& vectors) {
  using A = nvae::NormalKLArgs;
  static const std::map<std::string, nvae::Strided4 A::*> view_fields = {
      {"mu_p", &A::mu_p},       {"log_sigma_p", &A::log_sigma_p},
      {"mu_q", &A::mu_q},       {"log_sigma_q", &A::log_sigma_q},
      {"eps", &A::eps},         {"z", &A::z},
      {"log_det", &A::log_det}, {"mu", &A::mu},
      {"log_sigma", &A::log_sigma}, {"grad_z", &A::grad_z},
      {"z_out", &A::z_out},     {"d_mu_p", &A::d_mu_p},
      {"d_log_sigma_p", &A::d_log_sigma_p}, {"d_mu_q", &A::d_mu_q},
      {"d_log_sigma_q", &A::d_log_sigma_q}, {"d_z", &A::d_z},
      {"d_log_det", &A::d_log_det}, {"d_mu", &A::d_mu},
      {"d_log_sigma", &A::d_log_sigma}};
  A a;
  a.dtype = to_dtype(dtype);
  if (shape[0] <= 0 || shape[1] <= 0 || shape[2] <= 0 || shape[3] <= 0) {
    throw std::invalid_argument("shape (N, C, H, W) must be positive");
  }
  a.n = shape[0];
  a.c = shape[1];
  a.h = shape[2];
  a.w = shape[3];
  a.residual = residual;
  a.temperature = temperature;
  for (const auto& [name, spec] : views) {
    const auto it = view_fields.find(name);
    if (it == view_fields.end()) throw std::invalid_argument("unknown tensor '" + name + "'");
    if (spec.first == 0) throw std::invalid_argument("tensor '" + name + "': null device pointer");
    nvae::Strided4& v = a.*(it->second);
    v.data = reinterpret_cast<void*>(spec.first);
    for (int d = 0; d < 4; ++d) v.stride[d] = spec.second[d];
  }
  for (const auto& [name, ptr] : vectors) {
    if (ptr == 0) throw std::invalid_argument("vector '" + name + "': null device pointer");
    if (name == "grad_kl_all") a.grad_kl_all = as<const float>(ptr);
    else if (name == "grad_log_q") a.grad_log_q = as<const float>(ptr);
    else if (name == "grad_log_p") a.grad_log_p = as<const float>(ptr);
    else if (name == "grad_kl_diag") a.grad_kl_diag = as<const float>(ptr);
    else if (name == "sums_n") a.sums_n = as<float>(ptr);
    else if (name == "kl_diag") a.kl_diag = as<float>(ptr);
    else throw std::invalid_argument("unknown vector '" + name + "'");
  }
  return a;
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
        const DeviceGuard guard(device);
        return nvae::bn_reduce_workspace_bytes(to_shape(n, c, hw, channels_last));
      },
      py::arg("n"), py::arg("c"), py::arg("hw"), py::arg("channels_last"), py::arg("device"));

  m.def(
      "bn_stats",
      [](Ptr x, int dtype, int64_t n, int64_t c, int64_t hw, bool channels_last, Ptr mean, Ptr var, Ptr workspace,
         size_t workspace_bytes, int device, Ptr stream) {
        require({x, mean, var, workspace}, "bn_stats");
        const DeviceGuard guard(device);
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
        const DeviceGuard guard(device);
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
        const DeviceGuard guard(device);
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
        const DeviceGuard guard(device);
        check_cuda(nvae::bn_swish_backward_apply(
                       as<const void>(dy), as<const void>(x), as<void>(dx), to_dtype(dtype),
                       to_shape(n, c, hw, channels_last), as<const float>(scale), as<const float>(shift),
                       as<const float>(mean), as<const float>(coef_xmu), as<const float>(coef_const),
                       stream_of(stream)),
                   "bn_swish_backward_apply");
      },
      py::call_guard<py::gil_scoped_release>());

  // ---- depthwise stage ----
  m.def(
      "dwconv_stage_forward_workspace_bytes",
      [](int64_t n, int64_t c, int64_t h, int64_t w, int k, int stride, bool upsample, int device) {
        const nvae::DwConvShape shape = to_dw_shape(n, c, h, w, k, stride, upsample);
        const DeviceGuard guard(device);
        return nvae::dwconv_stage_forward_workspace_bytes(shape);
      },
      py::arg("n"), py::arg("c"), py::arg("h"), py::arg("w"), py::arg("k"), py::arg("stride"), py::arg("upsample"),
      py::arg("device"));

  m.def(
      "dwconv_stage_backward_workspace_bytes",
      [](int64_t n, int64_t c, int64_t h, int64_t w, int k, int stride, bool upsample, int device) {
        const nvae::DwConvShape shape = to_dw_shape(n, c, h, w, k, stride, upsample);
        const DeviceGuard guard(device);
        return nvae::dwconv_stage_backward_workspace_bytes(shape);
      },
      py::arg("n"), py::arg("c"), py::arg("h"), py::arg("w"), py::arg("k"), py::arg("stride"), py::arg("upsample"),
      py::arg("device"));

  m.def(
      "dwconv_stage_forward",
      [](Ptr a, int dtype, int64_t n, int64_t c, int64_t h, int64_t w, int k, int stride, bool upsample, Ptr scale,
         Ptr shift, Ptr weight, int weight_dtype, Ptr out, Ptr mean_c, Ptr var_c, Ptr workspace,
         size_t workspace_bytes, int device, Ptr stream) {
        require({a, scale, shift, weight, out, mean_c, var_c, workspace}, "dwconv_stage_forward");
        const nvae::DwConvShape shape = to_dw_shape(n, c, h, w, k, stride, upsample);
        const DeviceGuard guard(device);
        check_cuda(nvae::dwconv_stage_forward(as<const void>(a), to_dtype(dtype), shape, as<const float>(scale),
                                              as<const float>(shift), as<const void>(weight), to_dtype(weight_dtype),
                                              as<void>(out), as<float>(mean_c), as<float>(var_c), as<void>(workspace),
                                              workspace_bytes, stream_of(stream)),
                   "dwconv_stage_forward");
      },
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "dwconv_stage_backward",
      [](Ptr dc, Ptr a, int dtype, int64_t n, int64_t c, int64_t h, int64_t w, int k, int stride, bool upsample,
         Ptr scale, Ptr shift, Ptr mean_a, Ptr weight, int weight_dtype, Ptr g, Ptr sums, Ptr dweight, Ptr workspace,
         size_t workspace_bytes, int device, Ptr stream) {
        require({dc, a, scale, shift, mean_a, weight, g, sums, dweight, workspace}, "dwconv_stage_backward");
        const nvae::DwConvShape shape = to_dw_shape(n, c, h, w, k, stride, upsample);
        const DeviceGuard guard(device);
        check_cuda(nvae::dwconv_stage_backward(as<const void>(dc), as<const void>(a), to_dtype(dtype), shape,
                                               as<const float>(scale), as<const float>(shift),
                                               as<const float>(mean_a), as<const void>(weight),
                                               to_dtype(weight_dtype), as<void>(g), as<float>(sums),
                                               as<float>(dweight), as<void>(workspace), workspace_bytes,
                                               stream_of(stream)),
                   "dwconv_stage_backward");
      },
      py::call_guard<py::gil_scoped_release>());

  // The fused contract: a BatchNorm as (weight, bias, param dtype code, mean, var, eps), the running
  // update as (mean, var, dtype code, num_batches_tracked or 0, momentum, unbias) or None, a
  // BatchNorm's backward as (sums, count, training).
  m.def(
      "dwconv_stage_forward_fused",
      [](Ptr a, int dtype, int64_t n, int64_t c, int64_t h, int64_t w, int k, int stride, bool upsample,
         const BatchNormSpec& bn1, Ptr weight, int weight_dtype, Ptr out, Ptr stats,
         const std::optional<RunningSpec>& running, Ptr workspace, size_t workspace_bytes, int device, Ptr stream) {
        require({a, weight, out}, "dwconv_stage_forward_fused");
        if (running && stats == 0) throw std::invalid_argument("dwconv_stage_forward_fused: running needs stats");
        if (stats != 0) require({workspace}, "dwconv_stage_forward_fused");
        const nvae::DwConvShape shape = to_dw_shape(n, c, h, w, k, stride, upsample);
        const nvae::BatchNormArgs bn = to_bn(bn1, "bn1");
        const nvae::RunningUpdate run = running ? to_running(*running) : nvae::RunningUpdate{};
        const DeviceGuard guard(device);
        check_cuda(nvae::dwconv_stage_forward_fused(as<const void>(a), to_dtype(dtype), shape, bn,
                                                    as<const void>(weight), to_dtype(weight_dtype), as<void>(out),
                                                    as<float>(stats), run, as<void>(workspace), workspace_bytes,
                                                    stream_of(stream)),
                   "dwconv_stage_forward_fused");
      },
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "dwconv_stage_backward_fused",
      [](Ptr dz, Ptr z, const BatchNormSpec& bn_z, const GradSpec& grad_z, Ptr a, int dtype, int64_t n, int64_t c,
         int64_t h, int64_t w, int k, int stride, bool upsample, const BatchNormSpec& bn1, Ptr weight,
         int weight_dtype, Ptr g, Ptr sums, Ptr grad_weight, Ptr grad_bias, Ptr dweight, Ptr workspace,
         size_t workspace_bytes, int device, Ptr stream) {
        require({dz, z, a, weight, g, sums, grad_weight, grad_bias, dweight, workspace}, "dwconv_stage_backward_fused");
        const nvae::DwConvShape shape = to_dw_shape(n, c, h, w, k, stride, upsample);
        const nvae::BatchNormArgs bnz = to_bn(bn_z, "bn_z"), bn = to_bn(bn1, "bn1");
        nvae::BatchNormGrad grad;
        grad.sums = as<const float>(std::get<0>(grad_z));
        grad.count = std::get<1>(grad_z);
        grad.training = std::get<2>(grad_z);
        if (grad.training && (grad.sums == nullptr || grad.count <= 0)) {
          throw std::invalid_argument("grad_z: training needs sums and a positive count");
        }
        const DeviceGuard guard(device);
        check_cuda(nvae::dwconv_stage_backward_fused(as<const void>(dz), as<const void>(z), bnz, grad,
                                                     as<const void>(a), to_dtype(dtype), shape, bn,
                                                     as<const void>(weight), to_dtype(weight_dtype), as<void>(g),
                                                     as<float>(sums), as<void>(grad_weight), as<void>(grad_bias),
                                                     as<void>(dweight), as<void>(workspace), workspace_bytes,
                                                     stream_of(stream)),
                   "dwconv_stage_backward_fused");
      },
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "dwconv_stage_launch_plan",
      [](int64_t n, int64_t c, int64_t h, int64_t w, int k, int stride, bool upsample, int sms,
         int64_t smem_per_block) {
        if (sms <= 0) throw std::invalid_argument("sms must be positive");
        if (smem_per_block < 48 * 1024) throw std::invalid_argument("smem_per_block must be at least 48 KiB");
        const nvae::DwConvShape shape = to_dw_shape(n, c, h, w, k, stride, upsample);
        const nvae::DwConvStageLaunch plan = nvae::dwconv_stage_launch_plan(shape, sms, smem_per_block);
        auto merge = [](const nvae::MergeLaunch& m) {
          py::dict d;
          d["parts"] = m.parts;
          d["segments"] = m.segments;
          d["seg_len"] = m.seg_len;
          d["blocks"] = m.blocks;
          d["serial_loads"] = m.serial_loads;
          return d;
        };
        auto pass = [&](const nvae::DwConvPassLaunch& p) {
          py::dict d;
          d["blocks"] = p.blocks;
          d["tile"] = py::make_tuple(p.th, p.tw);
          d["tiles"] = p.tiles;
          d["tiles_per_block"] = p.tiles_per_block;
          d["smem_bytes"] = p.smem_bytes;
          d["evaluations_per_element"] = p.evaluations;
          d["merge"] = merge(p.merge);
          return d;
        };
        py::dict out;
        out["forward"] = pass(plan.forward);
        out["input_grad"] = pass(plan.input_grad);
        out["weight_grad"] = pass(plan.weight_grad);
        return out;
      },
      py::arg("n"), py::arg("c"), py::arg("h"), py::arg("w"), py::arg("k"), py::arg("stride"), py::arg("upsample"),
      py::arg("sms"), py::arg("smem_per_block"),
      "The depthwise stage's launch plan on a device with `sms` multiprocessors and `smem_per_block` bytes of "
      "dynamic shared memory per block (nothing is launched): per kernel "
      "grid blocks, tile, tiles per block, shared memory, BN1 + Swish evaluations per element of a, and the merge "
      "of its partials (runs, serial loads per thread).");

  // ---- residual-normal KL: tensors cross as {name: (pointer, strides)}, fp32 vectors as {name: pointer} ----
  m.def(
      "normal_kl_workspace_bytes",
      [](int dtype, std::array<int64_t, 4> shape, bool residual, const std::map<std::string, ViewSpec>& views,
         int device) {
        const nvae::NormalKLArgs args = to_kl_args(dtype, shape, residual, 1.f, views, {});
        const DeviceGuard guard(device);
        return nvae::normal_kl_workspace_bytes(args);
      },
      py::arg("dtype"), py::arg("shape"), py::arg("residual"), py::arg("views"), py::arg("device"));

  using KLReducing = cudaError_t (*)(const nvae::NormalKLArgs&, void*, size_t, cudaStream_t);
  using KLElementwise = cudaError_t (*)(const nvae::NormalKLArgs&, cudaStream_t);
  const std::pair<const char*, KLReducing> reducing[] = {{"normal_kl_forward", &nvae::normal_kl_forward},
                                                         {"flow_kl_forward", &nvae::flow_kl_forward}};
  for (const auto& [name, fn] : reducing) {
    m.def(
        name,
        [name = std::string(name), fn = fn](int dtype, std::array<int64_t, 4> shape, bool residual,
                                            const std::map<std::string, ViewSpec>& views,
                                            const std::map<std::string, Ptr>& vectors, Ptr workspace,
                                            size_t workspace_bytes, int device, Ptr stream) {
          const nvae::NormalKLArgs args = to_kl_args(dtype, shape, residual, 1.f, views, vectors);
          require({workspace}, name.c_str());
          const DeviceGuard guard(device);
          check_cuda(fn(args, as<void>(workspace), workspace_bytes, stream_of(stream)), name.c_str());
        },
        py::arg("dtype"), py::arg("shape"), py::arg("residual"), py::arg("views"), py::arg("vectors"),
        py::arg("workspace"), py::arg("workspace_bytes"), py::arg("device"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
  }
  const std::pair<const char*, KLElementwise> elementwise[] = {{"normal_kl_backward", &nvae::normal_kl_backward},
                                                               {"flow_kl_backward", &nvae::flow_kl_backward},
                                                               {"normal_sample_forward", &nvae::normal_sample_forward},
                                                               {"normal_sample_backward", &nvae::normal_sample_backward}};
  for (const auto& [name, fn] : elementwise) {
    m.def(
        name,
        [name = std::string(name), fn = fn](int dtype, std::array<int64_t, 4> shape, bool residual, float temperature,
                                            const std::map<std::string, ViewSpec>& views,
                                            const std::map<std::string, Ptr>& vectors, int device, Ptr stream) {
          const nvae::NormalKLArgs args = to_kl_args(dtype, shape, residual, temperature, views, vectors);
          const DeviceGuard guard(device);
          check_cuda(fn(args, stream_of(stream)), name.c_str());
        },
        py::arg("dtype"), py::arg("shape"), py::arg("residual"), py::arg("temperature"), py::arg("views"),
        py::arg("vectors"), py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  }
}
