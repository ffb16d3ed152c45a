"""CUDA backend: the compiled ops of ``badam_kernels._C`` (sources in ``csrc/``).

``torch.ops.badam_kernels.adamw_step`` is one fused AdamW step over a block's flat buffers (a norm
pass when clipping or checking for non-finite gradients, a one-block prologue, one update pass: 28
bytes per parameter for bf16 params and grads with fp32 master, m and v),
``torch.ops.badam_kernels.init_state`` sets master = float(param), m = v = 0 in one pass, and
``torch.ops.badam_kernels.masked_adamw_step`` is the ratio mode's gather-update-scatter of the masked
entries (one launch, one thread block per tile; ``csrc/masked_adamw.cu``). All run on
the current stream with no host synchronisation, so they can be captured in a CUDA graph, and they
have Meta implementations, so torch.compile can trace them.

The extension is the one ``setup.py`` built, or is compiled on first use (see ``_build.py``).
Bit-level differences from the reference: stochastic rounding draws its noise from a hash of
(seed, step, element index) instead of torch's generator, so it is equal in distribution only.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
from torch import Tensor

from .._build import load_extension
from .interface import AdamWStepArgs, MaskedAdamWStepArgs

NAME = "cuda"
_SCALAR_CACHE_SIZE = 64
_scalars: "OrderedDict[tuple, Tensor]" = OrderedDict()


def unavailable_reason() -> Optional[str]:
    ops, reason = load_extension()
    if ops is None:
        return reason
    if not torch.cuda.is_available():
        return "badam_kernels._C is loaded but no CUDA device is visible"
    return None


def supports_device(device) -> bool:
    return torch.device(device).type == "cuda"


def _device_scalar(value, device: torch.device) -> Tensor:
    """A one-element fp64 tensor on ``device`` holding a Python float (tensors pass through).

    Filled by a kernel, not copied from the host, so that it never waits; the last few values are
    cached per device, so a constant lr or loss scale costs nothing after its first step. During a
    CUDA graph capture the fill is part of the graph (the value is baked in; pass a tensor to vary it).
    """
    if isinstance(value, Tensor):
        return value
    if torch.cuda.is_current_stream_capturing():  # filled when the graph replays: not for eager use
        return torch.full((1,), float(value), dtype=torch.float64, device=device)
    key = (device, float(value))
    tensor = _scalars.get(key)
    if tensor is None:
        tensor = torch.full((1,), float(value), dtype=torch.float64, device=device)
        _scalars[key] = tensor
        if len(_scalars) > _SCALAR_CACHE_SIZE:
            _scalars.popitem(last=False)
    else:
        _scalars.move_to_end(key)
    return tensor


def _int64(seed: int) -> int:
    """Any Python int as the int64 with the same low 64 bits (the kernel hashes it as uint64)."""
    seed &= (1 << 64) - 1
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def adamw_step(args: AdamWStepArgs) -> Optional[Tensor]:
    device = args.param.device
    grad_scale = None if args.grad_scale is None else _device_scalar(args.grad_scale, device)
    found_inf = None if args.found_inf is None else _device_scalar(args.found_inf, device)  # a float is allowed too
    norm = torch.ops.badam_kernels.adamw_step(
        args.param, args.grad, args.master, args.exp_avg, args.exp_avg_sq, args.step,
        _device_scalar(args.lr, device), args.beta1, args.beta2, args.eps, args.weight_decay,
        args.decay_numel, grad_scale, found_inf,
        0.0 if args.max_grad_norm is None else float(args.max_grad_norm), args.check_finite, _int64(args.seed),
    )
    return norm if args.needs_norm else None


def init_state(param: Tensor, master: Optional[Tensor], exp_avg: Tensor, exp_avg_sq: Tensor) -> None:
    torch.ops.badam_kernels.init_state(param, master, exp_avg, exp_avg_sq)


def masked_adamw_step(args: MaskedAdamWStepArgs) -> None:
    torch.ops.badam_kernels.masked_adamw_step(
        args.param, args.grad, args.index, args.master, args.exp_avg, args.exp_avg_sq, args.tile_base, args.tile_step,
        args.lr, args.beta1, args.beta2, args.eps, args.weight_decay, args.tile_start, args.num_tiles)
