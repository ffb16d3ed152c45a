"""Training data for ``badam-finetune``: files, a byte tokenizer, and batches in a resumable order.

Two kinds of data:

* plain text (any file but ``.jsonl``): tokenized once, cut into windows of ``seq_len`` tokens; the
  loss is on every token (language modelling);
* examples (``.jsonl``, one JSON object a line): conversations in the chat (``messages``), sharegpt
  (``conversations``), alpaca, instruction/response or prompt/completion format, or ``text``
  documents; ``formats.py`` says how each is written out (the tokenizer's chat template, else a
  plain template) and which tokens carry the loss (the assistant turns). Each batch is padded to its
  longest example, or with ``packing`` the examples are packed into full ``seq_len`` rows
  (``packing.py``).

The order of the examples is a function of the seed and the step index alone (one shuffle per pass
over the data, drawn from ``numpy.random.default_rng([seed, epoch])``), so the batch of step ``s``
is the same whether the run got there in one go or was resumed: :meth:`Batches.batch` takes the step.
``build_data`` also holds out the evaluation set (``--eval-fraction``: a subset drawn from the seed
alone, so a resumed run holds out the same examples) or reads it (``--eval-data``).
"""
from __future__ import annotations

import collections
import os
from dataclasses import dataclass
from importlib import resources
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .formats import (IGNORE_INDEX, PLAIN_TEMPLATE, DataError, Example, encode_examples, parse_line,  # noqa: F401
                      prompt_text)

DEFAULT_TEXT = "shakespeare.txt"  # in badam_kernels/finetune/assets/; its first line is a header naming the source
PAIR_KEYS = (("instruction", "response"), ("prompt", "completion"))
EVAL_SPLIT_KEY = (7, 1, 3)  # the held-out subset's random stream: [seed, *EVAL_SPLIT_KEY], apart from the orders'
Encoded = Tuple[List[int], List[int]]  # (input ids, labels)


class ByteTokenizer:
    """Bytes are tokens: the UTF-8 bytes of a text are its token ids (vocabulary 256, nothing to download).

    Byte 0 (NUL, which text files do not contain) doubles as end-of-sequence and padding.
    """

    vocab_size = 256
    eos_token_id = 0
    pad_token_id = 0
    bos_token_id = None
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        data = bytes(int(i) for i in ids if not (skip_special_tokens and int(i) == self.eos_token_id))
        return data.decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return self.vocab_size


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise DataError(f"data file not found: {path}")
    if not os.path.isfile(path):
        raise DataError(f"data path is not a file: {path}")


def load_text(path: str) -> str:
    """The whole text of a UTF-8 file; an empty or undecodable file is a :class:`DataError`."""
    _check_file(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    return text


def load_default_text() -> str:
    """The Shakespeare excerpt shipped with the package, without its header line."""
    text = resources.files("badam_kernels.finetune").joinpath("assets", DEFAULT_TEXT).read_text(encoding="utf-8")
    return text.split("\n", 1)[1]


def load_examples(path: str) -> Tuple[List[Example], List[str]]:
    """The examples of a JSONL file (blank lines skipped) and where each is (``path:line``).

    Any format of ``formats.py`` on any line; a line that fits none raises a :class:`DataError` that
    gives ``path:line``, the keys it has and the formats there are.
    """
    _check_file(path)
    examples, where = [], []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    where.append(f"{path}:{lineno}")
                    examples.append(parse_line(line, where[-1]))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty)")
    return examples, where


def load_jsonl(path: str) -> List[Tuple[str, str]]:
    """(prompt, response) pairs of a JSONL file of single-turn examples (the older interface)."""
    pairs = []
    for example, where in zip(*load_examples(path)):
        turns = [] if example.is_text else [m for m in example.messages if m["role"] != "system"]
        if [m["role"] for m in turns] != ["user", "assistant"]:
            raise DataError(f"{where}: not a single (prompt, response) pair")
        pairs.append((turns[0]["content"], turns[1]["content"]))
    return pairs


# ---------------------------------------------------------------------------------------- tokenize

def encode_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids of a long text (a 1-D int64 tensor), tokenized in paragraph-aligned pieces."""
    if isinstance(tokenizer, ByteTokenizer):
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    ids: List[int] = []
    piece_chars = 1 << 16
    start = 0
    while start < len(text):
        end = text.find("\n\n", start + piece_chars)
        end = len(text) if end < 0 else end + 2
        ids.extend(tokenizer.encode(text[start:end], add_special_tokens=False))
        start = end
    return torch.tensor(ids, dtype=torch.long)


def format_prompt(tokenizer, prompt: str) -> Tuple[str, bool]:
    """The prompt as the model should see it, and whether the tokenizer should add its special tokens."""
    return prompt_text(tokenizer, [{"role": "user", "content": prompt}])


def encode_pairs(tokenizer, pairs: Sequence[Tuple[str, str]], seq_len: int) -> List[Encoded]:
    """Input ids and labels of each (prompt, response), cut to ``seq_len``; labels are ``IGNORE_INDEX``
    on the prompt (``formats.encode_examples`` of one user and one assistant turn each)."""
    examples = [Example("prompt/completion", [{"role": "user", "content": p}, {"role": "assistant", "content": r}])
                for p, r in pairs]
    return encode_examples(tokenizer, examples, seq_len)


def encode_pair(tokenizer, prompt: str, response: str, seq_len: int) -> Tuple[List[int], List[int]]:
    """``encode_pairs`` of one pair."""
    return encode_pairs(tokenizer, [(prompt, response)], seq_len)[0]


# ---------------------------------------------------------------------------------------- batches

@dataclass
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: Optional[torch.Tensor]  # None when nothing is padded (or packed: the position ids say it)
    num_tokens: int  # real (unpadded) tokens fed to the model
    position_ids: Optional[torch.Tensor] = None  # packed rows: restarting at 0 with each example
    one_row: bool = False  # feed the rows as one row (flash attention's varlen path separates the examples)

    def model_inputs(self, device) -> Dict[str, Any]:
        """The model's keyword arguments, on ``device``. Packed rows also say ``use_cache=False``:
        transformers looks for packed examples in the position ids only when there is no cache."""
        inputs = {"input_ids": self.input_ids, "labels": self.labels, "attention_mask": self.attention_mask}
        if self.position_ids is not None:
            inputs["position_ids"] = self.position_ids
        if self.one_row:
            inputs = {k: None if v is None else v.reshape(1, -1) for k, v in inputs.items()}
        inputs = {k: None if v is None else v.to(device) for k, v in inputs.items()}
        if self.position_ids is not None:
            inputs["use_cache"] = False
        return inputs


def pad_batch(examples: Sequence[Encoded], pad_id: int) -> Batch:
    """Examples as one batch, each row right-padded to the longest."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[row, :len(labs)] = torch.tensor(labs, dtype=torch.long)
        mask[row, :len(ids)] = 1
    num_tokens = int(mask.sum())
    return Batch(input_ids, labels, None if num_tokens == mask.numel() else mask, num_tokens)


def pad_id_of(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else int(pad)


def has_target(labels: Sequence[int]) -> bool:
    """Some token after the first carries the loss (the first is never predicted)."""
    return any(label != IGNORE_INDEX for label in labels[1:])


def examples_with_targets(encoded: Sequence[Encoded], source: str, seq_len: Optional[int]) -> Tuple[List[Encoded], int]:
    """The examples that keep a trained token within ``seq_len``, and how many were dropped; none kept
    is a DataError naming the source."""
    kept = [e for e in encoded if has_target(e[1])]
    if not kept:
        raise DataError(f"{source}: no example keeps a trained token within --seq-len {seq_len} "
                        "(the prompts are too long); use a larger --seq-len")
    return kept, len(encoded) - len(kept)


class Batches:
    """Batches of a fixed list of examples, in an order that depends only on ``seed`` and the step.

    Step ``s`` takes the examples at positions ``[s * batch_size, (s + 1) * batch_size)`` of an endless
    stream made of one shuffled pass over the data after another (the pass ``e`` is shuffled by
    ``numpy.random.default_rng([seed, e])``).
    """

    text = False  # plain text (language modelling) rather than examples

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        if num_examples < 1:
            raise DataError("no training examples")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self._orders: Dict[int, np.ndarray] = {}

    def steps_per_epoch(self) -> int:
        return -(-self.num_examples // self.batch_size)

    def describe(self) -> str:
        """What one pass holds, for the job's log."""
        return f"{self.num_examples} examples"

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) > 4:
                self._orders.clear()
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        return self._orders[epoch]

    def indices(self, step: int) -> List[Tuple[int, int]]:
        """(epoch, example index) of each example in the batch of ``step``."""
        out = []
        for position in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, offset = divmod(position, self.num_examples)
            out.append((epoch, int(self.order(epoch)[offset])))
        return out

    def batch(self, step: int) -> Batch:
        raise NotImplementedError


class TextBatches(Batches):
    """Windows of ``seq_len`` tokens of one long token stream; each pass starts at a fresh random offset."""

    text = True

    def __init__(self, ids: torch.Tensor, seq_len: int, batch_size: int, seed: int, source: str = "text"):
        if ids.numel() < seq_len + 1:
            raise DataError(f"{source}: {ids.numel()} tokens, fewer than --seq-len + 1 = {seq_len + 1}; "
                            "use a smaller --seq-len or more text")
        self.ids = ids
        self.seq_len = seq_len
        super().__init__((ids.numel() - seq_len) // seq_len, batch_size, seed)

    def _offset(self, epoch: int) -> int:
        return int(np.random.default_rng([self.seed, epoch, 1]).integers(self.seq_len))

    def batch(self, step: int) -> Batch:
        rows = []
        for epoch, index in self.indices(step):
            start = self._offset(epoch) + index * self.seq_len
            rows.append(self.ids[start:start + self.seq_len])
        input_ids = torch.stack(rows)
        return Batch(input_ids, input_ids.clone(), None, input_ids.numel())


class ExampleBatches(Batches):
    """Tokenized examples (``formats.encode_examples``), padded per batch to the longest; the examples
    without a trained token within ``seq_len`` are dropped (and counted)."""

    def __init__(self, encoded: Sequence[Encoded], pad_id: int, batch_size: int, seed: int,
                 source: str = "data", seq_len: Optional[int] = None, formats: Optional[Dict[str, int]] = None):
        self.examples, self.dropped = examples_with_targets(encoded, source, seq_len)
        self.pad_id = pad_id
        self.formats = dict(formats or {})
        super().__init__(len(self.examples), batch_size, seed)

    def describe(self) -> str:
        kinds = ", ".join(f"{name} {n}" for name, n in self.formats.items())
        text = f"{len(self.examples)} examples" + (f" ({kinds})" if len(self.formats) > 1 else
                                                   f" ({kinds.rsplit(' ', 1)[0]})" if kinds else "")
        if self.dropped:
            text += f", {self.dropped} dropped (no trained token within --seq-len)"
        return text

    def batch(self, step: int) -> Batch:
        return pad_batch([self.examples[index] for _, index in self.indices(step)], self.pad_id)


class PairBatches(ExampleBatches):
    """(prompt, response) pairs, padded per batch to the longest; loss on the responses only (the older interface)."""

    def __init__(self, pairs: Sequence[Tuple[str, str]], tokenizer, seq_len: int, batch_size: int,
                 seed: int, source: str = "data"):
        super().__init__(encode_pairs(tokenizer, pairs, seq_len), pad_id_of(tokenizer), batch_size, seed, source,
                         seq_len)


# ---------------------------------------------------------------------------------------- building

@dataclass
class Source:
    """A data file read: its token stream (text) or its examples, and what to call it."""

    name: str
    ids: Optional[torch.Tensor] = None
    examples: Optional[List[Example]] = None
    where: Optional[List[str]] = None

    @property
    def text(self) -> bool:
        return self.ids is not None


def read_source(path: Optional[str], tokenizer) -> Source:
    """A ``.jsonl`` file's examples, any other file's tokens, or (None) the shipped text's tokens."""
    if path is None:
        return Source(f"badam_kernels/finetune/assets/{DEFAULT_TEXT}", ids=encode_text(tokenizer, load_default_text()))
    if path.lower().endswith(".jsonl"):
        examples, where = load_examples(path)
        return Source(path, examples=examples, where=where)
    return Source(path, ids=encode_text(tokenizer, load_text(path)))


def hold_out(source: Source, fraction: float, seed: int, seq_len: int) -> Tuple[Source, Source]:
    """(training part, held-out part) of a source: of examples, ``round(fraction * n)`` (at least 1)
    drawn by ``default_rng([seed, *EVAL_SPLIT_KEY])`` (the file's order kept within each part); of a
    text, its last ``fraction`` of the tokens (no window then straddles the two parts)."""
    flag = f"--eval-fraction {fraction:g}"
    if source.text:
        n = source.ids.numel()
        k = int(round(fraction * n))
        if k < 2 or n - k < seq_len + 1:
            raise DataError(f"{flag} of {source.name} ({n:,} tokens) leaves {n - k:,} tokens to train on and "
                            f"{k:,} to evaluate; each part needs at least 2 and training --seq-len + 1 = {seq_len + 1}")
        return (Source(source.name, ids=source.ids[:n - k]),
                Source(f"the last {fraction:g} of {source.name}", ids=source.ids[n - k:]))
    n = len(source.examples)
    k = max(1, int(round(fraction * n)))
    if k >= n:
        raise DataError(f"{flag} of the {n} examples of {source.name} leaves none to train on")
    held = np.zeros(n, dtype=bool)
    held[np.random.default_rng([seed, *EVAL_SPLIT_KEY]).permutation(n)[:k]] = True
    part = [(ex, w) for ex, w in zip(source.examples, source.where)]
    train = [p for p, h in zip(part, held) if not h]
    evals = [p for p, h in zip(part, held) if h]
    return (Source(source.name, examples=[e for e, _ in train], where=[w for _, w in train]),
            Source(f"{fraction:g} of {source.name} held out", examples=[e for e, _ in evals],
                   where=[w for _, w in evals]))


def make_batches(source: Source, tokenizer, seq_len: int, batch_size: int, seed: int,
                 packing: bool = False) -> Batches:
    """The training batches of a source: text windows, padded examples or (``packing``) packed rows."""
    if source.text:  # already full windows: packing changes nothing
        return TextBatches(source.ids, seq_len, batch_size, seed, source=source.name)
    encoded = encode_examples(tokenizer, source.examples, seq_len, source.where)
    formats = dict(collections.Counter(ex.format for ex in source.examples))
    if packing:
        from .packing import PackedBatches

        return PackedBatches(encoded, pad_id_of(tokenizer), seq_len, batch_size, seed, source.name, formats)
    return ExampleBatches(encoded, pad_id_of(tokenizer), batch_size, seed, source.name, seq_len, formats)


def eval_examples(source: Source, tokenizer, seq_len: int) -> List[Encoded]:
    """The evaluation examples of a source: its examples with a trained token within ``seq_len``, or a
    text cut into consecutive windows of ``seq_len`` tokens (the last one shorter)."""
    if source.text:
        ids = source.ids.tolist()
        windows = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
        examples = [(w, list(w)) for w in windows if len(w) >= 2]
    else:
        examples = [e for e in encode_examples(tokenizer, source.examples, seq_len, source.where) if has_target(e[1])]
    if not examples:
        raise DataError(f"{source.name}: no evaluation example keeps a trained token within --seq-len {seq_len}")
    return examples


def build_data(cfg, tokenizer) -> Tuple[Batches, Optional[Tuple[str, List[Encoded]]]]:
    """The training batches of a (resolved) configuration and its evaluation set (a name and the
    examples, or None): ``--eval-fraction`` of ``--data`` held out, or ``--eval-data``."""
    source = read_source(cfg.data, tokenizer)
    held = None
    if getattr(cfg, "eval_fraction", None):
        source, held = hold_out(source, cfg.eval_fraction, cfg.seed, cfg.seq_len)
    elif getattr(cfg, "eval_data", None):
        held = read_source(cfg.eval_data, tokenizer)
    batches = make_batches(source, tokenizer, cfg.seq_len, cfg.batch_size, cfg.seed, getattr(cfg, "packing", False))
    return batches, None if held is None else (held.name, eval_examples(held, tokenizer, cfg.seq_len))


def build_batches(path: Optional[str], tokenizer, seq_len: int, batch_size: int, seed: int,
                  packing: bool = False) -> Batches:
    """The batches of a data file (``.jsonl``: examples; anything else: plain text), or of the shipped text."""
    return make_batches(read_source(path, tokenizer), tokenizer, seq_len, batch_size, seed, packing)
