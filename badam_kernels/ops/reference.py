"""Reference backend: the state operations in plain torch, on any device.

This is the ground truth the Triton and CUDA backends are tested against. It follows
``torch.optim.AdamW``'s single-tensor arithmetic operation for operation (lerp for m, mul+addcmul for
v, addcdiv for the update, bias corrections in double precision on the host), so that in fp32 a
``BlockOptimizer`` on this backend reproduces the official BAdam, which calls torch's AdamW, to the
last bit. It is not fast: it reads scalars back to the host and makes several passes.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .interface import MASKED_TILE, AdamWStepArgs, MaskedAdamWStepArgs

NAME = "reference"


def _scalar(x) -> Optional[float]:
    return None if x is None else float(x.item() if isinstance(x, Tensor) else x)


def stochastic_round_to_bf16(w: Tensor, generator: torch.Generator) -> Tensor:
    """Round fp32 to bf16 up or down with probability given by the distance: unbiased in expectation.

    Adding a uniform 16-bit integer to the fp32 bit pattern and truncating the low 16 bits rounds up
    exactly when the dropped bits plus the noise carry into bit 16.
    """
    noise = torch.randint(0, 1 << 16, w.shape, dtype=torch.int32, device=w.device, generator=generator)
    bits = w.contiguous().view(torch.int32)
    finite = torch.isfinite(w)
    rounded = ((bits + noise) & -65536).view(torch.float32)  # -65536 == 0xFFFF0000 as int32
    return torch.where(finite, rounded, w).to(torch.bfloat16)


def grad_norm(grad: Tensor, grad_scale: Optional[float]) -> Tensor:
    """L2 norm of the (unscaled) gradient, accumulated in fp32."""
    g = grad.float()
    if grad_scale is not None:
        g = g / grad_scale
    return torch.linalg.vector_norm(g, 2, dtype=torch.float32)


def adamw_step(args: AdamWStepArgs) -> Optional[Tensor]:
    grad_scale = _scalar(args.grad_scale)
    norm = grad_norm(args.grad, grad_scale) if args.needs_norm else None
    if args.found_inf is not None and _scalar(args.found_inf) != 0.0:
        return norm
    if args.check_finite and not bool(torch.isfinite(norm)):
        return norm

    lr = _scalar(args.lr)
    step = _scalar(args.step) + 1.0
    grad = args.grad.float() if grad_scale is None else args.grad.float() / grad_scale
    if args.max_grad_norm is not None:
        clip = min(1.0, args.max_grad_norm / (float(norm) + 1e-6))
        grad = grad * clip

    w = args.master if args.master is not None else args.param.float()
    m = args.exp_avg.float()
    v = args.exp_avg_sq.float()
    if args.weight_decay != 0.0 and args.decay_numel > 0:
        w[: args.decay_numel].mul_(1.0 - lr * args.weight_decay)
    m.lerp_(grad, 1.0 - args.beta1)
    v.mul_(args.beta2).addcmul_(grad, grad, value=1.0 - args.beta2)
    step_size = lr / (1.0 - args.beta1 ** step)
    bias_correction2_sqrt = (1.0 - args.beta2 ** step) ** 0.5
    denom = (v.sqrt() / bias_correction2_sqrt).add_(args.eps)
    w.addcdiv_(m, denom, value=-step_size)

    # write back whatever was computed in a copy (low-precision states, params without master)
    for dst, src in ((args.exp_avg, m), (args.exp_avg_sq, v)):
        if dst is not src:
            dst.copy_(src)
    if args.stochastic_rounding:
        gen = torch.Generator(device=w.device).manual_seed(args.seed)
        args.param.copy_(stochastic_round_to_bf16(w, gen))
    elif w is not args.param:
        args.param.copy_(w)
    args.step.add_(1.0)
    return norm


def init_state(param: Tensor, master: Optional[Tensor], exp_avg: Tensor, exp_avg_sq: Tensor) -> None:
    if master is not None:
        master.copy_(param)
    exp_avg.zero_()
    exp_avg_sq.zero_()



def masked_adamw_step(args: MaskedAdamWStepArgs) -> None:
    """The masked Adam step, operation for operation as ``badam.BlockOptimizerRatio`` 1.4's sparse Adam
    (``exp_avg += (g - exp_avg) * (1 - beta1)``, ...; the step size in double precision on the host)."""
    tiles = slice(args.tile_start, args.tile_start + args.num_tiles)
    entries = slice(args.tile_start * MASKED_TILE, (args.tile_start + args.num_tiles) * MASKED_TILE)
    index = args.index[entries].long()
    valid = index >= 0
    tile_of_entry = torch.arange(args.num_tiles, device=index.device).repeat_interleave(MASKED_TILE)
    pos = (args.tile_base[tiles][tile_of_entry] + index)[valid]
    fresh = (args.tile_step[tiles] == 0)[tile_of_entry][valid]
    t = (args.tile_step[tiles].double() + 1.0)[tile_of_entry][valid]

    g = args.grad[pos].float()
    w_param = args.param[pos].float()
    if args.master is not None:
        w = torch.where(fresh, w_param, args.master[entries][valid])
    else:
        w = w_param
    zero = torch.zeros((), device=g.device)
    m = torch.where(fresh, zero, args.exp_avg[entries][valid])
    v = torch.where(fresh, zero, args.exp_avg_sq[entries][valid])

    if args.weight_decay != 0.0:
        w.mul_(1.0 - args.lr * args.weight_decay)
    m.add_((g - m).mul_(1.0 - args.beta1))
    v.add_(g.pow(2).sub_(v).mul_(1.0 - args.beta2))
    step_size = (args.lr * torch.sqrt(1.0 - args.beta2 ** t) / (1.0 - args.beta1 ** t)).float()
    w.add_(m / v.sqrt().add_(args.eps) * -step_size)

    for dst, src in ((args.master, w), (args.exp_avg, m), (args.exp_avg_sq, v)):
        if dst is not None:
            view = dst[entries]
            view[valid] = src
    args.param[pos] = w.to(args.param.dtype)
    args.tile_step[tiles] += 1.0
