"""Loading the CUDA extension (``badam_kernels._build``): without it the package imports, the dispatch
says why the backend is unavailable, and the JIT build can be turned off."""
import pytest
import torch

import badam_kernels  # noqa: F401  (the package imports without the extension)
from badam_kernels import _build, ops
from badam_kernels.ops import backend_report


def test_backend_report_says_why_cuda_is_unavailable():
    report = backend_report()
    assert set(report) >= {"cuda", "triton", "reference"}
    assert report["reference"] == "available"
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the gpu tests cover the backend")
    assert report["cuda"].startswith("unavailable (")
    assert len(report["cuda"]) > len("unavailable (ImportError: )") + 10, report["cuda"]
    ext, reason = _build.load_extension()
    assert ext is None and isinstance(reason, str) and reason
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        ops.resolve_backend("cuda", torch.device("cpu"))


def test_jit_opt_out_is_reported(monkeypatch):
    monkeypatch.setattr(_build, "_result", None)
    monkeypatch.setenv(_build.JIT_ENV, "0")
    monkeypatch.setattr("importlib.import_module", _raise_module_not_found)
    ext, reason = _build.load_extension()
    assert ext is None and f"{_build.JIT_ENV}=0" in reason


def _raise_module_not_found(name, package=None):
    raise ModuleNotFoundError(f"No module named {name!r}")
