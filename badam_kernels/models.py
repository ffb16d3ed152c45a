"""Find the repeated stack of layers in a model (Hugging Face decoders and any other nn.Module), and
turn on a Hugging Face model's gradient checkpointing."""
from __future__ import annotations

from typing import Optional

from torch import nn


def find_layer_stack(model: nn.Module) -> nn.ModuleList:
    """The model's stack of identical layers: the ``nn.ModuleList``/``nn.Sequential`` of at least two
    children of one class that holds the most parameters (``model.model.layers`` for Llama, Qwen,
    SmolLM; ``transformer.h`` for GPT-2; ...).

    Raises ValueError when the model has no such stack.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"expected an nn.Module, got {type(model).__name__}")
    best, best_size = None, 0
    for _, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < 2:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = module, size
    if best is None:
        raise ValueError(f"{type(model).__name__} has no layer stack this package recognises "
                         "(a ModuleList of at least two layers of one class)")
    return best


def enable_gradient_checkpointing(model: nn.Module, use_reentrant: Optional[bool] = None) -> None:
    """Hugging Face gradient checkpointing under the name the installed transformers has
    (``activation_checkpointing_enable`` from 5.2x, where the old ``gradient_checkpointing_enable``
    warns). ``use_reentrant`` None: transformers' default variant."""
    kwargs = None if use_reentrant is None else {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
