"""Where the bytes are: weights, master copy, moments, gradients, host-parked states."""
from __future__ import annotations

from typing import Dict

import torch

from .block_state import local_shard


def _nbytes(t) -> int:
    """Bytes this process holds: a DTensor's (FSDP2) local shard only."""
    if t is None:
        return 0
    t = local_shard(t)
    return t.numel() * t.element_size()


def memory_report(optimizer, model: torch.nn.Module) -> Dict[str, int]:
    """Bytes held per category by a model trained with a :class:`BlockOptimizer`.

    Per process: of sharded (FSDP2) parameters, the local shards. ``weights``: every model parameter; ``master``: the active block's fp32 master copy;
    ``moments``: its optimizer states (Adam's m and v, or the base optimizer's); ``grads``: gradient
    buffers; ``host_parked``: states of inactive blocks parked in host memory (``offload`` policy).
    """
    weights = sum(_nbytes(p) for p in model.parameters())
    master = sum(_nbytes(g.master) for g in optimizer.groups)
    moments = sum(_nbytes(g.exp_avg) + _nbytes(g.exp_avg_sq) for g in optimizer.groups)
    if not optimizer.fused:
        moments += sum(_nbytes(v) for state in optimizer.base_optimizer.state.values()
                       for v in state.values() if torch.is_tensor(v))
    flat_grads = {g.grad.data_ptr() for g in optimizer.groups if g.grad is not None}
    grads = sum(_nbytes(g.grad) for g in optimizer.groups if g.grad is not None)
    grads += sum(_nbytes(p.grad) for p in model.parameters()
                 if p.grad is not None and local_shard(p.grad).untyped_storage().data_ptr() not in flat_grads)
    return {"weights": weights, "master": master, "moments": moments, "grads": grads,
            "host_parked": optimizer.policy.host_bytes()}


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
