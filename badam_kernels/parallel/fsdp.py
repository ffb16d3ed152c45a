"""Sharded BAdam on FSDP2 (``torch.distributed.fsdp.fully_shard``): each rank keeps 1/N of every layer.

``shard_model`` puts each decoder layer and then the root under ``fully_shard``; the parameters become
DTensors whose local shards FSDP2 owns. ``FlatGroup`` (``block_state.py``) makes the model's
parameters views of its flat buffer, but FSDP2 all-gathers from storage of its own (a padded
buffer that the local shard is a view of), so a ``ShardedFlatGroup`` keeps *copies* instead: the
rank's local shards are staged into the flat ``param`` buffer before the fused step and copied back
in place afterwards, into the very tensors FSDP2 all-gathers at the next forward. Gradients arrive as
DTensor shards that FSDP2 reduce-scatters and averages itself; they are moved into the flat grad
buffer at step time and ``.grad`` becomes a DTensor view of it. Master weights and Adam moments
exist only for the local shard, so optimizer memory is 1/N of the unsharded BAdam's as well.

What crosses the wire: in forward an all-gather of every layer (all of them run), in backward an
all-gather of each layer that backward visits (with ``truncate_backward``, the active block and the
layers above it: it also stops FSDP2's backward prefetch of the layer below, never reached) and a
reduce-scatter of the active block's gradients only, since nothing else requires grad; per step one
scalar all-reduce for the global gradient norm when clipping or checking for non-finite gradients.

Checkpoints go through ``torch.distributed.checkpoint`` with optimizer states as DTensors of the
parameters' global shapes, so a run saved on N ranks resumes on M (``save_checkpoint`` /
``load_checkpoint``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from ..block_state import Entry, FlatGroup, layout, local_shard, state_specs
from .data_parallel import ProcessGroupSync
from ..layers import find_layer_stack
from ..optimizer import STATE_DICT_FORMAT, BlockOptimizer
from ..update import fused_adamw_eligible

__all__ = ["ShardedBlockOptimizer", "ShardedFlatGroup", "ShardedGradients", "load_checkpoint", "save_checkpoint", "shard_model"]

DCP_FORMAT = "badam_kernels.ShardedBlockOptimizer.dcp/1"
_META_KEYS = ("param_names", "param_groups", "global_step", "state_policy")


def shard_model(model: nn.Module, mesh=None, reshard_after_forward: bool = True, mp_policy=None) -> nn.Module:
    """Put each layer of the model's layer stack, then the model itself, under FSDP2's ``fully_shard``.

    ``mesh`` (default: every rank of the world, on the default device type), ``reshard_after_forward``
    and ``mp_policy`` (a ``MixedPrecisionPolicy``) are passed to every ``fully_shard`` call. The
    parameters become DTensors sharded on dim 0. Returns the model (sharded in place).
    """
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for layer in find_layer_stack(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _as_global(local: Tensor, like: Tensor) -> Tensor:
    """``local`` as the shard of a DTensor laid out like parameter ``like`` (plain tensors stay plain)."""
    if not isinstance(like, DTensor):
        return local
    return DTensor.from_local(local, like.device_mesh, like.placements, shape=like.shape, stride=like.stride())


def _copies(param: Tensor, world_size: int) -> int:
    """On how many ranks the same local shard of ``param`` lives (plain tensors: on all of them)."""
    if not isinstance(param, DTensor):
        return world_size
    mesh = param.device_mesh
    return math.prod(mesh.size(d) for d, p in enumerate(param.placements) if not p.is_shard())


def _copy_checked(dst: Tensor, src: Tensor, what: str) -> None:
    if src.shape != dst.shape:  # copy_ would broadcast silently
        raise ValueError(f"checkpoint holds {what} with local shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(src)


@dataclass
class LocalLayout:
    """A flat group's layout over the rank's local shards (``block_state.layout`` of their sizes)."""

    entries: List[Entry]  # the real parameters, in flat order
    offsets: List[int]
    shapes: List[torch.Size]  # local shard shapes (may be empty on the last ranks)
    numel: int
    decay_numel: int

    @classmethod
    def of(cls, entries: Sequence[Entry]) -> "LocalLayout":
        local = [Entry(e.index, e.name, local_shard(e.param), e.decay) for e in entries]
        ordered, offsets, numel, decay_numel = layout(local)
        by_index = {e.index: e for e in entries}
        return cls([by_index[e.index] for e in ordered], offsets, [e.param.shape for e in ordered], numel, decay_numel)

    def views(self, flat: Tensor) -> List[Tensor]:
        return [flat[o:o + s.numel()].view(s) for o, s in zip(self.offsets, self.shapes)]


class ShardedFlatGroup(FlatGroup):
    """A ``FlatGroup`` over the local shards of DTensor parameters (plain parameters work too).

    The flat buffers hold copies of the local shards: ``pull_params`` refreshes the ``param`` buffer
    from them, ``push_params`` writes it back in place. Gradients are adopted at step time
    (``collect_grads``), each ``.grad`` then being a DTensor view of the flat grad buffer, so that
    FSDP2 accumulates later backward passes straight into it. No post-accumulate-grad hooks.
    """

    def _layout(self, entries: Sequence[Entry]):
        lay = LocalLayout.of(entries)
        return lay.entries, lay.offsets, lay.shapes, lay.numel, lay.decay_numel

    def _bind_params(self) -> None:
        self.pull_params()

    def _grad_hooks(self) -> list:
        return []  # gradients are adopted at step time (collect_grads)

    @torch.no_grad()
    def pull_params(self) -> None:
        """Copy the local shards into the flat ``param`` buffer (they may have been loaded meanwhile)."""
        for e, view in zip(self.entries, self._views(self.param)):
            view.copy_(local_shard(e.param))

    @torch.no_grad()
    def push_params(self) -> None:
        """Copy the flat ``param`` buffer back into the local shards, in place (what FSDP2 all-gathers)."""
        for e, view in zip(self.entries, self._views(self.param)):
            local_shard(e.param).copy_(view)

    def _adopt_grad(self, k: int) -> None:
        """Move parameter k's (local) gradient into the buffer; ``.grad`` becomes a (DTensor) view of it."""
        param = self.entries[k].param
        if param.grad is None:
            return
        view = self._grad_views()[k]
        local = local_shard(param.grad)
        if local.data_ptr() != view.data_ptr():
            view.copy_(local)
            param.grad = _as_global(view, param)

    def replicated_grads(self) -> List[Tensor]:
        """Gradient views of the plain (not sharded) parameters, which FSDP2 does not reduce."""
        return [v for e, v in zip(self.entries, self._grad_views()) if not isinstance(e.param, DTensor)]

    def local_sq_norm(self, world_size: int) -> Tensor:
        """This rank's share of the squared gradient norm: a shard held by c ranks counts 1/c on each."""
        weights = [1.0 / _copies(e.param, world_size) for e in self.entries]
        if len(set(weights)) == 1:
            return self.grad.float().square().sum() * weights[0]
        return sum(v.float().square().sum() * w for v, w in zip(self._grad_views(), weights))


class ShardedGradients(ProcessGroupSync):
    """FSDP2: each rank updates its shards. FSDP2 reduce-scatters and averages the DTensor gradients;
    plain (replicated) parameters are averaged here; the gradient norm spans every rank's shard, so
    it is summed over the ranks (one scalar all-reduce) and never taken inside the kernel."""

    group_class = ShardedFlatGroup
    norm_is_local = False

    def flat_numel(self, entries: Sequence[Entry]) -> int:
        return LocalLayout.of(entries).numel

    def reduce(self, groups: List[ShardedFlatGroup]) -> None:
        if self.world_size == 1:
            return
        for group in groups:
            for grad in group.replicated_grads():
                dist.all_reduce(grad, group=self.process_group)
                grad.div_(self.world_size)

    def squared_norm(self, groups: List[ShardedFlatGroup]) -> Tensor:
        """The whole gradient's sum of squares: each rank's share, summed by one all-reduce."""
        sq = torch.stack([g.local_sq_norm(self.world_size).to(self.comm_device) for g in groups]).sum()
        dist.all_reduce(sq, group=self.process_group)
        return sq

    def before_update(self, groups: List[ShardedFlatGroup]) -> None:
        for group in groups:
            group.pull_params()

    def after_update(self, groups: List[ShardedFlatGroup]) -> None:
        for group in groups:
            group.push_params()


class ShardedBlockOptimizer(BlockOptimizer):
    """``BlockOptimizer`` over a model sharded with FSDP2 (see :func:`shard_model`).

    Takes the arguments of :class:`BlockOptimizer` plus, keyword-only, ``process_group``: the ranks
    of the parameters' mesh (default: the whole world), over which the gradient norm is summed and
    rank 0's seed of the random block order is broadcast. Needs an Adam/AdamW base optimizer (the
    fused path) and an initialised process group. Every rank must call ``step`` (it holds a
    collective when clipping or checking for non-finite gradients), and call it while FSDP2 holds the
    parameters sharded, as it does after backward: a module left unsharded across ``step`` (a
    forward in between with ``reshard_after_forward=False``) would run its next forward with the
    old weights and ``requires_grad``.

    Semantics are those of :class:`BlockOptimizer` (schedule, ``reset``/``offload``, master weights or
    stochastic rounding, ``max_grad_norm`` on the global norm, ``skip_nonfinite``), with each rank
    updating its shards. ``dcp_state_dict``/``load_dcp_state_dict`` checkpoint with
    ``torch.distributed.checkpoint`` across world sizes; ``state_dict`` stays the per-rank one.
    """

    def __init__(self, base_optimizer, named_parameters_list, *args, process_group=None, **kwargs):
        if not fused_adamw_eligible(base_optimizer):
            raise ValueError("ShardedBlockOptimizer needs an Adam/AdamW base optimizer (the fused path)")
        super().__init__(base_optimizer, named_parameters_list, *args, sync=ShardedGradients(process_group),
                         **kwargs)

    # ---------------------------------------------------------------- DCP checkpoints
    def _layouts(self, block: int) -> List[LocalLayout]:
        return [LocalLayout.of(entries) for entries in self._block_entries(block)]

    def _param_states(self, block: int, flats: List[Dict[str, Tensor]]) -> Dict[str, Dict[str, Tensor]]:
        """Flat states of a block's groups as {parameter name: {state: DTensor of the global shape}}."""
        out: Dict[str, Dict[str, Tensor]] = {}
        for lay, flat in zip(self._layouts(block), flats):
            for key, buf in flat.items():
                if key != "step":
                    for e, view in zip(lay.entries, lay.views(buf)):
                        out.setdefault(e.name, {})[key] = _as_global(view, e.param)
        return out

    def _flat_states(self, block: int, per_param: Dict[str, Dict[str, Tensor]],
                     steps: List[float]) -> List[Dict[str, Tensor]]:
        """The inverse of ``_param_states``: this rank's flat state buffers of the block (on the CPU)."""
        flats = []
        for lay, step in zip(self._layouts(block), steps):
            flat = {}
            for key, some in per_param[lay.entries[0].name].items():
                flat[key] = torch.zeros(lay.numel, dtype=some.dtype)
                for e, view in zip(lay.entries, lay.views(flat[key])):
                    _copy_checked(view, local_shard(per_param[e.name][key]), f"{key} of {e.name}")
            flat["step"] = torch.tensor([step], dtype=torch.float32)
            flats.append(flat)
        return flats

    def _zero_flats(self, block: int) -> List[Dict[str, Tensor]]:
        """Empty flat states of the block, to be filled by ``dcp.load``."""
        return [{key: torch.zeros(shape, dtype=dtype) for key, (shape, dtype) in
                 state_specs(lay.entries[0].param.dtype, lay.numel, keep_master=self.options.master_weights,
                             with_moments=self.rule.with_moments, state_dtype=self.options.state_dtype).items()}
                for lay in self._layouts(block)]

    def dcp_state_dict(self, meta: Optional[dict] = None) -> dict:
        """The optimizer's state for ``torch.distributed.checkpoint``: ``{"meta": ..., "states": ...}``.

        ``states[str(block)][param_name]`` holds ``master``/``exp_avg``/``exp_avg_sq`` as DTensors with
        the parameter's mesh, placements and global shape, for the active block and (``offload``)
        every parked block; ``meta`` the bookkeeping as plain values (global step, schedule, each
        block's step counters, hyperparameters). Given ``meta`` (a checkpoint's, loaded first), the
        result is instead a template of that checkpoint's states to ``dcp.load`` into: which blocks
        hold states depends on the saved run, so the bookkeeping must be known before the tensors.
        """
        if meta is not None:
            blocks = [int(block) for block, _ in meta["steps"]]
            return {"meta": meta, "states": {str(b): self._param_states(b, self._zero_flats(b)) for b in blocks}}
        sd = self.state_dict()  # CPU copies of the active and parked flat states
        flats = {self.active_block: sd["active_states"]}
        for (block, _), states in sorted(sd["parked"].items()):
            flats.setdefault(block, []).append(states)
        meta = {key: sd[key] for key in _META_KEYS}
        meta.update(format=DCP_FORMAT, schedule={**sd["schedule"], "generator": sd["schedule"]["generator"].tolist()},
                    steps=[[block, [float(s["step"]) for s in fl]] for block, fl in flats.items()])
        return {"meta": meta, "states": {str(b): self._param_states(b, fl) for b, fl in flats.items()}}

    def load_dcp_state_dict(self, state_dict: dict) -> None:
        """Resume from a ``dcp_state_dict(meta)`` template that ``dcp.load`` filled (see ``load_checkpoint``).

        Works on any number of ranks; the model's weights are restored separately (``set_model_state_dict``).
        """
        meta = state_dict["meta"]
        if meta.get("format") != DCP_FORMAT:
            raise ValueError("not a badam_kernels.ShardedBlockOptimizer DCP state dict")
        steps = {int(block): s for block, s in meta["steps"]}
        if set(state_dict["states"]) != {str(b) for b in steps}:
            raise ValueError(f"the states hold blocks {sorted(state_dict['states'])}, the checkpoint's bookkeeping "
                             f"{sorted(steps)}: build the template with dcp_state_dict(meta) after loading the meta")
        flats = {b: self._flat_states(b, state_dict["states"][str(b)], s) for b, s in steps.items()}
        schedule = {**meta["schedule"], "generator": torch.tensor(meta["schedule"]["generator"], dtype=torch.uint8)}
        self.load_state_dict({
            **{key: meta[key] for key in _META_KEYS}, "format": STATE_DICT_FORMAT, "schedule": schedule,
            "active_states": flats.pop(int(schedule["active"])), "active_base_state": None,
            "parked": {(b, gi): s for b, fl in flats.items() for gi, s in enumerate(fl)}, "parked_base": {}})


def save_checkpoint(path, model: Optional[nn.Module], optimizer: ShardedBlockOptimizer) -> None:
    """Save the sharded model and optimizer with ``torch.distributed.checkpoint`` (every rank calls it).

    ``model=None`` saves the optimizer's states only (for a caller that writes the weights itself).
    """
    state = {"optim": optimizer.dcp_state_dict()}
    if model is not None:
        state["model"] = get_model_state_dict(model)
    dcp.save(state, checkpoint_id=path, process_group=optimizer.sync.process_group)


def load_checkpoint(path, model: Optional[nn.Module], optimizer: ShardedBlockOptimizer) -> None:
    """Resume ``save_checkpoint``'s checkpoint, saved on any number of ranks (every rank calls it).

    Two reads: first the optimizer's bookkeeping (which blocks hold states), then the model's
    weights (unless ``model`` is None) and those states, into a template shaped by it.
    """
    group = optimizer.sync.process_group
    meta = {"optim": {"meta": optimizer.dcp_state_dict()["meta"]}}
    dcp.load(meta, checkpoint_id=path, process_group=group)
    state = {"optim": optimizer.dcp_state_dict(meta["optim"]["meta"])}
    if model is not None:
        state["model"] = get_model_state_dict(model)
    dcp.load(state, checkpoint_id=path, process_group=group)
    if model is not None:
        set_model_state_dict(model, state["model"])
    optimizer.load_dcp_state_dict(state["optim"])
