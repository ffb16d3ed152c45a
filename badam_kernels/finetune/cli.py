"""``badam-finetune``: full-parameter fine-tuning by block coordinate descent with Adam (BAdam).

With no arguments it trains the embedded tiny Llama on the shipped Shakespeare excerpt (a minute or
two on two CPU cores). ``badam-finetune info`` reports versions, the device and the kernel backends.
Any bad input ends with one line ``badam-finetune: error: ...`` on stderr and exit status 2 (1 for a
failure during training); set ``BADAM_KERNELS_DEBUG=1`` to get the traceback instead.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Union

from .data import DataError
from .loop import ConfigError

PROG = "badam-finetune"
DEBUG_ENV = "BADAM_KERNELS_DEBUG"


class UsageError(Exception):
    """A command line that cannot run; the message is printed as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the usage too and exit; we want one line
        raise UsageError(message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return value


def _number(text: str, allow_zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0 or (allow_zero and value == 0)) or value != value or value == float("inf"):
        kind = "non-negative" if allow_zero else "positive"
        raise argparse.ArgumentTypeError(f"must be a {kind} number, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    return _number(text, allow_zero=False)


def _non_negative_float(text: str) -> float:
    return _number(text, allow_zero=True)


def count_or_all(text: str) -> Union[int, str]:
    """A non-negative integer, or ``all``."""
    if text.strip().lower() == "all":
        return "all"
    try:
        return _non_negative_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer or 'all', got {text!r}") from None


def _prefix_list(text: str) -> List[str]:
    if text.strip().lower() in ("", "none"):
        return []
    prefixes = [p.strip() for p in text.split(",")]
    if not all(prefixes):
        raise argparse.ArgumentTypeError(f"expected comma-separated name prefixes, got {text!r}")
    return prefixes


def build_parser() -> argparse.ArgumentParser:
    from .loop import BACKENDS, DEVICES, DTYPES, KEEP_MODES, STATE_POLICIES, SWITCH_MODES

    p = _Parser(
        prog=PROG,
        description="Full-parameter fine-tuning of LLMs by block coordinate descent with Adam (BAdam). "
                    "With no arguments: train the embedded tiny Llama on the shipped Shakespeare excerpt.",
        epilog=f"'{PROG} info' prints the version, torch/triton versions, the device and the kernel "
               "backends. Defaults marked 'job' differ between the embedded model (learning from "
               "scratch: batch 16, seq 128, lr 2e-3, switch every 20, the embedding and lm_head + final norm "
               "each a block of their own) and --model (fine-tuning: batch 8, seq 512, lr 1e-5, switch "
               "every 50, one block per layer, as BAdam).",
        argument_default=argparse.SUPPRESS,  # unset options stay unset: --resume must know what was given
    )
    g = p.add_argument_group("job")
    g.add_argument("--model", metavar="PATH",
                   help="a local Hugging Face model folder or a .gguf file (nothing is downloaded); a folder "
                        "without tokenizer files is read with the byte tokenizer. Default: the embedded tiny Llama")
    g.add_argument("--data", metavar="FILE",
                   help="a .jsonl file of instruction/response (or prompt/completion) pairs, loss on the "
                        "responses only; or a text file. Default: the shipped Shakespeare excerpt")
    g.add_argument("--steps", metavar="N", type=_positive_int,
                   help="steps to run (on --resume: more steps). Default: 400 on the shipped text, one "
                        "pass over a --data file; on --resume: up to the step the run was heading to")
    g.add_argument("--out", metavar="DIR", help="run folder (default: runs/<timestamp>/)")
    g.add_argument("--resume", metavar="RUN_DIR", help="continue the run saved in RUN_DIR, exactly")
    t = p.add_argument_group("training")
    t.add_argument("--batch-size", metavar="N", type=_positive_int, help="sequences per step (default: job)")
    t.add_argument("--seq-len", metavar="N", type=_positive_int, help="tokens per sequence (default: job)")
    t.add_argument("--lr", metavar="LR", type=_positive_float, help="learning rate (default: job)")
    t.add_argument("--weight-decay", metavar="WD", type=_non_negative_float, help="AdamW weight decay (default: 0)")
    t.add_argument("--warmup-steps", metavar="N", type=_non_negative_int, help="linear LR warm-up steps (default: 0)")
    t.add_argument("--max-grad-norm", metavar="NORM", type=_non_negative_float,
                   help="clip the active block's gradient norm; 0: no clipping (default: 1.0)")
    t.add_argument("--seed", metavar="N", type=_non_negative_int, help="seed of the model init and the data order (default: 0)")
    t.add_argument("--dtype", choices=sorted(DTYPES), help="model dtype (default: bf16 on a GPU, fp32 on the CPU)")
    t.add_argument("--device", choices=DEVICES, help="where to train (default: auto, the GPU if there is one)")
    t.add_argument("--shard", action="store_true",
                   help="under torchrun: shard the model and the optimizer states over the processes with "
                        "FSDP2, each holding 1/N of every layer (default: data parallel, each a whole copy); "
                        "checkpoints then resume on any number of processes; cannot change on --resume")
    b = p.add_argument_group("BAdam")
    b.add_argument("--switch-every", metavar="N", type=_positive_int, help="steps per block (default: job)")
    b.add_argument("--switch-mode", choices=SWITCH_MODES, help="block order (default: descending)")
    b.add_argument("--start-block", metavar="K", type=_non_negative_int, help="first block (needed by --switch-mode fixed)")
    b.add_argument("--state-policy", choices=STATE_POLICIES,
                   help="optimizer states at a switch: reset (BAdam) or offload to host memory (HiFT) "
                        "(default: reset)")
    b.add_argument("--include-embedding", action=argparse.BooleanOptionalAction,
                   help="give the embedding a block of its own (default: job)")
    b.add_argument("--include-lm-head", action=argparse.BooleanOptionalAction,
                   help="give lm_head and the final norm a block of their own (default: job)")
    b.add_argument("--active-modules", type=_prefix_list, metavar="PREFIXES",
                   help="comma-separated parameter-name prefixes trained with every block; 'none' for none "
                        "(default: none)")
    b.add_argument("--backend", choices=BACKENDS, help="kernel backend (default: auto, the fastest available)")
    b.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    b.add_argument("--keep-activations", metavar="N|all", type=count_or_all,
                   help="the top N layers from the active block up skip gradient checkpointing: they keep "
                        "their activations instead of recomputing them (faster backward, more memory); 'all' "
                        "for every layer from the active block up; only with --grad-checkpointing (default: 0)")
    b.add_argument("--keep-mode", choices=KEEP_MODES,
                   help="what the --keep-activations layers keep: all their activations, or only the outputs of "
                        "matrix products and attention, recomputing the elementwise operations (less memory, but "
                        "measured slower than fewer kept layers) (default: all)")
    b.add_argument("--compile", action="store_true",
                   help="torch.compile each layer (fused elementwise work, fewer launches: 1.24x tokens/s on the "
                        "Llama-3-8B shape, 1.42x at 1.2B, measured on an H200); the first steps of the first "
                        "blocks take a few seconds more to compile")
    o = p.add_argument_group("output")
    o.add_argument("--log-every", metavar="N", type=_positive_int, help="a log line every N steps (default: 50)")
    o.add_argument("--save-every", metavar="N", type=_non_negative_int,
                   help="also checkpoint every N steps; 0: only at the end (default: 0)")
    o.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    o.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
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
        from .loop import TrainConfig, train

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
