"""Training data for ``badam-finetune``: files, a byte tokenizer, and batches in a resumable order.

Two kinds of data:

* plain text (``.txt``): tokenized once, cut into windows of ``seq_len`` tokens; the loss is on
  every token (language modelling);
* instruction/response pairs (``.jsonl``, one JSON object a line with the keys
  ``instruction``/``response`` or ``prompt``/``completion``, optionally ``input``): the prompt is
  formatted with the tokenizer's chat template when it has one, else with a plain
  ``### Instruction: / ### Response:`` template; the loss is on the response tokens only.

The order of the examples is a function of the seed and the step index alone (one shuffle per pass
over the data, drawn from ``numpy.random.default_rng([seed, epoch])``), so the batch of step ``s``
is the same whether the run got there in one go or was resumed: :meth:`Batches.batch` takes the step.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

IGNORE_INDEX = -100  # label of a token that carries no loss (prompt, padding)
DEFAULT_TEXT = "shakespeare.txt"  # in badam_kernels/finetune/assets/; its first line is a header naming the source
PAIR_KEYS = (("instruction", "response"), ("prompt", "completion"))
PLAIN_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"


class DataError(ValueError):
    """A data file that cannot be used; the message names the file (and the line) and what is wrong."""


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


def load_jsonl(path: str) -> List[Tuple[str, str]]:
    """(prompt, response) pairs from a JSONL file; blank lines are skipped.

    Accepted objects: ``{"instruction": ..., "response": ...}`` or ``{"prompt": ..., "completion": ...}``,
    with an optional ``"input"`` appended to the instruction (Alpaca style). Any other line raises a
    :class:`DataError` that gives ``path:line`` and what is wrong with it.
    """
    _check_file(path)
    pairs = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    pairs.append(_parse_pair(line, f"{path}:{lineno}"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    if not pairs:
        raise DataError(f"{path}: no examples (the file is empty)")
    return pairs


def _parse_pair(line: str, where: str) -> Tuple[str, str]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for prompt_key, response_key in PAIR_KEYS:
        if prompt_key in obj and response_key in obj:
            break
    else:
        wanted = " or ".join(f"{a}/{b}" for a, b in PAIR_KEYS)
        raise DataError(f"{where}: expected the keys {wanted}, got {sorted(obj)}")
    for key in (prompt_key, response_key, "input"):
        if key in obj and not isinstance(obj[key], str):
            raise DataError(f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}")
    prompt, response = obj[prompt_key], obj[response_key]
    if obj.get("input"):
        prompt = f"{prompt}\n\n{obj['input']}"
    if not response:
        raise DataError(f"{where}: {response_key!r} is empty")
    return prompt, response


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
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return text, False  # the template writes the special tokens itself
    return PLAIN_TEMPLATE.format(instruction=prompt), True


def _encode_many(tokenizer, texts: List[str], add_special_tokens: bool) -> List[List[int]]:
    if isinstance(tokenizer, ByteTokenizer) or not callable(tokenizer):
        return [tokenizer.encode(t, add_special_tokens=add_special_tokens) for t in texts]
    return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]  # one batched call


def encode_pairs(tokenizer, pairs: Sequence[Tuple[str, str]], seq_len: int) -> List[Tuple[List[int], List[int]]]:
    """Input ids and labels of each (prompt, response), cut to ``seq_len``; labels are ``IGNORE_INDEX``
    on the prompt, and the response ends with the end-of-sequence token when the tokenizer has one."""
    formatted = [format_prompt(tokenizer, prompt) for prompt, _ in pairs]
    special = formatted[0][1] if formatted else False
    prompt_ids = _encode_many(tokenizer, [text for text, _ in formatted], special)
    response_ids = _encode_many(tokenizer, [response for _, response in pairs], False)
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    out = []
    for p_ids, r_ids in zip(prompt_ids, response_ids):
        r_ids = list(r_ids) + eos
        out.append(((list(p_ids) + r_ids)[:seq_len], ([IGNORE_INDEX] * len(p_ids) + r_ids)[:seq_len]))
    return out


def encode_pair(tokenizer, prompt: str, response: str, seq_len: int) -> Tuple[List[int], List[int]]:
    """``encode_pairs`` of one pair."""
    return encode_pairs(tokenizer, [(prompt, response)], seq_len)[0]


# ---------------------------------------------------------------------------------------- batches

@dataclass
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: Optional[torch.Tensor]  # None when nothing is padded
    num_tokens: int  # real (unpadded) tokens fed to the model


class Batches:
    """Batches of a fixed list of examples, in an order that depends only on ``seed`` and the step.

    Step ``s`` takes the examples at positions ``[s * batch_size, (s + 1) * batch_size)`` of an endless
    stream made of one shuffled pass over the data after another (the pass ``e`` is shuffled by
    ``numpy.random.default_rng([seed, e])``).
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        if num_examples < 1:
            raise DataError("no training examples")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self._orders: Dict[int, np.ndarray] = {}

    def steps_per_epoch(self) -> int:
        return -(-self.num_examples // self.batch_size)

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


class PairBatches(Batches):
    """Tokenized (prompt, response) pairs, padded per batch to the longest; loss on the responses only."""

    def __init__(self, pairs: Sequence[Tuple[str, str]], tokenizer, seq_len: int, batch_size: int,
                 seed: int, source: str = "data"):
        self.examples = []
        dropped = 0
        for ids, labels in encode_pairs(tokenizer, pairs, seq_len):
            if any(label != IGNORE_INDEX for label in labels[1:]):
                self.examples.append((ids, labels))
            else:
                dropped += 1
        if not self.examples:
            raise DataError(f"{source}: no example keeps a response token within --seq-len {seq_len} "
                            "(the prompts are too long); use a larger --seq-len")
        self.dropped = dropped
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = 0 if pad is None else int(pad)
        super().__init__(len(self.examples), batch_size, seed)

    def batch(self, step: int) -> Batch:
        chosen = [self.examples[index] for _, index in self.indices(step)]
        width = max(len(ids) for ids, _ in chosen)
        input_ids = torch.full((len(chosen), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(chosen), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(chosen), width), dtype=torch.long)
        for row, (ids, labs) in enumerate(chosen):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            labels[row, :len(labs)] = torch.tensor(labs)
            mask[row, :len(ids)] = 1
        num_tokens = int(mask.sum())
        return Batch(input_ids, labels, None if num_tokens == mask.numel() else mask, num_tokens)


def build_batches(path: Optional[str], tokenizer, seq_len: int, batch_size: int, seed: int) -> Batches:
    """The batches of a data file (``.jsonl``: pairs; anything else: plain text), or of the shipped text."""
    if path is None:
        return TextBatches(encode_text(tokenizer, load_default_text()), seq_len, batch_size, seed,
                           source=f"badam_kernels/finetune/assets/{DEFAULT_TEXT}")
    if path.lower().endswith(".jsonl"):
        return PairBatches(load_jsonl(path), tokenizer, seq_len, batch_size, seed, source=path)
    return TextBatches(encode_text(tokenizer, load_text(path)), seq_len, batch_size, seed, source=path)
