"""Backend dispatch for the block-state operations.

One interface, several backends, each a module that satisfies ``interface.Backend``:

* ``reference``: plain torch, any device, the ground truth;
* ``triton``: Triton kernels (CUDA tensors; CPU tensors too under ``TRITON_INTERPRET=1``);
* ``cuda``: the compiled extension ``badam_kernels._C`` (CUDA tensors).

``resolve_backend`` picks the fastest one available for a device; the choice can be forced with an
argument or the environment variable ``BADAM_KERNELS_BACKEND`` (``auto`` or a backend name).
"""
from __future__ import annotations

import importlib
import os
from typing import Dict, Optional, Sequence, cast

import torch

from .interface import AdamWStepArgs, Backend, pack_adamw_args  # noqa: F401  (re-exported)
from .interface import MASKED_TILE, MaskedAdamWStepArgs, MaskedStates, pack_masked_adamw_args  # noqa: F401  (re-exported)

BACKEND_NAMES = ("triton", "cuda", "reference")  # auto: the first that runs (fastest on H200)
_MODULES = {"reference": ".reference", "triton": ".triton_adamw", "cuda": ".cuda"}
ENV_VAR = "BADAM_KERNELS_BACKEND"
_loaded: Dict[str, Optional[Backend]] = {}
_load_errors: Dict[str, str] = {}


def load_backend(name: str) -> Optional[Backend]:
    """The backend (its module), or None where it cannot load here (the reason is in ``backend_report``)."""
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)} or 'auto'")
    if name not in _loaded:
        try:
            module = importlib.import_module(_MODULES[name], __name__)
            reason = getattr(module, "unavailable_reason", lambda: None)()
            if reason:
                raise ImportError(reason)
            _loaded[name] = cast(Backend, module)
        except Exception as exc:  # a missing triton or an unbuilt extension is not an error here
            _loaded[name] = None
            _load_errors[name] = f"{type(exc).__name__}: {exc}"
    return _loaded[name]


def _runs_on(module: Backend, device: torch.device) -> bool:
    supports = getattr(module, "supports_device", lambda d: True)
    return bool(supports(device))


def resolve_backend(name: Optional[str] = None, device: Optional[torch.device] = None,
                    fastest_first: Sequence[str] = BACKEND_NAMES) -> Backend:
    """The backend (its module) to use: ``name`` (or the environment variable), else the first of
    ``fastest_first`` that runs on ``device``."""
    name = (name or os.environ.get(ENV_VAR) or "auto").lower()
    device = torch.device(device) if device is not None else torch.device("cpu")
    if name != "auto":
        module = load_backend(name)
        if module is None:
            raise RuntimeError(f"backend {name!r} is not available: {_load_errors.get(name)}")
        if not _runs_on(module, device):
            raise RuntimeError(f"backend {name!r} does not run on {device.type} tensors")
        return module
    # CPU tensors: the reference (Triton runs there only through its interpreter, a testing aid)
    candidates = fastest_first if device.type != "cpu" else ("reference",)
    for candidate in candidates:
        module = load_backend(candidate)
        if module is not None and _runs_on(module, device):
            return module
    raise RuntimeError("no backend available")  # unreachable: reference runs everywhere


def backend_report() -> Dict[str, str]:
    """For each backend: 'available' or why not (for ``badam-finetune info``)."""
    report = {}
    for name in BACKEND_NAMES:
        module = load_backend(name)
        report[name] = "available" if module is not None else f"unavailable ({_load_errors.get(name)})"
    return report


def adamw_step(*tensors, backend: Optional[str] = None, **kwargs):
    """One fused AdamW step over a block's flat buffers; see ``interface.AdamWStepArgs``.

    Positional: ``param, grad, master, exp_avg, exp_avg_sq, step``. Returns the gradient norm (a 0-d
    fp32 tensor) when it was computed, else None.
    """
    args = pack_adamw_args(*tensors, **kwargs)
    return resolve_backend(backend, args.param.device, _fastest_for(args)).adamw_step(args)


def _fastest_for(args: AdamWStepArgs) -> Sequence[str]:
    """The automatic choice per state layout, as measured (``benchmarks/bench_step.py`` on the H200,
    ``benchmarks/results/bench_step_h200_2026-12-05.json``): Triton is the fastest for every layout
    but bf16 parameters without a master and bf16 moments (stochastic rounding, 14 bytes per
    parameter), where its kernel reaches 2.8 TB/s and the CUDA one 3.9 (0.78 against 1.08 ms a layer)."""
    if args.stochastic_rounding and args.exp_avg.dtype == torch.bfloat16:
        return ("cuda", "triton", "reference")
    return BACKEND_NAMES


def init_state(param, master, exp_avg, exp_avg_sq, backend: Optional[str] = None) -> None:
    """Fused state initialisation at a switch: master from the params, m and v zeroed, one pass."""
    from .interface import check_state_buffers

    check_state_buffers(param, master, exp_avg, exp_avg_sq)
    resolve_backend(backend, param.device).init_state(param, master, exp_avg, exp_avg_sq)


def resolve_op_backend(op: str, name: Optional[str] = None, device: Optional[torch.device] = None) -> Backend:
    """The backend to run the optional op ``op`` (e.g. ``masked_adamw_step``) on ``device``.

    A backend named by the argument must have the op (else a RuntimeError says so); otherwise (the
    environment variable or ``auto``) the choice falls through to the next backend that has it, so
    forcing ``cuda`` for the whole run still runs the ops only Triton and the reference implement.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if name is not None and name.lower() != "auto":
        module = resolve_backend(name, device)
        if not hasattr(module, op):
            raise RuntimeError(f"backend {name!r} does not implement {op}")
        return module
    try:
        module = resolve_backend(None, device)
        if hasattr(module, op):
            return module
    except RuntimeError:
        pass  # the environment forces a backend that cannot run here: fall through, as for a missing op
    candidates = BACKEND_NAMES if device.type != "cpu" else ("reference",)
    for candidate in candidates:
        module = load_backend(candidate)
        if module is not None and hasattr(module, op) and _runs_on(module, device):
            return module
    raise RuntimeError(f"no backend implements {op} on {device}")


def masked_adamw_step(*tensors, backend: Optional[str] = None, **kwargs) -> None:
    """One masked Adam step (the ratio mode): gather the masked entries' gradients, update their
    master, m and v, scatter the new values into the parameters, in one launch per tile range; see
    ``interface.MaskedAdamWStepArgs``.

    Positional: ``param, grad, states`` (a ``MaskedStates``).
    """
    args = pack_masked_adamw_args(*tensors, **kwargs)
    if args.num_tiles:
        resolve_op_backend("masked_adamw_step", backend, args.param.device).masked_adamw_step(args)
