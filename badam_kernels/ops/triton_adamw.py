"""Triton backend: the fused AdamW step and the state initialisation of a BAdam block.

The update, for every element of the block's flat buffers (torch.optim.AdamW's order of operations),
with g = grad / grad_scale and t = step + 1::

    g <- g * min(1, max_grad_norm / (||g||_2 + 1e-6))               (when clipping)
    w <- w * (1 - lr * weight_decay)                                 (elements [0, decay_numel))
    m <- m + (1 - beta1) * (g - m)
    v <- beta2 * v + (1 - beta2) * g * g
    w <- w - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    param <- w rounded to the param dtype (stochastically when there is no fp32 master)

Why it is fast: a dozen flops per element make the step memory bound, so its time is the bytes moved
divided by the memory bandwidth, and one sweep moves each byte once. With bf16 params and grads and
an fp32 master, m and v that is 2 + 4 + 4 + 4 bytes read and 4 + 4 + 4 + 2 written: 28 bytes per
parameter (badam 1.4's grad.float(), torch AdamW on the fp32 copy, param.copy_(master.to(bf16))
moves 6 + 28 + 10 = 44, in several passes). Without a master (stochastic rounding) it is 22 bytes,
with bf16 m and v as well 14.

Clipping or the non-finite check adds one read of grad (2 bytes) in a first pass that leaves one
partial sum of squares per program; a one-program kernel turns those into the norm, the skip
decision, the clipping factor and the bias corrections, and the update pass reads these few scalars
from L2. No value goes back to the host, so the step (with lr and step as device tensors) can be
captured in a CUDA graph.

Tiling: the flat block is cut into tiles of BLOCK = 2048 elements, one program of 16 warps per tile;
each thread holds 4 consecutive elements, so bf16 and fp32 tensors share one register layout (no
shuffle through shared memory) and load as 8- and 16-byte vectors when the buffers are 16-byte
aligned and the length is a multiple of 16.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from .interface import AdamWStepArgs

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # pragma: no cover - exercised only where triton is missing
    _IMPORT_ERROR = f"triton is not importable: {type(exc).__name__}: {exc}"

    class _NoTriton:
        """Lets this module import without triton, so that ``unavailable_reason`` can say why."""

        @staticmethod
        def constexpr(value=None):
            return value

        @staticmethod
        def jit(fn):
            return fn

    triton = tl = _NoTriton()

NAME = "triton"
BLOCK = 2048  # elements per program (per loop iteration in the norm pass)
NUM_WARPS = 16  # 4 elements per thread
MAX_PARTIALS = 1024  # programs of the norm pass; each loops over every 1024th tile
MAX_NUMEL = 2**31 - BLOCK  # offsets are int32
# Triton decides when a kernel is defined whether it runs compiled or through its interpreter.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason() -> Optional[str]:
    return _IMPORT_ERROR


def supports_device(device) -> bool:
    """CUDA tensors; CPU tensors when the kernels run through Triton's interpreter."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return device.type == "cpu" and _INTERPRETED and os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _scalar(x, IS_PTR: tl.constexpr):
    """A float argument, or the value behind a one-element tensor (lr, grad_scale, found_inf)."""
    if IS_PTR:
        x = tl.load(x)
    return tl.cast(x, tl.float32)


@triton.jit
def _is_nonfinite(x):
    """fp32 x is inf or NaN: its exponent bits are all ones."""
    return (x.to(tl.uint32, bitcast=True) & 0x7F800000) == 0x7F800000


@triton.jit
def _one_minus_pow(one_minus_beta, t):
    """1 - beta^t for an integral t >= 1, in fp64 by binary powering.

    In fp32, 1 - 0.999^t keeps three or four significant digits at small t (cancellation); beta is
    rebuilt from the fp32 argument 1 - beta, which holds it to 7 digits where it matters.
    """
    beta = 1.0 - tl.cast(one_minus_beta, tl.float64)
    k = t.to(tl.int32)
    power = tl.full([], 1.0, tl.float64)
    for _ in tl.static_range(25):  # fp32 step counts are exact integers up to 2^24
        power = tl.where((k & 1) != 0, power * beta, power)
        beta = beta * beta
        k = k >> 1
    return 1.0 - power


@triton.jit
def _add_and_truncate_to_bf16(x, addend):
    """bf16 rounding by integer arithmetic: add ``addend`` to the fp32 bit pattern, drop the low 16
    bits (the carry rounds away from zero); inf and NaN are kept as they are."""
    bits = (x.to(tl.uint32, bitcast=True) + addend) & 0xFFFF0000
    return tl.where(_is_nonfinite(x), x, bits.to(tl.float32, bitcast=True)).to(tl.bfloat16)


@triton.jit
def _round_to_nearest(x, dtype: tl.constexpr):
    """fp32 x in ``dtype``, rounded to nearest, ties to even.

    For bf16 by bit arithmetic (add 0x7FFF plus the lowest kept bit, truncate): the same result as
    the hardware conversion, and independent of how Triton's interpreter casts (it truncates).
    """
    if dtype == tl.bfloat16:
        return _add_and_truncate_to_bf16(x, 0x7FFF + ((x.to(tl.uint32, bitcast=True) >> 16) & 1))
    else:
        return x.to(dtype)


@triton.jit
def _stochastic_round_to_bf16(w, seed, offs):
    """fp32 w in bf16, rounded up or down with probability given by the distance: unbiased.

    Adding 16 uniform random bits before truncating carries into the kept bits with probability
    (dropped bits) / 2^16; the counter-based RNG makes the noise a function of (seed, element).
    """
    return _add_and_truncate_to_bf16(w, tl.randint(seed, offs).to(tl.uint32, bitcast=True) & 0xFFFF)


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _grad_sumsq_kernel(grad_ptr, partial_ptr, grad_scale, n,
                       HAS_SCALE: tl.constexpr, SCALE_IS_PTR: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 1 (clipping or the non-finite check): partial_ptr[pid] = sum of (grad / grad_scale)^2
    over the tiles pid, pid + P, pid + 2P, ... of the P programs, accumulated per lane in fp32."""
    pid = tl.program_id(0)
    scale = _scalar(grad_scale, SCALE_IS_PTR)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(pid * BLOCK, n, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        g = tl.load(grad_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        if HAS_SCALE:
            g = g / scale
        acc += g * g
    tl.store(partial_ptr + pid, tl.sum(acc, axis=0))


# Layout of the scalars that pass 2 prepares for pass 3.
_SKIP = tl.constexpr(0)
_DECAY = tl.constexpr(1)
_CLIP = tl.constexpr(2)
_STEP_SIZE = tl.constexpr(3)
_BIAS_CORRECTION2_SQRT = tl.constexpr(4)
_GRAD_SCALE = tl.constexpr(5)
_NUM_SCALARS = 6


@triton.jit
def _step_scalars_kernel(
    partial_ptr, num_partials, norm_ptr, scalars_ptr, step_ptr, lr, grad_scale, found_inf,
    one_minus_beta1, one_minus_beta2, weight_decay, max_grad_norm,
    LR_IS_PTR: tl.constexpr, SCALE_IS_PTR: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, FOUND_INF_IS_PTR: tl.constexpr,
    HAS_NORM: tl.constexpr, CLIP: tl.constexpr, CHECK_FINITE: tl.constexpr,
    PARTIALS_BLOCK: tl.constexpr,
):
    """Pass 2 (one program): the block's scalars, so that no value ever goes back to the host.

    norm from pass 1's partials; skip (the grad scaler found an inf, or the grads are not finite);
    the decay factor, clipping factor and bias corrections of step t = step + 1; then step = t
    unless skipped (pass 3 reads only these scalars, never step).
    """
    sumsq = 0.0
    if HAS_NORM:
        idx = tl.arange(0, PARTIALS_BLOCK)
        sumsq = tl.sum(tl.load(partial_ptr + idx, mask=idx < num_partials, other=0.0), axis=0)
        tl.store(norm_ptr, tl.sqrt(sumsq))
    skip = tl.program_id(0) < 0  # False
    if HAS_FOUND_INF:
        skip = skip | (_scalar(found_inf, FOUND_INF_IS_PTR) != 0.0)
    if CHECK_FINITE:
        skip = skip | _is_nonfinite(sumsq)
    clip = tl.cast(1.0, tl.float32)
    if CLIP:
        clip = tl.minimum(max_grad_norm / (tl.sqrt(sumsq) + 1e-6), 1.0)
    lr = _scalar(lr, LR_IS_PTR)
    step = tl.load(step_ptr)
    t = step + 1.0
    tl.store(scalars_ptr + _SKIP, skip.to(tl.float32))
    tl.store(scalars_ptr + _DECAY, 1.0 - lr * weight_decay)
    tl.store(scalars_ptr + _CLIP, clip)
    tl.store(scalars_ptr + _STEP_SIZE, (lr.to(tl.float64) / _one_minus_pow(one_minus_beta1, t)).to(tl.float32))
    tl.store(scalars_ptr + _BIAS_CORRECTION2_SQRT, tl.sqrt(_one_minus_pow(one_minus_beta2, t).to(tl.float32)))
    tl.store(scalars_ptr + _GRAD_SCALE, _scalar(grad_scale, SCALE_IS_PTR))
    tl.store(step_ptr, tl.where(skip, step, t))


@triton.jit
def _adamw_kernel(
    param_ptr, grad_ptr, master_ptr, exp_avg_ptr, exp_avg_sq_ptr, scalars_ptr,
    n, decay_numel, beta2, one_minus_beta1, one_minus_beta2, eps, seed,
    HAS_SCALE: tl.constexpr, CLIP: tl.constexpr,
    HAS_MASTER: tl.constexpr, STOCHASTIC_ROUNDING: tl.constexpr, BLOCK: tl.constexpr,
):
    """Pass 3: the update of one tile; w lives in master_ptr (fp32) or, without a master, in param_ptr."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offs < n

    # Stage 1: read the tile once.
    g = tl.load(grad_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    if HAS_MASTER:
        w = tl.load(master_ptr + offs, mask=in_bounds, other=0.0)
    else:
        w = tl.load(param_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    m = tl.load(exp_avg_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    v = tl.load(exp_avg_sq_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)

    # Stage 2: the AdamW arithmetic in fp32, with the scalars of pass 2 (five loads that hit in L2).
    if HAS_SCALE:
        g = g / tl.load(scalars_ptr + _GRAD_SCALE)
    if CLIP:
        g = g * tl.load(scalars_ptr + _CLIP)
    w = tl.where(offs < decay_numel, w * tl.load(scalars_ptr + _DECAY), w)
    m = m + one_minus_beta1 * (g - m)
    v = beta2 * v + one_minus_beta2 * g * g
    denom = tl.sqrt(v) / tl.load(scalars_ptr + _BIAS_CORRECTION2_SQRT) + eps
    w = w - tl.load(scalars_ptr + _STEP_SIZE) * m / denom

    # Stage 3: write the tile once; a skipped step writes as if the block were empty.
    write = offs < tl.where(tl.load(scalars_ptr + _SKIP) != 0.0, 0, n)
    tl.store(exp_avg_ptr + offs, _round_to_nearest(m, exp_avg_ptr.dtype.element_ty), mask=write)
    tl.store(exp_avg_sq_ptr + offs, _round_to_nearest(v, exp_avg_sq_ptr.dtype.element_ty), mask=write)
    if HAS_MASTER:
        tl.store(master_ptr + offs, w, mask=write)
    if STOCHASTIC_ROUNDING:
        tl.store(param_ptr + offs, _stochastic_round_to_bf16(w, seed, offs), mask=write)
    else:
        tl.store(param_ptr + offs, _round_to_nearest(w, param_ptr.dtype.element_ty), mask=write)


@triton.jit
def _init_state_kernel(param_ptr, master_ptr, exp_avg_ptr, exp_avg_sq_ptr, n,
                       HAS_MASTER: tl.constexpr, BLOCK: tl.constexpr):
    """master = float(param), m = 0, v = 0 in one sweep (2 + 4 + 8 bytes per parameter for bf16)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if HAS_MASTER:
        tl.store(master_ptr + offs, tl.load(param_ptr + offs, mask=mask).to(tl.float32), mask=mask)
    zeros = tl.zeros([BLOCK], dtype=tl.float32)
    tl.store(exp_avg_ptr + offs, zeros.to(exp_avg_ptr.dtype.element_ty), mask=mask)
    tl.store(exp_avg_sq_ptr + offs, zeros.to(exp_avg_sq_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Launchers (arguments are validated and packed by interface.py)
# ----------------------------------------------------------------------------------------------------


def _scalar_arg(x, default: float = 0.0):
    """(kernel argument, is-a-pointer) for a float or one-element tensor; None becomes ``default``."""
    if isinstance(x, Tensor):
        return x, True
    return float(default if x is None else x), False


def _num_tiles(n: int) -> int:
    if n > MAX_NUMEL:
        raise ValueError(f"the Triton backend indexes with int32: a block of {n} elements is too large")
    return max(1, triton.cdiv(n, BLOCK))


def adamw_step(args: AdamWStepArgs) -> Optional[Tensor]:
    n, device = args.numel, args.param.device
    num_tiles = _num_tiles(n)
    lr, lr_is_ptr = _scalar_arg(args.lr)
    grad_scale, scale_is_ptr = _scalar_arg(args.grad_scale, 1.0)
    found_inf, found_inf_is_ptr = _scalar_arg(args.found_inf)
    has_scale, clip = args.grad_scale is not None, args.max_grad_norm is not None

    # pass 1: partial sums of squares of the grads (only when clipping or checking them)
    partials = norm = args.step  # stand-ins for pointers a variant does not read
    num_partials = 0
    if args.needs_norm:
        num_partials = min(num_tiles, MAX_PARTIALS)
        partials = torch.empty(num_partials, dtype=torch.float32, device=device)
        norm = torch.empty((), dtype=torch.float32, device=device)
        _grad_sumsq_kernel[(num_partials,)](
            args.grad, partials, grad_scale, n,
            HAS_SCALE=has_scale, SCALE_IS_PTR=scale_is_ptr, BLOCK=BLOCK, num_warps=NUM_WARPS)

    # pass 2: the block's scalars; step += 1 unless skipped
    scalars = torch.empty(_NUM_SCALARS, dtype=torch.float32, device=device)
    _step_scalars_kernel[(1,)](
        partials, num_partials, norm, scalars, args.step, lr, grad_scale, found_inf,
        1.0 - args.beta1, 1.0 - args.beta2, args.weight_decay,
        float(args.max_grad_norm) if clip else 0.0,
        LR_IS_PTR=lr_is_ptr, SCALE_IS_PTR=scale_is_ptr,
        HAS_FOUND_INF=args.found_inf is not None, FOUND_INF_IS_PTR=found_inf_is_ptr,
        HAS_NORM=args.needs_norm, CLIP=clip, CHECK_FINITE=args.check_finite,
        PARTIALS_BLOCK=triton.next_power_of_2(max(num_partials, 1)), num_warps=4)

    # pass 3: the update, one sweep over the block
    _adamw_kernel[(num_tiles,)](
        args.param, args.grad, args.master if args.master is not None else args.param,
        args.exp_avg, args.exp_avg_sq, scalars,
        n, args.decay_numel, args.beta2, 1.0 - args.beta1, 1.0 - args.beta2, args.eps,
        args.seed & (2**63 - 1),
        HAS_SCALE=has_scale, CLIP=clip, HAS_MASTER=args.master is not None,
        STOCHASTIC_ROUNDING=args.stochastic_rounding, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return norm if args.needs_norm else None


def init_state(param: Tensor, master: Optional[Tensor], exp_avg: Tensor, exp_avg_sq: Tensor) -> None:
    n = param.numel()
    _init_state_kernel[(_num_tiles(n),)](
        param, master if master is not None else param, exp_avg, exp_avg_sq, n,
        HAS_MASTER=master is not None, BLOCK=BLOCK, num_warps=NUM_WARPS)


# the ratio mode's masked Adam step (its kernel has a file of its own)
from .triton_masked_adamw import masked_adamw_step  # noqa: E402,F401
