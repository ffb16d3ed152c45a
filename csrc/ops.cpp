// The op layer of badam_kernels._C: schemas, argument checks, the CUDA and Meta implementations.
//
// The ops are registered with TORCH_LIBRARY, so they are called as torch.ops.badam_kernels.<name>,
// traced by torch.compile (through the Meta implementations and the schemas' alias annotations) and
// captured in CUDA graphs (the kernels run on the current stream and never synchronise the host).
//
//   adamw_step(...) -> Tensor   the gradient norm as a 0-d fp32 tensor when it was computed
//                               (max_grad_norm > 0 or check_finite), else an empty tensor of shape [0]
//   init_state(...) -> ()       master = float(param), exp_avg = exp_avg_sq = 0
//   masked_adamw_step(...) -> () the ratio mode's Adam step of the masked entries (masked_adamw.h)
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "fused_adamw.h"
#include "masked_adamw.h"

namespace badam {
namespace {

constexpr const char* kStep = "badam_kernels::adamw_step";
constexpr const char* kInit = "badam_kernels::init_state";
constexpr const char* kMasked = "badam_kernels::masked_adamw_step";

DType param_dtype(const char* op, const char* name, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: break;
  }
  TORCH_CHECK(false, op, ": ", name, " must be bfloat16, float16 or float32, got ", t.scalar_type());
}

DType state_dtype(const char* op, const char* name, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, op, ": ", name, " must be float32 or bfloat16, got ", t.scalar_type());
}

// A flat buffer of the block: a contiguous CUDA tensor with param's device and element count.
void check_buffer(const char* op, const char* name, const at::Tensor& t, const at::Tensor& param) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == param.device(), op, ": ", name, " is on ", t.device(), " but param is on ",
              param.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (a flat buffer), got strides ",
              t.strides());
  TORCH_CHECK(t.numel() == param.numel(), op, ": ", name, " has ", t.numel(), " elements, param has ",
              param.numel());
}

void check_states(const char* op, const at::Tensor& param, const std::optional<at::Tensor>& master,
                  const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq) {
  TORCH_CHECK(param.defined() && param.is_cuda(), op, ": param must be a CUDA tensor, got one on ",
              param.defined() ? param.device() : at::Device(at::kCPU));
  check_buffer(op, "param", param, param);
  param_dtype(op, "param", param);
  if (master.has_value() && master->defined()) {
    check_buffer(op, "master", *master, param);
    TORCH_CHECK(master->scalar_type() == at::kFloat, op, ": master must be float32, got ", master->scalar_type());
  }
  check_buffer(op, "exp_avg", exp_avg, param);
  check_buffer(op, "exp_avg_sq", exp_avg_sq, param);
  state_dtype(op, "exp_avg", exp_avg);
  state_dtype(op, "exp_avg_sq", exp_avg_sq);
}

// Adam's hyperparameters, the same for every step op.
void check_hyperparameters(const char* op, double beta1, double beta2, double eps, double weight_decay) {
  TORCH_CHECK(0.0 <= beta1 && beta1 < 1.0 && 0.0 <= beta2 && beta2 < 1.0, op, ": betas must lie in [0, 1), got (",
              beta1, ", ", beta2, ")");
  TORCH_CHECK(eps >= 0.0 && weight_decay >= 0.0, op, ": eps and weight_decay must be non-negative");
}

// A one-element device scalar, read by the kernels as fp32 or fp64 (other dtypes are converted on the
// device, which stays capturable). `keep` holds the converted tensor until the op returns.
struct ScalarArg {
  DeviceScalar scalar;
  at::Tensor keep;
};

ScalarArg device_scalar(const char* name, const std::optional<at::Tensor>& t, const at::Tensor& param) {
  if (!t.has_value() || !t->defined()) return {};
  TORCH_CHECK(t->numel() == 1, kStep, ": ", name, " must have one element, got shape ", t->sizes());
  TORCH_CHECK(t->device() == param.device(), kStep, ": ", name, " is on ", t->device(), " but param is on ",
              param.device(), " (a host scalar would need a synchronisation; pass a device tensor)");
  at::Tensor x = *t;
  if (x.scalar_type() != at::kFloat && x.scalar_type() != at::kDouble) x = x.to(at::kFloat);
  return {DeviceScalar{x.const_data_ptr(), x.scalar_type() == at::kDouble}, x};
}

bool needs_norm(double max_grad_norm, bool check_finite) { return max_grad_norm > 0.0 || check_finite; }

at::Tensor norm_result(const at::Tensor& param, bool computed) {
  const auto options = param.options().dtype(at::kFloat);
  return computed ? at::empty(at::IntArrayRef{}, options) : at::empty({0}, options);
}

at::Tensor adamw_step_cuda(const at::Tensor& param, const at::Tensor& grad, const std::optional<at::Tensor>& master,
                           const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, const at::Tensor& step,
                           const at::Tensor& lr, double beta1, double beta2, double eps, double weight_decay,
                           int64_t decay_numel, const std::optional<at::Tensor>& grad_scale,
                           const std::optional<at::Tensor>& found_inf, double max_grad_norm, bool check_finite,
                           int64_t seed) {
  check_states(kStep, param, master, exp_avg, exp_avg_sq);
  check_buffer(kStep, "grad", grad, param);
  const bool has_master = master.has_value() && master->defined();
  TORCH_CHECK(has_master || param.scalar_type() != at::kHalf, kStep,
              ": float16 params need a float32 master copy (stochastic rounding is implemented for bfloat16)");
  TORCH_CHECK(step.defined() && step.device() == param.device() && step.numel() == 1 &&
                  step.scalar_type() == at::kFloat,
              kStep, ": step must be a one-element float32 tensor on ", param.device());
  check_hyperparameters(kStep, beta1, beta2, eps, weight_decay);
  TORCH_CHECK(0 <= decay_numel && decay_numel <= param.numel(), kStep, ": decay_numel=", decay_numel,
              " is outside [0, ", param.numel(), "]");

  const c10::cuda::CUDAGuard guard(param.device());
  const ScalarArg lr_arg = device_scalar("lr", lr, param);
  TORCH_CHECK(lr_arg.scalar.ptr != nullptr, kStep, ": lr must be a defined tensor");
  const ScalarArg scale_arg = device_scalar("grad_scale", grad_scale, param);
  const ScalarArg inf_arg = device_scalar("found_inf", found_inf, param);

  const int device = param.get_device();
  const bool norm_needed = needs_norm(max_grad_norm, check_finite);
  at::Tensor norm = norm_result(param, norm_needed);
  at::Tensor workspace =
      at::empty({adamw_workspace_floats(param.numel(), norm_needed, device)}, param.options().dtype(at::kFloat));

  AdamWLaunch a{};
  a.param = param.data_ptr();
  a.grad = grad.const_data_ptr();
  a.master = has_master ? master->data_ptr<float>() : nullptr;
  a.exp_avg = exp_avg.data_ptr();
  a.exp_avg_sq = exp_avg_sq.data_ptr();
  a.step = step.data_ptr<float>();
  a.norm_out = norm_needed ? norm.data_ptr<float>() : nullptr;
  a.workspace = workspace.data_ptr<float>();
  a.param_dtype = param_dtype(kStep, "param", param);
  a.grad_dtype = param_dtype(kStep, "grad", grad);
  a.exp_avg_dtype = state_dtype(kStep, "exp_avg", exp_avg);
  a.exp_avg_sq_dtype = state_dtype(kStep, "exp_avg_sq", exp_avg_sq);
  a.lr = lr_arg.scalar;
  a.grad_scale = scale_arg.scalar;
  a.found_inf = inf_arg.scalar;
  a.numel = param.numel();
  a.decay_numel = decay_numel;
  a.beta1 = beta1;
  a.beta2 = beta2;
  a.eps = eps;
  a.weight_decay = weight_decay;
  a.max_grad_norm = max_grad_norm;
  a.check_finite = check_finite;
  a.seed = static_cast<uint64_t>(seed);
  a.device = device;
  a.stream = c10::cuda::getCurrentCUDAStream(device).stream();
  launch_adamw_step(a);
  return norm;
}

void init_state_cuda(const at::Tensor& param, const std::optional<at::Tensor>& master, const at::Tensor& exp_avg,
                     const at::Tensor& exp_avg_sq) {
  check_states(kInit, param, master, exp_avg, exp_avg_sq);
  const c10::cuda::CUDAGuard guard(param.device());
  const bool has_master = master.has_value() && master->defined();
  InitStateLaunch a{};
  a.param = param.const_data_ptr();
  a.master = has_master ? master->data_ptr<float>() : nullptr;
  a.exp_avg = exp_avg.data_ptr();
  a.exp_avg_sq = exp_avg_sq.data_ptr();
  a.param_dtype = param_dtype(kInit, "param", param);
  a.exp_avg_dtype = state_dtype(kInit, "exp_avg", exp_avg);
  a.exp_avg_sq_dtype = state_dtype(kInit, "exp_avg_sq", exp_avg_sq);
  a.numel = param.numel();
  a.device = param.get_device();
  a.stream = c10::cuda::getCurrentCUDAStream(a.device).stream();
  launch_init_state(a);
}

// A contiguous CUDA tensor on `device` with `numel` elements of dtype `dtype` (the masked op's buffers).
void check_flat(const char* op, const char* name, const at::Tensor& t, const at::Device& device, int64_t numel,
                at::ScalarType dtype) {
  TORCH_CHECK(t.defined() && t.device() == device, op, ": ", name, " must be a tensor on ", device);
  TORCH_CHECK(t.is_contiguous() && t.numel() == numel, op, ": ", name, " must be a contiguous buffer of ", numel,
              " elements, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
}

void masked_adamw_step_cuda(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& index,
                            const std::optional<at::Tensor>& master, const at::Tensor& exp_avg,
                            const at::Tensor& exp_avg_sq, const at::Tensor& tile_base, const at::Tensor& tile_step,
                            double lr, double beta1, double beta2, double eps, double weight_decay, int64_t tile_start,
                            int64_t num_tiles) {
  TORCH_CHECK(param.defined() && param.is_cuda() && param.is_contiguous(), kMasked,
              ": param must be a contiguous CUDA tensor");
  check_buffer(kMasked, "grad", grad, param);
  const at::Device device = param.device();
  const int64_t tiles = tile_base.numel(), entries = tiles * kMaskedTile;
  check_flat(kMasked, "tile_base", tile_base, device, tiles, at::kLong);
  check_flat(kMasked, "tile_step", tile_step, device, tiles, at::kFloat);
  check_flat(kMasked, "index", index, device, entries, at::kInt);
  check_flat(kMasked, "exp_avg", exp_avg, device, entries, at::kFloat);
  check_flat(kMasked, "exp_avg_sq", exp_avg_sq, device, entries, at::kFloat);
  const bool has_master = master.has_value() && master->defined();
  if (has_master) check_flat(kMasked, "master", *master, device, entries, at::kFloat);
  TORCH_CHECK(has_master || param.scalar_type() == at::kFloat, kMasked, ": ", param.scalar_type(),
              " params need a float32 master of the masked entries");
  TORCH_CHECK(0 <= tile_start && 0 <= num_tiles && tile_start + num_tiles <= tiles, kMasked, ": tiles [", tile_start,
              ", ", tile_start + num_tiles, ") are outside the ", tiles, " tiles");
  check_hyperparameters(kMasked, beta1, beta2, eps, weight_decay);

  const c10::cuda::CUDAGuard guard(device);
  MaskedAdamWLaunch a{};
  a.param = param.data_ptr();
  a.grad = grad.const_data_ptr();
  a.index = index.const_data_ptr<int32_t>();
  a.master = has_master ? master->data_ptr<float>() : nullptr;
  a.exp_avg = exp_avg.data_ptr<float>();
  a.exp_avg_sq = exp_avg_sq.data_ptr<float>();
  a.tile_base = tile_base.const_data_ptr<int64_t>();
  a.tile_step = tile_step.data_ptr<float>();
  a.param_dtype = param_dtype(kMasked, "param", param);
  a.grad_dtype = param_dtype(kMasked, "grad", grad);
  a.tile_start = tile_start;
  a.num_tiles = num_tiles;
  a.lr = lr;
  a.beta1 = beta1;
  a.beta2 = beta2;
  a.eps = eps;
  a.weight_decay = weight_decay;
  a.stream = c10::cuda::getCurrentCUDAStream(param.get_device()).stream();
  launch_masked_adamw_step(a);
}

// Meta: shapes only, for torch.compile's fake tensors. The mutations are declared in the schemas.
at::Tensor adamw_step_meta(const at::Tensor& param, const at::Tensor&, const std::optional<at::Tensor>&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double,
                           double, double, int64_t, const std::optional<at::Tensor>&,
                           const std::optional<at::Tensor>&, double max_grad_norm, bool check_finite, int64_t) {
  return norm_result(param, needs_norm(max_grad_norm, check_finite));
}

void init_state_meta(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&) {}

void masked_adamw_step_meta(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double,
                            double, double, double, int64_t, int64_t) {}

}  // namespace
}  // namespace badam

TORCH_LIBRARY(badam_kernels, m) {
  m.def(
      "adamw_step(Tensor(a!) param, Tensor grad, Tensor(b!)? master, Tensor(c!) exp_avg, Tensor(d!) exp_avg_sq, "
      "Tensor(e!) step, Tensor lr, float beta1, float beta2, float eps, float weight_decay, int decay_numel, "
      "Tensor? grad_scale, Tensor? found_inf, float max_grad_norm, bool check_finite, int seed) -> Tensor");
  m.def("init_state(Tensor param, Tensor(a!)? master, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq) -> ()");
  m.def(
      "masked_adamw_step(Tensor(a!) param, Tensor grad, Tensor index, Tensor(b!)? master, Tensor(c!) exp_avg, "
      "Tensor(d!) exp_avg_sq, Tensor tile_base, Tensor(e!) tile_step, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, int tile_start, int num_tiles) -> ()");
}

TORCH_LIBRARY_IMPL(badam_kernels, CUDA, m) {
  m.impl("adamw_step", &badam::adamw_step_cuda);
  m.impl("init_state", &badam::init_state_cuda);
  m.impl("masked_adamw_step", &badam::masked_adamw_step_cuda);
}

TORCH_LIBRARY_IMPL(badam_kernels, Meta, m) {
  m.impl("adamw_step", &badam::adamw_step_meta);
  m.impl("init_state", &badam::init_state_meta);
  m.impl("masked_adamw_step", &badam::masked_adamw_step_meta);
}

// `import badam_kernels._C` loads the library (and so registers the ops); the module itself is empty.
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif
#define BADAM_CONCAT_(a, b) a##b
#define BADAM_CONCAT(a, b) BADAM_CONCAT_(a, b)
#define BADAM_STR_(a) #a
#define BADAM_STR(a) BADAM_STR_(a)

PyMODINIT_FUNC BADAM_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, BADAM_STR(TORCH_EXTENSION_NAME),
                               "badam_kernels C++/CUDA ops, registered as torch.ops.badam_kernels",
                               -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
