"""The active block's parameters, gradients and optimizer states, in flat buffers.

While a block is active its parameters of one dtype live in one contiguous buffer (the model's
``nn.Parameter`` objects become views of it), their gradients in a second buffer that exists from
the block's backward to ``zero_grad()`` (each gradient moves in as autograd produces it and ``.grad``
becomes a view, so accumulation goes straight into it; it takes no room during the forward, when
activations peak), and the fp32 master copy and Adam moments in three more. A fused step is then a plain 1-D sweep over five buffers in one launch. Tensors that
take weight decay come first, so the decay mask is a single split point. Offsets are padded to
``ALIGN`` elements so that every view starts on a 128-byte boundary.
"""
from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import ops

ALIGN = 64  # elements


def local_shard(t: Tensor) -> Tensor:
    """The part of ``t`` this process holds: a DTensor's (FSDP2) local shard, any other tensor itself.

    Under ``no_grad`` so that it is FSDP2's own storage (written in place by the sharded optimizer),
    not an autograd alias. No DTensor exists unless its module was imported, so this checks without
    importing it (that costs most of a second at start-up).
    """
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is None or not isinstance(t, dtensor.DTensor):
        return t
    with torch.no_grad():
        return t.to_local()


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class Entry:
    """One parameter of the active block."""

    index: int  # position in the optimizer's named-parameter list
    name: str
    param: torch.nn.Parameter
    decay: bool


def layout(entries: Sequence[Entry]):
    """Order (decayed tensors first), offsets, padded length and decay split of a flat group."""
    ordered = sorted(entries, key=lambda e: (not e.decay, e.index))
    offsets, total, decay_numel = [], 0, 0
    for e in ordered:
        offsets.append(total)
        total += _aligned(e.param.numel())
        if e.decay:
            decay_numel = total
    return ordered, offsets, total, decay_numel


def state_specs(dtype: torch.dtype, numel: int, *, keep_master: bool, with_moments: bool,
                state_dtype: torch.dtype) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    """Shape and dtype of each state buffer of a flat group (what ``state_tensors`` returns)."""
    specs = {}
    if keep_master and dtype != torch.float32:
        specs["master"] = ((numel,), torch.float32)
    if with_moments:
        specs["exp_avg"] = specs["exp_avg_sq"] = ((numel,), state_dtype)
    specs["step"] = ((1,), torch.float32)
    return specs


def _adopt_hook(group_ref, k: int):
    """The hook holds its group weakly: parameters must not keep a dropped optimizer's buffers alive."""

    def hook(_param):
        group = group_ref()
        if group is not None:
            group._adopt_grad(k)

    return hook


class FlatGroup:
    """The active block's parameters of one dtype and device, with their flat state buffers.

    ``master`` is None for fp32 parameters (they are their own master) and for bf16 parameters kept
    without a master (stochastic rounding); ``exp_avg``/``exp_avg_sq`` are allocated only when the
    fused AdamW path is used (``with_moments``).
    """

    def __init__(self, entries: Sequence[Entry], *, keep_master: bool, with_moments: bool,
                 state_dtype: torch.dtype = torch.float32):
        self.entries, self.offsets, self.shapes, self.numel, self.decay_numel = self._layout(entries)
        first = self.entries[0].param
        self.dtype, self.device = first.dtype, local_shard(first).device
        self.padded = self.numel != sum(shape.numel() for shape in self.shapes)
        new = torch.zeros if self.padded else torch.empty  # padding holds zeros in every buffer
        self.param = new(self.numel, dtype=self.dtype, device=self.device)
        self._bind_params()
        self.grad: Optional[Tensor] = None  # allocated when the first gradient arrives
        self._views_of_grad: List[Tensor] = []
        self._hooks = self._grad_hooks()
        self._allocate_states(keep_master, with_moments, state_dtype)

    # -- what a group over local shards (parallel/fsdp.py) does differently ---------------------------
    def _layout(self, entries: Sequence[Entry]):
        """(entries in flat order, offsets, shapes, padded length, decay split) of the flat buffers."""
        ordered, offsets, numel, decay_numel = layout(entries)
        return ordered, offsets, [e.param.shape for e in ordered], numel, decay_numel

    @torch.no_grad()
    def _bind_params(self) -> None:
        """The model's parameters move into the flat buffer: each becomes a view of it."""
        for e, view in zip(self.entries, self._views(self.param)):
            view.copy_(e.param.data)
            e.param.data = view

    def _grad_hooks(self) -> list:
        """Each gradient moves into the flat buffer as soon as autograd produces it (``_adopt_grad``)."""
        return [e.param.register_post_accumulate_grad_hook(_adopt_hook(weakref.ref(self), k))
                for k, e in enumerate(self.entries)]

    def _allocate_states(self, keep_master: bool, with_moments: bool, state_dtype: torch.dtype) -> None:
        """The master and moment buffers ``state_specs`` asks for (zeros where padding needs them)."""
        new = torch.zeros if self.padded else torch.empty
        specs = state_specs(self.dtype, self.numel, keep_master=keep_master, with_moments=with_moments,
                            state_dtype=state_dtype)
        self.master = self.exp_avg = self.exp_avg_sq = None
        for name, (shape, dtype) in specs.items():
            if name != "step":
                setattr(self, name, new(shape, dtype=dtype, device=self.device))
        self.step = torch.zeros(1, dtype=torch.float32, device=self.device)

    # -- views ------------------------------------------------------------------------------------
    def _views(self, flat: Tensor) -> List[Tensor]:
        return [flat[o:o + shape.numel()].view(shape) for o, shape in zip(self.offsets, self.shapes)]

    def master_views(self) -> List[Tensor]:
        """The fp32 tensors a base optimizer updates: views of the master, or the fp32 params."""
        return self._views(self.master) if self.master is not None else [e.param for e in self.entries]

    @property
    def params(self) -> List[torch.nn.Parameter]:
        return [e.param for e in self.entries]

    # -- gradients --------------------------------------------------------------------------------
    def _grad_views(self) -> List[Tensor]:
        if self.grad is None:
            new = torch.zeros if self.padded else torch.empty  # padding must hold zero gradients
            self.grad = new(self.numel, dtype=self.dtype, device=self.device)
            self._views_of_grad = self._views(self.grad)
        return self._views_of_grad

    def _adopt_grad(self, k: int) -> None:
        """Move parameter k's gradient into the buffer and make ``.grad`` a view of it.

        Runs as a post-accumulate-grad hook, so each fresh gradient is copied and freed as soon as
        autograd produces it: the buffer exists only from the active block's backward to
        ``zero_grad``, and no moment holds the block's gradients twice.
        """
        param = self.entries[k].param
        if param.grad is None:
            return
        view = self._grad_views()[k]
        if param.grad.data_ptr() != view.data_ptr():
            view.copy_(param.grad)
            param.grad = view

    def collect_grads(self) -> List[str]:
        """Make the grad buffer hold every gradient; return the names of parameters that have none."""
        missing = [e.name for e in self.entries if e.param.grad is None]
        if not missing:
            for k in range(len(self.entries)):
                self._adopt_grad(k)  # gradients set by hand, without backward, are adopted here
        return missing

    def zero_grads(self, set_to_none: bool = True) -> None:
        """Free the gradients (``set_to_none``) or zero them in one memset."""
        if set_to_none:
            for e in self.entries:
                e.param.grad = None
            self.grad, self._views_of_grad = None, []
        elif self.grad is not None:
            self.grad.zero_()
        else:
            for e in self.entries:
                if e.param.grad is not None:
                    e.param.grad.zero_()

    def release(self) -> None:
        """The block goes inactive: its gradients are dropped (the parameters keep their storage)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.zero_grads(set_to_none=True)

    # -- states -----------------------------------------------------------------------------------
    def state_tensors(self) -> Dict[str, Tensor]:
        named = {"master": self.master, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "step": self.step}
        return {k: v for k, v in named.items() if v is not None}

    def init_states(self, backend: Optional[str]) -> None:
        """Fresh states at a switch: master from the params, zero moments, step 0."""
        if self.exp_avg is not None:
            ops.init_state(self.param, self.master, self.exp_avg, self.exp_avg_sq, backend=backend)
        elif self.master is not None:
            self.master.copy_(self.param)
        self.step.zero_()

    def load_states(self, states: Dict[str, Tensor]) -> None:
        """Take states saved by ``state_tensors`` (parked or checkpointed), checking they fit."""
        mine = self.state_tensors()
        if set(states) != set(mine):
            raise ValueError(f"saved block states hold {sorted(states)}, this block needs {sorted(mine)}")
        for key, dst in mine.items():
            src = states[key]
            if src.shape != dst.shape:
                raise ValueError(f"saved {key} has shape {tuple(src.shape)}, this block needs {tuple(dst.shape)}")
            dst.copy_(src, non_blocking=True)
