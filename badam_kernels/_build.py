"""Loading the C++/CUDA extension ``badam_kernels._C``, or compiling it on first use.

Order: the extension built by ``setup.py`` (``import badam_kernels._C``); else, where torch is a CUDA
build, nvcc and ninja are found and a CUDA device is visible, a JIT build of ``csrc/`` through
``torch.utils.cpp_extension.load`` into ``~/.cache/badam_kernels/`` (or a temporary directory), which
is compiled once per torch/CUDA version and source change. ``BADAM_KERNELS_JIT=0`` turns the JIT
build off. Nothing here raises: ``load_extension()`` returns ``(torch.ops.badam_kernels, None)`` or
``(None, reason)``.

``setup.py`` reads the compiler flags below (it loads this file by path, without importing the
package), so both builds compile the same way.
"""
from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path
from typing import List, Optional, Tuple

JIT_ENV = "BADAM_KERNELS_JIT"
VERBOSE_ENV = "BADAM_KERNELS_BUILD_VERBOSE"  # =1: print the JIT build's commands, ptxas register report
DEFAULT_ARCH_LIST = "9.0"

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = ("ops.cpp", "fused_adamw.cu", "masked_adamw.cu")
OPS = ("adamw_step", "init_state", "masked_adamw_step")
CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "-lineinfo"]  # IEEE division and sqrt (no fast math): the reference's arithmetic

_result: Optional[Tuple[Optional[object], Optional[str]]] = None


def nvcc_flags(ptxas_verbose: bool = False) -> List[str]:
    return NVCC_FLAGS + (["-Xptxas=-v"] if ptxas_verbose else [])


def cuda_home_problem(cuda_home: Optional[str]) -> Optional[str]:
    """Why this CUDA_HOME cannot compile the extension, or None."""
    if not cuda_home:
        return "nvcc not found (set CUDA_HOME to the CUDA toolkit, e.g. /usr/local/cuda)"
    home = Path(cuda_home)
    if not (home / "bin" / "nvcc").exists():
        return f"CUDA_HOME={cuda_home} has no bin/nvcc"
    if not (home / "include" / "cuda_runtime.h").exists():
        return f"CUDA_HOME={cuda_home} has no include/cuda_runtime.h (set CUDA_HOME to the CUDA toolkit)"
    return None


def use_cuda_home() -> Optional[str]:
    """Point torch's extension builder at a usable CUDA toolkit; None, or why there is none.

    torch guesses CUDA_HOME from $CUDA_HOME, else from the nvcc on PATH; a wrapper script such as
    /usr/local/bin/nvcc makes that guess /usr/local, which has no CUDA headers. Then /usr/local/cuda
    is used where it is a toolkit.
    """
    from torch.utils import cpp_extension

    problem = cuda_home_problem(cpp_extension.CUDA_HOME)
    if problem is None:
        return None
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and cuda_home_problem(candidate) is None:
            cpp_extension.CUDA_HOME = candidate  # read by CUDAExtension and load() when they build
            os.environ["CUDA_HOME"] = candidate
            return None
    return problem


def _ops():
    import torch

    ops = torch.ops.badam_kernels
    missing = [name for name in OPS if not hasattr(ops, name)]
    if missing:
        raise RuntimeError(f"the library is loaded but torch.ops.badam_kernels lacks {missing}")
    return ops


def _registered():
    try:
        return _ops()
    except Exception:
        return None


def _build_dir() -> Path:
    import torch

    tag = f"torch{torch.__version__}".replace("+", "_")
    for root in (Path.home() / ".cache" / "badam_kernels", Path(tempfile.gettempdir()) / "badam_kernels"):
        path = root / tag
        try:
            path.mkdir(parents=True, exist_ok=True)
            if os.access(path, os.W_OK):
                return path
        except OSError:
            continue
    return Path(tempfile.mkdtemp(prefix="badam_kernels_"))


def _jit_build() -> Tuple[Optional[object], Optional[str]]:
    if os.environ.get(JIT_ENV, "1").strip() == "0":
        return None, f"not built, and the JIT build is off ({JIT_ENV}=0)"
    import torch

    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
    if not torch.cuda.is_available():
        return None, "no CUDA device is visible (torch.cuda.is_available() is False); not JIT-compiling"
    missing = [name for name in SOURCES if not (CSRC / name).exists()]
    if missing:
        return None, f"not built, and the sources for a JIT build are missing from {CSRC}: {missing}"
    from torch.utils import cpp_extension

    problem = use_cuda_home()
    if problem:
        return None, f"not built, and no JIT build: {problem}"
    if not cpp_extension.is_ninja_available():
        return None, "not built, and the JIT build needs ninja (pip install ninja)"
    try:
        jit_compile(verbose=os.environ.get(VERBOSE_ENV, "0").strip() == "1")
        return _ops(), None
    except Exception as exc:  # a failed compile must not break `import badam_kernels`
        message = str(exc).strip().splitlines()
        tail = " | ".join(message[-6:]) if message else ""
        return None, f"JIT build of csrc/ failed: {type(exc).__name__}: {tail}"


def jit_compile(verbose: bool = False, build_directory: Optional[str] = None) -> None:
    """Compile csrc/ with torch.utils.cpp_extension.load and load it (registers the ops); raises on failure."""
    from torch.utils import cpp_extension

    cpp_extension.load(
        name="badam_kernels_C",
        sources=[str(CSRC / name) for name in SOURCES],
        extra_cflags=CXX_FLAGS,
        extra_cuda_cflags=nvcc_flags(ptxas_verbose=verbose),
        build_directory=build_directory or str(_build_dir()),
        is_python_module=False,
        verbose=verbose,
    )


def _load() -> Tuple[Optional[object], Optional[str]]:
    try:
        import torch  # noqa: F401
    except Exception as exc:
        return None, f"torch cannot be imported: {exc}"
    try:
        importlib.import_module("badam_kernels._C")
        return _ops(), None
    except ModuleNotFoundError:
        prebuilt_problem = None
    except Exception as exc:  # e.g. built against another torch: rebuild below
        prebuilt_problem = f"badam_kernels._C failed to load ({type(exc).__name__}: {exc})"
        ops = _registered()
        if ops is not None:
            return ops, None
    ops, reason = _jit_build()
    if ops is None and prebuilt_problem:
        reason = f"{prebuilt_problem}; {reason}"
    return ops, reason


def load_extension() -> Tuple[Optional[object], Optional[str]]:
    """``(torch.ops.badam_kernels, None)`` once the ops are registered, else ``(None, reason)``; cached."""
    global _result
    if _result is None:
        try:
            _result = _load()
        except Exception as exc:  # never raise at import
            _result = (None, f"{type(exc).__name__}: {exc}")
    return _result
