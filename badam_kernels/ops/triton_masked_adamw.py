"""Triton: the ratio mode's masked Adam step (``BlockOptimizerRatio``), gather, update and scatter in one launch.

Each parameter trains a fraction of its entries; their fp32 master, m and v live in compact buffers
(one slot per masked entry, see ``interface.MaskedAdamWStepArgs``) and the dense gradient and
parameter are read and written only at the masked positions. For an entry at p = tile_base + index,
with t = tile_step + 1 (the Adam paper's efficient form, as ``badam.BlockOptimizerRatio`` 1.4 has it)::

    w <- w * (1 - lr * weight_decay)
    m <- m + (1 - beta1) * (g[p] - m)
    v <- v + (1 - beta2) * (g[p]^2 - v)
    w <- w - lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps)
    param[p] <- w rounded to nearest;  a tile at step 0 starts fresh: w = param[p], m = v = 0

Bytes per masked element, bf16 params and grads, fp32 master, m and v, int32 index: 4 (index) + 2
(grad) + 12 (master, m, v) read, 12 + 2 (param) written: 32 bytes (fp32 params, no master: 4 + 4 + 4
+ 8 read, 8 + 4 written, 32). A fresh tile reads param (2) instead of master, m, v. Held between steps:
16 bytes per masked element (index, master, m, v; 12 for fp32 params). The compact buffers are read
and written in order; the dense gradient and parameter are gathered and scattered, which costs whole
32-byte sectors where the entries are scattered (``mask_mode="scatter"``) and is coalesced where
they are adjacent.

Tiling: one program per tile of ``MASKED_TILE`` = 1024 entries; every tile belongs to one
parameter, so its base offset and step counter are two scalar loads, and the bias corrections are
computed per program in fp64 (no second kernel, no value back to the host).
"""
from __future__ import annotations

from .interface import MASKED_TILE, MaskedAdamWStepArgs
from .triton_adamw import _one_minus_pow, _round_to_nearest, triton, tl

NUM_WARPS = 4


@triton.jit
def _masked_adamw_kernel(
    param_ptr, grad_ptr, index_ptr, master_ptr, exp_avg_ptr, exp_avg_sq_ptr, tile_base_ptr, tile_step_ptr,
    tile_start, lr, one_minus_beta1, one_minus_beta2, eps, decay,
    HAS_MASTER: tl.constexpr, TILE: tl.constexpr,
):
    tile = tile_start + tl.program_id(0)
    offs = tile.to(tl.int64) * TILE + tl.arange(0, TILE)

    # Stage 1: where the tile's entries are, and whether its states are fresh.
    local = tl.load(index_ptr + offs)
    valid = local >= 0
    pos = tl.load(tile_base_ptr + tile) + local.to(tl.int64)
    step = tl.load(tile_step_ptr + tile)
    step_of_entry = tl.full([TILE], 0.0, tl.float32) + step
    kept = valid & (step_of_entry != 0.0)  # entries whose states carry over from the last step
    t = step + 1.0

    # Stage 2: gather the gradient; w from the master (or the parameter), m and v (zero when fresh).
    g = tl.load(grad_ptr + pos, mask=valid, other=0.0).to(tl.float32)
    if HAS_MASTER:
        w = tl.load(master_ptr + offs, mask=kept, other=0.0)
        w = tl.where(kept, w, tl.load(param_ptr + pos, mask=valid & (step_of_entry == 0.0), other=0.0).to(tl.float32))
    else:
        w = tl.load(param_ptr + pos, mask=valid, other=0.0).to(tl.float32)
    m = tl.load(exp_avg_ptr + offs, mask=kept, other=0.0)
    v = tl.load(exp_avg_sq_ptr + offs, mask=kept, other=0.0)

    # Stage 3: the Adam arithmetic in fp32; the step size of this tile's t in fp64.
    w = w * decay
    m = m + (g - m) * one_minus_beta1
    v = v + (g * g - v) * one_minus_beta2
    bias_correction2 = _one_minus_pow(one_minus_beta2, t)
    step_size = (tl.cast(lr, tl.float64) * tl.sqrt(bias_correction2) / _one_minus_pow(one_minus_beta1, t)).to(tl.float32)
    w = w + m / (tl.sqrt(v) + eps) * -step_size

    # Stage 4: write the compact states in order, scatter the parameter.
    if HAS_MASTER:
        tl.store(master_ptr + offs, w, mask=valid)
    tl.store(exp_avg_ptr + offs, m, mask=valid)
    tl.store(exp_avg_sq_ptr + offs, v, mask=valid)
    tl.store(param_ptr + pos, _round_to_nearest(w, param_ptr.dtype.element_ty), mask=valid)
    # every warp of the program reads the step in stage 1; without the barrier one warp's store could
    # land before a slower warp's load, which would then use the next step's bias corrections (and take
    # a fresh tile for a kept one)
    tl.debug_barrier()
    tl.store(tile_step_ptr + tile, t)


def masked_adamw_step(args: MaskedAdamWStepArgs) -> None:
    _masked_adamw_kernel[(args.num_tiles,)](
        args.param, args.grad, args.index, args.master if args.master is not None else args.exp_avg,
        args.exp_avg, args.exp_avg_sq, args.tile_base, args.tile_step,
        args.tile_start, args.lr, 1.0 - args.beta1, 1.0 - args.beta2, args.eps, 1.0 - args.lr * args.weight_decay,
        HAS_MASTER=args.master is not None, TILE=MASKED_TILE, num_warps=NUM_WARPS)
