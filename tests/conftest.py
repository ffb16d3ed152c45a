import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is defined, so it is set before any test imports one:
# without a GPU the Triton kernels run on CPU tensors through the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: without it they are reported as skipped, never silently passed."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run `pytest -m gpu` on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"
