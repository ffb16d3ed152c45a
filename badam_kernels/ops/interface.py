"""The state operations every backend implements, and the checks they share.

A BAdam block keeps its optimizer state in flat 1-D buffers (see ``block_state.py``):

* ``param``      the block's parameters, one contiguous buffer that the model's ``nn.Parameter``
                 objects are views of (bf16, fp16 or fp32);
* ``grad``       their gradients, same layout (the parameters' ``.grad`` are views of it);
* ``master``     an fp32 master copy, or ``None`` (fp32 params are their own master; bf16 params
                 without a master are written back with stochastic rounding);
* ``exp_avg``    Adam's first moment m (fp32 or bf16);
* ``exp_avg_sq`` Adam's second moment v (fp32 or bf16);
* ``step``       a one-element fp32 device tensor: how many updates were applied since the state
                 was (re)initialised; the step increments it unless the update is skipped.

The tensors whose weight decays are laid out first, so the per-tensor decay mask is one number:
elements ``[0, decay_numel)`` decay, the rest (biases, norms) do not.

Each backend module (``reference``, ``triton_adamw``, ``cuda``) satisfies the ``Backend`` protocol
below; this module validates and packs the arguments once for all of them.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Protocol, Union, runtime_checkable

import torch
from torch import Tensor

PARAM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
STATE_DTYPES = (torch.float32, torch.bfloat16)
Scalar = Union[float, Tensor]


@dataclass
class AdamWStepArgs:
    """Everything one fused AdamW step needs, validated.

    The update (decoupled weight decay, Loshchilov & Hutter; torch.optim.AdamW's order of operations),
    with g the gradient divided by ``grad_scale``::

        norm  = ||g||_2                       (only when clipping or checking for non-finite grads)
        skip  = found_inf != 0  or  (check_finite and norm is not finite)
        if not skip:
            t     = step + 1
            g     = g * min(1, max_grad_norm / (norm + 1e-6))        (when max_grad_norm is set)
            w     = w * (1 - lr * weight_decay)                      (first decay_numel elements)
            m     = beta1 * m + (1 - beta1) * g
            v     = beta2 * v + (1 - beta2) * g * g
            w     = w - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
            param = w rounded to the param dtype   (stochastically when there is no master)
            step  = t
    """

    param: Tensor
    grad: Tensor
    master: Optional[Tensor]
    exp_avg: Tensor
    exp_avg_sq: Tensor
    step: Tensor
    lr: Scalar
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decay_numel: int
    grad_scale: Optional[Scalar] = None
    found_inf: Optional[Tensor] = None
    max_grad_norm: Optional[float] = None
    check_finite: bool = True
    seed: int = 0

    @property
    def numel(self) -> int:
        return self.param.numel()

    @property
    def stochastic_rounding(self) -> bool:
        return self.master is None and self.param.dtype != torch.float32

    @property
    def needs_norm(self) -> bool:
        return self.max_grad_norm is not None or self.check_finite


@runtime_checkable
class Backend(Protocol):
    """The contract of a backend: a module (or any object) with these members.

    ``ops.load_backend`` / ``ops.resolve_backend`` return one; the public ``ops.adamw_step`` and
    ``ops.init_state`` validate their arguments (``pack_adamw_args``, ``check_state_buffers``) before
    they call it, so a backend may assume valid, same-device, contiguous flat buffers.

    Two more functions are optional (the dispatch assumes the defaults where a backend lacks them):

    * ``unavailable_reason() -> str | None``: why the backend cannot run in this process (a missing
      ``triton``, an unbuilt extension, no CUDA device), or None; default: always available;
    * ``supports_device(device) -> bool``: whether it runs on tensors of ``device``; default: any device;
    * ``masked_adamw_step(args: MaskedAdamWStepArgs) -> None``: the ratio mode's update of a
      parameter's masked entries (see ``MaskedAdamWStepArgs``); ``ops.masked_adamw_step`` dispatches
      only to backends that have it (``SupportsMaskedAdamW``).
    """

    NAME: str
    """The name the dispatch knows it by: ``"reference"``, ``"triton"`` or ``"cuda"``."""

    def adamw_step(self, args: AdamWStepArgs) -> Optional[Tensor]:
        """One fused AdamW step in place (see ``AdamWStepArgs``); the gradient norm (a 0-d fp32 tensor)
        when ``args.needs_norm``, else None."""

    def init_state(self, param: Tensor, master: Optional[Tensor], exp_avg: Tensor, exp_avg_sq: Tensor) -> None:
        """Set master = float(param) (when there is a master) and exp_avg = exp_avg_sq = 0, in place."""


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _check_flat(name: str, t: Tensor, numel: int, device: torch.device, dtypes) -> None:
    _require(isinstance(t, Tensor), f"{name} must be a tensor, got {type(t).__name__}")
    _require(t.dim() == 1 and t.is_contiguous(), f"{name} must be a contiguous 1-D buffer, got shape {tuple(t.shape)}")
    _require(t.numel() == numel, f"{name} has {t.numel()} elements, expected {numel}")
    _require(t.device == device, f"{name} is on {t.device}, expected {device}")
    _require(t.dtype in dtypes, f"{name} has dtype {t.dtype}, expected one of {[str(d) for d in dtypes]}")


def check_state_buffers(param: Tensor, master: Optional[Tensor], exp_avg: Tensor, exp_avg_sq: Tensor) -> None:
    """Shapes, devices and dtypes of a block's flat state buffers."""
    _require(isinstance(param, Tensor) and param.dim() == 1, "param must be a flat 1-D buffer")
    numel, device = param.numel(), param.device
    _check_flat("param", param, numel, device, PARAM_DTYPES)
    if master is not None:
        _check_flat("master", master, numel, device, (torch.float32,))
    elif param.dtype == torch.float16:
        raise ValueError("fp16 parameters need an fp32 master copy (stochastic rounding is implemented for bf16)")
    _check_flat("exp_avg", exp_avg, numel, device, STATE_DTYPES)
    _check_flat("exp_avg_sq", exp_avg_sq, numel, device, STATE_DTYPES)


def _checked_betas(betas, eps: float, weight_decay: float):
    """(beta1, beta2) as floats, after checking them, eps and the weight decay."""
    beta1, beta2 = (float(b) for b in betas)
    _require(0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0, f"betas must lie in [0, 1), got {betas}")
    _require(eps >= 0.0, f"eps must be non-negative, got {eps}")
    _require(weight_decay >= 0.0, f"weight_decay must be non-negative, got {weight_decay}")
    return beta1, beta2


def pack_adamw_args(
    param: Tensor,
    grad: Tensor,
    master: Optional[Tensor],
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    *,
    lr: Scalar,
    betas: tuple = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decay_numel: Optional[int] = None,
    grad_scale: Optional[Scalar] = None,
    found_inf: Optional[Tensor] = None,
    max_grad_norm: Optional[float] = None,
    check_finite: bool = True,
    seed: int = 0,
) -> AdamWStepArgs:
    """Validate the arguments of a fused AdamW step and pack them for a backend."""
    check_state_buffers(param, master, exp_avg, exp_avg_sq)
    numel, device = param.numel(), param.device
    _check_flat("grad", grad, numel, device, PARAM_DTYPES)
    _require(isinstance(step, Tensor) and step.numel() == 1 and step.dtype == torch.float32,
             "step must be a one-element fp32 tensor")
    _require(step.device == device, f"step is on {step.device}, expected {device}")
    beta1, beta2 = _checked_betas(betas, eps, weight_decay)
    decay_numel = numel if decay_numel is None else int(decay_numel)
    _require(0 <= decay_numel <= numel, f"decay_numel={decay_numel} is outside [0, {numel}]")
    if max_grad_norm is not None:
        _require(max_grad_norm > 0, f"max_grad_norm must be positive, got {max_grad_norm}")
    for name, value in (("lr", lr), ("grad_scale", grad_scale), ("found_inf", found_inf)):
        if isinstance(value, Tensor):
            _require(value.numel() == 1, f"{name} must be a scalar or a one-element tensor")
            _require(value.device == device, f"{name} is on {value.device}, expected {device}")
    return AdamWStepArgs(param, grad, master, exp_avg, exp_avg_sq, step, lr, beta1, beta2, float(eps),
                         float(weight_decay), decay_numel, grad_scale, found_inf, max_grad_norm,
                         bool(check_finite), int(seed))



# ------------------------------------------------------------------------------------------------
# The ratio mode's op: Adam on a fraction of each parameter's entries (``ratio.BlockOptimizerRatio``)
# ------------------------------------------------------------------------------------------------

MASKED_TILE = 1024
"""Entries per tile of the compact (masked) buffers: every tile belongs to one parameter, whose
masked entries fill whole tiles, the last one padded with index -1. The layout is part of the
contract, the same for every backend."""


@dataclass
class MaskedStates:
    """The states of a flat group's masked entries, in tiles (see ``MaskedAdamWStepArgs``)."""

    index: Tensor
    master: Optional[Tensor]
    exp_avg: Tensor
    exp_avg_sq: Tensor
    tile_base: Tensor
    tile_step: Tensor

    def tensors_by_name(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(MaskedStates)}


@dataclass
class MaskedAdamWStepArgs(MaskedStates):
    """Everything one masked Adam step needs, validated: the states (``MaskedStates``) and these.

    ``param`` and ``grad`` are a flat group's dense buffers (N elements); the optimizer states live
    in compact buffers of K = T * MASKED_TILE entries, one per masked entry (T tiles):

    * ``index``      int32 [K]: the entry's offset inside its parameter, -1 for tile padding;
    * ``tile_base``  int64 [T]: where the tile's parameter starts in ``param``/``grad``;
    * ``tile_step``  fp32 [T]: steps taken since the tile's states were reset; 0 means fresh
                     (w is read from ``param``, m = v = 0, whatever the buffers hold);
    * ``master``     fp32 [K] or None (fp32 params are their own master);
    * ``exp_avg``, ``exp_avg_sq``  fp32 [K].

    For the tiles ``[tile_start, tile_start + num_tiles)``, for each entry with p = tile_base + index
    (the Adam paper's efficient form, as ``badam.BlockOptimizerRatio`` 1.4 computes it, plus
    decoupled weight decay), with t = tile_step + 1::

        g = grad[p]
        w = master (or float(param[p]); float(param[p]) when fresh)
        w = w * (1 - lr * weight_decay)
        m = m + (1 - beta1) * (g - m)
        v = v + (1 - beta2) * (g * g - v)
        w = w - lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps)
        param[p] = w rounded to nearest in the param dtype;  tile_step = t
    """

    param: Tensor
    grad: Tensor
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    tile_start: int
    num_tiles: int


@runtime_checkable
class SupportsMaskedAdamW(Protocol):
    """A backend that implements the optional ratio-mode op."""

    def masked_adamw_step(self, args: MaskedAdamWStepArgs) -> None:
        """One masked Adam step in place (see ``MaskedAdamWStepArgs``)."""


def pack_masked_adamw_args(param: Tensor, grad: Tensor, states: MaskedStates, *, lr: float,
                           betas: tuple = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                           tile_start: int = 0, num_tiles: Optional[int] = None) -> MaskedAdamWStepArgs:
    """Validate the arguments of a masked Adam step and pack them for a backend."""
    _require(isinstance(states, MaskedStates), f"states must be a MaskedStates, got {type(states).__name__}")
    index, master, tile_base, tile_step = states.index, states.master, states.tile_base, states.tile_step
    exp_avg, exp_avg_sq = states.exp_avg, states.exp_avg_sq
    _require(isinstance(param, Tensor) and param.dim() == 1, "param must be a flat 1-D buffer")
    n, device = param.numel(), param.device
    _check_flat("param", param, n, device, PARAM_DTYPES)
    _check_flat("grad", grad, n, device, PARAM_DTYPES)
    _require(isinstance(tile_base, Tensor) and tile_base.dim() == 1, "tile_base must be a 1-D tensor")
    total_tiles = tile_base.numel()
    k = total_tiles * MASKED_TILE
    _check_flat("tile_base", tile_base, total_tiles, device, (torch.int64,))
    _check_flat("tile_step", tile_step, total_tiles, device, (torch.float32,))
    _check_flat("index", index, k, device, (torch.int32,))
    if master is not None:
        _check_flat("master", master, k, device, (torch.float32,))
    else:
        _require(param.dtype == torch.float32, f"{param.dtype} params need an fp32 master of the masked entries")
    _check_flat("exp_avg", exp_avg, k, device, (torch.float32,))
    _check_flat("exp_avg_sq", exp_avg_sq, k, device, (torch.float32,))
    num_tiles = total_tiles - tile_start if num_tiles is None else int(num_tiles)
    _require(0 <= tile_start and 0 <= num_tiles and tile_start + num_tiles <= total_tiles,
             f"tiles [{tile_start}, {tile_start + num_tiles}) are outside the {total_tiles} tiles")
    beta1, beta2 = _checked_betas(betas, eps, weight_decay)
    _require(not isinstance(lr, Tensor), "lr must be a Python float for the masked step")
    return MaskedAdamWStepArgs(**states.tensors_by_name(), param=param, grad=grad, lr=float(lr), beta1=beta1,
                               beta2=beta2, eps=float(eps), weight_decay=float(weight_decay),
                               tile_start=int(tile_start), num_tiles=num_tiles)
