"""The options of BAdam, each declared once: its default, help text, choices and check.

``BAdamOptions`` holds the optimizer's keyword options and the truncation knobs. Everything that
takes them reads this one declaration: ``BlockOptimizer`` validates its arguments with it, the
Hugging Face integration takes a ``BAdamOptions`` (``BAdamConfig`` is its old name), and the main
job's ``TrainConfig`` and its command line are generated from the same fields (see
``finetune/config.py``), so an option's name, default, help and check live here and nowhere else.

An option is a dataclass field made by :func:`option`; its metadata says how to check it and how
the command line spells it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from .ops import BACKEND_NAMES
from .schedule import SWITCH_MODES

STATE_POLICIES = ("reset", "offload")
KEEP_MODES = ("all", "matmuls")  # what kept layers keep: every activation, or matrix-product outputs only
STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class OptionError(ValueError):
    """A value an option cannot take; the message names the option and why."""


# ------------------------------------------------------------------------------------ checks
# Each check returns None when the value is fine, else what it should be ("a positive integer").

def positive_int(value) -> Optional[str]:
    return None if _is_int(value) and value > 0 else "a positive integer"


def non_negative_int(value) -> Optional[str]:
    return None if _is_int(value) and value >= 0 else "a non-negative integer"


def positive_float(value) -> Optional[str]:
    return None if _is_number(value) and value > 0 else "a positive number"


def non_negative_float(value) -> Optional[str]:
    return None if _is_number(value) and value >= 0 else "a non-negative number"


def boolean(value) -> Optional[str]:
    return None if isinstance(value, bool) else "true or false"


def count_or_all(value) -> Optional[str]:
    return None if value == "all" or (_is_int(value) and value >= 0) else "a non-negative integer or 'all'"


def prefix_list(value) -> Optional[str]:
    ok = isinstance(value, (list, tuple)) and all(isinstance(p, str) and p for p in value)
    return None if ok else "a list of parameter-name prefixes"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ------------------------------------------------------------------------------------ declaring an option

def option(default: Any, help: str, *, check: Optional[Callable[[Any], Optional[str]]] = None,
           choices: Optional[Sequence] = None, none: bool = False, flag: Optional[str] = None,
           cli: bool = True, metavar: Optional[str] = None, parse: Optional[Callable[[str], Any]] = None,
           resume_may_change: bool = False, group: Optional[str] = None) -> Any:
    """A dataclass field declared as an option.

    ``check`` or ``choices`` say which values are valid; ``none``: None is valid too (it means a
    default decided elsewhere). ``flag`` is the command-line spelling (default ``--field-name``),
    ``cli=False`` keeps it off the command line, ``parse`` turns the command-line text into a value
    (default: the type of ``check``), ``resume_may_change``: ``badam-finetune --resume`` may change it,
    ``group``: the section of the command-line help it is listed in.
    """
    metadata = dict(help=help, check=check, choices=tuple(choices) if choices is not None else None, none=none,
                    flag=flag, cli=cli, metavar=metavar, parse=parse, resume_may_change=resume_may_change,
                    group=group)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def with_default(options_class, name: str, default: Any, help: Optional[str] = None, **changes) -> Any:
    """``name``'s declaration in ``options_class`` with another default (and help, or other metadata):
    for a class that builds on the options with defaults of its own."""
    field = {f.name: f for f in dataclasses.fields(options_class)}[name]
    metadata = {**field.metadata, **changes}
    if help is not None:
        metadata["help"] = help
    return dataclasses.field(default=default, metadata=metadata)


def declared(obj_or_class) -> Iterator[dataclasses.Field]:
    """The fields of an options dataclass that are declared with :func:`option`."""
    return (f for f in dataclasses.fields(obj_or_class) if "help" in f.metadata)


def flag_of(field: dataclasses.Field) -> str:
    """The command-line spelling of an option."""
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def problem(field: dataclasses.Field, value, cli: bool = False) -> Optional[str]:
    """Why ``value`` is not valid for ``field``, in one sentence naming it as Python (``cli=False``)
    or the command line spells it, or None."""
    meta = field.metadata
    if value is None and meta["none"]:
        return None
    name = flag_of(field) if cli else field.name
    if meta["choices"] is not None:
        if value in meta["choices"]:
            return None
        listed = ", ".join(map(str, meta["choices"]))
        return f"{name} must be one of {listed}, got {value!r}" if cli else \
            f"unknown {name} {value!r}; choose one of {listed}"
    wanted = meta["check"](value) if meta["check"] is not None else None
    return None if wanted is None else f"{name} must be {wanted}, got {value!r}"


def validate(obj, cli: bool = False, error: Callable[[str], Exception] = OptionError) -> None:
    """Raise ``error(message)`` for the first option of ``obj`` whose value is not valid."""
    for field in declared(obj):
        message = problem(field, getattr(obj, field.name), cli)
        if message is not None:
            raise error(message)


# ------------------------------------------------------------------------------------ BAdam's options

@dataclass
class BAdamOptions:
    """The options of ``BlockOptimizer`` beyond its base optimizer and parameters, and of the
    truncated backward, with ``badam`` 1.4's defaults where it has the option.

    ``BlockOptimizer(base, named_parameters, **options.optimizer_kwargs())`` builds the optimizer;
    :func:`badam_kernels.integrations.hf.make_badam_optimizer` also applies the truncation knobs.
    """

    # the schedule (as in badam 1.4)
    switch_block_every: int = option(50, "steps per block", check=positive_int, flag="--switch-every",
                                     metavar="N")
    switch_mode: str = option("descending", "block order: descending (the last block first), ascending, "
                              "random (a fresh order each block epoch) or fixed (start_block only)",
                              choices=SWITCH_MODES)
    start_block: Optional[int] = option(None, "the first block (needed by switch_mode fixed); default: the "
                                        "last for descending, the first for ascending", check=non_negative_int,
                                        none=True, metavar="K")
    block_prefix_list: Optional[List[List[str]]] = option(None, "the blocks, each a list of parameter-name "
                                                          "prefixes; default: one block per layer", none=True,
                                                          check=lambda v: None if isinstance(v, (list, tuple))
                                                          else "a list of lists of prefixes", cli=False)
    active_modules: Optional[List[str]] = option(None, "parameter-name prefixes trained with every block",
                                                 check=prefix_list, none=True, metavar="PREFIXES")
    include_embedding: bool = option(False, "give the embedding a block of its own", check=boolean)
    include_lm_head: bool = option(False, "give lm_head and the final norm a block of their own", check=boolean)
    verbose: int = option(1, "1: print the trainable prefixes at each switch, 0: silent", check=non_negative_int,
                          cli=False)
    seed: Optional[int] = option(None, "seed of the random block order; default: drawn from torch's global "
                                 "RNG in random mode", check=non_negative_int, none=True, cli=False)
    # the states and the step (this package's)
    state_policy: str = option("reset", "optimizer states at a switch: reset (BAdam) or offload to pinned host "
                               "memory and prefetch before the block returns (HiFT)", choices=STATE_POLICIES)
    backend: Optional[str] = option(None, "kernel backend; default: the fastest available (also the "
                                    "BADAM_KERNELS_BACKEND environment variable)", choices=("auto",) + BACKEND_NAMES,
                                    none=True)
    master_weights: bool = option(True, "keep an fp32 master copy of low-precision parameters (False: bf16 "
                                  "updated with stochastic rounding; needs Adam/AdamW)", check=boolean, cli=False)
    state_dtype: torch.dtype = option(torch.float32, "dtype of Adam's moments", choices=tuple(STATE_DTYPES.values()),
                                      cli=False)
    max_grad_norm: Optional[float] = option(None, "clip the active block's gradients to this global L2 norm "
                                            "(fused)", check=positive_float, none=True, metavar="NORM")
    skip_nonfinite: bool = option(True, "skip a step whose gradients hold NaN/Inf", check=boolean, cli=False)
    prefetch_steps: int = option(1, "offload: bring the next block's states back this many steps before the "
                                 "switch", check=positive_int, cli=False)
    # the backward pass and the layers
    truncate: bool = option(True, "install truncate_backward: the layers below the active block build no "
                            "graph", check=boolean, cli=False)
    keep_activations: Union[int, str] = option(0, "the top N layers from the active block up skip gradient "
                                               "checkpointing and keep their activations (faster backward, more "
                                               "memory); 'all' for every layer from the active block up",
                                               check=count_or_all, metavar="N|all", resume_may_change=True)
    keep_mode: str = option("all", "what the kept layers keep: all their activations, or only the outputs of "
                            "matrix products and attention, recomputing the elementwise operations (less "
                            "memory, measured slower than keeping fewer layers)", choices=KEEP_MODES,
                            resume_may_change=True)
    compile_layers: bool = option(False, "torch.compile each layer of the stack (fused elementwise work, fewer "
                                  "launches); the first steps of the first blocks compile", check=boolean,
                                  flag="--compile", resume_may_change=True)

    def __post_init__(self):
        validate(self)

    def optimizer_kwargs(self) -> Dict[str, Any]:
        """The keyword arguments of ``BlockOptimizer`` (not the truncation knobs)."""
        return {name: getattr(self, name) for name in OPTIMIZER_OPTIONS}

    def prepare_model(self, model, layers=None):
        """Apply the truncation knobs to ``model``: ``truncate_backward`` (unless it is installed
        already) and ``compile_layers`` (which leaves compiled layers alone). Returns the truncation
        handle, or None where none was installed now."""
        from .layers import compile_layers
        from .truncate import is_truncated, truncate_backward

        handle = None
        if self.truncate and not is_truncated(model, layers):
            handle = truncate_backward(model, layers=layers, keep_activations=self.keep_activations,
                                       keep_mode=self.keep_mode)
        if self.compile_layers:
            compile_layers(model, layers=layers)  # each new role compiles once, in the first blocks
        return handle


TRUNCATION_OPTIONS: Tuple[str, ...] = ("truncate", "keep_activations", "keep_mode", "compile_layers")
OPTIMIZER_OPTIONS: Tuple[str, ...] = tuple(f.name for f in dataclasses.fields(BAdamOptions)
                                           if f.name not in TRUNCATION_OPTIONS)
