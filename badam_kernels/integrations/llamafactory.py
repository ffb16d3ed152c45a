"""LLaMA-Factory (``llamafactory`` 0.9.5) on badam_kernels: an unchanged YAML, this package's BAdam.

::

    badam-llamafactory train run.yaml        # = llamafactory-cli train run.yaml, with badam_kernels in place
    python -m badam_kernels.integrations.llamafactory train run.yaml     # the same, without the console script

or from Python, around LLaMA-Factory's own entry points::

    from badam_kernels.integrations.llamafactory import installed
    from llamafactory.train.tuner import run_exp
    with installed():
        run_exp(dict(stage="sft", use_badam=True, ...))

A YAML with ``use_badam: true`` then trains with :class:`badam_kernels.BlockOptimizer` (fused step, exact
``state_dict``, no ``empty_cache`` per step) and :func:`badam_kernels.truncate_backward`, in every stage that
builds its optimizer through LLaMA-Factory's ``create_custom_optimizer`` (pt, sft, rm, dpo, kto, ppo). A YAML
without ``use_badam`` runs exactly as under ``llamafactory-cli``.

Where LLaMA-Factory 0.9.5 meets BAdam, and what :func:`install` puts there (each patch is undone by
:func:`uninstall`, and touches nothing outside this process):

* ``llamafactory.train.trainer_utils._create_badam_optimizer(model, training_args, finetuning_args)`` builds
  the official ``badam.BlockOptimizer`` (``badam_mode: layer``) or ``badam.BlockOptimizerRatio``
  (``ratio``); ``create_custom_optimizer`` looks it up in that module at call time, so replacing the module
  attribute reaches every trainer. Replaced by :func:`create_badam_optimizer`.
* Every trainer's ``__init__`` does ``from badam import BAdamCallback, clip_grad_norm_old_version``, sets
  ``accelerator.clip_grad_norm_`` to the latter (a per-tensor Python loop written for the sparse gradients
  of ``BlockOptimizerRatio``) and adds the callback (at ``on_train_begin`` it removes the embedding output's
  ``requires_grad`` hook and, under ZeRO-3, wires DeepSpeed). The two names of the ``badam`` module are
  replaced: the clipping goes back to Accelerate's own ``clip_grad_norm_`` (torch's foreach norm over the
  active block's gradients) when our layer-wise optimizer is in use, and the callback keeps the official
  behaviour and also frees the active block's flat gradient buffer after each step.
* Checkpoints are the Trainer's: ``optimizer.pt`` is our ``state_dict`` (schedule, step, active and parked
  states), loaded by ``load_state_dict`` on ``resume_from_checkpoint``: a resumed run continues on the same
  block with the same moments, bit for bit on the CPU (tests/test_llamafactory.py).

The ``badam_*`` options:

==========================  ===========================================================================
``badam_mode: layer``       :class:`badam_kernels.BlockOptimizer`
``badam_mode: ratio``       ``badam_kernels.BlockOptimizerRatio`` (dense gradients, Accelerate's own
                            clipping), without the ``fused`` flag that makes ``llamafactory-cli`` fail in
                            ratio mode under transformers 5.x's default ``optim``
``badam_start_block``       ``start_block``
``badam_switch_mode``       ``switch_mode`` (ascending, descending, random, fixed; LLaMA-Factory's default
                            is ascending)
``badam_switch_interval``   ``switch_block_every``; -1 (LLaMA-Factory: "disable the block update") trains
                            the start block for good (``switch_mode`` fixed; badam 1.4 itself, given -1,
                            switches at every step since ``n % -1 == 0``)
``badam_update_ratio``      ratio mode only: ``update_ratio`` of the ratio optimizer
``badam_mask_mode``         ratio mode only: ``mask_mode`` of the ratio optimizer
``badam_verbose``           ``verbose``: 0 silent, 1 and 2 log the block's prefixes at each switch (through
                            LLaMA-Factory's logger; the official 2 also prints every trainable name)
==========================  ===========================================================================

The rest of LLaMA-Factory's arguments keep their meaning: ``learning_rate``, ``adam_beta1/2``,
``adam_epsilon``, ``weight_decay`` (as the YAML says, not on biases and norms, as LLaMA-Factory's own param
groups mean it; the official path decays every parameter, norms included, at torch's AdamW default 0.01
whatever the YAML says: badam 1.4 rebuilds its groups with the base optimizer's defaults, and LLaMA-Factory
passes the weight decay in its groups only, so with the YAML's default 0 the two runs differ by that decay),
``optim`` (an AdamW gets the fused step, any other ``torch.optim`` optimizer trains block by block through
its own step), ``lr_scheduler_type``, ``max_grad_norm``, ``gradient_accumulation_steps``, ``save_steps``,
``resume_from_checkpoint``, ``bf16``, gradient checkpointing (LLaMA-Factory's default; its checkpoint function
already runs the frozen layers above the active block without recompute) and ``enable_liger_kernel`` (liger's
fused linear cross-entropy, RMSNorm, SwiGLU and rotary kernels, with liger-kernel installed: measured on the
1.2B shape in ``benchmarks/bench_llamafactory.py``; it turns ``BADAM_KERNELS_COMPILE`` off, see below).

Not supported, and what happens: DeepSpeed ZeRO-3 (the only multi-process BAdam LLaMA-Factory allows) falls
back to the official optimizer with a warning; ``llamafactory-cli``'s automatic torchrun launch on a machine
with several GPUs starts workers that do not import this module (they get the official optimizer):
``badam-llamafactory`` refuses it (exit 2) and asks for ``CUDA_VISIBLE_DEVICES`` with one GPU.

The fast path, opt-in by environment variable (LLaMA-Factory rejects unknown YAML keys):

* ``BADAM_KERNELS_FAST=1``: all of it at once, as the main job's ``--fast on``: compiled layers, the fused loss
  and the kept activations planned within the GPU's free memory less the main job's margin (2 GiB and 5%),
  each part of it replaced by its own variable where that is set (``BADAM_KERNELS_COMPILE=0``, say);
* ``BADAM_KERNELS_COMPILE=1``: ``compile_layers`` (each layer through ``torch.compile``); ignored, with a
  warning, where ``enable_liger_kernel`` put liger's modules in the layers (compiled together they ended in an
  illegal memory access on the GPU);
* ``BADAM_KERNELS_KEEP_ACTIVATIONS=N|all``: gradient checkpointing recomputes every layer from the active
  block up except the top N (``all``: none); unset, LLaMA-Factory's own checkpoint function stays, which
  keeps the activations of every frozen layer above the active block (the same as ``all``);
* ``BADAM_KERNELS_MEMORY_BUDGET=GiB``: N chosen as the main job chooses it (``finetune/plan.py``): the most
  top layers whose activations fit the budget, for the YAML's ``per_device_train_batch_size`` x
  ``cutoff_len`` tokens (the longest a batch can be), its ``enable_liger_kernel`` and the compiled or eager
  layers; the plan is logged (an explicit ``BADAM_KERNELS_KEEP_ACTIVATIONS`` wins; with
  ``disable_gradient_checkpointing`` every layer keeps its activations anyway, and a warning says so);
* ``BADAM_KERNELS_KEEP_MODE=all|matmuls``: what the kept layers keep (``truncate_backward``'s ``keep_mode``);
* ``BADAM_KERNELS_STATE_POLICY=reset|offload``, ``BADAM_KERNELS_BACKEND=reference|triton|cuda``;
* ``BADAM_KERNELS_TRUNCATE=0``: no truncated backward;
* ``BADAM_KERNELS_FUSED_CE=1``: liger's fused linear cross-entropy for the loss alone (the main job's; the
  logits are never whole), patched into the model instance where LLaMA-Factory's ``enable_liger_kernel``
  would also swap the layers' modules for liger's; with ``BADAM_KERNELS_COMPILE=1`` this is the main job's
  fast path. LLaMA-Factory's own ``enable_liger_kernel: true`` works too (without the compile, above).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from typing import Any, Dict, List, Optional

import torch

from .. import BlockOptimizer, find_layer_stack
from ..options import BAdamOptions, OptionError

__all__ = ["install", "uninstall", "installed", "create_badam_optimizer", "options_from_env", "memory_budget_from_env",
           "fused_ce_from_env", "fast_from_env", "fast_budget_gib", "planned_activations", "main"]

ENV_PREFIX = "BADAM_KERNELS_"
_ENV_OPTIONS = {  # environment variable (after the prefix) -> BAdamOptions field
    "COMPILE": "compile_layers", "KEEP_ACTIVATIONS": "keep_activations", "KEEP_MODE": "keep_mode",
    "STATE_POLICY": "state_policy", "BACKEND": "backend", "TRUNCATE": "truncate",
}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


class _State:
    saved: Optional[Dict[str, Any]] = None  # what install() replaced, for uninstall()
    official_clip: bool = False  # clip with the official per-tensor loop (the official optimizer is in use)


def _logger():
    from llamafactory.extras import logging as lf_logging
    return lf_logging.get_logger("llamafactory.badam_kernels")  # under LLaMA-Factory's configured root logger


# ------------------------------------------------------------------------------------ options

def options_from_env(environ=None) -> Dict[str, Any]:
    """The ``BAdamOptions`` fields set by ``BADAM_KERNELS_*`` environment variables (see the module doc)."""
    environ = os.environ if environ is None else environ
    found: Dict[str, Any] = {}
    for suffix, field in _ENV_OPTIONS.items():
        text = environ.get(ENV_PREFIX + suffix)
        if text is None or (suffix == "BACKEND" and text.strip() in ("", "auto")):
            continue
        text = text.strip()
        if field in ("compile_layers", "truncate"):
            found[field] = _flag(suffix, text)
        elif field == "keep_activations":
            if text != "all" and not text.isdigit():
                raise ValueError(f"{ENV_PREFIX}{suffix} must be a non-negative integer or 'all', got {text!r}")
            found[field] = text if text == "all" else int(text)
        else:
            found[field] = text
    if fast_from_env(environ):
        found.setdefault("compile_layers", True)
    return found


def fast_from_env(environ=None) -> bool:
    """``BADAM_KERNELS_FAST``: the whole fast path, each part unless its own variable says otherwise (off when
    unset)."""
    environ = os.environ if environ is None else environ
    return _flag("FAST", environ.get(ENV_PREFIX + "FAST", "0"))


def _flag(suffix: str, text: str) -> bool:
    """A ``BADAM_KERNELS_<suffix>`` on/off value."""
    value = text.strip()
    if value.lower() not in _TRUE + _FALSE:
        raise ValueError(f"{ENV_PREFIX}{suffix} must be 1 or 0, got {value!r}")
    return value.lower() in _TRUE


def fused_ce_from_env(environ=None) -> bool:
    """``BADAM_KERNELS_FUSED_CE``: liger's fused linear cross-entropy for the loss alone (when unset: on with
    ``BADAM_KERNELS_FAST=1``, else off)."""
    environ = os.environ if environ is None else environ
    return _flag("FUSED_CE", environ.get(ENV_PREFIX + "FUSED_CE", "1" if fast_from_env(environ) else "0"))


def memory_budget_from_env(environ=None) -> Optional[float]:
    """``BADAM_KERNELS_MEMORY_BUDGET`` in GiB, or None where it is unset."""
    environ = os.environ if environ is None else environ
    text = environ.get(ENV_PREFIX + "MEMORY_BUDGET", "").strip()
    if not text:
        return None
    try:
        budget = float(text)
    except ValueError:
        budget = -1.0
    if not budget > 0:
        raise ValueError(f"{ENV_PREFIX}MEMORY_BUDGET must be a positive number of GiB, got {text!r}")
    return budget


def badam_options(finetuning_args, num_blocks: int, environ=None) -> BAdamOptions:
    """LLaMA-Factory's ``badam_*`` arguments (layer mode) and the ``BADAM_KERNELS_*`` variables as ``BAdamOptions``."""
    mode, every, start = (finetuning_args.badam_switch_mode, finetuning_args.badam_switch_interval,
                          finetuning_args.badam_start_block)
    if every is None:
        raise ValueError("badam_switch_interval must be a positive integer or -1, got None")
    if every <= 0:  # LLaMA-Factory: -1 disables the block update
        if start is None:
            start = num_blocks - 1 if mode == "descending" else 0
        mode, every = "fixed", 1
    try:
        return BAdamOptions(switch_block_every=every, switch_mode=mode, start_block=start,
                            verbose=finetuning_args.badam_verbose, **options_from_env(environ))
    except OptionError as exc:
        raise ValueError(f"badam-llamafactory: {exc}") from None


# ------------------------------------------------------------------------------------ the optimizer

def create_badam_optimizer(model: torch.nn.Module, training_args, finetuning_args) -> torch.optim.Optimizer:
    """What ``llamafactory.train.trainer_utils._create_badam_optimizer`` becomes under :func:`install`."""
    from transformers import Trainer
    from transformers.integrations import is_deepspeed_zero3_enabled

    official = _State.saved["_create_badam_optimizer"] if _State.saved else None
    logger = _logger()
    if is_deepspeed_zero3_enabled():
        logger.warning_rank0("badam-llamafactory: DeepSpeed ZeRO-3 is not supported by badam_kernels; "
                             "using the official badam optimizer")
        _State.official_clip = True
        return official(model, training_args, finetuning_args)
    if finetuning_args.badam_mode == "ratio":
        return _create_ratio_optimizer(model, training_args, finetuning_args)

    _State.official_clip = False
    from ..partition import infer_block_prefixes

    num_blocks = len(infer_block_prefixes([n for n, _ in model.named_parameters()]))
    options = badam_options(finetuning_args, num_blocks)
    optim_class, optim_kwargs = Trainer.get_optimizer_cls_and_kwargs(training_args)
    # one group: BlockOptimizer reads the hyperparameters of group 0 and decays no bias or norm itself
    # (LLaMA-Factory's two groups put the no-decay one first)
    base = optim_class(model.parameters(), weight_decay=training_args.weight_decay, **optim_kwargs)
    log = logger.info_rank0 if options.verbose >= 1 else None
    optimizer = BlockOptimizer(base, list(model.named_parameters()), log_fn=log, **options.optimizer_kwargs())
    layers = find_layer_stack(model)
    liger = liger_modules(layers)
    options, ours_keep, fused_ours = _fast_path(model, layers, liger, options, training_args, logger)
    options.prepare_model(model, layers)
    logger.info_rank0(
        f"badam_kernels BlockOptimizer: {optimizer.num_blocks} blocks, switch mode {options.switch_mode}, "
        f"every {options.switch_block_every} steps, start block {optimizer.active_block}, "
        f"{'fused AdamW' if optimizer.fused else type(base).__name__ + ' step'}, state policy "
        f"{options.state_policy}, truncated backward {'on' if options.truncate else 'off'}, keep activations "
        f"{options.keep_activations if ours_keep else 'LLaMA-Factory default'}, "
        f"compiled layers {'on' if options.compile_layers else 'off'}, fused loss "
        f"{'liger (enable_liger_kernel)' if liger else 'liger, the loss alone' if fused_ours else 'off'}")
    return optimizer


def _fast_path(model, layers, liger: List[str], options: BAdamOptions, training_args, logger):
    """The ``BADAM_KERNELS_*`` fast path against what LLaMA-Factory set up: (the options with the compile and
    the kept layers decided, whether ours decide the kept layers, whether our fused loss is patched in)."""
    keep_given, budget = "keep_activations" in options_from_env(), memory_budget_from_env()
    checkpointing = getattr(model, "is_gradient_checkpointing", True)
    if budget is None and fast_from_env() and checkpointing and not keep_given:
        budget = fast_budget_gib(model)
    if budget is not None and not checkpointing:
        logger.warning_rank0(f"badam-llamafactory: {ENV_PREFIX}MEMORY_BUDGET has nothing to plan: gradient "
                             "checkpointing is off (disable_gradient_checkpointing), so every layer keeps its activations")
        budget = None
    if options.compile_layers and liger:
        logger.warning_rank0(
            f"badam-llamafactory: {ENV_PREFIX}COMPILE=1 is ignored: enable_liger_kernel replaced the layers' "
            f"{', '.join(liger)} with liger's Triton kernels, and compiling layers that hold them ended in an illegal "
            "memory access (liger-kernel 0.8.5, torch 2.11, H100); the layers run eagerly with liger's kernels; "
            f"{ENV_PREFIX}FUSED_CE=1 without enable_liger_kernel compiles them with liger's loss")
        options = dataclasses.replace(options, compile_layers=False)
    fused_ours = fused_ce_from_env() and fuse_the_loss(model, liger, logger)
    if budget is not None and not keep_given:
        seq_len, fused_yaml = _yaml_tokens_and_loss()
        plan = planned_activations(model, training_args, budget, options.compile_layers, seq_len,
                                   fused_yaml or fused_ours)
        logger.info_rank0(f"badam-llamafactory: {plan.describe()} "
                          f"({training_args.per_device_train_batch_size} x {seq_len} tokens a micro-batch at most)")
        for note in plan.notes:
            logger.warning_rank0(f"badam-llamafactory: {note}")
        options = dataclasses.replace(options, keep_activations=plan.keep_activations)
    ours_keep = keep_given or budget is not None  # else LLaMA-Factory's own checkpoint function decides
    if ours_keep:
        # LLaMA-Factory's checkpoint function (get_custom_gradient_checkpointing_func) never checkpoints a
        # layer without trainable parameters, i.e. it keeps every frozen layer's activations; for a budget,
        # go back to the plain function it wraps and let truncate_backward keep the top N layers
        for layer in layers:
            func = getattr(layer, "_gradient_checkpointing_func", None)
            if func is not None and hasattr(func, "__wrapped__"):
                layer._gradient_checkpointing_func = func.__wrapped__
    return options, ours_keep, fused_ours


def fast_budget_gib(model) -> Optional[float]:
    """``BADAM_KERNELS_FAST``'s budget where ``BADAM_KERNELS_MEMORY_BUDGET`` is unset: the main job's default (the
    GPU's free memory less 2 GiB and 5% of its size), with what this process' allocator holds counted as free,
    since the model is on the GPU by now and the plan counts its weights itself; None off a GPU (no limit)."""
    from ..finetune.plan import GiB, DeviceFacts, default_budget

    device = next(model.parameters()).device
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return default_budget(DeviceFacts("cuda", free + torch.cuda.memory_allocated(device), total)) / GiB


def fuse_the_loss(model, liger: List[str], logger) -> bool:
    """``BADAM_KERNELS_FUSED_CE=1``: liger's fused linear cross-entropy patched into this model instance and
    nothing else (``finetune/fast.patch_model``, the main job's loss), so that compiled layers stay plain
    torch; True when patched. Where ``enable_liger_kernel`` already put liger in the model, or liger
    cannot run the model, a line says so and the model keeps the loss it has."""
    from ..finetune.fast import patch_model

    if liger:
        logger.info_rank0(f"badam-llamafactory: {ENV_PREFIX}FUSED_CE=1 has nothing to add: enable_liger_kernel "
                          "already fuses the loss")
        return False
    reason = patch_model(model)
    if reason is not None:
        logger.warning_rank0(f"badam-llamafactory: {ENV_PREFIX}FUSED_CE=1: {reason}; the model keeps its plain loss")
    return reason is None


def liger_modules(layers) -> List[str]:
    """The names of liger-kernel's modules inside ``layers`` (sorted, once each): LLaMA-Factory's
    ``enable_liger_kernel`` swaps in liger's classes before loading, or rebinds a loaded module's ``forward``
    and ``_get_name``; either way the module's name starts with ``Liger``."""
    return sorted({m._get_name() for layer in layers for m in layer.modules() if m._get_name().startswith("Liger")})


def _yaml_tokens_and_loss():
    """(``cutoff_len``, ``enable_liger_kernel``) of the run's arguments, parsed again as LLaMA-Factory parsed
    them (its optimizer-creation point is not given them)."""
    from llamafactory.hparams import DataArguments, ModelArguments
    from llamafactory.hparams.parser import _parse_args
    from transformers import HfArgumentParser

    # only these two: building TrainingArguments again would reset Accelerate's state mid-run
    model_args, data_args = _parse_args(HfArgumentParser((ModelArguments, DataArguments)), allow_extra_keys=True)
    return data_args.cutoff_len, bool(model_args.enable_liger_kernel)


def planned_activations(model, training_args, budget_gib: float, compiled: bool, seq_len: int, fused_ce: bool):
    """The main job's plan (``finetune/plan.make_plan``) for this model under gradient checkpointing: how many
    top layers keep their activations within ``budget_gib`` for ``per_device_train_batch_size`` x ``seq_len``
    tokens, with liger's fused loss or the plain one, compiled or eager layers."""
    from ..finetune.plan import GiB, DeviceFacts, ModelShape, make_plan

    return make_plan(ModelShape.from_model(model), training_args.per_device_train_batch_size, seq_len,
                     DeviceFacts(next(model.parameters()).device.type), fast="on", budget_bytes=int(budget_gib * GiB),
                     fused_ce=fused_ce, compile_layers=compiled, grad_checkpointing=True)


def _create_ratio_optimizer(model, training_args, finetuning_args):
    """``badam_mode: ratio``: this package's ``BlockOptimizerRatio`` (a drop-in for the official one), built as
    LLaMA-Factory builds the official, less the ``fused``/``foreach`` flags that transformers 5.x's default
    ``optim`` (adamw_torch_fused) adds and the official class rejects (``llamafactory-cli`` itself fails there
    with a TypeError unless ``optim: adamw_torch``)."""
    from llamafactory.train.trainer_utils import _get_decay_parameter_names
    from transformers import Trainer

    from ..ratio import BlockOptimizerRatio

    _State.official_clip = False  # dense gradients: Accelerate's own clipping
    decay_names = _get_decay_parameter_names(model)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and n in decay_names]
    nodecay = [p for n, p in model.named_parameters() if p.requires_grad and n not in decay_names]
    optim_class, optim_kwargs = Trainer.get_optimizer_cls_and_kwargs(training_args)
    optim_kwargs = {k: v for k, v in optim_kwargs.items() if k not in ("fused", "foreach")}
    if finetuning_args.badam_update_ratio <= 1e-6:
        raise ValueError(f"badam_update_ratio must be positive, got {finetuning_args.badam_update_ratio}")
    return BlockOptimizerRatio(
        param_groups=[dict(params=nodecay, weight_decay=0.0),
                      dict(params=decay, weight_decay=training_args.weight_decay)],
        named_parameters_list=list(model.named_parameters()), update_ratio=finetuning_args.badam_update_ratio,
        mask_mode=finetuning_args.badam_mask_mode, verbose=finetuning_args.badam_verbose, include_embedding=False,
        **optim_kwargs)


# ------------------------------------------------------------------------------------ callback and clipping

def _block_optimizer(optimizer) -> Optional[BlockOptimizer]:
    while optimizer is not None and not isinstance(optimizer, BlockOptimizer):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


def _make_callback(official_callback):
    class BAdamCallback(official_callback):
        """The official callback (on_train_begin: no input ``requires_grad`` hook; ZeRO-3 wiring), and after
        each step the active block's flat gradient buffer is freed (the Trainer's ``model.zero_grad()``
        drops the ``.grad`` views but not the buffer)."""

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            block_optimizer = _block_optimizer(optimizer)
            if block_optimizer is not None:
                block_optimizer.zero_grad(set_to_none=True)

    return BAdamCallback


def _make_clip(official_clip):
    def clip_grad_norm_(self, parameters, max_norm, norm_type=2):
        """Accelerate's own clipping for our layer-wise optimizer; the official one otherwise."""
        from accelerate import Accelerator
        if _State.official_clip:
            return official_clip(self, parameters, max_norm, norm_type)
        return Accelerator.clip_grad_norm_(self, parameters, max_norm, norm_type)

    return clip_grad_norm_


# ------------------------------------------------------------------------------------ install

def install() -> None:
    """Put badam_kernels in place of the official BAdam in this process's LLaMA-Factory (idempotent)."""
    if _State.saved is not None:
        return
    import badam
    from llamafactory.train import trainer_utils

    _State.saved = {"_create_badam_optimizer": trainer_utils._create_badam_optimizer,
                    "BAdamCallback": badam.BAdamCallback,
                    "clip_grad_norm_old_version": badam.clip_grad_norm_old_version}
    trainer_utils._create_badam_optimizer = create_badam_optimizer
    badam.BAdamCallback = _make_callback(_State.saved["BAdamCallback"])
    badam.clip_grad_norm_old_version = _make_clip(_State.saved["clip_grad_norm_old_version"])


def uninstall() -> None:
    """Undo :func:`install`."""
    if _State.saved is None:
        return
    import badam
    from llamafactory.train import trainer_utils

    trainer_utils._create_badam_optimizer = _State.saved["_create_badam_optimizer"]
    badam.BAdamCallback = _State.saved["BAdamCallback"]
    badam.clip_grad_norm_old_version = _State.saved["clip_grad_norm_old_version"]
    _State.saved, _State.official_clip = None, False


@contextlib.contextmanager
def installed():
    """:func:`install` for the duration of a ``with`` block."""
    install()
    try:
        yield
    finally:
        uninstall()


# ------------------------------------------------------------------------------------ the command

USAGE = """usage: badam-llamafactory train CONFIG.yaml [key=value ...]

LLaMA-Factory's `llamafactory-cli` with badam_kernels in place of the official BAdam: a YAML with
`use_badam: true` trains with badam_kernels.BlockOptimizer and truncated backward. Every other command
and argument is llamafactory-cli's own. Fast path (environment): BADAM_KERNELS_FAST=1 (all of the
following at once, the activations planned within the GPU's free memory), BADAM_KERNELS_COMPILE=1,
BADAM_KERNELS_FUSED_CE=1, BADAM_KERNELS_KEEP_ACTIVATIONS=N|all, BADAM_KERNELS_MEMORY_BUDGET=GiB, BADAM_KERNELS_KEEP_MODE=all|matmuls,
BADAM_KERNELS_STATE_POLICY=reset|offload, BADAM_KERNELS_BACKEND, BADAM_KERNELS_TRUNCATE=0."""


def _would_launch_torchrun(argv: List[str]) -> bool:
    from llamafactory.extras.misc import get_device_count, is_env_enabled, use_kt, use_ray
    return bool(argv) and argv[0] == "train" and (
        is_env_enabled("FORCE_TORCHRUN") or is_env_enabled("USE_MCA")
        or (get_device_count() > 1 and not use_ray() and not use_kt()))


def main(argv: Optional[List[str]] = None) -> int:
    """``badam-llamafactory ARGS`` = ``llamafactory-cli ARGS`` after :func:`install`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    try:
        options_from_env()
        memory_budget_from_env()
        fused_ce_from_env()  # BADAM_KERNELS_FAST's value too
    except ValueError as exc:
        print(f"badam-llamafactory: error: {exc}", file=sys.stderr)
        return 2
    try:
        import llamafactory.cli  # noqa: F401  (importable, or a clear error)
    except ImportError as exc:
        print(f"badam-llamafactory: error: LLaMA-Factory is not importable ({exc}); "
              "use scripts/venv-llamafactory or `pip install llamafactory==0.9.5`", file=sys.stderr)
        return 2
    if _would_launch_torchrun(argv):
        print("badam-llamafactory: error: LLaMA-Factory would launch torchrun (several GPUs or FORCE_TORCHRUN), "
              "whose workers run the official badam; LLaMA-Factory allows multi-process BAdam only under "
              "DeepSpeed ZeRO-3, which badam_kernels does not support. Use one GPU "
              "(CUDA_VISIBLE_DEVICES=0) or llamafactory-cli.", file=sys.stderr)
        return 2
    install()
    sys.argv = ["llamafactory-cli"] + argv
    from llamafactory.cli import main as llamafactory_main
    llamafactory_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
