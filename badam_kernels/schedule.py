"""The order in which blocks take turns, as in ``badam.BlockOptimizer`` 1.4.

* ``descending``: last block first, then down, wrapping around (the original's default);
* ``ascending``: block 0 first, then up, wrapping around;
* ``random``: each block epoch visits every block once in a fresh random order;
* ``fixed``: the start block forever.

Random orders come from the schedule's own generator (seeded once), not the global RNG, so that a
resumed run and every data-parallel rank draw the same orders.
"""
from __future__ import annotations

from typing import Collection, List, Optional

import torch

SWITCH_MODES = ("random", "ascending", "descending", "fixed")


class BlockSchedule:
    """Which block is active, and which comes next.

    ``skip``: blocks that have nothing to train (every parameter frozen by the user); the schedule
    passes over them, as the original passes over blocks without LoRA parameters.
    """

    def __init__(self, num_blocks: int, mode: str = "descending", start_block: Optional[int] = None,
                 seed: Optional[int] = None, skip: Collection[int] = ()):
        if mode not in SWITCH_MODES:
            raise ValueError(f"unknown switch_mode {mode!r}; choose one of {', '.join(SWITCH_MODES)}")
        if num_blocks < 1:
            raise ValueError("there are no blocks to train")
        if start_block is not None and not 0 <= start_block < num_blocks:
            raise ValueError(f"start_block={start_block} is outside [0, {num_blocks - 1}]")
        if mode == "fixed" and start_block is None:
            raise ValueError("switch_mode 'fixed' needs start_block: which block to train")
        self.skip = frozenset(skip)
        if len(self.skip) == num_blocks:
            raise ValueError("no block has a parameter to train (all of them have requires_grad=False)")
        if mode == "fixed" and start_block in self.skip:
            raise ValueError(f"switch_mode 'fixed' trains block {start_block}, whose parameters are all frozen")
        self.num_blocks = num_blocks
        self.mode = mode
        if seed is None and mode == "random":  # only random orders draw: other modes leave torch's RNG alone
            seed = int(torch.randint(0, 2**62, ()).item())
        self.generator = torch.Generator().manual_seed(seed or 0)
        self.pending: List[int] = []  # random mode: the rest of this epoch's order, next block last
        if start_block is not None:
            self.active = start_block
        elif mode == "descending":
            self.active = num_blocks - 1
        elif mode == "ascending":
            self.active = 0
        else:
            self.active = self.advance()
        if self.active in self.skip:
            self.advance()

    def _next_epoch(self) -> List[int]:
        """A fresh random order of the blocks to train, the next block last."""
        order = torch.randperm(self.num_blocks, generator=self.generator).tolist()
        return [b for b in order if b not in self.skip]

    def peek(self) -> int:
        """The block that ``advance`` will activate (draws the next random epoch if needed)."""
        if self.mode == "random":
            if not self.pending:
                self.pending = self._next_epoch()
            return self.pending[-1]
        if self.mode == "fixed":
            return self.active
        step = 1 if self.mode == "ascending" else -1
        block = (self.active + step) % self.num_blocks
        while block in self.skip:
            block = (block + step) % self.num_blocks
        return block

    def advance(self) -> int:
        """Move to the next block and return it."""
        self.active = self.peek()
        if self.mode == "random":
            self.pending.pop()
        return self.active

    def state_dict(self) -> dict:
        return {"mode": self.mode, "num_blocks": self.num_blocks, "active": self.active,
                "pending": list(self.pending), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if state["num_blocks"] != self.num_blocks:
            raise ValueError(f"checkpoint has {state['num_blocks']} blocks, this optimizer has {self.num_blocks}")
        self.mode = state["mode"]
        self.active = int(state["active"])
        self.pending = list(state["pending"])
        self.generator.set_state(state["generator"].cpu())  # a wrapper may have moved the dict to a GPU
