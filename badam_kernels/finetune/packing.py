"""``--packing``: short examples packed into full ``seq_len`` rows, each attending only to itself.

The rows are made once, by best-fit decreasing (each example, the longest first, goes into the row
with the least room left that still holds it; a function of the lengths alone, so a resumed run
packs the same rows), and then shuffled per pass like unpacked examples. In a row each example keeps
its labels, its first token's label becomes ``IGNORE_INDEX`` (the token before it belongs to another
example: nothing predicts across a boundary; unpacked, a first token is never a target either) and
its position ids restart at 0. The padding after the last example continues its positions and
carries no loss; no real token attends to it (attention is causal).

Whether the examples of a row see each other depends on the model's attention implementation
(:func:`attention_separation`); with transformers 5.x:

* ``sdpa``, ``eager``, ``flex_attention``: separated. ``create_causal_mask`` finds the packed
  examples in the position ids (given no 2-D attention mask, which packed batches never pass) and
  builds a block-diagonal causal mask (for ``sdpa`` a dense mask, so torch runs its masked kernel
  instead of the causal flash kernel);
* ``flash_attention_2``/``3`` (and their ``kernels`` variants): separated. transformers takes the
  varlen path from position ids only for a batch of one row, so each batch is fed as one row of
  ``batch_size * seq_len`` tokens (same tokens, labels and loss);
* anything else (an implementation registered by the user, a model whose forward takes no
  ``position_ids``, a transformers without packed-sequence masks): not separated: the job says so on
  stderr, and each example attends to the examples before it in its row.

With separated attention a packed batch gives the loss of the same examples unpacked (the tests
check it to rounding), in fewer, fuller rows.
"""
from __future__ import annotations

import bisect
import inspect
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .data import Batch, Batches, Encoded, examples_with_targets
from .formats import IGNORE_INDEX

SEPARATING_MASKS = ("sdpa", "eager", "flex_attention")  # built by transformers' create_causal_mask


def pack(lengths: Sequence[int], seq_len: int) -> List[List[int]]:
    """Rows of example indices, each row's lengths summing to at most ``seq_len``: best-fit decreasing."""
    rows: List[List[int]] = []
    room: List[Tuple[int, int]] = []  # (room left, row), sorted; full rows leave it
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        size = lengths[i]
        if size > seq_len:
            raise ValueError(f"example {i} has {size} tokens, more than seq_len {seq_len}")
        j = bisect.bisect_left(room, (size, -1))
        if j < len(room):
            left, row = room.pop(j)
        else:
            left, row = seq_len, len(rows)
            rows.append([])
        rows[row].append(i)
        if left - size > 0:
            bisect.insort(room, (left - size, row))
    return rows


class PackedBatches(Batches):
    """Packed rows of tokenized examples, ``batch_size`` rows a step (see the module's docstring)."""

    def __init__(self, encoded: Sequence[Encoded], pad_id: int, seq_len: int, batch_size: int, seed: int,
                 source: str = "data", formats: Optional[Dict[str, int]] = None):
        self.examples, self.dropped = examples_with_targets(encoded, source, seq_len)
        self.pad_id = pad_id
        self.seq_len = seq_len
        self.formats = dict(formats or {})
        self.rows = pack([len(ids) for ids, _ in self.examples], seq_len)
        self.one_row = False  # set by use_attention for flash attention
        super().__init__(len(self.rows), batch_size, seed)

    def fill(self) -> float:
        """The share of the rows' tokens that are examples (not padding)."""
        return sum(len(ids) for ids, _ in self.examples) / (len(self.rows) * self.seq_len)

    def describe(self) -> str:
        kinds = ", ".join(f"{name} {n}" for name, n in self.formats.items())
        text = (f"{len(self.examples)} examples" + (f" ({kinds})" if kinds else "")
                + f" packed into {len(self.rows)} sequences of {self.seq_len} tokens ({100 * self.fill():.0f}% full)")
        if self.dropped:
            text += f", {self.dropped} dropped (no trained token within --seq-len)"
        return text

    def batch(self, step: int) -> Batch:
        rows = [self.rows[index] for _, index in self.indices(step)]
        width = max(sum(len(self.examples[i][0]) for i in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        num_tokens = 0
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                ids, labs = self.examples[i]
                n = len(ids)
                input_ids[r, at:at + n] = torch.tensor(ids, dtype=torch.long)
                labels[r, at + 1:at + n] = torch.tensor(labs[1:], dtype=torch.long)
                positions[r, at:at + n] = torch.arange(n)
                at += n
            num_tokens += at
            last = n if row else 0
            positions[r, at:] = torch.arange(last, last + width - at)  # padding continues the last example
        return Batch(input_ids, labels, None, num_tokens, position_ids=positions, one_row=self.one_row)

    def use_attention(self, model) -> Optional[str]:
        """Fit the batches to ``model``'s attention (see the module's docstring); returns a warning
        when the examples of a row cannot be kept apart, else None."""
        how, why = attention_separation(model)
        self.one_row = how == "varlen"
        return None if how else (f"--packing: the packed examples attend to each other ({why}); "
                                 "without --packing every example is alone in its row")


def attention_separation(model) -> Tuple[Optional[str], str]:
    """("mask" | "varlen" | None, why): how packed examples are kept apart in ``model``'s attention."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None) or "unknown"
    try:
        takes_positions = "position_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes_positions = False
    if not takes_positions:
        return None, f"{type(model).__name__}.forward takes no position_ids"
    try:
        from transformers import masking_utils
    except ImportError:
        masking_utils = None
    if impl in SEPARATING_MASKS:
        if masking_utils is not None and hasattr(masking_utils, "find_packed_sequence_indices"):
            return "mask", f"attention {impl}: a block-diagonal causal mask from the restarting position ids"
        return None, f"attention {impl}: this transformers builds no mask for packed sequences"
    if "flash" in impl:
        return "varlen", f"attention {impl}: each batch goes in as one row, through the varlen kernel"
    return None, f"attention implementation {impl!r} is not known to separate packed sequences"
