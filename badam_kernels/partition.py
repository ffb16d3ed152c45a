"""Split a model's parameters into BAdam blocks, as ``badam.BlockOptimizer`` 1.4 does.

A block is a list of name prefixes; a parameter belongs to a block when one of its prefixes occurs
in the parameter's name (a substring test, as in the original). The automatic partition makes one
block per transformer layer (names matching ``...layers.<i>.``), optionally one for the embedding,
and optionally a last block holding everything else (lm_head, final norm, and the embedding when it
has no block of its own).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Collection, Dict, List, Optional, Sequence, Tuple

import torch

_EMBED_PATTERN = re.compile(r".*embed[^.]*\.")
_LAYER_PATTERN = re.compile(r".*layers.[^.]*\.")
_NUMBERED = re.compile(r"(?:^|\.)(\d+)\.")  # a ModuleList child: "<stack>.<i>."


def infer_block_prefixes(param_names: Sequence[str], include_embedding: bool = False,
                         include_lm_head: bool = False) -> List[List[str]]:
    """One block per layer, in the order the layers appear, like the original's ``infer_param_groups``.

    Layers are found by the original's pattern (``...layers.<i>.``: Llama, Qwen, OPT, GPT-NeoX, Phi-3,
    Gemma ...); where it matches nothing, by the names a layer stack gets in any ``nn.ModuleList``
    (``<stack>.<i>.``, e.g. GPT-2's ``transformer.h.<i>.``): the stack with the most parameter names,
    as ``find_layer_stack`` picks the one with the most parameters.
    """
    layer_pattern = _LAYER_PATTERN if any(_LAYER_PATTERN.match(n) for n in param_names) else _module_list_pattern(param_names)
    blocks: List[List[str]] = []
    others: List[str] = []
    for name in param_names:
        if any(block[0] in name for block in blocks):
            continue
        if layer_pattern is not None and layer_pattern.findall(name):
            blocks.append(layer_pattern.findall(name))
        elif include_embedding and _EMBED_PATTERN.findall(name):
            blocks.append(_EMBED_PATTERN.findall(name))
        else:
            others.append(name)
    if include_lm_head:
        blocks.append(others)
    return blocks


def _module_list_pattern(param_names: Sequence[str]) -> Optional["re.Pattern"]:
    """A pattern matching ``<stack>.<i>.`` for the ModuleList whose children hold the most parameter
    names (at least two children), or None where no name has a numbered component."""
    stacks: Dict[str, Tuple[set, int]] = {}
    for name in param_names:
        for match in _NUMBERED.finditer(name):
            stack = name[:match.start(1)]
            children, count = stacks.get(stack, (set(), 0))
            stacks[stack] = (children | {match.group(1)}, count + 1)
    candidates = [(count, stack) for stack, (children, count) in stacks.items() if len(children) >= 2]
    if not candidates:
        return None
    _, stack = max(candidates)
    return re.compile("^" + re.escape(stack) + r"\d+\.")


def decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay applies to matrices, not to biases or normalisation weights."""
    lowered = name.lower()
    return param.dim() >= 2 and "bias" not in lowered and "norm" not in lowered


@dataclass(frozen=True)
class Partition:
    """Which parameters (by index into the named-parameter list) each block trains.

    Parameters the user froze are in no block's ``members``: they match their block's prefixes but
    are never trained; a block left with nothing to train is skipped by the schedule.
    """

    prefixes: Tuple[Tuple[str, ...], ...]
    members: Tuple[Tuple[int, ...], ...]
    always_active: Tuple[int, ...]

    @property
    def num_blocks(self) -> int:
        return len(self.members)

    def active_indices(self, block: int) -> Tuple[int, ...]:
        """Indices of the parameters trained while ``block`` is active (its own and the always-active ones)."""
        return tuple(sorted(set(self.members[block]) | set(self.always_active)))

    def blocks_without_parameters(self) -> Tuple[int, ...]:
        """Blocks with nothing to train (every parameter they match was frozen by the user)."""
        return tuple(b for b in range(self.num_blocks) if not self.active_indices(b))


def build_partition(names: Sequence[str], block_prefix_list: Sequence[Sequence[str]],
                    active_modules: Sequence[str] = (), frozen: Collection[int] = ()) -> Partition:
    """Resolve prefixes to parameters; reject prefixes that match nothing and parameters in two blocks.

    ``frozen``: indices of parameters the user froze; they count as matched but are trained by no block.
    """
    if not isinstance(block_prefix_list, (list, tuple)) or not block_prefix_list:
        raise ValueError("block_prefix_list must be a non-empty list of lists of name prefixes "
                         "(no layer stack was recognised in the parameter names)")
    owner = {}
    members = []
    for b, prefixes in enumerate(block_prefix_list):
        if isinstance(prefixes, str):
            raise ValueError(f"block {b} must be a list of prefixes, got the string {prefixes!r}")
        block = []
        for prefix in prefixes:
            matched = _matching(names, prefix, f"block prefix {prefix!r} (block {b})")
            for i in matched:
                if owner.get(i, b) != b:
                    raise ValueError(f"parameter {names[i]!r} is in two blocks: {owner[i]} and {b}")
                owner[i] = b
                block.append(i)
        members.append(tuple(sorted(set(block) - set(frozen))))
    always = []
    for prefix in active_modules:
        always.extend(_matching(names, prefix, f"active module prefix {prefix!r}"))
    return Partition(tuple(tuple(p) for p in block_prefix_list), tuple(members),
                     tuple(sorted(set(always) - set(frozen))))


def _matching(names: Sequence[str], prefix: str, what: str) -> List[int]:
    matched = [i for i, n in enumerate(names) if prefix in n]
    if not matched:
        raise ValueError(f"{what} matches no parameter name")
    return matched


# Set on the parameters a BlockOptimizer froze because their block is inactive: a second optimizer
# built over the same model must still train them, unlike parameters the user froze.
_FROZEN_BY_BLOCK_OPTIMIZER = "_badam_kernels_inactive"


def trainable(param: torch.Tensor) -> bool:
    """Whether the user lets ``param`` train: it requires grad, or only a BlockOptimizer froze it."""
    return param.requires_grad or getattr(param, _FROZEN_BY_BLOCK_OPTIMIZER, False)


def set_trainable(param: torch.Tensor, active: bool) -> None:
    """Unfreeze ``param`` for its block's turn, or freeze it (dropping its gradient) until the next."""
    param.requires_grad_(active)
    setattr(param, _FROZEN_BY_BLOCK_OPTIMIZER, not active)
    if not active:
        param.grad = None


def checked_named_parameters(named_parameters_list) -> List[Tuple[str, torch.nn.Parameter]]:
    """``named_parameters_list`` as a list of (name, tensor) pairs, each tensor once."""
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
