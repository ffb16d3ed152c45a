"""The update rule of the active block: what one ``BlockOptimizer.step`` does to its flat groups.

* :class:`FusedAdamW`: AdamW in one kernel launch per flat group (``ops.adamw_step``: master weights,
  moments, clipping and the finite check fused); the moments live in the groups' flat buffers.
* :class:`BaseOptimizerUpdate`: any ``torch.optim`` optimizer (HiFT's optimizer independence),
  pointed at the active block's fp32 tensors (the master views) at every switch.

Both read the hyperparameters they are handed at each step (``BlockOptimizer.hyperparameters``),
so schedulers and edits of ``param_groups`` take effect.
"""
from __future__ import annotations

from collections import defaultdict
from typing import List, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import ops
from .block_state import FlatGroup


def fused_adamw_eligible(opt: Optimizer) -> bool:
    """The fused kernel implements AdamW (decoupled decay); Adam without weight decay is the same update."""
    if type(opt) not in (torch.optim.AdamW, torch.optim.Adam):
        return False
    d = opt.defaults
    if d.get("amsgrad") or d.get("maximize") or d.get("differentiable"):
        return False
    decoupled = type(opt) is torch.optim.AdamW or d.get("decoupled_weight_decay", False)
    return decoupled or all(g.get("weight_decay", 0.0) == 0.0 for g in opt.param_groups)


class FusedAdamW:
    """AdamW over the flat buffers, one fused kernel per group (``ops.adamw_step``)."""

    with_moments = True  # the flat groups hold Adam's m and v

    def __init__(self, backend: Optional[str]):
        self.backend = backend

    def start(self, groups: List[FlatGroup], saved: Optional[dict] = None) -> None:
        """A block becomes active: a forced backend that cannot run on its device fails now, with its reason."""
        for group in groups:
            ops.resolve_backend(self.backend, group.device)

    def step(self, groups: List[FlatGroup], hp: dict, *, seed: int, grad_scale=None, found_inf=None,
             max_grad_norm: Optional[float] = None, check_finite: bool = False) -> Optional[Tensor]:
        """One AdamW step of every group; the norm the kernel computed (one group) or None.

        ``max_grad_norm`` and ``check_finite`` are passed only when the kernel may judge the gradient
        alone, i.e. one group holds all of it (``BlockOptimizer._kernel_takes_the_norm``).
        """
        norm = None
        for group in groups:
            norm = ops.adamw_step(
                group.param, group.grad, group.master, group.exp_avg, group.exp_avg_sq, group.step,
                lr=hp["lr"], betas=hp["betas"], eps=hp["eps"], weight_decay=hp.get("weight_decay", 0.0),
                decay_numel=group.decay_numel, grad_scale=grad_scale, found_inf=found_inf,
                max_grad_norm=max_grad_norm, check_finite=check_finite, seed=seed, backend=self.backend)
        return norm

    def state_dict(self) -> None:
        return None  # every state is in the flat groups


class BaseOptimizerUpdate:
    """A ``torch.optim`` optimizer over the active block's fp32 tensors (the master views, or the
    fp32 parameters themselves). Its states follow the block: the state policy saves them with the
    block's and hands them back with ``start(groups, saved)``."""

    with_moments = False  # the base optimizer keeps its own states

    def __init__(self, base_optimizer: Optimizer):
        self.base_optimizer = base_optimizer
        self.backend = None
        self._decays: List[bool] = []

    def start(self, groups: List[FlatGroup], saved: Optional[dict] = None) -> None:
        """Point the base optimizer at the block's fp32 tensors: one group that decays, one that does not."""
        decay, no_decay = [], []
        for group in groups:
            for entry, hp in zip(group.entries, group.master_views()):
                (decay if entry.decay else no_decay).append(hp)
        kept = [(params, decays) for params, decays in ((decay, True), (no_decay, False)) if params]
        self.base_optimizer.param_groups = [{**self.base_optimizer.defaults, "params": p} for p, _ in kept]
        self._decays = [decays for _, decays in kept]
        self.base_optimizer.state = defaultdict(dict)
        if saved is not None:
            self.base_optimizer.load_state_dict(saved)

    def _take_hyperparameters(self, hp: dict) -> None:
        """The base optimizer's groups take today's hyperparameters; biases and norms no weight decay."""
        for group, decays in zip(self.base_optimizer.param_groups, self._decays):
            group.update(hp)
            if not decays:
                group["weight_decay"] = 0.0

    def step(self, groups: List[FlatGroup], hp: dict, **_fused_only) -> None:
        self._take_hyperparameters(hp)
        for group in groups:
            if group.master is not None:
                for master, entry in zip(group.master_views(), group.entries):
                    master.grad = entry.param.grad.float()
        self.base_optimizer.step()
        for group in groups:
            if group.master is not None:
                for master, entry in zip(group.master_views(), group.entries):
                    entry.param.copy_(master)
                    master.grad = None
        return None

    def state_dict(self) -> dict:
        """The base optimizer's state of the active block, on the CPU."""
        return to_cpu(self.base_optimizer.state_dict())


def to_cpu(obj):
    """A copy of ``obj`` (tensors in dicts, lists and tuples) with every tensor on the CPU."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj
