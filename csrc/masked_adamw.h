// Launcher of the ratio mode's masked Adam step (masked_adamw.cu), called by the op layer (ops.cpp).
//
// The layout is ops/interface.py's MaskedAdamWStepArgs: a flat group's dense param and grad (N
// elements), and compact states of K = T * kMaskedTile entries in T tiles, each tile inside one
// parameter, its last tile padded with index -1.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "fused_adamw.h"  // DType

namespace badam {

constexpr int64_t kMaskedTile = 1024;  // entries per tile (interface.MASKED_TILE)

struct MaskedAdamWLaunch {
  void* param;               // N elements of param_dtype, written at the masked positions only
  const void* grad;          // N elements of grad_dtype
  const int32_t* index;      // K: the entry's offset inside its parameter, -1 for padding
  float* master;             // K fp32 elements, or nullptr (fp32 params are their own master)
  float* exp_avg;            // K
  float* exp_avg_sq;         // K
  const int64_t* tile_base;  // T: where the tile's parameter starts in param and grad
  float* tile_step;          // T: steps since the tile's states were reset (0: fresh); incremented
  DType param_dtype, grad_dtype;
  int64_t tile_start, num_tiles;  // the tiles [tile_start, tile_start + num_tiles) are updated
  double lr, beta1, beta2, eps, weight_decay;
  cudaStream_t stream;
};

void launch_masked_adamw_step(const MaskedAdamWLaunch& a);

}  // namespace badam
