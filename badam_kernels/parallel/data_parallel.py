"""Data-parallel BAdam on ``torch.distributed`` (NCCL on CUDA, gloo on CPU), started by ``torchrun``.

Only the active block requires grad, so only its gradients cross the wire: with D blocks, about 1/D
of what DDP all-reduces. They already sit in one flat buffer per dtype group (``FlatGroup.grad``,
see ``block_state.py``), so one ``all_reduce`` per group per step is the whole communication; it
runs in ``_reduce_gradients``, before the finite check and the clipping, so every rank sees the
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

__all__ = ["DataParallelBlockOptimizer", "agreed_seed", "comm_device", "init_distributed", "is_main_process"]


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


def agreed_seed(seed: Optional[int], process_group=None) -> int:
    """Rank 0's seed (drawn from its global RNG when None) on every rank of the group: one broadcast."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    t = torch.tensor([seed], dtype=torch.int64, device=comm_device(process_group))
    dist.broadcast(t, group_src=0, group=process_group)
    return int(t.item())


class DataParallelBlockOptimizer(BlockOptimizer):
    """``BlockOptimizer`` whose active block's gradients are averaged over the ranks of a process group.

    Takes the arguments of :class:`BlockOptimizer`, plus (keyword-only):
        process_group: the ranks to average over (default: the whole world).
        sync_module_states: broadcast rank 0's parameters once, before anything else, so that ranks
            that initialised their models differently start identical.
        overlap: launch each group's all-reduce from a backward hook (see the module docstring).

    Each rank's loss must be the mean over its own shard, with equal shard sizes: the average of
    the ranks' gradients is then the gradient of the mean over the whole batch.
    ``bytes_reduced_last_step`` and ``bytes_reduced_total`` count the gradient bytes all-reduced.
    """

    def __init__(self, base_optimizer, named_parameters_list, *args, process_group=None,
                 sync_module_states: bool = False, overlap: bool = False, seed: Optional[int] = None, **kwargs):
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call badam_kernels.distributed."
                               "init_distributed() first (under torchrun)")
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self.bytes_reduced_last_step = 0
        self.bytes_reduced_total = 0
        self.overlap = overlap
        self._sync_enabled = True
        self._pending: dict = {}  # group index -> async work of its all-reduce
        self._arrived: dict = {}  # group index -> entries whose gradient arrived in this backward
        self._overlap_hooks: list = []
        named = list(named_parameters_list)
        self._check_same_parameters(named)
        if sync_module_states:
            self._broadcast_parameters(named)
        super().__init__(base_optimizer, named, *args, seed=agreed_seed(seed, process_group), **kwargs)

    # ---------------------------------------------------------------- agreement at construction
    def _broadcast_from_rank0(self, tensor: torch.Tensor) -> None:
        dist.broadcast(tensor, group_src=0, group=self.process_group)

    def _check_same_parameters(self, named) -> None:
        """One small all-gather: every rank must hold the same parameter names, shapes and dtypes."""
        digest = hashlib.sha256(repr([(n, tuple(p.shape), str(p.dtype)) for n, p in named]).encode()).hexdigest()
        digests: List[Optional[str]] = [None] * self.world_size
        dist.all_gather_object(digests, digest, group=self.process_group)
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise ValueError(f"ranks {differ} hold other parameters (names, shapes or dtypes) than rank 0: "
                             "every rank must build the same model")

    def _broadcast_parameters(self, named) -> None:
        with torch.no_grad():
            for _, p in named:
                self._broadcast_from_rank0(p.data)

    # ---------------------------------------------------------------- the reduction
    def _grad_bytes(self) -> int:
        return sum(g.grad.numel() * g.grad.element_size() for g in self.groups)

    def _launch(self, group, async_op: bool):
        op = dist.ReduceOp.AVG if dist.get_backend(self.process_group) == "nccl" else dist.ReduceOp.SUM
        return dist.all_reduce(group.grad, op=op, group=self.process_group, async_op=async_op)

    def _reduce_gradients(self) -> None:
        """Average each group's flat gradient over the ranks: one all-reduce per group (or wait for it)."""
        if self.world_size == 1:
            self._pending.clear()
            self.bytes_reduced_last_step = 0
            return
        self._arrived.clear()
        for gi, group in enumerate(self.groups):
            work = self._pending.pop(gi, None)
            if work is not None:
                work.wait()
            else:
                self._launch(group, async_op=False)
            if dist.get_backend(self.process_group) != "nccl":  # gloo has no ReduceOp.AVG
                group.grad.div_(self.world_size)
        self.bytes_reduced_last_step = self._grad_bytes()
        self.bytes_reduced_total += self.bytes_reduced_last_step

    # ---------------------------------------------------------------- overlap with backward
    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes in here only accumulate (no all-reduce is launched); ``step`` still reduces."""
        previous, self._sync_enabled = self._sync_enabled, False
        try:
            yield
        finally:
            self._sync_enabled = previous

    def _activate(self, block: int, saved: Optional[dict] = None) -> None:
        super()._activate(block, saved)
        if self.overlap and self.world_size > 1:
            self._install_overlap_hooks()

    def _install_overlap_hooks(self) -> None:
        for handle in self._overlap_hooks:
            handle.remove()
        self._overlap_hooks = []
        self._pending.clear()
        self._arrived.clear()
        me = weakref.ref(self)  # hooks hold the optimizer weakly, as block_state.py's do their group
        for gi, group in enumerate(self.groups):
            for k, param in enumerate(group.params):
                # registered after the group's own hook, so the gradient is already in group.grad
                self._overlap_hooks.append(param.register_post_accumulate_grad_hook(
                    _arrival_hook(me, gi, weakref.ref(group), k)))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for work in self._pending.values():  # a backward without step: let its reductions land first
            work.wait()
        self._pending.clear()
        self._arrived.clear()
        super().zero_grad(set_to_none)


def _arrival_hook(opt_ref, gi: int, group_ref, k: int):
    def hook(_param):
        opt, group = opt_ref(), group_ref()
        if opt is None or group is None or not any(g is group for g in opt.groups):
            return  # the optimizer is gone, or the block went inactive
        arrived = opt._arrived.setdefault(gi, set())
        arrived.add(k)
        if len(arrived) == len(group.entries) and opt._sync_enabled and gi not in opt._pending:
            opt._pending[gi] = opt._launch(group, async_op=True)

    return hook
