"""Module names that moved in the package's new layout keep importing, with a DeprecationWarning.

``import badam_kernels.sharded`` gives the module ``badam_kernels.parallel.fsdp`` itself (the same
object, so classes and functions are identical under both names). A finder on ``sys.meta_path``
does it lazily: nothing is imported until an old name is.
"""
import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "badam_kernels.sharded": "badam_kernels.parallel.fsdp",
    "badam_kernels.distributed": "badam_kernels.parallel.data_parallel",
    "badam_kernels.models": "badam_kernels.layers",
    "badam_kernels.train": "badam_kernels.finetune.loop",
    "badam_kernels.cli": "badam_kernels.finetune.cli",
    "badam_kernels.data": "badam_kernels.finetune.data",
    "badam_kernels.plots": "badam_kernels.finetune.plots",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        warnings.warn(f"{spec.name} has moved to {MOVED[spec.name]}; import it from there (the old name "
                      "will be removed)", DeprecationWarning, stacklevel=2)
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module):
        pass  # the module is the moved one, already executed; importlib files it under the old name


def install() -> None:
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedModuleFinder())  # before the path finders: a stale folder must not win
