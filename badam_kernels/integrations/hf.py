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
from typing import List, Optional

import torch
from transformers import Trainer, TrainerCallback

from .. import BlockOptimizer, compile_layers, is_truncated, truncate_backward

__all__ = ["BAdamConfig", "BAdamTrainer", "FreeBlockGradsCallback", "make_badam_optimizer"]


@dataclass
class BAdamConfig:
    """The BlockOptimizer arguments that are not AdamW's (see ``BlockOptimizer`` for each)."""

    switch_block_every: int = 50
    switch_mode: str = "descending"
    start_block: Optional[int] = None
    block_prefix_list: Optional[List[List[str]]] = None  # None: one block per layer
    active_modules: Optional[List[str]] = None
    include_embedding: bool = False
    include_lm_head: bool = False
    state_policy: str = "reset"
    backend: Optional[str] = None
    master_weights: bool = True
    state_dtype: torch.dtype = torch.float32
    max_grad_norm: Optional[float] = None  # the BlockOptimizer's fused clipping; under the Trainer use args.max_grad_norm
    skip_nonfinite: bool = True
    prefetch_steps: int = 1
    seed: Optional[int] = None  # random block order; BAdamTrainer uses args.seed when None
    truncate: bool = True  # install truncate_backward on the model
    keep_activations: object = 0  # truncate_backward's: top layers that skip checkpointing (int or "all")
    keep_mode: str = "all"  # truncate_backward's: what those layers keep ("all" or "matmuls")
    compile_layers: bool = False  # torch.compile each layer of the stack (badam_kernels.compile_layers)
    verbose: int = 0


def make_badam_optimizer(model: torch.nn.Module, config: Optional[BAdamConfig] = None,
                         **adamw_kwargs) -> BlockOptimizer:
    """A ``BlockOptimizer`` over ``torch.optim.AdamW(model.parameters(), **adamw_kwargs)``.

    Also installs ``truncate_backward(model, keep_activations=config.keep_activations)`` (once;
    ``config.truncate=False`` skips it) and, with ``config.compile_layers``, compiles each layer
    (regional compilation; leave the Trainer's ``torch_compile`` off, it compiles the whole model). Build it
    after the model is on its device and before handing it to a Trainer or ``accelerator.prepare``.
    """
    config = config or BAdamConfig()
    base = torch.optim.AdamW(model.parameters(), **adamw_kwargs)
    optimizer = BlockOptimizer(
        base, list(model.named_parameters()), block_prefix_list=config.block_prefix_list,
        switch_block_every=config.switch_block_every, start_block=config.start_block,
        switch_mode=config.switch_mode, active_modules=config.active_modules,
        include_embedding=config.include_embedding, include_lm_head=config.include_lm_head,
        verbose=config.verbose, state_policy=config.state_policy, backend=config.backend,
        master_weights=config.master_weights, state_dtype=config.state_dtype,
        max_grad_norm=config.max_grad_norm, skip_nonfinite=config.skip_nonfinite,
        prefetch_steps=config.prefetch_steps, seed=config.seed)
    if config.truncate and not is_truncated(model):
        truncate_backward(model, keep_activations=config.keep_activations, keep_mode=config.keep_mode)
    if config.compile_layers:
        compile_layers(model)  # once: layers already compiled are left as they are
    return optimizer


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

    ``badam``: a :class:`BAdamConfig` (default: ``BAdamConfig()``). AdamW takes ``learning_rate``,
    ``adam_beta1/2``, ``adam_epsilon`` and ``weight_decay`` from the ``TrainingArguments``; ``optim``
    is not consulted. The LR scheduler, ``max_grad_norm``, ``gradient_accumulation_steps``,
    checkpointing and ``resume_from_checkpoint`` are the Trainer's own.
    """

    def __init__(self, *args, badam: Optional[BAdamConfig] = None, **kwargs):
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
