"""``BlockOptimizerRatio``: BAdam's ratio mode, a drop-in for ``badam.BlockOptimizerRatio`` 1.4.

The algorithm: every parameter trains a fraction ``update_ratio`` of its entries with Adam; the
masked entries are ``adjacent`` (a contiguous run of the flattened parameter, starting at an offset)
or ``scatter`` (a random permutation's run, from a per-parameter seed). Every ``switch_every`` steps
the offsets move on by one mask's length and the Adam states start again, so in ``1 / update_ratio``
periods every entry has had its turn. Only the masked entries have states (fp32 master, m, v), so
they take 16 bytes per masked entry instead of 16 per parameter (``ops.masked_adamw_step``).

What this class does differently from the original (``badam/block_optim.py``), which turns the
gradients sparse in a post-accumulate-grad hook and steps with sparse tensors:

* the gradients stay dense, so gradient clipping, DDP, gradient accumulation and checkpoints of
  the model work as with any torch optimizer; each step is one fused gather-update-scatter launch
  per flat group (``ops.masked_adamw_step``), with an fp32 master of the masked entries of bf16
  parameters (the original keeps bf16 moments and adds bf16 updates, which round away);
* the masks are drawn at the first step of each period, from the step count (not in a hook at
  every backward), so accumulating gradients over several backwards, also across a switch, is exact;
* ``scatter`` draws from a private generator with the original's seed and leaves the global RNG
  alone (the original calls ``torch.random.manual_seed`` on every mask it draws);
* a model without a parameter named ``embed``/``lm_head`` (tied embeddings) is accepted;
  ``update_ratio`` 1 works on parameters below ``preserve_threshold``; parameters that share a
  shape but not a ratio (``param_update_ratios``) get masks of their own ratio;
* decoupled weight decay when a parameter group sets ``weight_decay`` (the original ignores it;
  at 0, the default, the two are the same); a ``state_dict`` that resumes exactly.

The same as the original, so that fp32 trajectories agree: the parameters covered (trainable ones;
the first parameter named ``embed`` and the first named ``lm_head`` frozen unless included), the
per-parameter seeds (one ``torch.randint(0, 1000, (1,))`` draw per named parameter, in order), the
masks (with ``keep_mask`` one mask per shape, drawn from the offset and seed of the parameter of that
shape whose gradient arrives first), the Adam arithmetic (the paper's efficient form, eps outside the
bias correction), per-parameter step counts (a parameter without a gradient is skipped), and the
1e-9 the original adds to the gradients of parameters below ``preserve_threshold`` or at ratio 1.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import ops
from .block_state import Entry, FlatGroup
from .ops import MASKED_TILE, MaskedStates
from .options import non_negative_int, positive_int
from .partition import checked_named_parameters, set_trainable, trainable

STATE_DICT_FORMAT = "badam_kernels.BlockOptimizerRatio/1"
MASK_MODES = ("adjacent", "scatter")
GRAD_SHIFT = 1e-9  # what the original adds before ``to_sparse`` (so that zero gradients stay entries)


# ---------------------------------------------------------------------------------------------- masks

def adjacent_mask(numel: int, count: int, offset: int, device) -> Tensor:
    """``count`` consecutive entries from ``offset``, wrapping around the end; sorted."""
    if offset + count > numel:
        return torch.cat([torch.arange(0, offset + count - numel, device=device),
                          torch.arange(offset, numel, device=device)])
    return torch.arange(offset, offset + count, device=device)


def scatter_mask(numel: int, count: int, offset: int, seed: int, device) -> Tensor:
    """``count`` entries of the permutation ``seed`` draws, from ``offset``, wrapping; sorted.

    The original seeds the global RNG with ``seed`` and calls ``randperm``; a private generator of the
    same device seeded alike draws the same permutation without touching the global RNG.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    perm = torch.randperm(numel, generator=generator, device=device)
    chosen = torch.cat([perm[offset:], perm[:offset + count - numel]]) if offset + count > numel \
        else perm[offset:offset + count]
    return chosen.sort().values


# ---------------------------------------------------------------------------------------------- state

class _RatioGroup(FlatGroup):
    """A flat group of dense parameters and gradients (no dense states) that notes the order in which
    the gradients arrive: the original draws a shape's shared mask from the first one's seed."""

    def __init__(self, entries: Sequence[Entry], arrivals: Dict[int, int]):
        self._arrivals = arrivals
        super().__init__(entries, keep_master=False, with_moments=False)

    def _adopt_grad(self, k: int) -> None:
        index = self.entries[k].index
        if self.entries[k].param.grad is not None and index not in self._arrivals:
            self._arrivals[index] = len(self._arrivals)
        super()._adopt_grad(k)


@dataclass
class _Compact(MaskedStates):
    """The states of one flat group's masked entries (``ops.MaskedStates``): a parameter's entries
    fill whole tiles, ``spans[k]`` = (first tile, tiles, masked count) of entry k."""

    spans: List[Tuple[int, int, int]]

    @classmethod
    def allocate(cls, group: FlatGroup, counts: Sequence[int]) -> "_Compact":
        spans, bases, first = [], [], 0
        for offset, count in zip(group.offsets, counts):
            tiles = -(-count // MASKED_TILE)
            spans.append((first, tiles, count))
            bases += [offset] * tiles
            first += tiles
        k, device = first * MASKED_TILE, group.device
        return cls(torch.full((k,), -1, dtype=torch.int32, device=device),
                   torch.zeros(k, device=device) if group.dtype != torch.float32 else None,  # zeros: the
                   torch.zeros(k, device=device), torch.zeros(k, device=device),  # padding is defined
                   torch.tensor(bases, dtype=torch.int64, device=device),
                   torch.zeros(first, dtype=torch.float32, device=device), spans)

    def tensors(self) -> Dict[str, Tensor]:
        """What a checkpoint holds (the tile bases follow from the model)."""
        named = {"index": self.index, "master": self.master, "exp_avg": self.exp_avg,
                 "exp_avg_sq": self.exp_avg_sq, "tile_step": self.tile_step}
        return {k: v for k, v in named.items() if v is not None}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.tensors().values(), self.tile_base))


# ---------------------------------------------------------------------------------------------- optimizer

class BlockOptimizerRatio(Optimizer):
    """Adam on a fraction of every parameter's entries (BAdam's ratio mode).

    Args (as in ``badam.BlockOptimizerRatio`` 1.4, with its defaults):
        param_groups: the parameter groups (or parameters); each group's lr, betas, eps and
            weight_decay are read at every step.
        named_parameters_list: ``list(model.named_parameters())``.
        update_ratio: fraction of each parameter's entries trained at a time, in (0, 1].
        verbose: unused (as in the original).
        switch_every: steps per mask; then the offsets move on and the states start again.
        preserve_threshold: parameters with fewer entries get 1e-9 added to their gradient (as the
            original does; despite the name, their updates are masked like the others').
        param_update_ratios: ``{name substring: ratio}``, the last matching substring wins.
        mask_mode: ``adjacent`` or ``scatter``.
        lr, betas, eps: the defaults of groups that do not set them (``optimizer_defaults`` replaces all).
        keep_mask: one mask per (shape, ratio), shared by the parameters of that shape; else one each.
        include_embedding, include_lm_head: train the embedding / the output layer too.
    Keyword-only:
        backend: kernel backend of the masked step (``reference``, ``triton``, ``cuda``, or None: the
            fastest that implements it; see ``ops.resolve_op_backend``).
    """

    def __init__(self, param_groups, named_parameters_list, update_ratio=0.1, verbose=1, switch_every=100,
                 preserve_threshold=100, param_update_ratios=None, mask_mode="adjacent", lr=1e-5,
                 betas=(0.9, 0.999), eps=1e-8, optimizer_defaults=None, keep_mask=True, include_embedding=False,
                 include_lm_head=False, *, backend: Optional[str] = None):
        param_update_ratios = dict(param_update_ratios or {})
        _check_arguments(update_ratio, switch_every, preserve_threshold, param_update_ratios, mask_mode)
        self.named_parameters_list = checked_named_parameters(named_parameters_list)
        self.update_ratio, self.verbose, self.switch_every = update_ratio, verbose, switch_every
        self.preserve_threshold, self.mask_mode, self.keep_mask = preserve_threshold, mask_mode, keep_mask
        self.include_embedding, self.include_lm_head, self.backend = include_embedding, include_lm_head, backend
        covered = self._freeze_excluded_layers()
        # one seed per named parameter from the global RNG, as the original draws them
        self.seeds = [int(torch.randint(0, 1000, (1,)).item()) for _ in self.named_parameters_list]
        self.ratios = [_ratio_of(name, update_ratio, param_update_ratios) for name, _ in self.named_parameters_list]
        self.offsets = [0] * len(self.named_parameters_list)
        self.global_step = 0
        self.masks_stale = True  # masks are drawn at the first step of each period
        self._arrivals: Dict[int, int] = {}  # parameter index -> order its gradient arrived in this step

        defaults = dict(lr=lr, betas=betas, eps=eps) if optimizer_defaults is None else optimizer_defaults
        super().__init__(param_groups, defaults)
        self.groups: List[Tuple[int, _RatioGroup, _Compact]] = self._build_groups(covered)

    # ------------------------------------------------------------------------------------ set-up
    def _freeze_excluded_layers(self) -> Set[int]:
        """Freeze the embedding / lm_head as the original does (the first parameter whose name holds
        ``embed`` / ``lm_head``, where there is one); the indices of the parameters left to train."""
        covered = {i for i, (_, p) in enumerate(self.named_parameters_list) if trainable(p)}
        for included, word in ((self.include_embedding, "embed"), (self.include_lm_head, "lm_head")):
            first = next((i for i, (n, _) in enumerate(self.named_parameters_list) if word in n), None)
            if not included and first is not None:
                set_trainable(self.named_parameters_list[first][1], False)
                covered.discard(first)
        return covered

    def _build_groups(self, covered: Set[int]) -> List[Tuple[int, _RatioGroup, _Compact]]:
        """One flat group per (param group, dtype, device), with its compact states."""
        index_of = {id(p): i for i, (_, p) in enumerate(self.named_parameters_list)}
        groups = []
        for g, group in enumerate(self.param_groups):
            by_kind: Dict[tuple, List[Entry]] = defaultdict(list)
            for p in group["params"]:
                i = index_of.get(id(p))
                if i is None:
                    raise ValueError("a parameter of param_groups is not in named_parameters_list")
                if i in covered:
                    by_kind[(p.dtype, p.device)].append(Entry(i, self.named_parameters_list[i][0], p, True))
            for entries in by_kind.values():
                flat = _RatioGroup(entries, self._arrivals)
                counts = [self.masked_count(e.index) for e in flat.entries]
                groups.append((g, flat, _Compact.allocate(flat, counts)))
        return groups

    def masked_count(self, i: int) -> int:
        """How many entries of parameter ``i`` train at a time (``int(numel * ratio)``, as the original)."""
        return int(self.named_parameters_list[i][1].numel() * self.ratios[i])

    def state_bytes(self) -> int:
        """Bytes of optimizer state held on the devices (index, master, m, v, tile tables)."""
        return sum(compact.nbytes() for _, _, compact in self.groups)

    def hyperparameters(self, group: int) -> dict:
        """Group ``group``'s hyperparameters as they stand now (read at every step, so schedulers work)."""
        return {k: v for k, v in self.param_groups[group].items() if k != "params"}

    # ------------------------------------------------------------------------------------ masks
    def _mask(self, i: int, owner: int) -> Tensor:
        """Parameter ``i``'s masked entries (offsets inside it), drawn from ``owner``'s offset and seed."""
        param = self.named_parameters_list[i][1]
        numel, count, offset = param.numel(), self.masked_count(i), self.offsets[owner]
        if self.ratios[i] == 1.0:
            return torch.arange(numel, device=param.device)
        if self.mask_mode == "adjacent":
            return adjacent_mask(numel, count, offset, param.device)
        return scatter_mask(numel, count, offset, self.seeds[owner], param.device)

    def _owners(self) -> Dict[int, int]:
        """Whose offset and seed each parameter's mask comes from: its own, or with ``keep_mask`` the
        first parameter of its (shape, ratio) whose gradient arrived (the original's shared mask)."""
        covered = [e.index for _, flat, _ in self.groups for e in flat.entries]
        if not self.keep_mask:
            return {i: i for i in covered}
        first: Dict[tuple, int] = {}
        for i in sorted(covered, key=lambda i: (self._arrivals.get(i, math.inf), i)):
            param = self.named_parameters_list[i][1]
            first.setdefault((tuple(param.shape), self.ratios[i], param.device), i)
        return {i: first[(tuple(p.shape), self.ratios[i], p.device)]
                for i in covered for p in (self.named_parameters_list[i][1],)}

    def _draw_masks(self) -> None:
        """A new period: draw every parameter's mask into the index buffers; every state starts fresh."""
        owners, drawn = self._owners(), {}
        for _, flat, compact in self.groups:
            for entry, (first, _, count) in zip(flat.entries, compact.spans):
                owner = owners[entry.index]
                mask = drawn.get(owner) if self.keep_mask else None
                if mask is None:
                    mask = drawn[owner] = self._mask(entry.index, owner)
                start = first * MASKED_TILE
                compact.index[start:start + count] = mask.to(torch.int32)
            compact.tile_step.zero_()
        self.masks_stale = False

    # ------------------------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure=None):
        """One masked Adam step of every parameter that has a gradient; a new period every ``switch_every``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with_grad = self._collect_grads()
        if self.masks_stale and with_grad:
            self._draw_masks()
        for g, flat, compact in self.groups:
            self._update(flat, compact, self.hyperparameters(g), with_grad)
        self.global_step += 1
        if self.global_step % self.switch_every == 0:  # the original's rule
            for i in with_grad:
                self.offsets[i] = (self.offsets[i] + self.masked_count(i)) % self.named_parameters_list[i][1].numel()
            self.masks_stale = True
        self._arrivals.clear()
        return loss

    def _collect_grads(self) -> Set[int]:
        """Move the gradients into the flat buffers; the indices of the parameters that have one."""
        with_grad = set()
        for _, flat, _ in self.groups:
            for k, entry in enumerate(flat.entries):
                if entry.param.grad is not None:
                    flat._adopt_grad(k)  # gradients set by hand, without backward
                    with_grad.add(entry.index)
        return with_grad

    def _update(self, flat: _RatioGroup, compact: _Compact, hp: dict, with_grad: Set[int]) -> None:
        """One launch per run of consecutive parameters with gradients (one launch when all have one)."""
        runs: List[List[int]] = []  # [first tile, tiles]
        for entry, (first, tiles, _) in zip(flat.entries, compact.spans):
            if entry.index not in with_grad or tiles == 0:
                continue
            if entry.param.numel() < self.preserve_threshold or self.ratios[entry.index] == 1.0:
                entry.param.grad.add_(GRAD_SHIFT)  # as the original, before its to_sparse
            if runs and runs[-1][0] + runs[-1][1] == first:
                runs[-1][1] += tiles
            else:
                runs.append([first, tiles])
        for first, tiles in runs:
            ops.masked_adamw_step(
                flat.param, flat.grad, compact, lr=hp["lr"], betas=hp["betas"], eps=hp["eps"],
                weight_decay=hp.get("weight_decay", 0.0), tile_start=first, num_tiles=tiles, backend=self.backend)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for _, flat, _ in self.groups:
            flat.zero_grads(set_to_none)

    # ------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything needed to resume exactly: step, offsets, seeds, masks and the masked entries' states."""
        return {
            "format": STATE_DICT_FORMAT,
            "param_names": [n for n, _ in self.named_parameters_list],
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
            "global_step": self.global_step,
            "offsets": list(self.offsets),
            "seeds": list(self.seeds),
            "ratios": list(self.ratios),
            "mask_mode": self.mask_mode,
            "masks_stale": self.masks_stale,
            "states": [{k: v.detach().cpu().clone() for k, v in compact.tensors().items()}
                       for _, _, compact in self.groups],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume from ``state_dict()`` (the model's weights are restored separately). All or nothing:
        a checkpoint of another model or another ratio is refused and leaves the optimizer as it was."""
        self._check_loadable(state_dict)
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update(saved)
        self.global_step = int(state_dict["global_step"])
        self.offsets = [int(o) for o in state_dict["offsets"]]
        self.seeds = [int(s) for s in state_dict["seeds"]]
        self.masks_stale = bool(state_dict["masks_stale"])
        for (_, _, compact), saved in zip(self.groups, state_dict["states"]):
            for key, dst in compact.tensors().items():
                dst.copy_(saved[key])

    def _check_loadable(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or state_dict.get("format") != STATE_DICT_FORMAT:
            raise ValueError("not a badam_kernels.BlockOptimizerRatio state dict")
        if state_dict["param_names"] != [n for n, _ in self.named_parameters_list]:
            raise ValueError("checkpoint is from another model: parameter names differ")
        if list(state_dict["ratios"]) != self.ratios or state_dict["mask_mode"] != self.mask_mode:
            raise ValueError("checkpoint was made with other update ratios or another mask_mode")
        if len(state_dict["param_groups"]) != len(self.param_groups) or len(state_dict["states"]) != len(self.groups):
            raise ValueError("checkpoint has other parameter groups")
        for g, ((_, _, compact), saved) in enumerate(zip(self.groups, state_dict["states"])):
            mine = compact.tensors()
            if set(saved) != set(mine):
                raise ValueError(f"checkpoint's states of group {g} hold {sorted(saved)}, this optimizer needs {sorted(mine)}")
            for key, dst in mine.items():
                if tuple(saved[key].shape) != tuple(dst.shape):
                    raise ValueError(f"checkpoint's {key} of group {g} has shape {tuple(saved[key].shape)}, this "
                                     f"optimizer needs {tuple(dst.shape)} (another model or update_ratio?)")


def _ratio_of(name: str, update_ratio: float, param_update_ratios: dict) -> float:
    """The parameter's ratio: the last ``param_update_ratios`` substring in its name wins, as in the original."""
    ratio = update_ratio
    for prefix, value in param_update_ratios.items():
        if prefix in name:
            ratio = value
    return ratio


def _check_arguments(update_ratio, switch_every, preserve_threshold, param_update_ratios, mask_mode) -> None:
    def is_ratio(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and 0.0 < x <= 1.0

    if not is_ratio(update_ratio):
        raise ValueError(f"update_ratio must lie in (0, 1], got {update_ratio!r}")
    for prefix, value in param_update_ratios.items():
        if not is_ratio(value):
            raise ValueError(f"param_update_ratios[{prefix!r}] must lie in (0, 1], got {value!r}")
    if mask_mode not in MASK_MODES:
        raise ValueError(f"unknown mask_mode {mask_mode!r}; choose one of {', '.join(MASK_MODES)}")
    for name, value, check in (("switch_every", switch_every, positive_int),
                               ("preserve_threshold", preserve_threshold, non_negative_int)):
        wanted = check(value)
        if wanted is not None:
            raise ValueError(f"{name} must be {wanted}, got {value!r}")
