"""Truncated backward: the layers below the active block build no graph and save no activations.

With block k active, nothing below layer k is trainable, so backward never needs to go there; but
autograd goes anyway when the layers' input requires grad, which Hugging Face arranges whenever
gradient checkpointing is on (``enable_input_require_grads`` makes the embedding output require
grad), so every layer is recomputed and differentiated whatever block is active.

``truncate_backward(model)`` gives each layer of the stack a ``__call__`` that decides per call:

* below the lowest layer with a trainable parameter: run under ``torch.no_grad()`` (also skips
  checkpointing: there is nothing to recompute);
* the lowest trainable layer: its tensor inputs are detached (backward stops at its weights; with
  the reentrant checkpointing variant they become leaves that require grad, since that variant
  returns no graph when no input requires grad);
* otherwise: unchanged, except that with ``keep_activations=n`` the top ``n`` layers from the
  lowest trainable one up run without gradient checkpointing (``keep_mode="all"``), or under a
  selective checkpoint that keeps only the outputs of matrix products and attention and recomputes
  the elementwise operations in backward (``keep_mode="matmuls"``: norms, rotary embedding, SiLU and
  products are cheap to redo but hold about a third of a frozen Llama layer's activations).

Why the last option: above the active block the layers are frozen, so their backward only computes
input gradients (about one forward's FLOPs), but checkpointing first re-runs their forward: half
of what backward costs there. Run without checkpointing they keep their activations instead
(frozen linears save no input, so less than a trainable layer keeps; measured on the Llama-3-8B
shape at 2x1024 tokens: 0.25 GiB per layer, and 1.25x the tokens/s with every layer kept);
``n`` trades that memory for the recompute. ``keep_mode="matmuls"`` saves about a third of the
kept memory but measured slower than not keeping at all on that shape (14.3k against 14.7k tokens/s:
selective checkpointing runs every operation through a Python dispatch mode); fewer kept layers are
the better trade for an in-between budget.

Under FSDP2 the layers below the active block are also told not to all-gather in backward
(``set_unshard_in_backward(False)``): FSDP2's backward prefetch would otherwise gather the layer
below the lowest trainable one, which backward never reaches.

Nothing is truncated while a parameter that comes before the stack (the embedding, or an lm_head
tied to it) is trainable, since then gradients must flow through every layer. The ``__call__`` is
installed by swapping each layer's class for a subclass, so it sits outside any wrapper the layer's
own class puts around ``forward`` (checkpointing, FSDP); ``remove()`` restores the classes.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Dict, List, Optional, Union

import torch
import torch.utils.checkpoint
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from .layers import find_layer_stack

_BELOW, _LOWEST, _PLAIN, _KEEP = "below", "lowest", "plain", "keep"
KEEP_MODES = ("all", "matmuls")
_truncating_classes: Dict[type, type] = {}


def _uses_reentrant_checkpointing(layer: nn.Module) -> bool:
    if not (getattr(layer, "gradient_checkpointing", False) and layer.training):
        return False
    func = getattr(layer, "_gradient_checkpointing_func", None)
    if isinstance(func, functools.partial):
        return func.keywords.get("use_reentrant", True)
    return True  # unknown checkpointing function: assume the variant that needs it


def _truncating_class(cls: type) -> type:
    """A subclass of ``cls`` whose ``__call__`` consults the truncation handle."""
    if cls not in _truncating_classes:
        base_call = cls.__call__

        def __call__(self, *args, **kwargs):
            handle, index = self._badam_truncation
            role = handle.role(index)
            if role == _BELOW:
                with torch.no_grad():
                    return base_call(self, *args, **kwargs)
            if index == handle.lowest:
                args, kwargs = _cut_below(args, kwargs, leaf=role == _LOWEST and _uses_reentrant_checkpointing(self))
            if role == _KEEP:
                # Hugging Face layers checkpoint while ``gradient_checkpointing`` is set, with their
                # ``_gradient_checkpointing_func``
                override = (("_gradient_checkpointing_func", _checkpoint_saving_matmuls)
                            if handle.keep_mode == "matmuls" else ("gradient_checkpointing", False))
                with _instance_attribute(self, *override):
                    return base_call(self, *args, **kwargs)
            return base_call(self, *args, **kwargs)

        _truncating_classes[cls] = type(cls.__name__, (cls,), {"__call__": __call__,
                                                               "__module__": cls.__module__})
    return _truncating_classes[cls]


def _cut_below(args: tuple, kwargs: dict, leaf: bool):
    """The lowest trainable layer's inputs, detached: nothing below it trains, so their gradient is never
    used. Backward then stops at the layer's weights, and torch.compile sees the same input on every
    block (Hugging Face's checkpointing makes the embedding output require grad, so the bottom layer's
    input would otherwise differ from the others' and recompile it once). ``leaf``: the positional
    floating inputs become leaves that require grad, as reentrant checkpointing returns no graph
    without one."""
    def cut(value, as_leaf):
        if not (torch.is_tensor(value) and value.is_floating_point()):
            return value
        return value.detach().requires_grad_() if as_leaf else value.detach()

    return tuple(cut(a, leaf) for a in args), {k: cut(v, False) for k, v in kwargs.items()}


@contextlib.contextmanager
def _instance_attribute(obj, name: str, value):
    """Set ``obj.name`` for the duration, then restore the instance's own value (or its absence)."""
    missing = object()
    own = obj.__dict__.get(name, missing)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if own is missing:
            delattr(obj, name)
        else:
            setattr(obj, name, own)


def _matmul_ops() -> frozenset:
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


_SAVED_OPS = _matmul_ops()


def _save_matmuls(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


_checkpoint_saving_matmuls = functools.partial(
    torch.utils.checkpoint.checkpoint, use_reentrant=False,
    context_fn=functools.partial(create_selective_checkpoint_contexts, _save_matmuls))


class TruncatedBackward:
    """Handle returned by :func:`truncate_backward`; ``remove()`` undoes it."""

    def __init__(self, layers: nn.ModuleList, params_before: List[nn.Parameter], keep_activations: int = 0,
                 keep_mode: str = "all"):
        self.layers = list(layers)
        self.keep_activations, self.keep_mode = keep_activations, keep_mode
        self._layer_params = [list(layer.parameters()) for layer in self.layers]
        self._params_before = params_before
        self.lowest: Optional[int] = None  # the lowest trainable layer, read by role() at each forward's first layer
        self._gathering_from: Optional[int] = None  # FSDP2 layers from here up all-gather in backward
        self._original_classes = [type(layer) for layer in self.layers]
        for index, layer in enumerate(self.layers):
            layer._badam_truncation = (self, index)
            layer.__class__ = _truncating_class(type(layer))

    def lowest_trainable(self) -> Optional[int]:
        """Index of the lowest layer holding a parameter that requires grad, -1 if something before
        the stack is trainable (no truncation), None if no layer is trainable."""
        if any(p.requires_grad for p in self._params_before):
            return -1
        return next((i for i, params in enumerate(self._layer_params)
                     if any(p.requires_grad for p in params)), None)

    def role(self, index: int) -> str:
        if not torch.is_grad_enabled():
            return _PLAIN
        if index == 0 or self.lowest is None:  # re-read once per forward pass, at the first layer
            self.lowest = self.lowest_trainable()
            self._gather_in_backward_from(self.lowest)
        lowest = self.lowest
        if lowest is None or index < lowest:
            return _BELOW
        if lowest >= 0 and index >= max(lowest, len(self.layers) - self.keep_activations):
            return _KEEP
        return _LOWEST if index == lowest else _PLAIN

    def _gather_in_backward_from(self, lowest: Optional[int]) -> None:
        """FSDP2 layers below ``lowest`` skip the all-gather in backward (no-op for other layers)."""
        first = len(self.layers) if lowest is None else max(lowest, 0)
        if first == self._gathering_from:
            return
        self._gathering_from = first
        for index, layer in enumerate(self.layers):
            if hasattr(layer, "set_unshard_in_backward"):
                layer.set_unshard_in_backward(index >= first)

    def remove(self) -> None:
        self._gather_in_backward_from(-1)
        for layer, cls in zip(self.layers, self._original_classes):
            layer.__class__ = cls
            del layer._badam_truncation


def is_truncated(model: nn.Module, layers: Optional[nn.ModuleList] = None) -> bool:
    """Whether :func:`truncate_backward` is installed on the model's layer stack."""
    layers = find_layer_stack(model) if layers is None else layers
    return any(hasattr(layer, "_badam_truncation") for layer in layers)


def truncate_backward(model: nn.Module, layers: Optional[nn.ModuleList] = None, *,
                      keep_activations: Union[int, str] = 0, keep_mode: str = "all") -> TruncatedBackward:
    """Make the layers below the active block run without autograd. Returns a handle with ``remove()``.

    ``layers`` defaults to :func:`find_layer_stack` of the model. Parameters registered before the
    first layer (the embedding) are watched: while one is trainable, nothing is truncated.
    ``keep_activations``: how many layers, counted down from the top of the stack and never below
    the active block, skip gradient checkpointing (keep their activations rather than recompute
    them in backward); ``"all"`` for every layer from the active block up. Only for layers that
    checkpoint through Hugging Face's ``gradient_checkpointing`` attribute; 0 changes nothing.
    ``keep_mode``: ``"all"`` (those layers keep every activation) or ``"matmuls"`` (they keep the
    outputs of matrix products and attention and recompute the elementwise operations in backward:
    on a Llama layer those outputs are about two thirds of what it keeps, for a little recompute).
    """
    if keep_mode not in KEEP_MODES:
        raise ValueError(f"keep_mode must be one of {', '.join(KEEP_MODES)}, got {keep_mode!r}")
    if keep_activations == "all":
        keep_activations = 1 << 30
    if isinstance(keep_activations, bool) or not isinstance(keep_activations, int) or keep_activations < 0:
        raise ValueError(f"keep_activations must be a non-negative int or 'all', got {keep_activations!r}")
    layers = find_layer_stack(model) if layers is None else layers
    if is_truncated(model, layers):
        raise ValueError("truncate_backward is already installed on these layers")
    stack_params = {id(p) for p in layers.parameters()}
    params_before = []
    for p in model.parameters():
        if id(p) in stack_params:
            break
        params_before.append(p)
    return TruncatedBackward(layers, params_before, keep_activations, keep_mode)
