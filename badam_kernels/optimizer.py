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

from .block_state import Entry, FlatGroup, state_specs
from .options import BAdamOptions, OptionError
from .partition import Partition, build_partition, checked_named_parameters, decays, infer_block_prefixes, \
    set_trainable, trainable
from .schedule import BlockSchedule
from .state_policy import POLICIES
from .sync import LocalGradients
from .update import BaseOptimizerUpdate, FusedAdamW, fused_adamw_eligible

STATE_DICT_FORMAT = "badam_kernels.BlockOptimizer/1"


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
    Keyword-only additions (declared with their checks in ``options.BAdamOptions``):
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
        sync: how the active block's gradients are synchronised over processes (``sync.py``; the
            parallel optimizers in ``badam_kernels.parallel`` pass theirs).

    Frozen parameters: a parameter with ``requires_grad=False`` when the optimizer is built (the base
    model under peft/LoRA, a layer frozen by hand) is never trained, whichever block is active, and a
    block left with nothing to train is skipped, as badam 1.4 skips blocks without LoRA parameters.
    Parameters that an earlier ``BlockOptimizer`` froze because their block was inactive are not
    frozen by the user: a second optimizer over the same model trains every block.

    Hyperparameters are read from ``param_groups[0]`` at every step (lr, betas, eps, weight decay),
    so schedulers and edits by hand take effect as with any torch optimizer.

    The optimizer holds three parts it delegates to: the update rule (``update.FusedAdamW`` over
    the flat buffers, or ``update.BaseOptimizerUpdate``), the state policy (``state_policy``) and the
    gradient synchronisation (``sync``). What is left here is the algorithm: partition, schedule,
    step, switch, state_dict.
    """

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
        sync=None,
    ):
        if not isinstance(base_optimizer, Optimizer):
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer).__name__}")
        if ds_zero3_enabled is not None:
            warnings.warn("ds_zero3_enabled is ignored (DeepSpeed ZeRO-3 is not supported by badam_kernels)")
        try:
            self.options = BAdamOptions(
                switch_block_every=switch_block_every, switch_mode=switch_mode, start_block=start_block,
                block_prefix_list=block_prefix_list, active_modules=list(active_modules or []),
                include_embedding=include_embedding, include_lm_head=include_lm_head, verbose=verbose, seed=seed,
                state_policy=state_policy, backend=backend, master_weights=master_weights,
                state_dtype=state_dtype, max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite,
                prefetch_steps=prefetch_steps)
        except OptionError as exc:
            raise ValueError(str(exc)) from None
        self.named_parameters_list = checked_named_parameters(named_parameters_list)
        names = [n for n, _ in self.named_parameters_list]
        self.block_prefix_list = block_prefix_list or infer_block_prefixes(names, include_embedding, include_lm_head)
        self.active_modules = self.options.active_modules
        # parameters the user froze (a peft base model, a hand-frozen layer) are never trained
        self.user_frozen = frozenset(i for i, (_, p) in enumerate(self.named_parameters_list) if not trainable(p))
        self.partition: Partition = build_partition(names, self.block_prefix_list, self.active_modules,
                                                    self.user_frozen)
        self.sync = sync if sync is not None else LocalGradients()
        if switch_mode == "random":  # the one draw from the global RNG, as the original's
            seed = self.sync.agree_on_seed(int(torch.randint(0, 2**62, ()).item()) if seed is None else seed)
        self.schedule = BlockSchedule(self.partition.num_blocks, switch_mode, start_block, seed,
                                      skip=self.partition.blocks_without_parameters())
        self.switch_mode, self.switch_block_every = switch_mode, switch_block_every
        self.verbose, self.log_fn = verbose, log_fn
        self.base_optimizer = base_optimizer
        self.rule = FusedAdamW(backend) if fused_adamw_eligible(base_optimizer) else BaseOptimizerUpdate(base_optimizer)
        if not master_weights and not self.fused:
            raise ValueError("master_weights=False (stochastic rounding) needs an Adam/AdamW base optimizer")
        self.policy = POLICIES[state_policy]()
        self.global_step = 0
        self.switched = False
        self.last_grad_norm: Optional[torch.Tensor] = None
        self.groups: List[FlatGroup] = []

        # LR schedulers and the HF Trainer act on these groups (all parameters, as in the original);
        # their hyperparameters are read at every step.
        super().__init__(base_optimizer.param_groups, base_optimizer.defaults)
        if self.fused:
            self._step_supports_amp_scaling = True  # GradScaler hands us grad_scale and found_inf
        self.policy.reserve(self.num_blocks, self._state_layout)
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

    @property
    def fused(self) -> bool:
        """Whether the update is the fused AdamW kernel (else the base optimizer's own step)."""
        return isinstance(self.rule, FusedAdamW)

    @property
    def state_policy(self) -> str:
        return self.policy.name

    @property
    def park(self):
        """The host store of the parked block states (``offload``)."""
        return self.policy.park_of_states

    def hyperparameters(self) -> dict:
        """The update's hyperparameters as they stand now: ``param_groups[0]`` without its parameters.

        Read at every step, as a torch optimizer reads its groups, so that schedulers of lr, betas
        (``OneCycleLR``'s momentum cycling) or weight decay, and edits by hand, take effect. Group 0,
        as in the original: the active block's biases and norms get no weight decay whatever it says.
        """
        return {k: v for k, v in self.param_groups[0].items() if k != "params"}

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
        return [specs for specs, _ in self._state_layout(block)]

    def _state_layout(self, block: int) -> List[Tuple[Dict[str, Tuple[Tuple[int, ...], torch.dtype]], torch.device]]:
        """(state specs, device) of each of the block's flat groups."""
        return [(state_specs(entries[0].param.dtype, self.sync.flat_numel(entries),
                             keep_master=self.options.master_weights, with_moments=self.rule.with_moments,
                             state_dtype=self.options.state_dtype), entries[0].param.device)
                for entries in self._block_entries(block)]

    def _activate(self, block: int, saved: Optional[dict] = None) -> None:
        """Make ``block`` trainable: freeze the rest, flatten its parameters, set up its states."""
        active = set(self.partition.active_indices(block))
        for i, (_, param) in enumerate(self.named_parameters_list):
            if i not in self.user_frozen:
                set_trainable(param, i in active)
        self.groups = [self.sync.group_class(entries, keep_master=self.options.master_weights,
                                             with_moments=self.rule.with_moments, state_dtype=self.options.state_dtype)
                       for entries in self._block_entries(block)]
        if saved is not None:  # a checkpoint's states
            for group, states in zip(self.groups, saved["active_states"]):
                group.load_states(states)
            rule_state = saved.get("active_base_state")
        elif self.policy.holds(block):  # parked at the block's last visit
            rule_state = self.policy.take(block, self.groups)
        else:
            for group in self.groups:
                group.init_states(self.rule.backend)
            rule_state = None
        self.rule.start(self.groups, rule_state)
        self.sync.activated(self.groups)
        self._log(f"Parameters with the following prefix will be trainable: "
                  f"{list(self.partition.prefixes[block]) + self.active_modules}")

    def _deactivate(self, park: bool = True) -> None:
        """The active block goes inactive: its states are parked (``offload``) or dropped."""
        if park:
            self.policy.park(self.schedule.active, self.groups, self.rule.state_dict())
        for group in self.groups:
            group.release()
        self.groups = []

    def switch_block(self) -> None:
        """Hand over to the next block of the schedule now."""
        self._deactivate()
        self._activate(self.schedule.advance())

    # ---------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        """One update of the active block; switches block when its turn is over."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._collect_grads()
        self.sync.reduce(self.groups)
        if self._grads_finite_or_clipped():
            self._update()
        self.global_step += 1
        self.switched = (self.global_step + 1) % self.switch_block_every == 0
        if self.switched:
            self.switch_block()
        else:
            steps_left = self.switch_block_every - 1 - (self.global_step + 1) % self.switch_block_every
            if steps_left < self.options.prefetch_steps:
                self.policy.prefetch(self.schedule.peek(), [g.device for g in self.groups])
        return loss

    def _collect_grads(self) -> None:
        # A method of its own so that no local variable of step() still holds an outgoing group when
        # switch_block() builds the next one: its master and moments would be alive twice at the peak.
        for group in self.groups:
            missing = group.collect_grads()
            if missing:
                raise RuntimeError(f"no gradient for the active parameters {missing[:3]}"
                                   f"{' ...' if len(missing) > 3 else ''}: run backward before step()")

    def _kernel_takes_the_norm(self) -> bool:
        """One fused group holding the whole gradient: the kernel computes, checks and clips the norm
        itself, with no read back to the host."""
        return self.fused and len(self.groups) == 1 and self.sync.norm_is_local

    def _grads_finite_or_clipped(self) -> bool:
        """Norm check and clipping, where the kernel does not do them; False: skip this step."""
        if self._kernel_takes_the_norm():
            return True
        if self.options.max_grad_norm is None and not self.options.skip_nonfinite:
            self.last_grad_norm = None
            return True
        norm = self.sync.squared_norm(self.groups).sqrt()
        scale = getattr(self, "grad_scale", None)  # GradScaler: the gradients are still scaled here
        if scale is not None:
            norm = norm / torch.as_tensor(scale, device=norm.device).reshape(())
        self.last_grad_norm = norm
        if self.options.skip_nonfinite and not bool(torch.isfinite(norm)):
            return False
        if self.options.max_grad_norm is not None:
            coef = (self.options.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            for g in self.groups:
                g.grad.mul_(coef.to(g.grad.device, g.grad.dtype))
        return True

    def _update(self) -> None:
        one_group = self._kernel_takes_the_norm()
        self.sync.before_update(self.groups)
        norm = self.rule.step(
            self.groups, self.hyperparameters(), seed=self.global_step * 1000003 + self.schedule.active,
            grad_scale=getattr(self, "grad_scale", None), found_inf=getattr(self, "found_inf", None),
            max_grad_norm=self.options.max_grad_norm if one_group else None,
            check_finite=self.options.skip_nonfinite and one_group)
        self.sync.after_update(self.groups)
        if one_group:
            self.last_grad_norm = norm

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Free (or zero) the active block's gradients; the other parameters have none."""
        self.sync.zero_grad()
        for group in self.groups:
            group.zero_grads(set_to_none)

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Everything needed to resume exactly: schedule, step, hyperparameters, active and parked states."""
        parked, parked_base = self.policy.state_dict()
        return {
            "format": STATE_DICT_FORMAT,
            "param_names": [n for n, _ in self.named_parameters_list],
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
            "global_step": self.global_step,
            "schedule": self.schedule.state_dict(),
            "state_policy": self.state_policy,
            "active_states": [{k: v.detach().cpu().clone() for k, v in g.state_tensors().items()}
                              for g in self.groups],
            "active_base_state": self.rule.state_dict(),
            "parked": parked,
            "parked_base": parked_base,
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
        self.policy.load_state_dict(state_dict["parked"], state_dict.get("parked_base", {}))
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
        active = int(schedule["active"])
        saved_blocks = [(active, "the active block", state_dict["active_states"])]
        by_block: Dict[int, list] = defaultdict(list)
        for (block, _), states in sorted(state_dict["parked"].items()):
            by_block[int(block)].append(states)
        saved_blocks += [(block, f"parked block {block}", groups) for block, groups in by_block.items()]
        for block, what, groups in saved_blocks:
            _check_states_fit(groups, self._state_specs(block), what)
        base = state_dict.get("active_base_state")
        if base is not None:
            saved_count = sum(len(g["params"]) for g in base["param_groups"])
            count = len(self.partition.active_indices(active))
            if saved_count != count:
                raise ValueError(f"checkpoint's base optimizer holds {saved_count} parameters, the active block has {count}")


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
