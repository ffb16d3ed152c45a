"""Learning-rate schedules of the main job: constant, linear or cosine decay after a linear warm-up.

The factor that multiplies ``--lr`` at optimizer step ``s`` (0-based) of a run of ``total`` steps
with ``warmup`` warm-up steps:

* warm-up (``s < warmup``): ``(s + 1) / warmup``: the first step already moves (never a step at
  LR 0), the last warm-up step reaches the full LR;
* then ``constant``: 1; ``linear``: ``(total - s) / (total - warmup)``, down to ``1 / (total -
  warmup)`` at the last step; ``cosine``: ``(1 + cos(pi * (s - warmup) / (total - warmup))) / 2``.

These are torch's own schedulers, chained: the warm-up is ``LinearLR(start_factor=1/warmup,
total_iters=warmup - 1)``, the linear decay ``LinearLR(1, 0, total_iters=total - warmup)``, the
cosine ``CosineAnnealingLR(T_max=total - warmup)`` (tests/test_finetune_training.py compares them).
The factor is a pure function of the step, so a resumed run continues the same curve; ``total`` is
the run's target step (on ``--resume --steps N`` the decay stretches to the new target).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

LR_SCHEDULES = ("constant", "linear", "cosine")


def warmup_steps(steps: int, ratio: float, total: int) -> int:
    """The warm-up in steps: ``steps``, or ``ceil(ratio * total)`` when a ratio is given (as Hugging Face)."""
    return math.ceil(ratio * total) if ratio else int(steps)


def lr_factor(step: int, kind: str, warmup: int, total: int) -> float:
    """The LR multiplier at optimizer step ``step`` (0-based); see the module's docstring."""
    if kind not in LR_SCHEDULES:
        raise ValueError(f"unknown LR schedule {kind!r}; choose one of {', '.join(LR_SCHEDULES)}")
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    span = total - warmup
    if span <= 0:  # the whole run is warm-up (or past its end)
        return 1.0 if kind == "constant" else 0.0
    done = min(step - warmup, span)
    if kind == "linear":
        return (span - done) / span
    return 0.5 * (1.0 + math.cos(math.pi * done / span))


def build_scheduler(optimizer, kind: str = "constant", warmup: int = 0, total: Optional[int] = None):
    """A ``LambdaLR`` over ``optimizer`` with :func:`lr_factor`. Its state dict holds only the step
    (the factor is a closure), so a run resumed towards another target keeps its checkpointed step."""
    total = total if total is not None else warmup

    def factor(step: int) -> float:
        return lr_factor(step, kind, warmup, total)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
