"""The package's layout as users meet it: the core imports light, old module names still import."""
import importlib
import subprocess
import sys
import warnings

import pytest

from badam_kernels._moved import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_names_import_the_moved_module_with_a_warning(old):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=MOVED[old].replace(".", r"\.")):
        module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED[old])


def test_importing_the_optimizer_pulls_in_no_finetune_dependency():
    code = ("import sys, badam_kernels; from badam_kernels import BlockOptimizer, truncate_backward; "
            "print(sorted(m for m in ('transformers', 'matplotlib', 'safetensors', 'badam_kernels.finetune', "
            "'badam_kernels.parallel.fsdp') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_new_names_import_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for name in ("badam_kernels.parallel.fsdp", "badam_kernels.parallel.data_parallel", "badam_kernels.layers",
                     "badam_kernels.finetune.cli", "badam_kernels.options"):
            importlib.import_module(name)
