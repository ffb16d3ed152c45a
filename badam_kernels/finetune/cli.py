"""``badam-finetune``: full-parameter fine-tuning by block coordinate descent with Adam (BAdam).

With no arguments it trains the embedded tiny Llama on the shipped Shakespeare excerpt (a minute or
two on two CPU cores). ``badam-finetune info`` reports versions, the device and the kernel backends.
Any bad input ends with one line ``badam-finetune: error: ...`` on stderr and exit status 2 (1 for a
failure during training); set ``BADAM_KERNELS_DEBUG=1`` to get the traceback instead.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import List, Optional, Union

from .. import options
from ..options import flag_of
from .config import EMBEDDED_DEFAULTS, FIELDS, GROUPS, PRETRAINED_DEFAULTS, ConfigError, TrainConfig
from .data import DataError

PROG = "badam-finetune"
DEBUG_ENV = "BADAM_KERNELS_DEBUG"


class UsageError(Exception):
    """A command line that cannot run; the message is printed as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the usage too and exit; we want one line
        raise UsageError(message)


def _int_or_all(text: str) -> Union[int, str]:
    return "all" if text.strip().lower() == "all" else int(text)


def _prefixes(text: str) -> List[str]:
    if text.strip().lower() in ("", "none"):
        return []
    prefixes = [p.strip() for p in text.split(",")]
    if not all(prefixes):
        raise argparse.ArgumentTypeError(f"expected comma-separated name prefixes, got {text!r}")
    return prefixes


# How the command line spells the value of an option with this check (an option's ``parse`` overrides it).
CONVERT = {options.positive_int: int, options.non_negative_int: int, options.positive_float: float,
           options.non_negative_float: float, options.count_or_all: _int_or_all, options.prefix_list: _prefixes}
SPELLING = {options.prefix_list: "comma-separated, 'none' for none"}  # said in --help where the check is not


def _argument_type(field: dataclasses.Field):
    """argparse's ``type`` for an option: the text converted, then judged by the option's own check.
    (A check names what it wants for any value it refuses, None included.)"""
    check = field.metadata["check"]
    convert = field.metadata["parse"] or CONVERT[check]

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {check(None)}, got {text!r}") from None
        wanted = check(value)
        if wanted is not None:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
        return value

    return parse


def count_or_all(text: str) -> Union[int, str]:
    """``--keep-activations``' value: a non-negative integer or ``all`` (for other command lines too)."""
    return _argument_type(FIELDS["keep_activations"])(text)


def _shown(value) -> str:
    return "none" if value == [] else str(value)


def _help(field: dataclasses.Field) -> str:
    """The option's help, with how the command line spells it and its default (where not in the help)."""
    text = field.metadata["help"]
    if field.metadata["check"] in SPELLING:
        text += f" ({SPELLING[field.metadata['check']]})"
    if field.name in EMBEDDED_DEFAULTS:
        embedded, pretrained = EMBEDDED_DEFAULTS[field.name], PRETRAINED_DEFAULTS[field.name]
        text += " (default: job)" if embedded != pretrained else f" (default: {_shown(embedded)})"
    elif field.default is not None and not isinstance(field.default, bool) and "default:" not in text:
        text += f" (default: {_shown(field.default)})"
    return text.replace("%", "%%")


def _add_option(group, field: dataclasses.Field) -> None:
    meta = field.metadata
    kwargs = dict(dest=field.name, help=_help(field))
    if meta["metavar"]:
        kwargs["metavar"] = meta["metavar"]
    if meta["check"] is options.boolean:  # --flag (default off), --no-flag (default on), both (None: the job's)
        kwargs["action"] = {False: "store_true", True: "store_false", None: argparse.BooleanOptionalAction}[
            field.default]
    elif meta["choices"] is not None:
        kwargs["choices"] = meta["choices"]
    elif meta["check"] is not None or meta["parse"] is not None:
        kwargs["type"] = _argument_type(field)
    group.add_argument(flag_of(field), **kwargs)


def _job_defaults(defaults: dict) -> str:
    """The options that differ between the two jobs, as a command line would set them."""
    shown = []
    for name, value in defaults.items():
        if EMBEDDED_DEFAULTS[name] != PRETRAINED_DEFAULTS[name]:
            flag = flag_of(FIELDS[name])
            shown.append(flag if value is True else flag.replace("--", "--no-", 1) if value is False
                         else f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}")
    return ", ".join(shown)


def build_parser() -> argparse.ArgumentParser:
    """The command line, made from ``TrainConfig``'s declarations (one argument group per section)."""
    p = _Parser(
        prog=PROG,
        description="Full-parameter fine-tuning of LLMs by block coordinate descent with Adam (BAdam). "
                    "With no arguments: train the embedded tiny Llama on the shipped Shakespeare excerpt.",
        epilog=f"'{PROG} info' prints the version, torch/triton versions, the device and the kernel "
               "backends. Defaults marked 'job' differ between the embedded model (learning from scratch: "
               f"{_job_defaults(EMBEDDED_DEFAULTS)}) and --model (fine-tuning: "
               f"{_job_defaults(PRETRAINED_DEFAULTS)}, as BAdam).",
        argument_default=argparse.SUPPRESS,  # unset options stay unset: --resume must know what was given
    )
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    for field in FIELDS.values():
        if field.metadata["cli"]:
            _add_option(groups[field.metadata["group"]], field)
    groups["output"].add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    return p


def _version() -> str:
    from .. import __version__

    return __version__


def _dist_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def info() -> int:
    """Print the version, torch/triton/transformers versions, the device and the kernel backends."""
    import platform

    import torch

    from .. import ops

    print(f"badam-kernels {_version()}")
    print(f"python {platform.python_version()} ({platform.machine()}, {os.cpu_count()} CPUs)")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    print(f"triton {_dist_version('triton')}")
    print(f"transformers {_dist_version('transformers')}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            print(f"device cuda:{i}: {props.name}, {props.total_memory / 2**30:.1f} GiB, "
                  f"capability {props.major}.{props.minor}")
        device = torch.device("cuda")
    else:
        print("device cpu (no CUDA device)")
        device = torch.device("cpu")
    print("backends:")
    for name, status in ops.backend_report().items():
        print(f"  {name}: {_backend_status(name, status, device)}")
    try:
        chosen = ops.resolve_backend(None, device).__name__.rsplit(".", 1)[-1]
    except Exception as exc:  # e.g. a bad BADAM_KERNELS_BACKEND
        chosen = f"none ({exc})"
    print(f"auto on {device.type}: {chosen}")
    return 0


def _backend_status(name: str, status: str, device) -> str:
    """What ``--backend NAME`` does on ``device``: a backend that loads may still be refused there."""
    from .. import ops

    if status != "available":
        return status
    interpreter = name == "triton" and device.type == "cpu"  # Triton runs CPU tensors only interpreted
    try:
        ops.resolve_backend(name, device)
    except (RuntimeError, ValueError):
        hint = (": Triton runs CPU tensors only through its interpreter, set TRITON_INTERPRET=1 for that "
                "(slow, a testing aid)") if interpreter else ""
        return f"installed, but --backend {name} is refused on {device.type}{hint}"
    return "available through Triton's interpreter only (TRITON_INTERPRET=1: slow, a testing aid)" \
        if interpreter else "available"


def _error(message: str) -> None:
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        if argv[:1] == ["info"] or "--info" in argv:
            extra = [a for a in argv if a not in ("info", "--info")]
            if extra:
                raise UsageError(f"'info' takes no arguments, got {' '.join(extra)}")
            return info()
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # --help / --version
            return int(exc.code or 0)
        given = vars(args)
        from .loop import train

        _quiet_libraries()
        summary = train(TrainConfig(**given), given=set(given))
        return 130 if summary["interrupted"] else 0
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except (UsageError, DataError, ConfigError) as exc:
        if debug:
            raise
        _error(exc)
        return 2
    except Exception as exc:  # a failure while training: still one line, unless debugging
        if debug:
            raise
        _error(f"{type(exc).__name__}: {exc} (set {DEBUG_ENV}=1 for the traceback)")
        return 1
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Under torchrun: the job's process group ends with the job."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # rank 0 may still be writing: tear the group down together, not from under it
        dist.destroy_process_group()


def _quiet_libraries() -> None:
    """Keep the terminal to our progress bar and log lines (transformers' info/warnings are noise here)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
