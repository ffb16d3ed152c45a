"""Data-parallel BAdam on ``torch.distributed`` (NCCL on CUDA, gloo on CPU), started by ``torchrun``.

Only the active block requires grad, so only its gradients cross the wire: with D blocks, about 1/D
of what DDP all-reduces. They already sit in one flat buffer per dtype group (``FlatGroup.grad``,
see ``block_state.py``), so one ``all_reduce`` per group per step is the whole communication; it
runs in ``AllReduceGradients.reduce``, before the finite check and the clipping, so every rank sees the
same averaged gradients and takes (or skips) the same step.

At construction the ranks are made to agree: rank 0's seed of the random block order is broadcast
(every rank then draws the same orders from the schedule's own generator), the parameter names,
shapes and dtypes are compared once (a digest per rank), and optionally rank 0's weights are
broadcast (``sync_module_states``).

``overlap=True`` launches each group's all-reduce asynchronously from a post-accumulate-grad hook
as soon as the last gradient of the group has arrived, so that it runs while backward goes on
below the active block (it only helps when backward does go on: with a trainable embedding or
without ``truncate_backward``). Accumulating gradients over several backward passes then needs
``with opt.no_sync():`` around all but the last one, as with DDP.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import weakref
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from ..optimizer import BlockOptimizer
from ..sync import LocalGradients

__all__ = ["AllReduceGradients", "DataParallelBlockOptimizer", "ProcessGroupSync", "comm_device", "init_distributed",
           "is_main_process"]


def init_distributed(backend: Optional[str] = None) -> Tuple[int, int, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment; return (rank, world_size, device).

    Picks NCCL when CUDA is available, gloo otherwise, and binds each rank to GPU ``LOCAL_RANK``.
    Without torchrun's variables it makes a group of one process, so the same script runs alone.
    Calling it again returns the existing group's values.
    """
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = backend or ("nccl" if use_cuda else "gloo")
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, device_id=device if use_cuda else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), device


def is_main_process() -> bool:
    """True on global rank 0, or when no process group is up. Never waits for the other ranks."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def comm_device(process_group=None) -> torch.device:
    """Where the group's collectives take their tensors: the current GPU for NCCL, else the CPU."""
    if dist.get_backend(process_group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class ProcessGroupSync(LocalGradients):
    """What every multi-process synchronisation shares: the process group, its size, and the
    agreements at start-up (the seed of the random block order, the parameters)."""

    def __init__(self, process_group=None):
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call badam_kernels.parallel.data_parallel."
                               "init_distributed() first (under torchrun)")
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self.comm_device = comm_device(process_group)

    def agree_on_seed(self, seed: int) -> int:
        """Rank 0's seed on every rank of the group: one broadcast (only random orders need it)."""
        t = torch.tensor([seed], dtype=torch.int64, device=self.comm_device)
        dist.broadcast(t, group_src=0, group=self.process_group)
        return int(t.item())

    def check_same_parameters(self, named) -> None:
        """One small all-gather: every rank must hold the same parameter names, shapes and dtypes."""
        digest = hashlib.sha256(repr([(n, tuple(p.shape), str(p.dtype)) for n, p in named]).encode()).hexdigest()
        digests: List[Optional[str]] = [None] * self.world_size
        dist.all_gather_object(digests, digest, group=self.process_group)
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise ValueError(f"ranks {differ} hold other parameters (names, shapes or dtypes) than rank 0: "
                             "every rank must build the same model")


class AllReduceGradients(ProcessGroupSync):
    """Data parallel: each flat gradient group averaged over the ranks by one all-reduce per step,
    launched at ``reduce`` or, with ``overlap``, from backward as soon as the group's last gradient
    has arrived. Counts the bytes it reduces."""

    def __init__(self, process_group=None, overlap: bool = False):
        super().__init__(process_group)
        self.overlap = overlap
        self.enabled = True  # False inside no_sync(): backward only accumulates
        self.bytes_last_step = 0
        self.bytes_total = 0
        self.pending: dict = {}  # group index -> async work of its all-reduce
        self._arrived: dict = {}  # group index -> entries whose gradient arrived in this backward
        self._hooks: list = []

    def _launch(self, group, async_op: bool):
        op = dist.ReduceOp.AVG if dist.get_backend(self.process_group) == "nccl" else dist.ReduceOp.SUM
        return dist.all_reduce(group.grad, op=op, group=self.process_group, async_op=async_op)

    def reduce(self, groups) -> None:
        """Average each group's flat gradient over the ranks: one all-reduce per group (or wait for it)."""
        if self.world_size == 1:
            self.pending.clear()
            self.bytes_last_step = 0
            return
        self._arrived.clear()
        for gi, group in enumerate(groups):
            work = self.pending.pop(gi, None)
            if work is not None:
                work.wait()
            else:
                self._launch(group, async_op=False)
            if dist.get_backend(self.process_group) != "nccl":  # gloo has no ReduceOp.AVG
                group.grad.div_(self.world_size)
        self.bytes_last_step = sum(g.grad.numel() * g.grad.element_size() for g in groups)
        self.bytes_total += self.bytes_last_step

    def activated(self, groups) -> None:
        """With ``overlap``: hooks that launch a group's all-reduce once its last gradient arrived."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self.pending.clear()
        self._arrived.clear()
        if not (self.overlap and self.world_size > 1):
            return
        me = weakref.ref(self)  # hooks hold the sync weakly, as block_state.py's hold their group
        for gi, group in enumerate(groups):
            for k, param in enumerate(group.params):
                # registered after the group's own hook, so the gradient is already in group.grad
                self._hooks.append(param.register_post_accumulate_grad_hook(_arrival_hook(me, gi, weakref.ref(group), k)))

    def zero_grad(self) -> None:
        for work in self.pending.values():  # a backward without step: let its reductions land first
            work.wait()
        self.pending.clear()
        self._arrived.clear()


def _arrival_hook(sync_ref, gi: int, group_ref, k: int):
    def hook(_param):
        sync, group = sync_ref(), group_ref()
        if sync is None or group is None:
            return  # the optimizer is gone, or the block went inactive
        arrived = sync._arrived.setdefault(gi, set())
        arrived.add(k)
        if len(arrived) == len(group.entries) and sync.enabled and gi not in sync.pending:
            sync.pending[gi] = sync._launch(group, async_op=True)

    return hook


class DataParallelBlockOptimizer(BlockOptimizer):
    """``BlockOptimizer`` whose active block's gradients are averaged over the ranks of a process group.

    Every rank holds the whole model and calls ``step`` after its own backward; the average of
    the ranks' gradients is then the gradient of the mean over the whole batch.
    ``bytes_reduced_last_step`` and ``bytes_reduced_total`` count the gradient bytes all-reduced.
    ``sync_module_states``: broadcast rank 0's weights first; ``overlap``: see the module docstring.
    """

    def __init__(self, base_optimizer, named_parameters_list, *args, process_group=None,
                 sync_module_states: bool = False, overlap: bool = False, **kwargs):
        sync = AllReduceGradients(process_group, overlap)
        named = list(named_parameters_list)
        sync.check_same_parameters(named)
        if sync_module_states:
            with torch.no_grad():
                for _, p in named:
                    dist.broadcast(p.data, group_src=0, group=process_group)
        super().__init__(base_optimizer, named, *args, sync=sync, **kwargs)

    bytes_reduced_last_step = property(lambda self: self.sync.bytes_last_step, doc="gradient bytes of the last step")
    bytes_reduced_total = property(lambda self: self.sync.bytes_total, doc="gradient bytes all-reduced so far")

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes in here only accumulate (no all-reduce is launched); ``step`` still reduces."""
        previous, self.sync.enabled = self.sync.enabled, False
        try:
            yield
        finally:
            self.sync.enabled = previous
