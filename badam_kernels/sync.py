"""Gradient synchronisation of the active block: what ``BlockOptimizer`` does between backward and
the update when more than one process trains.

:class:`LocalGradients` is the one-process case (nothing to do). ``parallel/data_parallel.py``
(all-reduce of the active block's flat gradients) and ``parallel/fsdp.py`` (FSDP2 shards) provide
the others. A synchronisation object answers:

* ``group_class``: the flat group to build (``FlatGroup``, or one over local shards);
* ``norm_is_local``: whether one process's gradient is the whole gradient, so that the fused kernel
  may compute the norm, check it and clip by it on its own;
* ``agree_on_seed(seed)``: the seed every process uses for the random block order;
* ``activated(groups)``, ``reduce(groups)``, ``squared_norm(groups)``, ``before_update(groups)``,
  ``after_update(groups)``, ``zero_grad()``: the hooks of a step, in that order.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import Tensor

from .block_state import Entry, FlatGroup, layout


class LocalGradients:
    """One process holds the whole model and the whole gradient: nothing is synchronised."""

    group_class = FlatGroup
    norm_is_local = True

    def flat_numel(self, entries: Sequence[Entry]) -> int:
        """Length of the flat buffers of a group of these parameters (padding included)."""
        return layout(entries)[2]

    def agree_on_seed(self, seed: int) -> int:
        return seed

    def activated(self, groups: List[FlatGroup]) -> None:
        pass

    def reduce(self, groups: List[FlatGroup]) -> None:
        pass

    def squared_norm(self, groups: List[FlatGroup]) -> Tensor:
        """Sum of squares of the active block's gradient (as it stands: still scaled under GradScaler)."""
        squares = [torch.linalg.vector_norm(g.grad.float(), 2) ** 2 for g in groups]
        return torch.stack([s.to(squares[0].device) for s in squares]).sum()

    def before_update(self, groups: List[FlatGroup]) -> None:
        pass

    def after_update(self, groups: List[FlatGroup]) -> None:
        pass

    def zero_grad(self) -> None:
        pass
