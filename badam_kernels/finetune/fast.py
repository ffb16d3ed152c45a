"""The fast path's loss: liger-kernel's fused linear cross-entropy, where it is installed and fits the model.

The plain loss is the model's own (``model(input_ids, labels=...).loss``): the LM head writes the
whole ``tokens x vocab`` logits, which the loss upcasts to fp32 (12 bytes a logit in bf16: 6 GiB at
4 x 1024 tokens with a 128k vocabulary). The fused loss runs the decoder to its last hidden states
and hands them with the LM head's weight to ``LigerFusedLinearCrossEntropyFunction``, which computes
logits, loss and gradients a chunk of tokens at a time (``chunk_mem_const`` 8: chunks of up to
8 x hidden / vocab of the tokens; bench_e2e's ``ours_fast_ce8``). Both give the mean over the target
tokens (labels shifted by one, ``-100`` ignored), so the fused loss is the plain one to rounding.

liger-kernel is optional (``pip install badam-kernels[gpu]``); where it is missing, or cannot run
the model (no Triton GPU, logits scaled in a way the fused kernel does not do), :func:`fused_ce_problem`
says why and the job falls back to the plain loss, saying so once.

For the Hugging Face Trainer the usual way in is liger's model patching, which replaces the
model's ``forward`` with one that takes the fused loss when labels are given: :func:`patch_model`.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Optional

import torch

from .plan import CE_CHUNK_MEM

IGNORE_INDEX = -100
INSTALL_HINT = "pip install 'badam-kernels[gpu]' (liger-kernel)"


@functools.lru_cache(maxsize=None)
def liger_problem() -> Optional[str]:
    """Why liger-kernel's fused cross-entropy cannot be imported here, or None."""
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction  # noqa: F401
    except Exception as exc:  # ImportError, or a liger/triton mismatch failing at import
        if isinstance(exc, ModuleNotFoundError) and (exc.name or "").startswith("liger_kernel"):
            return f"liger-kernel is not installed ({INSTALL_HINT})"
        return f"liger-kernel does not import ({type(exc).__name__}: {exc})"
    return None


def fused_ce_problem(model, device_type: str) -> Optional[str]:
    """Why the fused loss cannot train ``model`` on ``device_type``, or None when it can."""
    reason = liger_problem()
    if reason is not None:
        return reason
    if device_type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return "liger's Triton kernels need a GPU (or TRITON_INTERPRET=1, a slow testing aid)"
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if not isinstance(head, torch.nn.Linear) or base is None or base is model:
        return f"{type(model).__name__} has no decoder + linear LM head to fuse"
    for name in ("logit_scale", "logits_scaling"):  # Cohere multiplies, Granite divides the logits
        scale = getattr(config, name, None)
        if scale not in (None, 1, 1.0):
            return f"{type(model).__name__} scales its logits ({name}={scale})"
    return None


def plain_loss(model, labels, **inputs) -> torch.Tensor:
    """The model's own causal-LM loss (``inputs``: ``input_ids``, ``attention_mask``, ``position_ids``...)."""
    return model(labels=labels, **inputs).loss


def fused_loss(model, labels, chunk_mem_const: int = CE_CHUNK_MEM, **inputs) -> torch.Tensor:
    """The same loss through liger's fused linear cross-entropy: the logits are never whole."""
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    base = getattr(model, model.base_model_prefix)
    head = model.get_output_embeddings()
    hidden = base(**inputs).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    softcap = getattr(model.config, "final_logit_softcapping", None)  # Gemma 2
    loss, *_ = LigerFusedLinearCrossEntropyFunction.apply(  # (loss, z_loss, accuracy, predictions)
        hidden.reshape(-1, hidden.shape[-1]), head.weight, targets.reshape(-1), head.bias, None, IGNORE_INDEX,
        0.0, 0.0, "mean", softcap, False, None, False, False, False, None, None, chunk_mem_const)
    return loss


def loss_function(model, fused: bool) -> Callable[..., torch.Tensor]:
    """``loss(input_ids=..., labels=..., attention_mask=..., ...)`` of ``model``: the fused or the plain one."""
    fn = fused_loss if fused else plain_loss
    return functools.partial(fn, model)


def patch_model(model) -> Optional[str]:
    """liger's model patching for the fused loss (its ``apply_liger_kernel_to_<type>`` with only
    ``fused_linear_cross_entropy``, on this model instance: no other module or model class changes).
    Returns None when patched, else why not (the model keeps its plain loss). Once a model: the outcome
    is kept in ``model._badam_fused_ce``, and a patched model is left as it is."""
    if getattr(model, "_badam_fused_ce", False):
        return None
    reason = _apply_fused_loss(model)
    model._badam_fused_ce = reason is None
    return reason


def _apply_fused_loss(model) -> Optional[str]:
    device = next(model.parameters()).device
    reason = fused_ce_problem(model, device.type)
    if reason is not None:
        return reason
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply is None:
        return f"liger-kernel has no fused loss for model type {model_type!r}"
    import inspect

    wanted = dict(fused_linear_cross_entropy=True, cross_entropy=False, rope=False, rms_norm=False, swiglu=False,
                  geglu=False, layer_norm=False)
    accepted = inspect.signature(apply).parameters
    apply(model=model, **{k: v for k, v in wanted.items() if k in accepted})
    return None
