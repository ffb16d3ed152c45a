// The ratio mode's masked Adam step (badam_kernels.ratio.BlockOptimizerRatio): each parameter trains
// a fraction of its entries, whose fp32 master, m and v live in compact buffers, one slot per masked
// entry. For an entry k of a tile, at p = tile_base + index[k] in the dense param and grad, with
// t = tile_step + 1 (the Adam paper's efficient form, as badam.BlockOptimizerRatio 1.4 computes it):
//
//     g = grad[p]
//     w = master[k] (or param[p]);  a fresh tile (tile_step == 0): w = param[p], m = v = 0
//     w = w * (1 - lr * weight_decay)
//     m = m + (1 - beta1) * (g - m)
//     v = v + (1 - beta2) * (g^2 - v)
//     w = w - lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps)
//     param[p] = w rounded to nearest;  tile_step = t
//
// Each operation is rounded on its own (no fused multiply-add), in the reference's order, so the
// result equals ops/reference.py's to the bit wherever torch's pow and this one agree on the step size.
//
// Bytes per masked entry with bf16 params and grads: read index 4, grad 2, master, m, v 12; write
// master, m, v 12, param 2: 32 B (a fresh tile reads param 2 instead of master, m, v). The compact
// buffers stream in order; the dense gradient and parameter are gathered and scattered, coalesced
// where the entries are adjacent (mask_mode="adjacent") and a 32-byte sector per entry where scattered.
//
// Tiling: one thread block per tile of kMaskedTile entries, each of its 256 threads taking every
// 256th entry (k = threadIdx.x + 256 j, j < 4), so every load and store of a warp covers 32
// consecutive entries. Thread 0 reads the tile's step, increments it and computes the step size (two
// fp64 powers a tile, not a thread); the block reads both from shared memory, so no thread can see the
// incremented step.
#include "masked_adamw.h"
#include "element_types.cuh"

#include <cuda_runtime.h>

#include <c10/cuda/CUDAException.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace badam {
namespace {

constexpr int kThreads = 256;
constexpr int kEntriesPerThread = kMaskedTile / kThreads;
static_assert(kMaskedTile % kThreads == 0, "a tile is a whole number of thread rows");

template <typename P, typename G, bool kMaster>
__global__ void __launch_bounds__(kThreads) masked_adamw_kernel(MaskedAdamWLaunch a) {
  const int64_t tile = a.tile_start + blockIdx.x;
  __shared__ float tile_step, neg_step_size;  // thread 0's, for the whole block
  if (threadIdx.x == 0) {
    tile_step = a.tile_step[tile];
    a.tile_step[tile] = tile_step + 1.0f;
    const double t = static_cast<double>(tile_step) + 1.0;  // the step size in fp64, as the reference computes it
    neg_step_size = -static_cast<float>(a.lr * sqrt(1.0 - pow(a.beta2, t)) / (1.0 - pow(a.beta1, t)));
  }
  __syncthreads();
  const bool fresh = tile_step == 0.0f;
  const int64_t base = a.tile_base[tile];
  // fp32 constants rounded as torch rounds Python scalars for fp32 tensors
  const float one_minus_beta1 = static_cast<float>(1.0 - a.beta1), one_minus_beta2 = static_cast<float>(1.0 - a.beta2);
  const float eps = static_cast<float>(a.eps), decay = static_cast<float>(1.0 - a.lr * a.weight_decay);

  P* __restrict__ param = static_cast<P*>(a.param);
  const G* __restrict__ grad = static_cast<const G*>(a.grad);
#pragma unroll
  for (int j = 0; j < kEntriesPerThread; ++j) {
    const int64_t k = tile * kMaskedTile + j * kThreads + threadIdx.x;
    const int32_t local = a.index[k];
    if (local < 0) continue;  // tile padding
    const int64_t p = base + local;
    const float g = to_float(grad[p]);
    float w, m = 0.0f, v = 0.0f;
    if (fresh || !kMaster) {
      w = to_float(param[p]);
    } else {
      w = a.master[k];
    }
    if (!fresh) {
      m = a.exp_avg[k];
      v = a.exp_avg_sq[k];
    }
    w = __fmul_rn(w, decay);
    m = __fadd_rn(m, __fmul_rn(__fsub_rn(g, m), one_minus_beta1));
    v = __fadd_rn(v, __fmul_rn(__fsub_rn(__fmul_rn(g, g), v), one_minus_beta2));
    w = __fadd_rn(w, __fmul_rn(__fdiv_rn(m, __fadd_rn(__fsqrt_rn(v), eps)), neg_step_size));
    if constexpr (kMaster) a.master[k] = w;
    a.exp_avg[k] = m;
    a.exp_avg_sq[k] = v;
    param[p] = from_float<P>(w);
  }
}

template <typename P, typename G, bool kMaster>
void launch(const MaskedAdamWLaunch& a) {
  masked_adamw_kernel<P, G, kMaster><<<static_cast<unsigned int>(a.num_tiles), kThreads, 0, a.stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_masked_adamw_step(const MaskedAdamWLaunch& a) {
  if (a.num_tiles == 0) return;
  TORCH_CHECK(a.num_tiles <= 0x7FFFFFFF, "badam_kernels: ", a.num_tiles, " tiles exceed one launch's grid");
  with_param_type(a.param_dtype, [&](auto p) {
    using P = typename decltype(p)::type;
    with_param_type(a.grad_dtype, [&](auto g) {
      using G = typename decltype(g)::type;
      if (a.master != nullptr) {
        launch<P, G, true>(a);
      } else if constexpr (std::is_same<P, float>::value) {  // fp32 params are their own master
        launch<P, G, false>(a);
      } else {
        TORCH_CHECK(false, "badam_kernels: masked_adamw_step: low-precision params need a float32 master");
      }
    });
  });
}

}  // namespace badam
