"""Evaluation during a run: the eval loss every ``--eval-every`` steps and at the end, and greedy
samples for ``--sample-prompts``.

The eval loss is token-weighted: the summed cross-entropy of every trained token of the eval set
(the tokens that carry the loss in training: assistant turns, responses, every token of a text)
divided by their number, so a long example weighs by its tokens, as in training. The eval examples
go in unpacked, ``--eval-batch-size`` at a time (default ``--batch-size``), padded to the longest of each batch, in eval mode
without gradients; under torchrun each rank takes every ``world``-th row of each batch and the sums
are added over the ranks. Nothing draws random numbers, so a resumed run evaluates the same way.

The evaluation lands in the step's line of ``metrics.jsonl`` (``eval_loss``, ``eval_tokens``,
``eval_s``), on the progress bar and in ``loss.png``. With ``--sample-prompts FILE`` (one prompt a
line, or ``.jsonl`` lines in any ``--data`` format, the answer left out) each evaluation also writes
``samples/step_N.jsonl``: the greedy continuation of each prompt, up to ``--sample-tokens`` new
tokens. A prompt is a user turn written out as in training (the chat template, or the plain
template), except in a run on plain text, where a line is text to continue (a JSONL ``text``
object always is).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .data import Encoded, pad_batch, pad_id_of
from .formats import IGNORE_INDEX, DataError, Example, parse_object, prompt_text

SAMPLES_DIR = "samples"


@dataclass
class Prompt:
    shown: str  # as the file gives it (for samples/step_N.jsonl)
    example: Example  # messages to answer, or text to continue


def load_prompts(path: str) -> List[Prompt]:
    """The prompts of a file: ``.jsonl`` lines (a JSON string, or an object in any data format), or
    one prompt a line of any other file; blank lines are skipped."""
    prompts = []
    jsonl = path.lower().endswith(".jsonl")
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                if not jsonl:
                    text = line.rstrip("\n")
                    prompts.append(Prompt(text, Example("prompt", [{"role": "user", "content": text}])))
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
                if isinstance(obj, str):
                    prompts.append(Prompt(obj, Example("prompt", [{"role": "user", "content": obj}])))
                elif isinstance(obj, dict):
                    example = parse_object(obj, where, prompt_only=True)
                    shown = example.text if example.is_text else example.messages[-1]["content"]
                    prompts.append(Prompt(shown, example))
                else:
                    raise DataError(f"{where}: expected a prompt (a JSON string or object), got {type(obj).__name__}")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise DataError(f"--sample-prompts {path}: {exc.strerror or exc}") from None
    if not prompts:
        raise DataError(f"--sample-prompts {path}: no prompts (the file is empty)")
    return prompts


def prompt_ids(tokenizer, prompt: Prompt, text_run: bool) -> List[int]:
    """The token ids a model answers ``prompt`` from (see the module's docstring)."""
    example = prompt.example
    if example.is_text or (text_run and example.format == "prompt"):
        return list(tokenizer.encode(example.text if example.is_text else prompt.shown, add_special_tokens=False))
    text, special = prompt_text(tokenizer, example.messages)
    return list(tokenizer.encode(text, add_special_tokens=special))


class Evaluation:
    """The eval loss of an eval set and the samples of a few prompts, at the steps they are due."""

    def __init__(self, examples: Optional[Sequence[Encoded]], source: Optional[str], every: int, pad_id: int,
                 batch_size: int, prompts: Sequence[Prompt] = (), tokenizer=None, text_run: bool = False,
                 sample_tokens: int = 64, samples_on_every_rank: bool = False):
        self.examples = list(examples or [])
        self.source = source
        self.every = every
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.prompts = list(prompts)
        self.tokenizer = tokenizer
        self.text_run = text_run
        self.sample_tokens = sample_tokens
        self.samples_on_every_rank = samples_on_every_rank  # sharded: every rank takes part in a forward
        self.last: Dict[str, Any] = {}

    @classmethod
    def build(cls, cfg, eval_set, tokenizer, batches) -> Optional["Evaluation"]:
        """The run's evaluation, or None without an eval set or sample prompts."""
        prompts = load_prompts(cfg.sample_prompts) if getattr(cfg, "sample_prompts", None) else []
        if eval_set is None and not prompts:
            return None
        source, examples = eval_set if eval_set is not None else (None, None)
        batch_size = getattr(cfg, "eval_batch_size", None) or cfg.batch_size
        return cls(examples, source, getattr(cfg, "eval_every", 0), pad_id_of(tokenizer), batch_size, prompts,
                   tokenizer, getattr(batches, "text", False), getattr(cfg, "sample_tokens", 64), cfg.shard)

    # ------------------------------------------------------------------------------------ when

    def due(self, step: int, target: int) -> bool:
        return step == target or (self.every > 0 and step % self.every == 0)

    def describe(self) -> str:
        parts = []
        if self.examples:
            tokens = sum(_targets(labels) for _, labels in self.examples)
            parts.append(f"eval: {self.source}: {len(self.examples)} examples, {tokens:,} trained tokens")
        if self.prompts:
            parts.append(f"{len(self.prompts)} sample prompts")
        when = f"every {self.every} steps and at the end" if self.every else "at the end"
        return ", ".join(parts) + f"; {when}"

    def at_step(self, run, step: int, target: int, say: Callable[[str], None]) -> Dict[str, Any]:
        """The eval fields of step ``step``'s metrics record ({} when no evaluation is due); writes the samples."""
        if not self.due(step, target):
            return {}
        t0 = time.perf_counter()
        record: Dict[str, Any] = {}
        line = f"eval at step {step}:"
        if self.examples:
            loss, tokens = self.loss(run.model, run.device, run.rank, run.world, run.loss_fn)
            record.update(eval_loss=loss, eval_tokens=tokens)
            line += f" loss {loss:.4f} over {tokens:,} tokens"
        if self.prompts and (run.main or self.samples_on_every_rank):
            path = self.write_samples(run.model, run.device, step, run.run_dir if run.main else None)
            if path:
                line += f"{',' if self.examples else ''} samples {path}"
        record["eval_s"] = round(time.perf_counter() - t0, 4)
        self.last = record
        say(line)
        return record

    def postfix(self) -> str:
        """For the progress bar: the last eval loss."""
        return f", eval {self.last['eval_loss']:.3f}" if "eval_loss" in self.last else ""

    def summary(self) -> Dict[str, Any]:
        return {"eval_loss": self.last.get("eval_loss"), "eval_tokens": self.last.get("eval_tokens")}

    # ------------------------------------------------------------------------------------ the loss

    @torch.no_grad()
    def loss(self, model, device, rank: int = 0, world: int = 1,
             loss_fn: Optional[Callable[..., torch.Tensor]] = None) -> Tuple[float, int]:
        """(token-weighted mean loss, trained tokens) of the eval set. ``loss_fn``: the run's loss (fast.py), so
        that where the training's is the fused one the evaluation's logits are never whole either (a wide
        ``--eval-batch-size`` of a 128k-vocabulary model would otherwise hold tokens x vocab of them, in fp32);
        None: the model's own."""
        was = model.training
        model.eval()
        total = torch.zeros((), dtype=torch.float64, device=device)
        count = 0
        try:
            for start in range(0, len(self.examples), self.batch_size):
                chunk = self.examples[start:start + self.batch_size]
                mine = chunk[rank::world]
                if not mine:  # every rank runs as many forwards (a sharded model needs them all): a row of no loss
                    mine = [(chunk[0][0], [IGNORE_INDEX] * len(chunk[0][1]))]
                batch = pad_batch(mine, self.pad_id)
                n = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
                inputs = {**batch.model_inputs(device), "use_cache": False}
                batch_loss = loss_fn(**inputs) if loss_fn is not None else model(**inputs).loss
                if n:
                    total += batch_loss.detach().double() * n
                    count += n
                del batch_loss
        finally:
            model.train(was)
        if world > 1:
            import torch.distributed as dist

            both = torch.stack([total, torch.tensor(float(count), dtype=torch.float64, device=device)])
            dist.all_reduce(both)
            total, count = both[0], int(both[1].item())
        return (float(total) / count if count else math.nan), count

    # ------------------------------------------------------------------------------------ samples

    @torch.no_grad()
    def generate(self, model, device) -> List[Dict[str, Any]]:
        """The greedy continuation of each prompt."""
        tok = self.tokenizer
        eos = tok.eos_token_id
        was = model.training
        model.eval()
        out = []
        try:
            for prompt in self.prompts:
                ids = prompt_ids(tok, prompt, self.text_run) or ([eos] if eos is not None else [self.pad_id])
                x = torch.tensor([ids], dtype=torch.long, device=device)
                kwargs = dict(max_new_tokens=self.sample_tokens, do_sample=False, use_cache=True,
                              pad_token_id=self.pad_id)
                if eos is not None:
                    kwargs["eos_token_id"] = eos
                gen = model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kwargs)[0, len(ids):].tolist()
                out.append({"prompt": prompt.shown, "output": tok.decode(gen, skip_special_tokens=True),
                            "new_tokens": len(gen)})
        finally:
            model.train(was)
        return out

    def write_samples(self, model, device, step: int, run_dir: Optional[str]) -> Optional[str]:
        samples = self.generate(model, device)
        if run_dir is None:
            return None
        folder = os.path.join(run_dir, SAMPLES_DIR)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"step_{step}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for sample in samples:
                f.write(json.dumps({"step": step, **sample}, ensure_ascii=False) + "\n")
        return path


def _targets(labels: Sequence[int]) -> int:
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)


def eval_loss_direct(model, examples: Sequence[Encoded], device="cpu") -> float:
    """The token-weighted eval loss computed the plain way, one example at a time from the logits
    (what ``Evaluation.loss`` must equal; for tests)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in examples:
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0].float()
            target = torch.tensor(labels[1:], device=device)
            total += float(torch.nn.functional.cross_entropy(logits[:-1], target, ignore_index=IGNORE_INDEX,
                                                             reduction="sum"))
            count += int((target != IGNORE_INDEX).sum())
    return total / count
