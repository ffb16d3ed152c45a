"""Gradient accumulation: one optimizer step over ``--grad-accum`` micro-batches of ``--batch-size``.

Optimizer step ``s`` takes the micro-batches ``s * N .. s * N + N - 1`` of the data stream (the data
position counts micro-batches, so a resumed run takes the same ones), runs forward and backward on
each, and leaves their summed gradients for one ``optimizer.step()``. Each micro-batch's loss (a mean
over its target tokens) is weighted by its share of the step's target tokens, so the gradient is the
one of the mean over all of the step's target tokens: ``--batch-size b --grad-accum 2`` trains as
``--batch-size 2b`` (the same examples, the same loss; equal to rounding). The logged loss is that
token-weighted mean; ``--switch-every``, ``--steps`` and the LR schedule count optimizer steps.
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from .data import IGNORE_INDEX
from .launch import rows_of_rank


def target_tokens(labels: torch.Tensor) -> int:
    """The tokens a causal-LM loss is taken over: labels shifted by one, ``IGNORE_INDEX`` left out."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def micro_weights(counts: List[int]) -> List[float]:
    """Each micro-batch's share of the step's target tokens (equal shares where none has any)."""
    total = sum(counts)
    return [c / total for c in counts] if total else [1.0 / len(counts)] * len(counts)


def forward_backward(run, step: int) -> Tuple[torch.Tensor, int]:
    """Forward and backward of optimizer step ``step`` on this rank's rows; returns (the step's loss,
    detached; the tokens fed to the model over all ranks)."""
    n = run.cfg.grad_accum
    batches = [run.batches.batch(step * n + j) for j in range(n)]
    rows = [rows_of_rank(batch, run.rank, run.world) for batch in batches]
    num_tokens = sum(batch.num_tokens for batch in batches)
    if n == 1:  # as without accumulation, to the bit
        loss = run.loss_fn(**rows[0].model_inputs(run.device))
        loss.backward()
        return loss.detach(), num_tokens
    weights = micro_weights([target_tokens(r.labels) for r in rows])
    total = None
    for micro, weight in zip(rows, weights):
        loss = run.loss_fn(**micro.model_inputs(run.device))
        (loss * weight).backward()
        part = loss.detach().float() * weight
        total = part if total is None else total + part
        del loss
    return total, num_tokens
