"""The active block's parameters, gradients and optimizer states, in flat buffers.

While a block is active its parameters of one dtype live in one contiguous buffer (the model's
``nn.Parameter`` objects become views of it), their gradients in a second buffer that exists from
the block's backward to ``zero_grad()`` (each gradient moves in as autograd produces it and ``.grad``
becomes a view, so accumulation goes straight into it; it takes no room during the forward, when
activations peak), and the fp32 master copy and Adam moments in three more. A fused step is then a plain 1-D sweep over five buffers in one launch. Tensors that
take weight decay come first, so the decay mask is a single split point. Offsets are padded to
``ALIGN`` elements so that every view starts on a 128-byte boundary.

``StatePark`` holds the states of inactive blocks in (pinned) host memory for the ``offload``
policy, with copies on a side stream so that a switch does not wait for the link.
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
Key = Tuple[int, int]  # (block, dtype group) of a parked state


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
        self.entries, self.offsets, total, self.decay_numel = layout(entries)
        first = self.entries[0].param
        self.dtype, self.device = first.dtype, first.device
        self.numel = total
        self.padded = total != sum(e.param.numel() for e in self.entries)
        new = torch.zeros if self.padded else torch.empty  # padding holds zeros in every buffer
        self.param = new(total, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            for e, view in zip(self.entries, self._views(self.param)):
                view.copy_(e.param.data)
                e.param.data = view  # the model's parameter now lives in the flat buffer
        self.grad: Optional[Tensor] = None  # allocated when the first gradient arrives
        self._views_of_grad: List[Tensor] = []
        self._hooks = [e.param.register_post_accumulate_grad_hook(_adopt_hook(weakref.ref(self), k))
                       for k, e in enumerate(self.entries)]
        self._allocate_states(keep_master, with_moments, state_dtype)

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
        return [flat[o:o + e.param.numel()].view(e.param.shape) for e, o in zip(self.entries, self.offsets)]

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


def _pin(t: Tensor) -> Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=torch.cuda.is_available())


class StatePark:
    """Optimizer states of inactive blocks, parked in host memory (the ``offload`` policy).

    States are keyed by (block, dtype group). Host buffers are pinned, allocated once per key and
    reused at every later park of it. Copies run on a side stream; an event per key orders them:
    the compute stream never reads a restored state before its copy landed, and a host buffer is
    never refilled while a copy from it is in flight. On CPU tensors the park simply keeps them.
    """

    def __init__(self):
        self.host: Dict[Key, Dict[str, Tensor]] = {}
        self._events: Dict[Key, "torch.cuda.Event"] = {}
        self._prefetched: Dict[Key, Dict[str, Tensor]] = {}
        self._stream = None
        self._current: set = set()  # keys whose host copy is the block's latest state

    def holds(self, block: int) -> bool:
        return any(key[0] == block for key in self._current)

    def blocks(self) -> List[int]:
        """Blocks with parked states."""
        return sorted({key[0] for key in self._current})

    def nbytes(self) -> int:
        """Host bytes held (buffers stay allocated for reuse after their block returns)."""
        return sum(t.numel() * t.element_size() for states in self.host.values() for t in states.values())

    def reserve(self, key: Key, specs: Dict[str, Tuple[Tuple[int, ...], torch.dtype]]) -> None:
        """Allocate the pinned host buffers of ``key`` now, so that no switch waits for the allocation."""
        self.host[key] = {name: torch.empty(shape, dtype=dtype, device="cpu", pin_memory=True)
                          for name, (shape, dtype) in specs.items()}

    def _side_stream(self, device: torch.device):
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        return self._stream

    def park(self, key: Key, states: Dict[str, Tensor]) -> None:
        """Copy ``states`` (device tensors) to the key's host buffers, without stalling the caller."""
        self._prefetched.pop(key, None)
        self._current.add(key)
        some = next(iter(states.values()))
        if some.device.type != "cuda":
            self.host[key] = dict(states)
            return
        host = self.host.get(key)
        if host is None or any(host[k].shape != v.shape or host[k].dtype != v.dtype for k, v in states.items()):
            host = {k: _pin(v) for k, v in states.items()}
            self.host[key] = host
        stream = self._side_stream(some.device)
        self._wait_event(key)  # the previous copy into or out of these buffers has finished
        stream.wait_stream(torch.cuda.current_stream(some.device))
        with torch.cuda.stream(stream):
            for name, t in states.items():
                host[name].copy_(t, non_blocking=True)
                t.record_stream(stream)  # the device tensor outlives the copy reading it
        self._record_event(key, stream)

    def prefetch(self, key: Key, device: torch.device) -> None:
        """Start copying parked states back to ``device``; ``take`` will wait for them."""
        if key not in self._current or key in self._prefetched or device.type != "cuda":
            return
        stream = self._side_stream(device)
        self._wait_event(key)
        with torch.cuda.stream(stream):
            self._prefetched[key] = {k: v.to(device, non_blocking=True) for k, v in self.host[key].items()}
        self._record_event(key, stream)

    def take(self, key: Key, device: torch.device) -> Dict[str, Tensor]:
        """The parked states on ``device``, ready for the compute stream."""
        if device.type != "cuda":
            self._current.discard(key)
            return self.host.pop(key)
        self.prefetch(key, device)  # a no-op when the prefetch already ran (it must see the key as current)
        self._current.discard(key)
        states = self._prefetched.pop(key)
        current = torch.cuda.current_stream(device)
        current.wait_event(self._events[key])
        for t in states.values():
            t.record_stream(current)
        return states

    def _record_event(self, key: Key, stream) -> None:
        event = torch.cuda.Event()
        event.record(stream)
        self._events[key] = event

    def _wait_event(self, key: Key) -> None:
        event = self._events.get(key)
        if event is not None:
            self._stream.wait_event(event)

    def state_dict(self) -> Dict[Key, Dict[str, Tensor]]:
        """CPU copies of every parked state (waits for copies in flight)."""
        for event in self._events.values():
            event.synchronize()
        return {key: {k: v.detach().cpu().clone() for k, v in self.host[key].items()} for key in self._current}

    def load_state_dict(self, parked: Dict[Key, Dict[str, Tensor]]) -> None:
        """Take saved parked states into host buffers of our own (pinned where CUDA is present),
        wherever the caller's copies live (Accelerate moves a whole state dict to the GPU)."""
        self.host = {}
        for key, states in parked.items():
            self.host[tuple(key)] = {k: _pin(v).copy_(v) for k, v in states.items()}
        self._current = set(self.host)
        self._prefetched.clear()
        self._events.clear()
