"""Build and install badam-kernels.

The package is pure Python + Triton. The C++/CUDA extension ``badam_kernels._C`` (sources in
``csrc/``) is compiled only where a CUDA build of torch and nvcc are present; force it with
``BADAM_KERNELS_BUILD_CUDA=1`` or skip it with ``BADAM_KERNELS_BUILD_CUDA=0``. It needs torch in the
build environment: ``pip install --no-build-isolation -e .``. Target GPUs: ``TORCH_CUDA_ARCH_LIST``
(default "9.0", Hopper); ``BADAM_KERNELS_BUILD_VERBOSE=1`` adds ptxas' register report. Where it is
not built, ``badam_kernels/_build.py`` compiles the same sources on first use (JIT).
"""
import importlib.util
import os
import re
from pathlib import Path

from setuptools import find_packages, setup

BUILD_ENV = "BADAM_KERNELS_BUILD_CUDA"
ROOT = Path(__file__).resolve().parent


def _build_config():
    """badam_kernels/_build.py (compiler flags shared with the JIT build), loaded without the package."""
    spec = importlib.util.spec_from_file_location("_badam_build", ROOT / "badam_kernels" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _why_no_cuda_build(config):
    """Why the extension cannot be built here, or None."""
    try:
        import torch
        from torch.utils import cpp_extension  # noqa: F401  (its import finds CUDA_HOME)
    except Exception as exc:  # e.g. pip's isolated build environment, which has no torch
        return f"torch is not importable in the build environment ({exc}); use --no-build-isolation"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    return config.use_cuda_home()


def _version() -> str:
    """The package's ``__version__``, written in one place (badam_kernels/__init__.py)."""
    text = (ROOT / "badam_kernels" / "__init__.py").read_text(encoding="utf-8")
    return re.search(r'^__version__ = "([^"]+)"', text, re.MULTILINE).group(1)


def cuda_extensions_and_cmdclass():
    """The CUDA extension and its build command, or nothing where it cannot or should not be built."""
    mode = os.environ.get(BUILD_ENV, "").strip()
    if mode == "0":
        return [], {}
    if mode not in ("", "1"):
        raise RuntimeError(f"{BUILD_ENV} must be 0 or 1, got {mode!r}")
    config = _build_config()
    reason = _why_no_cuda_build(config)
    if reason:
        if mode == "1":
            raise RuntimeError(f"{BUILD_ENV}=1 but badam_kernels._C cannot be built: {reason}")
        print(f"badam-kernels: not building the CUDA extension ({reason}); set {BUILD_ENV}=1 to require it")
        return [], {}

    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", config.DEFAULT_ARCH_LIST)
    verbose = os.environ.get(config.VERBOSE_ENV, "0").strip() == "1"
    extension = CUDAExtension(
        name="badam_kernels._C",
        sources=[f"csrc/{name}" for name in config.SOURCES],
        extra_compile_args={"cxx": config.CXX_FLAGS, "nvcc": config.nvcc_flags(ptxas_verbose=verbose)},
    )
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions_and_cmdclass()

setup(
    name="badam-kernels",
    version=_version(),
    description="Fast, small full-parameter fine-tuning by block coordinate descent with Adam (BAdam)",
    packages=find_packages(include=["badam_kernels", "badam_kernels.*"]),
    package_data={"badam_kernels.finetune": ["assets/*.txt", "assets/*.jsonl"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],  # the optimizer, the truncation and the kernels' dispatch need torch alone
    extras_require={
        "triton": ["triton>=3.0"],
        # the main job (badam-finetune) and the Hugging Face integration
        "finetune": ["transformers>=4.46", "safetensors", "tqdm", "matplotlib", "numpy", "pyyaml>=6"],
        # the main job's fused linear cross-entropy on a GPU (badam-finetune falls back to the plain loss without it)
        "gpu": ["liger-kernel>=0.8"],
        "test": ["pytest", "badam==1.4", "peft"],
    },
    entry_points={"console_scripts": ["badam-finetune=badam_kernels.finetune.cli:main",
                                      "badam-llamafactory=badam_kernels.integrations.llamafactory:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
