"""Build and install badam-kernels.

The package is pure Python + Triton. The C++/CUDA extension ``badam_kernels._C`` (sources in
``csrc/``) is compiled only where a CUDA build of torch and nvcc are present; force it with
``BADAM_KERNELS_BUILD_CUDA=1`` or skip it with ``BADAM_KERNELS_BUILD_CUDA=0``.
"""
from setuptools import find_packages, setup



def cuda_extensions_and_cmdclass():
    """The CUDA extension and its build command, or nothing where it cannot or should not be built."""
    return [], {}


ext_modules, cmdclass = cuda_extensions_and_cmdclass()

setup(
    name="badam-kernels",
    version="0.1.0",
    description="Fast, small full-parameter fine-tuning by block coordinate descent with Adam (BAdam)",
    packages=find_packages(include=["badam_kernels", "badam_kernels.*"]),
    package_data={"badam_kernels": ["data/*.txt", "data/*.jsonl"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "transformers>=4.46", "safetensors", "tqdm", "matplotlib", "numpy"],
    extras_require={"triton": ["triton>=3.0"], "test": ["pytest", "badam==1.4"]},
    entry_points={"console_scripts": ["badam-finetune=badam_kernels.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
