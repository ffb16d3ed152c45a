"""Find the repeated stack of layers in a model (Hugging Face decoders and any other nn.Module), turn
on a Hugging Face model's gradient checkpointing, compile the stack layer by layer."""
from __future__ import annotations

from typing import Optional

import torch
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


def compile_layers(model: nn.Module, layers: Optional[nn.ModuleList] = None, **compile_kwargs) -> nn.ModuleList:
    """Regional compilation: ``torch.compile`` each layer of the stack, not the whole model.

    In eager mode a small layer leaves the GPU waiting for the host (a 1.2B Llama layer runs about
    200 operators for about a millisecond of GPU work at 4 x 1024 tokens) and runs norms, rotary
    embeddings and SiLU as separate memory-bound kernels; compiled, the elementwise work fuses and
    the launches shrink. The layers share their compiled graphs (parameters are graph inputs), so a
    stack costs a few compilations whatever its depth: one per role a layer plays under BAdam
    (below the active block without autograd, the active block, frozen above it, checkpointed or
    not), each compiled the first time that role occurs. Works under ``truncate_backward`` and
    Hugging Face gradient checkpointing (either order); ``compile_kwargs`` go to ``torch.compile``
    (``mode``, ``backend``, ...). Layers already compiled are left as they are, so a second call
    (a second optimizer over the same model) compiles nothing. Returns the stack.
    """
    layers = find_layer_stack(model) if layers is None else layers
    # a few graphs per layer class (see above); the default limit of 8 is per code object and
    # would be reached with dynamic shapes or several dtypes; recompiling past it falls back to eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    for layer in layers:
        if layer._compiled_call_impl is None:
            layer.compile(**compile_kwargs)
    return layers
