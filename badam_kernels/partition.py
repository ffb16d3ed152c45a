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
from typing import List, Sequence, Tuple

import torch

_EMBED_PATTERN = re.compile(r".*embed[^.]*\.")
_LAYER_PATTERN = re.compile(r".*layers.[^.]*\.")


def infer_block_prefixes(param_names: Sequence[str], include_embedding: bool = False,
                         include_lm_head: bool = False) -> List[List[str]]:
    """One block per layer, in the order the layers appear, like the original's ``infer_param_groups``."""
    blocks: List[List[str]] = []
    others: List[str] = []
    for name in param_names:
        if any(block[0] in name for block in blocks):
            continue
        if _LAYER_PATTERN.findall(name):
            blocks.append(_LAYER_PATTERN.findall(name))
        elif include_embedding and _EMBED_PATTERN.findall(name):
            blocks.append(_EMBED_PATTERN.findall(name))
        else:
            others.append(name)
    if include_lm_head:
        blocks.append(others)
    return blocks


def in_prefixes(name: str, prefixes: Sequence[str]) -> bool:
    return any(prefix in name for prefix in prefixes)


def decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay applies to matrices, not to biases or normalisation weights."""
    lowered = name.lower()
    return param.dim() >= 2 and "bias" not in lowered and "norm" not in lowered


@dataclass(frozen=True)
class Partition:
    """Which parameters (by index into the named-parameter list) each block trains."""

    prefixes: Tuple[Tuple[str, ...], ...]
    members: Tuple[Tuple[int, ...], ...]
    always_active: Tuple[int, ...]

    @property
    def num_blocks(self) -> int:
        return len(self.members)

    def active_indices(self, block: int) -> Tuple[int, ...]:
        """Indices of the parameters trained while ``block`` is active (its own and the always-active ones)."""
        extra = [i for i in self.always_active if i not in self.members[block]]
        return tuple(sorted(set(self.members[block]) | set(extra)))


def build_partition(names: Sequence[str], block_prefix_list: Sequence[Sequence[str]],
                    active_modules: Sequence[str] = ()) -> Partition:
    """Resolve prefixes to parameters; reject prefixes that match nothing and parameters in two blocks."""
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
            matched = [i for i, n in enumerate(names) if prefix in n]
            if not matched:
                raise ValueError(f"block prefix {prefix!r} (block {b}) matches no parameter name")
            for i in matched:
                if owner.get(i, b) != b:
                    raise ValueError(f"parameter {names[i]!r} is in two blocks: {owner[i]} and {b}")
                owner[i] = b
                block.append(i)
        members.append(tuple(sorted(set(block))))
    always = []
    for prefix in active_modules:
        matched = [i for i, n in enumerate(names) if prefix in n]
        if not matched:
            raise ValueError(f"active module prefix {prefix!r} matches no parameter name")
        always.extend(matched)
    return Partition(tuple(tuple(p) for p in block_prefix_list), tuple(members), tuple(sorted(set(always))))
