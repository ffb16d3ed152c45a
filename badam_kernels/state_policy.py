"""What happens to the optimizer states of a block when it goes inactive: the state policy.

* :class:`ResetStates` (BAdam): they are dropped; the block starts afresh when its turn comes back.
* :class:`OffloadStates` (HiFT): they are parked in pinned host memory (:class:`StatePark`, copies on
  a side stream so that a switch does not wait for the link) and prefetched before the block
  returns, so the moments carry over block visits.

A policy keeps, per block, the flat groups' state tensors and the update rule's own state (a base
optimizer's, where it has one).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .block_state import FlatGroup

Key = Tuple[int, int]  # (block, dtype group) of a parked state
Specs = Dict[str, Tuple[Tuple[int, ...], torch.dtype]]


class ResetStates:
    """BAdam's policy: nothing is kept; every visit of a block starts with fresh states."""

    name = "reset"

    def __init__(self):
        self.park_of_states = StatePark()  # stays empty: nothing is ever parked

    def reserve(self, num_blocks: int, state_layout: Callable[[int], List[Tuple[Specs, torch.device]]]) -> None:
        pass

    def holds(self, block: int) -> bool:
        return False

    def park(self, block: int, groups: List[FlatGroup], rule_state: Optional[dict]) -> None:
        pass

    def prefetch(self, block: int, devices: List[torch.device]) -> None:
        pass

    def take(self, block: int, groups: List[FlatGroup]) -> Optional[dict]:
        raise KeyError(block)  # holds() is always False

    def host_bytes(self) -> int:
        return 0

    def state_dict(self) -> Tuple[dict, dict]:
        return {}, {}

    def load_state_dict(self, parked: dict, parked_rule: dict) -> None:
        pass


class OffloadStates:
    """HiFT's policy: an inactive block's states wait in host memory for its next turn.

    ``park`` (a :class:`StatePark`) holds the flat groups' tensors; the update rule's own state (a
    base optimizer's) is kept beside it on the CPU.
    """

    name = "offload"

    def __init__(self):
        self.park_of_states = StatePark()
        self.rule_states: Dict[int, dict] = {}

    def reserve(self, num_blocks: int, state_layout: Callable[[int], List[Tuple[Specs, torch.device]]]) -> None:
        """On CUDA: pin every block's host buffers up front (pinning is slow; a switch must not wait).
        ``state_layout(block)``: (state specs, device) of each of the block's flat groups."""
        for block in range(num_blocks):
            for gi, (specs, device) in enumerate(state_layout(block)):
                if device.type == "cuda":
                    self.park_of_states.reserve((block, gi), specs)

    def holds(self, block: int) -> bool:
        return self.park_of_states.holds(block)

    def park(self, block: int, groups: List[FlatGroup], rule_state: Optional[dict]) -> None:
        for gi, group in enumerate(groups):
            self.park_of_states.park((block, gi), group.state_tensors())
        if rule_state is not None:
            self.rule_states[block] = rule_state

    def prefetch(self, block: int, devices: List[torch.device]) -> None:
        for gi, device in enumerate(devices):
            self.park_of_states.prefetch((block, gi), device)

    def take(self, block: int, groups: List[FlatGroup]) -> Optional[dict]:
        """Load the block's parked states into its groups; return the rule's state (or None)."""
        for gi, group in enumerate(groups):
            group.load_states(self.park_of_states.take((block, gi), group.device))
        return self.rule_states.pop(block, None)

    def host_bytes(self) -> int:
        rule_bytes = sum(t.numel() * t.element_size() for state in self.rule_states.values() for t in _tensors(state))
        return self.park_of_states.nbytes() + rule_bytes

    def state_dict(self) -> Tuple[dict, dict]:
        """(parked flat states by (block, group), parked rule states by block), CPU copies."""
        return self.park_of_states.state_dict(), dict(self.rule_states)

    def load_state_dict(self, parked: dict, parked_rule: dict) -> None:
        self.park_of_states.load_state_dict(parked)
        self.rule_states = dict(parked_rule)


POLICIES = {"reset": ResetStates, "offload": OffloadStates}


def _tensors(obj):
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


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
