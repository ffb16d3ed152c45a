// Fused AdamW step over one BAdam block's flat buffers, in one pass over memory.
//
// With g = grad / grad_scale, and when clipping g = g * min(1, max_grad_norm / (||g||_2 + 1e-6)):
//
//     t     = step + 1
//     w     = w * (1 - lr * weight_decay)                          (elements [0, decay_numel) only)
//     m     = beta1 * m + (1 - beta1) * g
//     v     = beta2 * v + (1 - beta2) * g^2
//     w     = w - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//     param = w rounded to the param dtype (to nearest from the fp32 master, stochastically without it)
//     step  = t
//
// and nothing changes at all (step included) when found_inf != 0 or (check_finite and ||g|| is not
// finite). w is the fp32 master when there is one, else the param itself (fp32, or bf16 read as fp32).
//
// Why it is fast: the update is memory bound, so every byte is touched once. For bf16 params and
// grads with fp32 master, m and v one step moves 28 B per parameter (read g 2 + w 4 + m 4 + v 4, write
// param 2 + w 4 + m 4 + v 4), plus 2 B when the norm is needed (clipping or the finite check): about
// 0.93 ms per 100 M parameters at 3 TB/s. Each thread moves 8 elements per iteration with 16-byte
// loads and stores (seven independent loads in flight in the case above), over a grid-stride loop
// sized from the SM count and the kernel's occupancy. No host synchronisation: lr, grad_scale,
// found_inf and step are device tensors, so the whole step can be captured in a CUDA graph.
//
// Stages, all on the current stream:
//   1. grad_sumsq_kernel (only when the norm is needed): per-block partial sums of g^2.
//   2. adamw_prologue_kernel (one block): reduces the partials in a fixed order (deterministic),
//      decides whether to skip, computes the step's scalars (bias corrections in double, as
//      torch.optim.AdamW does on the host), writes the norm and increments step unless skipped.
//      The update reads the scalars from the workspace, never step itself, so incrementing step
//      here cannot race with it.
//   3. adamw_update_kernel: the elementwise update above; returns at once when the step is skipped.
//
// Stochastic rounding (bf16 params without a master): a uniform 16-bit integer is added to the fp32
// bit pattern and the low 16 bits are dropped, which rounds up with probability equal to the
// distance to the lower neighbour. The noise is a counter-based hash (splitmix64) of the seed, the
// new step number t and the element index, so it differs from step to step even when a CUDA graph
// replays a fixed seed, and it does not depend on the grid or on the vectorised/scalar path.
#include "fused_adamw.h"
#include "element_types.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <type_traits>

namespace badam {
namespace {

constexpr int kThreads = 256;      // threads per block of every kernel here
constexpr int kPack = 8;           // elements per thread and iteration: 16 B of bf16/fp16, 32 B of fp32
constexpr int kNormUnroll = 4;     // packs in flight per thread in the norm pass (one stream only)
constexpr int kNormBlocksPerSm = 4;
constexpr int kMaxDevices = 64;

// The step's scalars, computed on the device by the prologue and read by every update block.
struct StepScalars {
  float skip;           // != 0: change nothing
  float t;              // the new step number
  float inv_scale;      // 1 / grad_scale (torch divides by a scalar as a multiply by its reciprocal)
  float clip;           // min(1, max_grad_norm / (norm + 1e-6)), or 1 without clipping
  float decay;          // 1 - lr * weight_decay
  float neg_step_size;  // -lr / (1 - beta1^t)
  float inv_bc2_sqrt;   // 1 / sqrt(1 - beta2^t)
};
constexpr int64_t kScalarFloats = (sizeof(StepScalars) + sizeof(float) - 1) / sizeof(float);

// Constants known on the host, rounded to fp32 as torch rounds Python scalars for fp32 tensors.
struct Hyper {
  float lerp_weight;      // 1 - beta1
  float beta2;
  float one_minus_beta2;  // 1 - beta2
  float eps;
  int64_t decay_numel;
};

// ---------------------------------------------------------------------------------------------
// 8-element packs (the element types and their conversions: element_types.cuh)
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ bool is_finite(float x) {
  return (__float_as_uint(x) & 0x7F800000u) != 0x7F800000u;
}

// Two 16-bit values from one 32-bit word, element 2k in the low half (little endian).
__device__ __forceinline__ uint32_t pack_bits(uint32_t lo, uint32_t hi) { return (lo & 0xFFFFu) | (hi << 16); }

template <typename T>
struct PackIO;

template <>
struct PackIO<float> {
  static __device__ __forceinline__ void load(const float* p, int64_t pack, float (&x)[kPack]) {
    const float4* q = reinterpret_cast<const float4*>(p + pack * kPack);
    const float4 a = q[0], b = q[1];
    x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w;
    x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
  }
  static __device__ __forceinline__ void store(float* p, int64_t pack, const float (&x)[kPack]) {
    float4* q = reinterpret_cast<float4*>(p + pack * kPack);
    q[0] = make_float4(x[0], x[1], x[2], x[3]);
    q[1] = make_float4(x[4], x[5], x[6], x[7]);
  }
};

template <>
struct PackIO<__nv_bfloat16> {
  static __device__ __forceinline__ void load(const __nv_bfloat16* p, int64_t pack, float (&x)[kPack]) {
    const uint4 u = *reinterpret_cast<const uint4*>(p + pack * kPack);
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {  // bf16 -> fp32 is exact: the bf16 bits are the high half
      x[2 * k] = __uint_as_float(w[k] << 16);
      x[2 * k + 1] = __uint_as_float(w[k] & 0xFFFF0000u);
    }
  }
  static __device__ __forceinline__ uint32_t bits(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
  static __device__ __forceinline__ void store(__nv_bfloat16* p, int64_t pack, const float (&x)[kPack]) {
    *reinterpret_cast<uint4*>(p + pack * kPack) =
        make_uint4(pack_bits(bits(x[0]), bits(x[1])), pack_bits(bits(x[2]), bits(x[3])),
                   pack_bits(bits(x[4]), bits(x[5])), pack_bits(bits(x[6]), bits(x[7])));
  }
};

template <>
struct PackIO<__half> {
  static __device__ __forceinline__ void load(const __half* p, int64_t pack, float (&x)[kPack]) {
    const uint4 u = *reinterpret_cast<const uint4*>(p + pack * kPack);
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      x[2 * k] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[k] & 0xFFFFu)));
      x[2 * k + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[k] >> 16)));
    }
  }
  static __device__ __forceinline__ uint32_t bits(float x) { return __half_as_ushort(__float2half_rn(x)); }
  static __device__ __forceinline__ void store(__half* p, int64_t pack, const float (&x)[kPack]) {
    *reinterpret_cast<uint4*>(p + pack * kPack) =
        make_uint4(pack_bits(bits(x[0]), bits(x[1])), pack_bits(bits(x[2]), bits(x[3])),
                   pack_bits(bits(x[4]), bits(x[5])), pack_bits(bits(x[6]), bits(x[7])));
  }
};

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// ---------------------------------------------------------------------------------------------
// Device scalars, reductions, the stochastic-rounding hash
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ double load_scalar(const DeviceScalar& s, double absent) {
  if (s.ptr == nullptr) return absent;
  return s.is_double ? *static_cast<const double*>(s.ptr) : static_cast<double>(*static_cast<const float*>(s.ptr));
}

// 1 / grad_scale in fp32, as torch computes g / scale on CUDA (the scale rounded to fp32 first).
__device__ __forceinline__ float scale_inverse(const DeviceScalar& grad_scale) {
  return grad_scale.ptr == nullptr ? 1.0f : 1.0f / static_cast<float>(load_scalar(grad_scale, 1.0));
}

// Sum over the block, in a fixed order (deterministic); the result is valid in thread 0.
template <typename T>
__device__ __forceinline__ T block_sum(T x) {
  __shared__ T warp_sums[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xFFFFFFFFu, x, offset);
  if (lane == 0) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < kThreads / 32 ? warp_sums[lane] : T(0);
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xFFFFFFFFu, x, offset);
  }
  return x;
}

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

__device__ __forceinline__ uint64_t mix64(uint64_t z) {  // splitmix64's finaliser
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The stream of one (seed, step): 64 noise bits per group of 4 consecutive elements.
__device__ __forceinline__ uint64_t noise_key(uint64_t seed, float t) {
  return mix64(seed ^ mix64(static_cast<uint64_t>(t) * kGolden + 0x632BE59BD9B4E019ull));
}
__device__ __forceinline__ uint64_t noise_bits(uint64_t key, int64_t group) {
  return mix64(key + static_cast<uint64_t>(group + 1) * kGolden);
}

// fp32 -> bf16 bits, rounded up with probability (x - down) / (up - down); non-finite: to nearest.
__device__ __forceinline__ uint32_t stochastic_bf16_bits(float x, uint32_t noise16) {
  if (!is_finite(x)) return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  return (__float_as_uint(x) + noise16) >> 16;
}

// ---------------------------------------------------------------------------------------------
// The update of one element: torch.optim.AdamW's single-tensor order of operations
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float torch_lerp(float self, float end, float weight) {
  return fabsf(weight) < 0.5f ? self + weight * (end - self) : end - (end - self) * (1.0f - weight);
}

__device__ __forceinline__ void adamw_element(float g, float& w, float& m, float& v, bool decays,
                                              const StepScalars& s, const Hyper& h) {
  g = g * s.inv_scale;
  g = g * s.clip;
  if (decays) w = w * s.decay;
  m = torch_lerp(m, g, h.lerp_weight);
  v = v * h.beta2 + h.one_minus_beta2 * g * g;
  const float denom = sqrtf(v) * s.inv_bc2_sqrt + h.eps;
  w = w + s.neg_step_size * (m / denom);
}

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

struct SumsqArgs {
  const void* grad;
  int64_t numel;
  DeviceScalar grad_scale;
  float* partials;  // one per block
};

// Stage 1: per-block partial sums of (grad / grad_scale)^2 in fp32.
template <typename G>
__global__ void __launch_bounds__(kThreads) grad_sumsq_kernel(SumsqArgs a) {
  const G* grad = static_cast<const G*>(a.grad);
  const float inv = scale_inverse(a.grad_scale);
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  float acc[kNormUnroll] = {};
  int64_t scalar_from = 0;
  if (aligned16(grad)) {
    const int64_t packs = a.numel / kPack;
    for (int64_t p = tid; p < packs; p += stride * kNormUnroll) {
      float x[kNormUnroll][kPack];
#pragma unroll
      for (int u = 0; u < kNormUnroll; ++u) {  // all loads first: kNormUnroll 16-byte loads in flight
        const int64_t q = p + u * stride;
        if (q < packs) {
          PackIO<G>::load(grad, q, x[u]);
        } else {
#pragma unroll
          for (int j = 0; j < kPack; ++j) x[u][j] = 0.0f;
        }
      }
#pragma unroll
      for (int u = 0; u < kNormUnroll; ++u) {
#pragma unroll
        for (int j = 0; j < kPack; ++j) {
          const float y = x[u][j] * inv;
          acc[u] += y * y;
        }
      }
    }
    scalar_from = packs * kPack;  // the unaligned tail: fewer than kPack elements
  }
  for (int64_t i = scalar_from + tid; i < a.numel; i += stride) {
    const float y = to_float(grad[i]) * inv;
    acc[0] += y * y;
  }
  float sum = 0.0f;
#pragma unroll
  for (int u = 0; u < kNormUnroll; ++u) sum += acc[u];
  sum = block_sum(sum);
  if (threadIdx.x == 0) a.partials[blockIdx.x] = sum;
}

struct PrologueArgs {
  const float* partials;
  int nparts;
  bool needs_norm, check_finite, clip;
  DeviceScalar lr, grad_scale, found_inf;
  float* step;
  float* norm_out;
  StepScalars* scalars;
  double beta1, beta2, weight_decay, max_grad_norm;
};

// Stage 2, one block: the norm, the skip decision, the step's scalars, step += 1.
__global__ void __launch_bounds__(kThreads) adamw_prologue_kernel(PrologueArgs a) {
  double acc = 0.0;
  for (int i = threadIdx.x; i < a.nparts; i += kThreads) acc += a.partials[i];
  acc = block_sum(acc);
  if (threadIdx.x != 0) return;

  // fp32 like torch's norm: a sum of squares past FLT_MAX is inf, hence not finite
  const float norm = a.needs_norm ? sqrtf(static_cast<float>(acc)) : 0.0f;
  bool skip = a.found_inf.ptr != nullptr && load_scalar(a.found_inf, 0.0) != 0.0;  // NaN skips too
  if (a.check_finite && !is_finite(norm)) skip = true;

  const float t = *a.step + 1.0f;
  const double lr = load_scalar(a.lr, 0.0);
  StepScalars s;
  s.skip = skip ? 1.0f : 0.0f;
  s.t = t;
  s.inv_scale = scale_inverse(a.grad_scale);
  s.clip = 1.0f;
  if (a.clip) {  // Python's min(1.0, c): a NaN c gives 1
    const double c = a.max_grad_norm / (static_cast<double>(norm) + 1e-6);
    s.clip = c < 1.0 ? static_cast<float>(c) : 1.0f;
  }
  s.decay = static_cast<float>(1.0 - lr * a.weight_decay);
  s.neg_step_size = static_cast<float>(-(lr / (1.0 - pow(a.beta1, static_cast<double>(t)))));
  s.inv_bc2_sqrt = 1.0f / static_cast<float>(sqrt(1.0 - pow(a.beta2, static_cast<double>(t))));
  *a.scalars = s;
  if (a.norm_out != nullptr) *a.norm_out = norm;
  if (!skip) *a.step = t;
}

struct UpdateArgs {
  void* param;
  const void* grad;
  float* master;
  void* exp_avg;
  void* exp_avg_sq;
  const StepScalars* scalars;
  Hyper h;
  int64_t numel;
  uint64_t seed;
  bool vectorized;  // every buffer 16-byte aligned
};

// Stage 3: the update. P, G, M, V: the param, grad, exp_avg, exp_avg_sq element types.
template <typename P, typename G, typename M, typename V, bool kMaster>
__global__ void __launch_bounds__(kThreads) adamw_update_kernel(UpdateArgs a) {
  constexpr bool kStochastic = !kMaster && std::is_same<P, __nv_bfloat16>::value;
  static_assert(kMaster || !std::is_same<P, __half>::value, "fp16 params need a master copy");
  const StepScalars s = *a.scalars;
  if (s.skip != 0.0f) return;

  P* __restrict__ param = static_cast<P*>(a.param);
  const G* __restrict__ grad = static_cast<const G*>(a.grad);
  float* __restrict__ master = a.master;
  M* __restrict__ exp_avg = static_cast<M*>(a.exp_avg);
  V* __restrict__ exp_avg_sq = static_cast<V*>(a.exp_avg_sq);
  const uint64_t key = kStochastic ? noise_key(a.seed, s.t) : 0;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;

  int64_t scalar_from = 0;
  if (a.vectorized) {
    const int64_t packs = a.numel / kPack;
    for (int64_t p = tid; p < packs; p += stride) {
      float g[kPack], w[kPack], m[kPack], v[kPack];
      PackIO<G>::load(grad, p, g);
      if constexpr (kMaster) {
        PackIO<float>::load(master, p, w);
      } else {
        PackIO<P>::load(param, p, w);
      }
      PackIO<M>::load(exp_avg, p, m);
      PackIO<V>::load(exp_avg_sq, p, v);
      const int64_t first = p * kPack;
#pragma unroll
      for (int j = 0; j < kPack; ++j) adamw_element(g[j], w[j], m[j], v[j], first + j < a.h.decay_numel, s, a.h);
      PackIO<M>::store(exp_avg, p, m);
      PackIO<V>::store(exp_avg_sq, p, v);
      if constexpr (kMaster) {
        PackIO<float>::store(master, p, w);
        PackIO<P>::store(param, p, w);
      } else if constexpr (kStochastic) {
        const uint64_t n[2] = {noise_bits(key, 2 * p), noise_bits(key, 2 * p + 1)};
        uint32_t b[kPack];
#pragma unroll
        for (int j = 0; j < kPack; ++j) {
          b[j] = stochastic_bf16_bits(w[j], static_cast<uint32_t>(n[j >> 2] >> (16 * (j & 3))) & 0xFFFFu);
        }
        *reinterpret_cast<uint4*>(param + first) =
            make_uint4(pack_bits(b[0], b[1]), pack_bits(b[2], b[3]), pack_bits(b[4], b[5]), pack_bits(b[6], b[7]));
      } else {
        PackIO<P>::store(param, p, w);  // fp32 params are their own master
      }
    }
    scalar_from = packs * kPack;  // the tail: fewer than kPack elements
  }
  // the tail, or every element when a buffer is not 16-byte aligned
  for (int64_t i = scalar_from + tid; i < a.numel; i += stride) {
    float w = kMaster ? master[i] : to_float(param[i]);
    float m = to_float(exp_avg[i]), v = to_float(exp_avg_sq[i]);
    adamw_element(to_float(grad[i]), w, m, v, i < a.h.decay_numel, s, a.h);
    exp_avg[i] = from_float<M>(m);
    exp_avg_sq[i] = from_float<V>(v);
    if constexpr (kMaster) {
      master[i] = w;
      param[i] = from_float<P>(w);
    } else if constexpr (kStochastic) {
      const uint32_t noise = static_cast<uint32_t>(noise_bits(key, i >> 2) >> (16 * (i & 3))) & 0xFFFFu;
      param[i] = __ushort_as_bfloat16(static_cast<unsigned short>(stochastic_bf16_bits(w, noise)));
    } else {
      param[i] = from_float<P>(w);
    }
  }
}

struct InitArgs {
  const void* param;
  float* master;
  void* exp_avg;
  void* exp_avg_sq;
  int64_t numel;
  bool vectorized;
};

// master = float(param), m = v = 0, one pass: 14 B per parameter for bf16 params and fp32 states.
template <typename P, typename M, typename V, bool kMaster>
__global__ void __launch_bounds__(kThreads) init_state_kernel(InitArgs a) {
  const P* __restrict__ param = static_cast<const P*>(a.param);
  float* __restrict__ master = a.master;
  M* __restrict__ exp_avg = static_cast<M*>(a.exp_avg);
  V* __restrict__ exp_avg_sq = static_cast<V*>(a.exp_avg_sq);
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  int64_t scalar_from = 0;
  if (a.vectorized) {
    const int64_t packs = a.numel / kPack;
    const float zeros[kPack] = {};
    for (int64_t p = tid; p < packs; p += stride) {
      if constexpr (kMaster) {
        float w[kPack];
        PackIO<P>::load(param, p, w);
        PackIO<float>::store(master, p, w);
      }
      PackIO<M>::store(exp_avg, p, zeros);
      PackIO<V>::store(exp_avg_sq, p, zeros);
    }
    scalar_from = packs * kPack;
  }
  for (int64_t i = scalar_from + tid; i < a.numel; i += stride) {
    if constexpr (kMaster) master[i] = to_float(param[i]);
    exp_avg[i] = from_float<M>(0.0f);
    exp_avg_sq[i] = from_float<V>(0.0f);
  }
}

// ---------------------------------------------------------------------------------------------
// Launch configuration
// ---------------------------------------------------------------------------------------------

int sm_count(int device) {
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "badam_kernels: device index ", device, " out of range");
  static std::array<std::atomic<int>, kMaxDevices> cache{};
  int n = cache[device].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

// Resident blocks per SM of one kernel (registers, shared memory), cached per kernel and device.
template <auto Kernel>
int blocks_per_sm(int device) {
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "badam_kernels: device index ", device, " out of range");
  static std::array<std::atomic<int>, kMaxDevices> cache{};
  int n = cache[device].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, Kernel, kThreads, 0));
    n = std::max(n, 1);
    cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

// Enough blocks to fill the device once, fewer when there is less work.
template <auto Kernel>
unsigned grid_for(int64_t packs, int device) {
  const int64_t wanted = std::max<int64_t>(1, (packs + kThreads - 1) / kThreads);
  const int64_t resident = static_cast<int64_t>(sm_count(device)) * blocks_per_sm<Kernel>(device);
  return static_cast<unsigned>(std::min(wanted, resident));
}

// The norm pass's grid depends only on numel and the device, so the workspace can be sized first.
int norm_grid(int64_t numel, int device) {
  const int64_t per_block = static_cast<int64_t>(kThreads) * kPack * kNormUnroll;
  const int64_t wanted = std::max<int64_t>(1, (numel + per_block - 1) / per_block);
  return static_cast<int>(std::min<int64_t>(wanted, static_cast<int64_t>(sm_count(device)) * kNormBlocksPerSm));
}

template <typename P, typename G, typename M, typename V, bool kMaster>
void launch_update(const UpdateArgs& args, int64_t packs, int device, cudaStream_t stream) {
  constexpr auto kernel = adamw_update_kernel<P, G, M, V, kMaster>;
  kernel<<<grid_for<kernel>(packs, device), kThreads, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename P, typename M, typename V, bool kMaster>
void launch_init(const InitArgs& args, int64_t packs, int device, cudaStream_t stream) {
  constexpr auto kernel = init_state_kernel<P, M, V, kMaster>;
  kernel<<<grid_for<kernel>(packs, device), kThreads, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool host_aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace

int64_t adamw_workspace_floats(int64_t numel, bool needs_norm, int device) {
  return (needs_norm && numel > 0 ? norm_grid(numel, device) : 0) + kScalarFloats;
}

void launch_adamw_step(const AdamWLaunch& a) {
  const bool needs_norm = a.max_grad_norm > 0.0 || a.check_finite;
  const int nparts = needs_norm && a.numel > 0 ? norm_grid(a.numel, a.device) : 0;
  float* partials = a.workspace;
  StepScalars* scalars = reinterpret_cast<StepScalars*>(a.workspace + nparts);

  if (nparts > 0) {  // stage 1
    const SumsqArgs args{a.grad, a.numel, a.grad_scale, partials};
    with_param_type(a.grad_dtype, [&](auto g) {
      using G = typename decltype(g)::type;
      grad_sumsq_kernel<G><<<nparts, kThreads, 0, a.stream>>>(args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  PrologueArgs pro{};  // stage 2
  pro.partials = partials;
  pro.nparts = nparts;
  pro.needs_norm = needs_norm;
  pro.check_finite = a.check_finite;
  pro.clip = a.max_grad_norm > 0.0;
  pro.lr = a.lr;
  pro.grad_scale = a.grad_scale;
  pro.found_inf = a.found_inf;
  pro.step = a.step;
  pro.norm_out = a.norm_out;
  pro.scalars = scalars;
  pro.beta1 = a.beta1;
  pro.beta2 = a.beta2;
  pro.weight_decay = a.weight_decay;
  pro.max_grad_norm = a.max_grad_norm;
  adamw_prologue_kernel<<<1, kThreads, 0, a.stream>>>(pro);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  if (a.numel == 0) return;
  UpdateArgs args{};  // stage 3
  args.param = a.param;
  args.grad = a.grad;
  args.master = a.master;
  args.exp_avg = a.exp_avg;
  args.exp_avg_sq = a.exp_avg_sq;
  args.scalars = scalars;
  args.h = Hyper{static_cast<float>(1.0 - a.beta1), static_cast<float>(a.beta2),
                 static_cast<float>(1.0 - a.beta2), static_cast<float>(a.eps), a.decay_numel};
  args.numel = a.numel;
  args.seed = a.seed;
  args.vectorized = host_aligned16(a.param) && host_aligned16(a.grad) && host_aligned16(a.master) &&
                    host_aligned16(a.exp_avg) && host_aligned16(a.exp_avg_sq);
  const int64_t packs = args.vectorized ? std::max<int64_t>(1, a.numel / kPack) : a.numel;
  const bool has_master = a.master != nullptr;

  with_param_type(a.param_dtype, [&](auto p) {
    using P = typename decltype(p)::type;
    with_param_type(a.grad_dtype, [&](auto g) {
      using G = typename decltype(g)::type;
      with_state_type(a.exp_avg_dtype, [&](auto m) {
        using M = typename decltype(m)::type;
        with_state_type(a.exp_avg_sq_dtype, [&](auto v) {
          using V = typename decltype(v)::type;
          if (has_master) {
            launch_update<P, G, M, V, true>(args, packs, a.device, a.stream);
          } else if constexpr (!std::is_same<P, __half>::value) {
            launch_update<P, G, M, V, false>(args, packs, a.device, a.stream);
          } else {
            TORCH_CHECK(false, "badam_kernels::adamw_step: fp16 params need an fp32 master copy");
          }
        });
      });
    });
  });
}

void launch_init_state(const InitStateLaunch& a) {
  if (a.numel == 0) return;
  InitArgs args{a.param, a.master, a.exp_avg, a.exp_avg_sq, a.numel,
                host_aligned16(a.param) && host_aligned16(a.master) && host_aligned16(a.exp_avg) &&
                    host_aligned16(a.exp_avg_sq)};
  const int64_t packs = args.vectorized ? std::max<int64_t>(1, a.numel / kPack) : a.numel;
  with_state_type(a.exp_avg_dtype, [&](auto m) {
    using M = typename decltype(m)::type;
    with_state_type(a.exp_avg_sq_dtype, [&](auto v) {
      using V = typename decltype(v)::type;
      if (a.master == nullptr) {  // the param is not read: one instantiation serves every param dtype
        launch_init<float, M, V, false>(args, packs, a.device, a.stream);
        return;
      }
      with_param_type(a.param_dtype, [&](auto p) {
        using P = typename decltype(p)::type;
        launch_init<P, M, V, true>(args, packs, a.device, a.stream);
      });
    });
  });
}

}  // namespace badam
