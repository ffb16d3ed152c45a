"""badam-kernels: full-parameter fine-tuning of LLMs by block coordinate descent with Adam (BAdam).

Public API:

* :class:`BlockOptimizer`: a drop-in for ``badam.BlockOptimizer`` 1.4, with fused kernels, any base
  optimizer, state policies at a switch (``reset`` / ``offload``) and an exact ``state_dict``;
* :class:`BlockOptimizerRatio`: a drop-in for ``badam.BlockOptimizerRatio`` 1.4 (ratio mode) on dense
  gradients, with a fused gather-update-scatter step;
* :func:`truncate_backward`: layers below the active block build no graph and save no activations;
* :func:`find_layer_stack`: the repeated layer stack of a model (Hugging Face decoders and others);
* ``badam_kernels.ops``: the fused state operations behind one dispatch (reference, Triton, CUDA).
"""
from . import _moved
from .layers import compile_layers, find_layer_stack
from .optimizer import BlockOptimizer
from .ratio import BlockOptimizerRatio
from .truncate import TruncatedBackward, is_truncated, truncate_backward

__version__ = "0.1.0"
_moved.install()  # the old module names (badam_kernels.sharded, .distributed, ...) keep importing
__all__ = ["BlockOptimizer", "BlockOptimizerRatio", "truncate_backward", "TruncatedBackward", "is_truncated",
           "find_layer_stack", "compile_layers", "__version__"]
