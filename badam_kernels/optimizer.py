"""``BlockOptimizer``: block coordinate descent with Adam (BAdam), a drop-in for ``badam.BlockOptimizer`` 1.4.

The algorithm: split the parameters into D blocks (one transformer layer each, by default); train
one block for ``switch_block_every`` steps with the base optimizer while every other parameter is
frozen, then hand over to the next block in the schedule. Only the active block requires grad and
only it has an fp32 master copy and optimizer states, so memory is about 2M + 16M/D bytes for M
parameters.

What this class adds to the original: fused kernels (one launch per step over the active block's
flat buffers, see ``block_state.py`` and ``ops/``), any ``torch.optim`` base optimizer (HiFT), a
state policy at a switch (``reset`` as in BAdam, ``offload`` as in HiFT), a ``state_dict`` that
resumes exactly, skipping steps whose gradients are not finite, and no ``empty_cache``/``gc.collect``
on the hot path.

Two deliberate departures from badam 1.4, both where the original does not do what it says:
biases and normalisation weights really get no weight decay (badam 1.4 decays them: its no-decay
group's ``weight_decay`` is overwritten by the defaults), and ``start_block`` with ``random`` mode works.
Like the original, the first block trains ``switch_block_every - 1`` steps and every later block
``switch_block_every`` steps (it switches when ``(global_step + 1) % switch_block_every == 0``).
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.optim import Optimizer

from . import ops
from .block_state import Entry, FlatGroup, StatePark, layout, state_specs
from .partition import Partition, build_partition, decays, infer_block_prefixes
from .schedule import BlockSchedule

STATE_POLICIES = ("reset", "offload")
STATE_DICT_FORMAT = "badam_kernels.BlockOptimizer/1"


def _fused_adamw_eligible(opt: Optimizer) -> bool:
    """The fused kernel implements AdamW (decoupled decay); Adam without weight decay is the same update."""
    if type(opt) not in (torch.optim.AdamW, torch.optim.Adam):
        return False
    d = opt.defaults
    if d.get("amsgrad") or d.get("maximize") or d.get("differentiable"):
        return False
    decoupled = type(opt) is torch.optim.AdamW or d.get("decoupled_weight_decay", False)
    return decoupled or all(g.get("weight_decay", 0.0) == 0.0 for g in opt.param_groups)


class BlockOptimizer(Optimizer):
    """Train one block of parameters at a time with a base optimizer (BAdam / HiFT).

    Args (as in ``badam.BlockOptimizer`` 1.4):
        base_optimizer: a ``torch.optim`` optimizer over the model's parameters; its defaults give
            betas, eps and weight decay, ``param_groups[0]["lr"]`` of this optimizer the learning rate.
        named_parameters_list: ``list(model.named_parameters())``.
        block_prefix_list: list of blocks, each a list of name prefixes; inferred (one block per
            layer) when None.
        switch_block_every: steps per block.
        start_block: the first block (default: the last for ``descending``, 0 for ``ascending``).
        switch_mode: ``descending``, ``ascending``, ``random`` or ``fixed``.
        active_modules: name prefixes trained in every block.
        include_embedding, include_lm_head: give the embedding / the rest (lm_head, final norm) a
            block of their own in the inferred partition.
        verbose: 1 prints the trainable prefixes at each switch, 0 is silent.
        log_fn: called with that message instead of ``print``.
    Keyword-only additions:
        state_policy: ``reset`` (fresh states at each switch) or ``offload`` (states of inactive
            blocks parked in pinned host memory and prefetched before the block returns; on CUDA the
            host buffers of every block are pinned when the optimizer is built, 12 bytes per
            parameter with fp32 master and moments).
        backend: ``reference``, ``triton``, ``cuda`` or None (fastest available; also the
            ``BADAM_KERNELS_BACKEND`` environment variable).
        master_weights: keep an fp32 master copy of low-precision parameters (False: bf16 params
            updated with stochastic rounding, the smallest memory; needs the fused AdamW path).
        state_dtype: dtype of Adam's moments, torch.float32 or torch.bfloat16.
        max_grad_norm: clip the active block's gradients to this global L2 norm (fused).
        skip_nonfinite: skip a step whose gradients hold NaN/Inf (the weights stay as they were).
        prefetch_steps: with ``offload``, start bringing the next block's states back this many
            steps before the switch.
        seed: seed of the random block order (default: drawn from torch's global RNG in ``random``
            mode, the one draw the original makes too; the other modes leave the global RNG alone).

    Frozen parameters: a parameter with ``requires_grad=False`` when the optimizer is built (the base
    model under peft/LoRA, a layer frozen by hand) is never trained, whichever block is active, and a
    block left with nothing to train is skipped, as badam 1.4 skips blocks without LoRA parameters.
    Parameters that an earlier ``BlockOptimizer`` froze because their block was inactive are not
    frozen by the user: a second optimizer over the same model trains every block.

    Hyperparameters are read from ``param_groups[0]`` at every step (lr, betas, eps, weight decay),
    so schedulers and edits by hand take effect as with any torch optimizer.
    """

    group_class = FlatGroup  # builds the active block's flat groups (sharded.py: ShardedFlatGroup)
    norm_in_kernel = True  # one fused group: the kernel computes, checks and clips the norm

    def __init__(
        self,
        base_optimizer: Optimizer,
        named_parameters_list,
        block_prefix_list: Optional[List[List[str]]] = None,
        switch_block_every: int = 50,
        start_block: Optional[int] = None,
        switch_mode: str = "descending",
        active_modules: Optional[Sequence[str]] = None,
        include_embedding: bool = False,
        include_lm_head: bool = False,
        verbose: int = 1,
        log_fn: Optional[Callable[[str], None]] = None,
        ds_zero3_enabled=None,
        *,
        state_policy: str = "reset",
        backend: Optional[str] = None,
        master_weights: bool = True,
        state_dtype: torch.dtype = torch.float32,
        max_grad_norm: Optional[float] = None,
        skip_nonfinite: bool = True,
        prefetch_steps: int = 1,
        seed: Optional[int] = None,
    ):
        if not isinstance(base_optimizer, Optimizer):
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer).__name__}")
        if isinstance(switch_block_every, bool) or not isinstance(switch_block_every, int) or switch_block_every < 1:
            raise ValueError(f"switch_block_every must be a positive integer, got {switch_block_every!r}")
        if state_policy not in STATE_POLICIES:
            raise ValueError(f"unknown state_policy {state_policy!r}; choose one of {', '.join(STATE_POLICIES)}")
        if state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"state_dtype must be torch.float32 or torch.bfloat16, got {state_dtype}")
        if ds_zero3_enabled is not None:
            warnings.warn("ds_zero3_enabled is ignored (DeepSpeed ZeRO-3 is not supported by badam_kernels)")
        self.named_parameters_list = _checked_named_parameters(named_parameters_list)
        names = [n for n, _ in self.named_parameters_list]
        if block_prefix_list is None:
            block_prefix_list = infer_block_prefixes(names, include_embedding, include_lm_head)
        self.block_prefix_list = block_prefix_list
        self.active_modules = list(active_modules or [])
        # parameters the user froze (a peft base model, a hand-frozen layer) are never trained
        self.user_frozen = frozenset(i for i, (_, p) in enumerate(self.named_parameters_list) if not _trainable(p))
        self.partition: Partition = build_partition(names, block_prefix_list, self.active_modules, self.user_frozen)
        self.schedule = BlockSchedule(self.partition.num_blocks, switch_mode, start_block, seed,
                                      skip=self.partition.blocks_without_parameters())

        self.base_optimizer = base_optimizer
        self.switch_mode = switch_mode
        self.switch_block_every = switch_block_every
        self.verbose, self.log_fn = verbose, log_fn
        self.state_policy = state_policy
        self.backend = backend
        self.fused = _fused_adamw_eligible(base_optimizer)
        if not master_weights and not self.fused:
            raise ValueError("master_weights=False (stochastic rounding) needs an Adam/AdamW base optimizer")
        self.master_weights, self.state_dtype = master_weights, state_dtype
        self.max_grad_norm, self.skip_nonfinite = max_grad_norm, skip_nonfinite
        self.prefetch_steps = prefetch_steps
        self.global_step = 0
        self.switched = False
        self.last_grad_norm: Optional[torch.Tensor] = None
        self.groups: List[FlatGroup] = []
        self.park = StatePark()
        self._parked_base: Dict[int, dict] = {}

        # LR schedulers and the HF Trainer act on these groups (all parameters, as in the original);
        # their lr is read at every step.
        super().__init__(base_optimizer.param_groups, base_optimizer.defaults)
        if self.fused:
            self._step_supports_amp_scaling = True  # GradScaler hands us grad_scale and found_inf
        if state_policy == "offload":
            self._reserve_host_buffers()
        self._activate(self.schedule.active)

    # ---------------------------------------------------------------- public state
    @property
    def num_blocks(self) -> int:
        return self.partition.num_blocks

    @property
    def active_block(self) -> int:
        """Index of the block being trained now."""
        return self.schedule.active

    @property
    def active_param_names(self) -> List[str]:
        return [self.named_parameters_list[i][0] for i in self.partition.active_indices(self.active_block)]

    def hyperparameters(self) -> dict:
        """The update's hyperparameters as they stand now: ``param_groups[0]`` without its parameters.

        Read at every step, as a torch optimizer reads its groups, so that schedulers of lr, betas
        (``OneCycleLR``'s momentum cycling) or weight decay, and edits by hand, take effect. Group 0,
        as in the original: the active block's biases and norms get no weight decay whatever it says.
        """
        return {k: v for k, v in self.param_groups[0].items() if k != "params"}

    @property
    def current_block_idx(self) -> int:
        """badam 1.4 compatibility: there this holds the block that the next switch activates."""
        return self.schedule.peek()

    # ---------------------------------------------------------------- switching
    def _log(self, message: str) -> None:
        if self.log_fn is not None:
            self.log_fn(message)
        elif self.verbose >= 1:
            print(message)

    def _block_entries(self, block: int) -> List[List[Entry]]:
        """The block's parameters, grouped by dtype and device (one flat group each)."""
        entries: Dict[Tuple[torch.dtype, torch.device], List[Entry]] = defaultdict(list)
        for i in self.partition.active_indices(block):
            name, param = self.named_parameters_list[i]
            entries[(param.dtype, param.device)].append(Entry(i, name, param, decays(name, param)))
        return list(entries.values())

    def _state_specs(self, block: int) -> List[Dict[str, Tuple[Tuple[int, ...], torch.dtype]]]:
        """Shape and dtype of each state tensor of the block's flat groups, as ``state_tensors`` has them."""
        return [state_specs(entries[0].param.dtype, self._flat_numel(entries), keep_master=self.master_weights,
                            with_moments=self.fused, state_dtype=self.state_dtype)
                for entries in self._block_entries(block)]

    def _reserve_host_buffers(self) -> None:
        """``offload`` on CUDA: pin every block's host buffers up front (pinning is slow; a switch must not wait)."""
        for block in range(self.num_blocks):
            for gi, (entries, specs) in enumerate(zip(self._block_entries(block), self._state_specs(block))):
                if entries[0].param.device.type == "cuda":
                    self.park.reserve((block, gi), specs)

    def _flat_numel(self, entries: List[Entry]) -> int:
        """Length of the flat buffers of one group (padding included)."""
        return layout(entries)[2]

    def _activate(self, block: int, saved: Optional[dict] = None) -> None:
        """Make ``block`` trainable: freeze the rest, flatten its parameters, set up its states."""
        active = set(self.partition.active_indices(block))
        for i, (_, param) in enumerate(self.named_parameters_list):
            if i not in self.user_frozen:
                _set_trainable(param, i in active)
        self.groups = [self.group_class(group_entries, keep_master=self.master_weights, with_moments=self.fused,
                                        state_dtype=self.state_dtype) for group_entries in self._block_entries(block)]
        if self.fused:  # a forced backend that cannot run here fails now, with its reason
            for group in self.groups:
                ops.resolve_backend(self.backend, group.device)
        if saved is not None:
            self._load_block_states(saved)
        elif self.state_policy == "offload" and self.park.holds(block):
            for gi, group in enumerate(self.groups):
                group.load_states(self.park.take((block, gi), group.device))
            self._restore_base_state(self._parked_base.pop(block, None))
        else:
            for group in self.groups:
                group.init_states(self.backend)
            self._restore_base_state(None)
        prefixes = list(self.partition.prefixes[block]) + self.active_modules
        self._log(f"Parameters with the following prefix will be trainable: {prefixes}")

    def _deactivate(self, park: bool = True) -> None:
        """The active block goes inactive: its states are parked (``offload``) or dropped."""
        block = self.schedule.active
        if park and self.state_policy == "offload":
            for gi, group in enumerate(self.groups):
                self.park.park((block, gi), group.state_tensors())
            if not self.fused:
                self._parked_base[block] = _to_cpu(self.base_optimizer.state_dict())
        for group in self.groups:
            group.release()
        self.groups = []

    def switch_block(self) -> None:
        """Hand over to the next block of the schedule now."""
        self._deactivate()
        self._activate(self.schedule.advance())

    # ---------------------------------------------------------------- the base-optimizer path
    def _restore_base_state(self, base_state: Optional[dict]) -> None:
        """Point the base optimizer at the active block's fp32 tensors (fallback path only)."""
        if self.fused:
            return
        decay, no_decay = [], []
        for group in self.groups:
            for entry, hp in zip(group.entries, group.master_views()):
                (decay if entry.decay else no_decay).append(hp)
        groups = [({**self.hyperparameters(), "params": decay}, True),
                  ({**self.hyperparameters(), "params": no_decay}, False)]
        self.base_optimizer.param_groups = [g for g, _ in groups if g["params"]]
        self._base_group_decays = [decays for g, decays in groups if g["params"]]
        self._sync_base_hyperparameters()
        self.base_optimizer.state = defaultdict(dict)
        if base_state is not None:
            self.base_optimizer.load_state_dict(base_state)

    def _sync_base_hyperparameters(self) -> None:
        """The base optimizer's groups take today's hyperparameters; biases and norms no weight decay."""
        now = self.hyperparameters()
        for group, decays in zip(self.base_optimizer.param_groups, self._base_group_decays):
            group.update(now)
            if not decays:
                group["weight_decay"] = 0.0

    def _base_optimizer_step(self) -> None:
        self._sync_base_hyperparameters()
        for group in self.groups:
            if group.master is not None:
                for hp, entry in zip(group.master_views(), group.entries):
                    hp.grad = entry.param.grad.float()
        self.base_optimizer.step()
        for group in self.groups:
            if group.master is not None:
                for hp, entry in zip(group.master_views(), group.entries):
                    entry.param.copy_(hp)
                    hp.grad = None

    # ---------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        """One update of the active block; switches block when its turn is over."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._collect_grads()
        self._reduce_gradients()
        if self._grads_finite_or_clipped():
            if self.fused:
                self._fused_step()
            else:
                self._base_optimizer_step()
        self.global_step += 1
        self.switched = (self.global_step + 1) % self.switch_block_every == 0
        if self.switched:
            self.switch_block()
        elif self.state_policy == "offload":
            steps_left = self.switch_block_every - 1 - (self.global_step + 1) % self.switch_block_every
            if steps_left < self.prefetch_steps:
                self._prefetch_next()
        return loss

    def _collect_grads(self) -> None:
        # A method of its own so that no local variable of step() still holds an outgoing group when
        # switch_block() builds the next one: its master and moments would be alive twice at the peak.
        for group in self.groups:
            missing = group.collect_grads()
            if missing:
                raise RuntimeError(f"no gradient for the active parameters {missing[:3]}"
                                   f"{' ...' if len(missing) > 3 else ''}: run backward before step()")

    def _reduce_gradients(self) -> None:
        """Where data-parallel training averages the active block's flat gradients (see distributed.py)."""

    def _prefetch_next(self) -> None:
        upcoming = self.schedule.peek()
        for gi, group in enumerate(self.groups):
            self.park.prefetch((upcoming, gi), group.device)

    def _grads_finite_or_clipped(self) -> bool:
        """Norm check and clipping across dtype groups; the one-group fused path does both in-kernel.

        Returns False when the step must be skipped. Only this multi-group / fallback path reads
        the norm back to the host.
        """
        if self._kernel_takes_the_norm():
            return True
        if self.max_grad_norm is None and not self.skip_nonfinite:
            self.last_grad_norm = None
            return True
        norm = self._grad_norm()
        self.last_grad_norm = norm
        if self.skip_nonfinite and not bool(torch.isfinite(norm)):
            return False
        if self.max_grad_norm is not None:
            coef = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            for g in self.groups:
                g.grad.mul_(coef.to(g.grad.device, g.grad.dtype))
        return True

    def _kernel_takes_the_norm(self) -> bool:
        """One fused group: the kernel computes, checks and clips the norm itself (no host read)."""
        return self.norm_in_kernel and self.fused and len(self.groups) == 1

    def _grad_norm(self) -> torch.Tensor:
        """L2 norm of the active block's whole gradient, unscaled: under GradScaler the gradients are
        still scaled here (the fused kernel unscales them), so the norm is divided by the scale."""
        norms = [torch.linalg.vector_norm(g.grad.float(), 2) for g in self.groups]
        norm = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), 2)
        scale = getattr(self, "grad_scale", None)
        return norm if scale is None else norm / torch.as_tensor(scale, device=norm.device).reshape(())

    def _fused_step(self) -> None:
        one_group = self._kernel_takes_the_norm()
        hp = self.hyperparameters()
        for group in self.groups:
            norm = ops.adamw_step(
                group.param, group.grad, group.master, group.exp_avg, group.exp_avg_sq, group.step,
                lr=hp["lr"], betas=hp["betas"], eps=hp["eps"],
                weight_decay=hp.get("weight_decay", 0.0), decay_numel=group.decay_numel,
                grad_scale=getattr(self, "grad_scale", None), found_inf=getattr(self, "found_inf", None),
                max_grad_norm=self.max_grad_norm if one_group else None,
                check_finite=self.skip_nonfinite and one_group,
                seed=self.global_step * 1000003 + self.schedule.active, backend=self.backend)
            if one_group:
                self.last_grad_norm = norm

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Free (or zero) the active block's gradients; the other parameters have none."""
        for group in self.groups:
            group.zero_grads(set_to_none)

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Everything needed to resume exactly: schedule, step, hyperparameters, active and parked states."""
        return {
            "format": STATE_DICT_FORMAT,
            "param_names": [n for n, _ in self.named_parameters_list],
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
            "global_step": self.global_step,
            "schedule": self.schedule.state_dict(),
            "state_policy": self.state_policy,
            "active_states": [{k: v.detach().cpu().clone() for k, v in g.state_tensors().items()}
                              for g in self.groups],
            "active_base_state": None if self.fused else _to_cpu(self.base_optimizer.state_dict()),
            "parked": self.park.state_dict(),
            "parked_base": dict(self._parked_base),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume from ``state_dict()``; the model's weights are restored separately (model.load_state_dict).

        All or nothing: the whole checkpoint is checked against this optimizer first, and a refused
        one (another model, another shape, another state layout) leaves the optimizer as it was.
        """
        self._check_loadable(state_dict)
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update(saved)
        self._deactivate(park=False)  # the checkpoint's states replace ours
        self.global_step = int(state_dict["global_step"])
        self.schedule.load_state_dict(state_dict["schedule"])
        self.park.load_state_dict(state_dict["parked"])
        self._parked_base = dict(state_dict.get("parked_base", {}))
        self._activate(self.schedule.active, saved=state_dict)

    def _check_loadable(self, state_dict: dict) -> None:
        """Raise ValueError, naming what differs, unless ``load_state_dict`` can take ``state_dict`` whole."""
        if not isinstance(state_dict, dict) or state_dict.get("format") != STATE_DICT_FORMAT:
            raise ValueError("not a badam_kernels.BlockOptimizer state dict")
        names = [n for n, _ in self.named_parameters_list]
        saved_names = state_dict["param_names"]
        if saved_names != names:
            diff = next((f"{a!r} vs {b!r}" for a, b in zip(saved_names, names) if a != b),
                        f"{len(saved_names)} parameters vs {len(names)}")
            raise ValueError(f"checkpoint is from another model: parameter names differ ({diff})")
        if len(state_dict["param_groups"]) != len(self.param_groups):
            raise ValueError("checkpoint has a different number of parameter groups")
        schedule = state_dict["schedule"]
        if schedule["num_blocks"] != self.num_blocks or not 0 <= int(schedule["active"]) < self.num_blocks:
            raise ValueError(f"checkpoint has {schedule['num_blocks']} blocks, this optimizer has {self.num_blocks}")
        saved_blocks = [(int(schedule["active"]), "the active block", state_dict["active_states"])]
        by_block: Dict[int, list] = defaultdict(list)
        for (block, gi), states in sorted(state_dict["parked"].items()):
            by_block[int(block)].append(states)
        saved_blocks += [(block, f"parked block {block}", groups) for block, groups in by_block.items()]
        for block, what, groups in saved_blocks:
            _check_states_fit(groups, self._state_specs(block), what)
        base = state_dict.get("active_base_state")
        if base is not None:
            saved_count = sum(len(g["params"]) for g in base["param_groups"])
            count = len(self.partition.active_indices(int(schedule["active"])))
            if saved_count != count:
                raise ValueError(f"checkpoint's base optimizer holds {saved_count} parameters, the active block has {count}")

    def _load_block_states(self, saved: dict) -> None:
        for group, group_states in zip(self.groups, saved["active_states"]):
            group.load_states(group_states)
        self._restore_base_state(saved.get("active_base_state"))


def _check_states_fit(saved: List[Dict[str, torch.Tensor]], specs: List[dict], what: str) -> None:
    """The saved flat states of a block have the keys and shapes this optimizer's buffers have."""
    if len(saved) != len(specs):
        raise ValueError(f"checkpoint holds {len(saved)} state groups for {what}, this model has {len(specs)}")
    for states, spec in zip(saved, specs):
        if set(states) != set(spec):
            raise ValueError(f"checkpoint's states of {what} hold {sorted(states)}, this optimizer needs {sorted(spec)}")
        for key, (shape, _dtype) in spec.items():
            if tuple(states[key].shape) != tuple(shape):
                raise ValueError(f"checkpoint's {key} of {what} has shape {tuple(states[key].shape)}, this model "
                                 f"needs {tuple(shape)} (another model size?)")


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


# Set on the parameters a BlockOptimizer froze because their block is inactive: a second optimizer
# built over the same model must still train them, unlike parameters the user froze.
_FROZEN_BY_BLOCK_OPTIMIZER = "_badam_kernels_inactive"


def _trainable(param: torch.Tensor) -> bool:
    """Whether the user lets ``param`` train: it requires grad, or only a BlockOptimizer froze it."""
    return param.requires_grad or getattr(param, _FROZEN_BY_BLOCK_OPTIMIZER, False)


def _set_trainable(param: torch.Tensor, active: bool) -> None:
    """Unfreeze ``param`` for its block's turn, or freeze it (dropping its gradient) until the next."""
    param.requires_grad_(active)
    setattr(param, _FROZEN_BY_BLOCK_OPTIMIZER, not active)
    if not active:
        param.grad = None


def _checked_named_parameters(named_parameters_list) -> List[Tuple[str, torch.nn.Parameter]]:
    items = list(named_parameters_list)
    if not items:
        raise ValueError("named_parameters_list is empty")
    seen = {}
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], torch.Tensor)):
            raise TypeError("named_parameters_list must hold (name, parameter) pairs, "
                            "e.g. list(model.named_parameters())")
        name, param = item
        if id(param) in seen:
            raise ValueError(f"parameter {name!r} is the same tensor as {seen[id(param)]!r}")
        seen[id(param)] = name
    return items
