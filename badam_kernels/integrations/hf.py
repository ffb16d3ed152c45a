"""BAdam under the Hugging Face ``Trainer``: save/resume, LR schedulers, accumulation and clipping keep working.

Two ways in::

    # 1. the Trainer builds the optimizer (AdamW hyperparameters from TrainingArguments)
    trainer = BAdamTrainer(model=model, args=args, train_dataset=ds, badam=BAdamConfig(switch_block_every=50))

    # 2. a plain Trainer given the optimizer (its scheduler is made by the Trainer when None)
    optimizer = make_badam_optimizer(model, BAdamConfig(switch_block_every=50), lr=1e-5)
    trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(optimizer, None),
                      callbacks=[FreeBlockGradsCallback()])

How the Trainer meets ``BlockOptimizer`` (transformers 5.24, accelerate 1.15):

* ``create_optimizer`` runs once per ``train()`` and only while ``trainer.optimizer`` is None; the
  optimizer is then wrapped by ``accelerator.prepare`` in an ``AcceleratedOptimizer``, which calls
  ``optimizer.load_state_dict(optimizer.state_dict())`` to place the states: a BlockOptimizer
  survives it (the active block is rebuilt from the same states).
* Checkpoints: ``torch.save(optimizer.state_dict())`` to ``optimizer.pt`` and, on resume,
  ``load_state_dict(torch.load(..., weights_only=True))`` after the model weights are loaded and the
  optimizer is built: the BlockOptimizer state dict (schedule, step, active and parked states) loads
  under ``weights_only``, so a resumed run continues on the same block with the same moments.
* Clipping (``max_grad_norm``): ``clip_grad_norm_(model.parameters())`` before ``step()``; the active
  block's ``.grad`` are views of the flat gradient buffer, so clipping them in place clips what the
  fused step reads. The BlockOptimizer's own ``max_grad_norm`` is therefore left off here.
* Gradient accumulation: backward runs several times before ``step()``; gradients accumulate in
  place in the flat buffer. After the step the Trainer calls ``model.zero_grad()`` (not the
  optimizer's), which drops ``.grad`` but not the flat buffer: ``FreeBlockGradsCallback`` (installed
  by ``BAdamTrainer``) frees it at ``on_step_end`` so that it takes no memory during the next forward.
* Activation checkpointing (``TrainingArguments(activation_checkpointing=True)``) calls
  ``enable_input_require_grads``, which makes the embedding output require grad; the truncation
  installed by ``truncate_backward`` still runs the layers below the active block without autograd.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from transformers import Trainer, TrainerCallback

from .. import BlockOptimizer
from ..options import BAdamOptions, boolean, option, with_default

__all__ = ["BAdamConfig", "BAdamTrainer", "FreeBlockGradsCallback", "make_badam_optimizer"]


@dataclass
class BAdamConfig(BAdamOptions):
    """``BAdamOptions`` (the BlockOptimizer's options and the truncation knobs), silent by default: the
    Trainer logs. ``max_grad_norm`` is the BlockOptimizer's fused clipping; under the Trainer use
    ``TrainingArguments.max_grad_norm``. ``seed``: ``BAdamTrainer`` uses ``args.seed`` when None."""

    verbose: int = with_default(BAdamOptions, "verbose", 0)
    fast: bool = option(False, "the fast path in one switch: liger-kernel's fused linear cross-entropy (its model "
                        "patching, where installed and the model type is supported; else a warning and the plain "
                        "loss), compiled layers, and every layer from the active block up keeping its activations "
                        "under gradient checkpointing (keep_activations='all' unless set)", check=boolean)


def make_badam_optimizer(model: torch.nn.Module, config: Optional[BAdamOptions] = None,
                         **adamw_kwargs) -> BlockOptimizer:
    """A ``BlockOptimizer`` over ``torch.optim.AdamW(model.parameters(), **adamw_kwargs)`` with
    ``config``'s options (a :class:`BAdamConfig` or any ``BAdamOptions``; default ``BAdamConfig()``).

    ``config.fast`` (a :class:`BAdamConfig`'s): the fast path first (``_fast``: liger's fused loss,
    compiled layers, activations kept). Also installs ``truncate_backward(model, keep_activations=..., keep_mode=...)`` (once;
    ``config.truncate=False`` skips it) and, with ``config.compile_layers``, compiles each layer
    (regional compilation; leave the Trainer's ``torch_compile`` off, it compiles the whole model). Build it
    after the model is on its device and before handing it to a Trainer or ``accelerator.prepare``.
    """
    config = config or BAdamConfig()
    if getattr(config, "fast", False):
        config = _fast(model, config)
    base = torch.optim.AdamW(model.parameters(), **adamw_kwargs)
    optimizer = BlockOptimizer(base, list(model.named_parameters()), **config.optimizer_kwargs())
    config.prepare_model(model)
    return optimizer


def _fast(model: torch.nn.Module, config: BAdamOptions) -> BAdamOptions:
    """``fast=True``: liger's fused-loss patching of this model instance (once), compiled layers, and
    every layer keeping its activations where the config keeps none (the default)."""
    from ..finetune.fast import patch_model

    reason = patch_model(model)  # once a model (a second optimizer over it patches nothing)
    if reason is not None:
        warnings.warn(f"BAdamConfig(fast=True): {reason}; the model keeps its plain loss")
    keep = "all" if config.keep_activations == 0 else config.keep_activations
    return dataclasses.replace(config, compile_layers=True, keep_activations=keep)


def _unwrap(optimizer):
    """The BlockOptimizer inside Accelerate's (possibly nested) wrappers, or None."""
    while optimizer is not None and not isinstance(optimizer, BlockOptimizer):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


class FreeBlockGradsCallback(TrainerCallback):
    """Frees the active block's flat gradient buffer after each optimizer step.

    The Trainer calls ``model.zero_grad()``, which sets every ``.grad`` to None but leaves the
    BlockOptimizer's flat buffer allocated until the next backward; ``optimizer.zero_grad()`` frees it.
    """

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        block_optimizer = _unwrap(optimizer)
        if block_optimizer is not None:
            block_optimizer.zero_grad(set_to_none=True)


class BAdamTrainer(Trainer):
    """``transformers.Trainer`` that trains with ``BlockOptimizer`` over ``torch.optim.AdamW``.

    ``badam``: a :class:`BAdamConfig` or ``BAdamOptions`` (default: ``BAdamConfig()``). AdamW takes ``learning_rate``,
    ``adam_beta1/2``, ``adam_epsilon`` and ``weight_decay`` from the ``TrainingArguments``; ``optim``
    is not consulted. The LR scheduler, ``max_grad_norm``, ``gradient_accumulation_steps``,
    checkpointing and ``resume_from_checkpoint`` are the Trainer's own.
    """

    def __init__(self, *args, badam: Optional[BAdamOptions] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.badam_config = badam or BAdamConfig()
        if not self.args.optim.startswith("adamw_torch"):
            warnings.warn(f"BAdamTrainer trains with torch.optim.AdamW inside BlockOptimizer; "
                          f"optim={self.args.optim!r} is ignored")
        self.add_callback(FreeBlockGradsCallback())

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            config = self.badam_config
            if config.seed is None:
                config = dataclasses.replace(config, seed=self.args.seed)
            self.optimizer = make_badam_optimizer(
                self.model if model is None else model, config, lr=self.args.learning_rate,
                betas=(self.args.adam_beta1, self.args.adam_beta2), eps=self.args.adam_epsilon,
                weight_decay=self.args.weight_decay)
        return self.optimizer

    @property
    def block_optimizer(self) -> Optional[BlockOptimizer]:
        """The BlockOptimizer (unwrapped from Accelerate), None before training builds it."""
        return _unwrap(self.optimizer)
