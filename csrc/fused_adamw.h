// Launchers of the fused AdamW kernels (fused_adamw.cu), called by the op layer (ops.cpp).
//
// The op layer checks and unpacks torch tensors; this interface is plain pointers and dtypes, so the
// .cu file needs no ATen headers (it compiles fast and builds against the c10/cuda headers only).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace badam {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// A one-element device scalar (lr, grad_scale, found_inf): fp32 or fp64, or absent (ptr == nullptr).
struct DeviceScalar {
  const void* ptr = nullptr;
  bool is_double = false;
};

struct AdamWLaunch {
  void* param;               // numel elements of param_dtype, updated in place
  const void* grad;          // numel elements of grad_dtype
  float* master;             // numel fp32 elements, or nullptr
  void* exp_avg;             // numel elements of exp_avg_dtype
  void* exp_avg_sq;          // numel elements of exp_avg_sq_dtype
  float* step;               // one fp32 element: incremented on the device unless the step is skipped
  float* norm_out;           // one fp32 element that receives the gradient norm, or nullptr
  float* workspace;          // adamw_workspace_floats(...) fp32 elements, no initialisation needed
  DType param_dtype, grad_dtype, exp_avg_dtype, exp_avg_sq_dtype;
  DeviceScalar lr, grad_scale, found_inf;
  int64_t numel;
  int64_t decay_numel;
  double beta1, beta2, eps, weight_decay;
  double max_grad_norm;      // <= 0: no clipping
  bool check_finite;
  uint64_t seed;
  int device;
  cudaStream_t stream;
};

struct InitStateLaunch {
  const void* param;
  float* master;  // or nullptr
  void* exp_avg;
  void* exp_avg_sq;
  DType param_dtype, exp_avg_dtype, exp_avg_sq_dtype;
  int64_t numel;
  int device;
  cudaStream_t stream;
};

// Size of the scratch buffer one adamw_step needs (partial sums of squares + the step's scalars).
int64_t adamw_workspace_floats(int64_t numel, bool needs_norm, int device);

void launch_adamw_step(const AdamWLaunch& a);
void launch_init_state(const InitStateLaunch& a);

}  // namespace badam
