"""The job's speed plan: which loss, compiled layers or not, and how many layers keep their activations.

On a GPU (``--fast auto``, the default there; ``--fast on`` anywhere) the job takes the fastest
configuration measured in ``benchmarks/results/e2e_epoch_*`` that fits the memory budget: liger's
fused linear cross-entropy (the logits never materialised whole), each layer compiled, gradient
checkpointing with as many layers as fit keeping their activations (the top ones: their backward
then skips the recompute). ``--fast off``, and the CPU by default, keep the plain path. Any choice
given explicitly (``--fused-ce/--no-fused-ce``, ``--compile/--no-compile``,
``--grad-checkpointing/--no-grad-checkpointing``, ``--keep-activations``) wins over the plan.

:func:`make_plan` is a pure function of the model's shape, the micro-batch, the budget and what the
device offers, so it is tested on the CPU with a fake budget; :func:`estimate_peak` is its memory
model. The peak of a block epoch is reached with the lowest block active (every layer in the graph):

    weights        parameters x dtype bytes
    states         the largest block's fp32 master (low-precision models) + Adam's two fp32 moments
                   + its gradient in the model's dtype
    activations    kept layers x (per-token bytes of a frozen layer) x tokens
                   + checkpointed layers x their input (tokens x hidden x dtype bytes)
    loss           the larger of: the logits' bytes (plain loss: bf16 logits, their fp32 copy, the fp32
                   gradient and the bf16 one, ``2 x dtype + 8`` bytes a logit) or the fused loss's chunk
                   (``chunk x vocab x dtype`` + the hidden states' gradient), and one checkpointed
                   layer's recomputed activations in backward
    overhead       0.1 GiB (workspaces; measured in the optimizer step's peak)

A frozen Llama-style layer keeps per token, in elements of the model's dtype (the linear layers are
frozen, so they save no inputs): eager ``6h + 2kv + 3i`` (two fp32 norm inputs = 4h, q and the
attention output 2h, k and v 2kv, SiLU's input, its output and the up projection 3i); compiled
``4h + 2kv + 2i`` (inductor keeps the norms' bf16 inputs and recomputes SiLU). Calibration against
the measured peaks on an H200 (``benchmarks/results/e2e_epoch_{8b,1b}*_h200_2026-12-01.json``,
bf16, peak allocated memory over a block epoch, the lowest block active last), with
``ACTIVATION_FACTOR`` 1.04 (the 1.2B shape keeps about 4% more per token than the element count):

    8B at 2x1024   plain loss, checkpointing, none kept     measured 20.9  estimated 21.3 GiB (+2.0%)
                   plain loss, every layer kept             measured 29.1  estimated 29.7     (+2.1%)
                   fused CE (chunk 8), every layer kept     measured 26.3  estimated 26.9     (+2.1%)
                   compiled + fused CE, every layer kept    measured 23.5  estimated 24.0     (+2.1%)
                   fused CE (chunk 1), none kept            measured 18.4  estimated 18.7     (+1.5%)
    1.2B at 4x1024 plain loss, none kept                    measured  9.2  estimated  9.3     (+1.3%)
                   plain loss, every layer kept             measured 13.7  estimated 13.9     (+1.1%)
                   fused CE (chunk 8), every layer kept     measured  8.05 estimated  8.14    (+1.1%)
                   compiled + fused CE, every layer kept    measured  6.50 estimated  6.58    (+1.2%)
                   fused CE (chunk 1), none kept            measured  3.79 estimated  3.75    (-1.1%)

(every measured configuration within -2%..+3%; ``tests/test_finetune_training.py`` checks it against
the files). Memory the allocator reserves beyond what it allocates (fragmentation) is what the
default budget's margin is for: the GPU's free memory less 2 GiB and 5% of its size.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

GiB = 2**30
FAST_MODES = ("auto", "on", "off")
ACTIVATION_FACTOR = 1.04  # on the per-layer activation estimates (see the calibration above)
OVERHEAD = int(0.1 * GiB)
CE_CHUNK_MEM = 8  # liger's chunk_mem_const: 8x fewer, larger chunks than its default (bench_e2e's ce8: faster)
MARGIN_GIB, MARGIN_SHARE = 2.0, 0.05  # the default budget: free memory less this


# ------------------------------------------------------------------------------------ inputs

@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs of a decoder: sizes, parameter counts, the dtype's bytes."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int
    kv_dim: int  # key/value width (heads x head dim of the K and V projections)
    params: int  # every parameter (tied ones once)
    block_params: int  # the largest block's parameters (trained with it: the active modules too)
    dtype_bytes: int = 2
    supports_checkpointing: bool = True

    @classmethod
    def from_config(cls, config, dtype_bytes: int = 2, include_embedding: bool = False,
                    include_lm_head: bool = False) -> "ModelShape":
        """A Llama-style shape from a Hugging Face config (no weights needed): sizes and the
        parameter counts of a layer, the embedding and the LM head computed from them."""
        h, i, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or h // heads
        kv = head_dim * (getattr(config, "num_key_value_heads", None) or heads)
        q = head_dim * heads
        layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
        embed = config.vocab_size * h
        tied = bool(getattr(config, "tie_word_embeddings", False))
        head = (0 if tied else embed) + h  # the LM head and the final norm
        block = max(layer, embed if include_embedding else 0, head if include_lm_head else 0)
        return cls(h, i, n, config.vocab_size, kv, embed + n * layer + head, block, dtype_bytes)

    @classmethod
    def from_model(cls, model, include_embedding: bool = False, include_lm_head: bool = False,
                   active_modules: Sequence[str] = ()) -> "ModelShape":
        """The shape of a loaded model: sizes from its config, parameter counts from its tensors, the
        blocks as ``BlockOptimizer`` infers them."""
        from ..layers import find_layer_stack
        from ..partition import infer_block_prefixes

        config = model.config
        named = list(model.named_parameters())
        sizes = {}
        for name, p in named:
            sizes.setdefault(id(p), (name, p.numel()))
        names = [name for name, _ in sizes.values()]
        blocks = infer_block_prefixes(names, include_embedding, include_lm_head)
        every = sum(n for name, n in sizes.values() if any(name.startswith(m) for m in active_modules))
        block = max((sum(n for name, n in sizes.values() if any(name.startswith(b) for b in prefixes))
                     for prefixes in blocks), default=0) + every
        stack = find_layer_stack(model)
        h = config.hidden_size
        heads = getattr(config, "num_attention_heads", 1)
        head_dim = getattr(config, "head_dim", None) or h // heads
        kv = head_dim * (getattr(config, "num_key_value_heads", None) or heads)
        dtype_bytes = next(p for _, p in named).element_size()
        return cls(h, getattr(config, "intermediate_size", 4 * h), len(stack), model.get_input_embeddings().num_embeddings,
                   kv, sum(n for _, n in sizes.values()), block, dtype_bytes,
                   bool(getattr(model, "supports_gradient_checkpointing", False)))


@dataclass(frozen=True)
class DeviceFacts:
    """What the device offers the plan."""

    type: str  # "cuda" or "cpu"
    free_bytes: Optional[int] = None  # free memory before the model moves there (None: unknown, the CPU)
    total_bytes: Optional[int] = None
    fused_ce: Optional[str] = None  # why liger's fused cross-entropy cannot run here, None if it can
    compile: Optional[str] = None  # why the layers cannot be compiled here, None if they can


def default_budget(device: DeviceFacts) -> Optional[int]:
    """The GPU's free memory less a margin (2 GiB and 5% of its size); None on the CPU (no limit)."""
    if device.free_bytes is None:
        return None
    margin = MARGIN_GIB * GiB + MARGIN_SHARE * (device.total_bytes or device.free_bytes)
    return max(0, int(device.free_bytes - margin))


# ------------------------------------------------------------------------------------ memory model

def layer_activation_bytes(shape: ModelShape, tokens: int, compiled: bool) -> int:
    """Bytes a frozen layer keeps for backward when it is not checkpointed (see the module's docstring)."""
    h, kv, i = shape.hidden, shape.kv_dim, shape.intermediate
    elements = (4 * h + 2 * kv + 2 * i) if compiled else (6 * h + 2 * kv + 3 * i)
    return int(ACTIVATION_FACTOR * elements * shape.dtype_bytes * tokens)


def fused_ce_chunk(tokens: int, vocab: int, hidden: int, chunk_mem_const: int = CE_CHUNK_MEM) -> int:
    """The tokens of one chunk of liger's fused linear cross-entropy (its own rule, liger-kernel 0.8)."""
    inc_factor = -(-vocab // (chunk_mem_const * hidden))
    return min(tokens, 1 << max(0, math.ceil(math.log2(-(-tokens // inc_factor)))))


def estimate_peak(shape: ModelShape, tokens: int, *, fused_ce: bool, compiled: bool, grad_checkpointing: bool,
                  keep_activations: Union[int, str], world: int = 1, shard: bool = False) -> Dict[str, int]:
    """The expected peak of allocated memory over a block epoch, by part (bytes), and its ``total``.

    ``tokens``: one process' micro-batch (rows x sequence length); ``shard``: weights and states are
    split over ``world`` processes (FSDP2)."""
    b = shape.dtype_bytes
    split = world if shard else 1
    weights = shape.params * b // split
    master = 4 if b < 4 else 0
    states = shape.block_params * (master + 8 + b) // split
    n = shape.layers
    kept = n if not grad_checkpointing else min(n, n if keep_activations == "all" else int(keep_activations))
    per_layer = layer_activation_bytes(shape, tokens, compiled)
    activations = kept * per_layer + (n - kept) * tokens * shape.hidden * b
    if fused_ce:
        chunk = fused_ce_chunk(tokens, shape.vocab, shape.hidden)
        loss = chunk * shape.vocab * b + tokens * shape.hidden * b
    else:
        loss = tokens * shape.vocab * (2 * b + 8)
    recompute = per_layer if kept < n else 0
    parts = dict(weights=weights, states=states, activations=activations, loss_or_recompute=max(loss, recompute),
                 overhead=OVERHEAD)
    parts["total"] = sum(parts.values())
    return parts


# ------------------------------------------------------------------------------------ the plan

@dataclass
class Plan:
    """The choices the run trains with, why, and the expected peak (written to config.json and summary.json)."""

    fast: bool  # the fast path is on (``--fast on``, or ``auto`` on a GPU)
    fused_ce: bool
    compile_layers: bool
    grad_checkpointing: bool
    keep_activations: Union[int, str]
    layers: int
    tokens: int  # of one micro-batch on one process
    peak_gib: float
    budget_gib: Optional[float]
    fits: bool
    given: List[str] = field(default_factory=list)  # the choices given explicitly (the plan kept them)
    notes: List[str] = field(default_factory=list)  # fallbacks and warnings, said once at the start
    parts_gib: Dict[str, float] = field(default_factory=dict)

    @property
    def loss(self) -> str:
        return f"fused linear cross-entropy (liger-kernel, chunk_mem_const {CE_CHUNK_MEM})" if self.fused_ce \
            else "plain cross-entropy"

    def describe(self) -> str:
        """One line: which loss, compiled or not, how many layers keep their activations, the peak."""
        if not self.grad_checkpointing:
            layers = "no gradient checkpointing (every layer keeps its activations)"
        else:
            kept = self.layers if self.keep_activations == "all" else self.keep_activations
            layers = f"gradient checkpointing, {kept} of {self.layers} layers keep their activations"
        budget = f" of a {_gib(self.budget_gib)} GiB budget" if self.budget_gib is not None else ""
        mode = "fast" if self.fast else "plain"
        return (f"plan ({mode}): {self.loss}, layers {'compiled' if self.compile_layers else 'eager'}, {layers}; "
                f"expected peak {_gib(self.peak_gib)} GiB{budget}")

    def as_dict(self) -> Dict[str, Any]:
        return {**dataclasses.asdict(self), "loss": self.loss, "line": self.describe()}


def _gib(value: float) -> str:
    return f"{value:.1f}" if value >= 1 else f"{value:.2f}"


def fast_on(fast: str, device_type: str) -> bool:
    """``--fast``: on, off, or auto (on for CUDA)."""
    return fast == "on" or (fast == "auto" and device_type == "cuda")


def explicit_switches(fast: str, device_type: str, grad_checkpointing: Optional[bool],
                      keep_activations: Optional[Union[int, str]]) -> Optional[bool]:
    """The checkpointing switch as far as it is known before the model loads (None: the plan decides);
    raises for a ``--keep-activations`` that cannot apply, so that the job fails before loading."""
    from .config import require

    if grad_checkpointing is None and not fast_on(fast, device_type):
        grad_checkpointing = False
    require(keep_activations in (None, 0) or grad_checkpointing is not False,
            "--keep-activations only applies with --grad-checkpointing (without it every layer keeps its "
            "activations anyway)")
    return grad_checkpointing


def make_plan(shape: ModelShape, batch_rows: int, seq_len: int, device: DeviceFacts, *, fast: str = "auto",
              budget_bytes: Optional[int] = None, fused_ce: Optional[bool] = None,
              compile_layers: Optional[bool] = None, grad_checkpointing: Optional[bool] = None,
              keep_activations: Optional[Union[int, str]] = None, world: int = 1, shard: bool = False) -> Plan:
    """The run's choices: the given ones (not None) as they are, the others from ``fast`` and the budget.

    ``batch_rows``: one process' rows of a micro-batch; ``budget_bytes`` None: ``default_budget``
    (no limit on the CPU). With the fast path, checkpointing is on and the most top layers that fit
    the budget keep their activations ("all" when every one fits); the fused loss and the compiled
    layers are taken where the device offers them (``device.fused_ce`` / ``device.compile`` say why
    not: a note, said once)."""
    on = fast_on(fast, device.type)
    given = [name for name, value in (("fused_ce", fused_ce), ("compile_layers", compile_layers),
                                      ("grad_checkpointing", grad_checkpointing),
                                      ("keep_activations", keep_activations)) if value is not None]
    grad_checkpointing = explicit_switches(fast, device.type, grad_checkpointing, keep_activations)
    notes: List[str] = []
    wanted_ce = on if fused_ce is None else fused_ce
    if wanted_ce and shard:
        notes.append("fused cross-entropy: not with --shard (the LM head is sharded); plain cross-entropy")
        wanted_ce = False
    elif wanted_ce and device.fused_ce is not None:
        notes.append(f"fused cross-entropy: {device.fused_ce}; plain cross-entropy")
        wanted_ce = False
    compiled = on if compile_layers is None else compile_layers
    if compiled and compile_layers is None and device.compile is not None:
        notes.append(f"compiled layers: {device.compile}; eager layers")
        compiled = False
    if grad_checkpointing is None:
        grad_checkpointing = shape.supports_checkpointing
        if not grad_checkpointing:
            notes.append("gradient checkpointing: the model does not support it")
    budget = default_budget(device) if budget_bytes is None else budget_bytes
    tokens = batch_rows * seq_len

    def peak(keep) -> Dict[str, int]:
        return estimate_peak(shape, tokens, fused_ce=wanted_ce, compiled=compiled,
                             grad_checkpointing=grad_checkpointing, keep_activations=keep, world=world, shard=shard)

    if keep_activations is not None:
        keep = keep_activations
    elif not grad_checkpointing:
        keep = 0
    elif budget is None:
        keep = "all"
    else:
        keep = next((k for k in range(shape.layers, -1, -1) if peak(k)["total"] <= budget), 0)
        keep = "all" if keep == shape.layers else keep
    parts = peak(keep)
    fits = budget is None or parts["total"] <= budget
    if not fits:
        notes.append(f"the expected peak {_gib(parts['total'] / GiB)} GiB exceeds the memory budget "
                     f"{_gib(budget / GiB)} GiB: it may run out of memory (a smaller --batch-size with --grad-accum "
                     "keeps the same optimizer step)")
    return Plan(fast=on, fused_ce=wanted_ce, compile_layers=compiled, grad_checkpointing=grad_checkpointing,
                keep_activations=keep, layers=shape.layers, tokens=tokens, peak_gib=round(parts["total"] / GiB, 3),
                budget_gib=None if budget is None else round(budget / GiB, 3), fits=fits, given=given, notes=notes,
                parts_gib={k: round(v / GiB, 3) for k, v in parts.items() if k != "total"})


# ------------------------------------------------------------------------------------ the device

def device_facts(device, liger_reason: Optional[str] = None) -> DeviceFacts:
    """The facts of a torch device: free and total memory of a GPU (before the model moves there),
    and whether the fused loss (``liger_reason``: why not) and compiled layers can run."""
    import torch

    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return DeviceFacts("cuda", free, total, liger_reason, None)
    return DeviceFacts(device.type, None, None, liger_reason, None)


# ------------------------------------------------------------------------------------ the job's plan

def plan_for_run(cfg, model, device, world: int = 1) -> Plan:
    """The plan of a resolved ``TrainConfig`` for ``model`` (loaded, not yet on ``device``)."""
    from .fast import fused_ce_problem

    shape = ModelShape.from_model(model, bool(cfg.include_embedding), bool(cfg.include_lm_head),
                                  cfg.active_modules or ())
    wants_ce = cfg.fused_ce if cfg.fused_ce is not None else fast_on(cfg.fast, device.type)
    reason = fused_ce_problem(model, device.type) if wants_ce else None  # liger is imported only when wanted
    budget = None if cfg.memory_budget is None else int(cfg.memory_budget * GiB)
    return make_plan(shape, max(1, cfg.batch_size // world), cfg.seq_len, device_facts(device, reason),
                     fast=cfg.fast, budget_bytes=budget, fused_ce=cfg.fused_ce, compile_layers=cfg.compile_layers,
                     grad_checkpointing=cfg.grad_checkpointing, keep_activations=cfg.keep_activations, world=world,
                     shard=cfg.shard)


def apply_plan(cfg, plan: Plan):
    """``cfg`` with the plan's choices in place of the ones left to it."""
    return dataclasses.replace(cfg, fused_ce=plan.fused_ce, compile_layers=plan.compile_layers,
                               grad_checkpointing=plan.grad_checkpointing, keep_activations=plan.keep_activations)


def announce_plan(plan: Plan, device_type: str, log) -> None:
    """The plan's line (on a GPU, or wherever the fast path is on) and its notes, once, at the start."""
    import sys

    if plan.fast or device_type == "cuda":
        log(plan.describe())
    for note in plan.notes:
        print(f"badam-finetune: note: {note}", file=sys.stderr)


def record_plan(run_dir: str, plan: Plan) -> None:
    """Add the plan to the run folder's config.json (beside the options, which keep what was given)."""
    import json
    import os

    path = os.path.join(run_dir, "config.json")
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    saved["plan"] = plan.as_dict()
    with open(path, "w", encoding="utf-8") as f:
        json.dump(saved, f, indent=2)
