// Element types shared by the kernels (fused_adamw.cu, masked_adamw.cu): fp32, bf16 and fp16 values
// read as fp32 and written back rounded to nearest, and the dispatch from a DType code to a C++ type.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <c10/util/Exception.h>

#include "fused_adamw.h"  // DType

namespace badam {

// A type carried as a value, so that a generic lambda can receive it: f(Tag<float>{}).
template <typename T>
struct Tag {
  using type = T;
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// Parameters and gradients: fp32, bf16 or fp16.
template <typename F>
void with_param_type(DType t, F&& f) {
  switch (t) {
    case DType::kFloat32: return f(Tag<float>{});
    case DType::kBFloat16: return f(Tag<__nv_bfloat16>{});
    case DType::kFloat16: return f(Tag<__half>{});
  }
  TORCH_CHECK(false, "badam_kernels: unsupported dtype code ", static_cast<int>(t));
}

// Optimizer states: fp32 or bf16.
template <typename F>
void with_state_type(DType t, F&& f) {
  switch (t) {
    case DType::kFloat32: return f(Tag<float>{});
    case DType::kBFloat16: return f(Tag<__nv_bfloat16>{});
    case DType::kFloat16: break;
  }
  TORCH_CHECK(false, "badam_kernels: optimizer states must be fp32 or bf16");
}

}  // namespace badam
