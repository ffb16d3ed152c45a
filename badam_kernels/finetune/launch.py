"""Where and how the job runs: the device, one process or the ranks of a ``torchrun`` job, the
optimizer class that fits (one process, data parallel, FSDP2-sharded), and the few collectives the
loop needs (rank 0's run folder on every rank, the loss and the stop request agreed over the ranks).

Under ``torchrun`` each rank takes its rows of every global batch and rank 0 reports and writes. By
default every rank holds the whole model (data parallel); ``shard=True`` shards the model and the
optimizer states over the ranks with FSDP2 (``badam_kernels.parallel.fsdp``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import time
from typing import Dict, Optional, Tuple

import torch

from .config import ConfigError, TrainConfig, one_line, require


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    require(name != "cuda" or torch.cuda.is_available(), "--device cuda: no CUDA device is available")
    return torch.device(name)


def processes(cfg: TrainConfig) -> Tuple[int, int, torch.device]:
    """(rank, world size, device): one process, or the ranks of a ``torchrun`` job; ``shard`` always
    joins a process group (of one process, without torchrun)."""
    device = pick_device(cfg.device)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and not cfg.shard:
        return 0, 1, device
    require(torch.distributed.is_available(), "--shard and torchrun need torch.distributed, which this "
            "torch build lacks")
    from ..parallel.data_parallel import init_distributed

    rank, world, device = init_distributed("gloo" if device.type == "cpu" else None)
    require(cfg.batch_size % world == 0,
            f"--batch-size {cfg.batch_size} must divide evenly over the {world} processes of the job")
    return rank, world, device


def check_backend(name: str, device: torch.device) -> None:
    """A forced ``--backend`` runs on ``device``, or the job stops before the model loads."""
    if name == "auto":
        return
    from .. import ops

    try:
        ops.resolve_backend(name, device)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"--backend {name}: {one_line(exc)}") from None


def optimizer_class(shard: bool, world: int):
    """(class, extra arguments) of the job's optimizer: sharded (FSDP2), data parallel or one process."""
    if shard:
        from ..parallel.fsdp import ShardedBlockOptimizer

        return ShardedBlockOptimizer, {}
    if world == 1:
        from .. import BlockOptimizer

        return BlockOptimizer, {}
    from ..parallel.data_parallel import DataParallelBlockOptimizer

    return DataParallelBlockOptimizer, {"sync_module_states": True}


def shard_model(model: torch.nn.Module, device: torch.device, world: int) -> None:
    """``parallel.fsdp.shard_model`` over a mesh of every process of the job, on the job's device type.

    Every rank built the same weights (the same seed, or the same files), so each keeps its shard of
    its own copy; there is nothing to broadcast.
    """
    from torch.distributed.device_mesh import init_device_mesh

    from ..parallel.fsdp import shard_model as fully_shard_model

    fully_shard_model(model, mesh=init_device_mesh(device.type, (world,)))


def on_every_rank(value, world: int):
    """Rank 0's ``value`` (a picklable object) on every rank of the job."""
    if world == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def rows_of_rank(batch, rank: int, world: int):
    """This rank's rows of the global batch (all of it in a single process)."""
    if world == 1:
        return batch
    rows = batch.input_ids.shape[0] // world
    take = slice(rank * rows, (rank + 1) * rows)
    mask = None if batch.attention_mask is None else batch.attention_mask[take]
    positions = getattr(batch, "position_ids", None)  # packed rows
    extra = {} if positions is None else {"position_ids": positions[take]}
    return dataclasses.replace(batch, input_ids=batch.input_ids[take], labels=batch.labels[take],
                               attention_mask=mask, **extra)


def agree_over_ranks(loss: torch.Tensor, stop_requested: bool, world: int) -> Tuple[float, bool]:
    """The loss of the global batch (mean of the ranks' shard losses), for the log, and whether any
    rank was asked to stop: in one all-reduce, so that every rank stops after the same step (a rank
    stopping alone would leave the others waiting in a collective)."""
    if world == 1:
        return loss.item(), stop_requested
    import torch.distributed as dist

    both = torch.stack([loss.detach().float().reshape(()), torch.tensor(float(stop_requested), device=loss.device)])
    dist.all_reduce(both)
    return (both[0] / world).item(), bool(both[1] > 0)


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory so far: allocated CUDA memory on a GPU, the process' peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


class PeakMemory:
    """The allocated peak of the training steps, with the evaluations' apart. CUDA keeps one peak counter;
    it is read and reset around each evaluation, so that an eval batch larger than the training's
    (``--eval-batch-size``) does not show as the steps' memory. On the CPU the one peak is the process'
    resident set, which cannot be reset: there both are that peak as it stood when each was last read."""

    def __init__(self, device: torch.device):
        self.device = device
        self._steps_before = 0.0  # the steps' allocated peak up to the last evaluation (the counter was reset there)
        self._reserved_before = 0.0  # the allocator's reserved peak up to the last reset
        self.eval_mib: Optional[float] = None  # None: no evaluation yet

    def steps_mib(self) -> float:
        """The training steps' peak so far (weights, gradients, optimizer state and activations)."""
        return max(self._steps_before, peak_memory_mib(self.device))

    def overall_mib(self) -> float:
        """What the run needed at most: the steps' peak or an evaluation's, whichever is larger."""
        return max(self.steps_mib(), self.eval_mib or 0.0)

    def held_mib(self) -> Dict[str, Optional[float]]:
        """Beyond the allocated peak, on a GPU: the allocator's reserved peak over the run, evaluations included
        (allocated plus its cached, fragmented blocks), and what the whole device has in use now (every process'
        CUDA context, loaded kernels and reserve: what the card must hold); None on the CPU."""
        if self.device.type != "cuda":
            return {"peak_reserved_mib": None, "device_used_mib": None}
        free, total = torch.cuda.mem_get_info(self.device)
        return {"peak_reserved_mib": round(self._reserved_mib(), 1), "device_used_mib": round((total - free) / 2**20, 1)}

    @contextlib.contextmanager
    def evaluating(self):
        """Count what is allocated inside as an evaluation's, not the steps'."""
        cuda = self.device.type == "cuda"
        if cuda:
            self._steps_before = self.steps_mib()
            self._reset()
        try:
            yield
        finally:
            self.eval_mib = max(self.eval_mib or 0.0, peak_memory_mib(self.device))
            if cuda:  # the steps' counter starts again from what is allocated now
                self._reset()

    def _reserved_mib(self) -> float:
        return max(self._reserved_before, torch.cuda.max_memory_reserved(self.device) / 2**20)

    def _reset(self) -> None:  # CUDA's peak counters start again from what is held now; the reserved peak is kept
        self._reserved_before = self._reserved_mib()
        torch.cuda.reset_peak_memory_stats(self.device)


class StopFlag:
    """Ctrl-C, or SIGTERM (what a batch scheduler or a preempted machine sends before it kills), asks the
    loop to stop after the current step and save; a second signal interrupts at once. So does the clock
    passing ``deadline`` (a ``time.monotonic()``; ``--time-limit``), checked after each step."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM") if hasattr(signal, name))

    def __init__(self, deadline: Optional[float] = None):
        self.set = False
        self.deadline = deadline
        self._previous = {}

    @property
    def requested(self) -> bool:
        """Whether to stop after this step: a signal came, or the time is up."""
        return self.set or self._time_up()

    @property
    def reason(self) -> str:
        """What asked this rank to stop: ``"signal"``, ``"time limit"``, or ``"another rank"`` (its signal
        or its clock, agreed over the ranks)."""
        if self.set:
            return "signal"
        return "time limit" if self._time_up() else "another rank"

    def _time_up(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def __enter__(self):
        if _in_main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            if previous is not None:  # None: a handler not set from Python, which cannot be put back
                signal.signal(sig, previous)
        self._previous = {}
        return False


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
