"""Sharded BAdam at scale: a Llama fine-tuned with ``ShardedBlockOptimizer`` under FSDP2, under torchrun.

The experiment: a Llama-architecture ``LlamaForCausalLM`` (transformers, random weights, sdpa
attention; bf16 on CUDA, fp32 on the CPU) is sharded over every rank with ``shard_model`` (FSDP2:
each decoder layer one unit, the root, holding the embedding, final norm and lm_head, another) and
fine-tuned block by block with ``ShardedBlockOptimizer`` (one block per decoder layer, fp32 master
weights and Adam moments of the active block's local shards only), gradient checkpointing on
(non-reentrant, with ``enable_input_require_grads`` as the Hugging Face Trainer does) and
``truncate_backward`` on. Every rank trains on its own ``--batch`` x ``--seq`` random tokens.

The model is never whole on one device: it is built under ``torch.device("meta")``, sharded, then
``to_empty`` allocates only the local shards, which are initialised in place (normal(0, 0.02) from
a per-rank generator, norm weights 1); the rotary ``inv_freq`` buffers, which ``to_empty`` leaves
uninitialised, are recomputed from the config.

Shapes (``--shape``): ``70b`` (hidden 8192, intermediate 28672, 80 layers, 64 heads, 8 KV heads,
vocab 128256), ``8b`` (4096 / 14336 / 32 / 32 / 8 / 128256), ``1b`` (2048 / 8192 / 16 / 32 / 8 /
128256, tied embeddings), ``tiny`` (64 / 128 / 4 / 4 / 2 / 256, tied; the CPU test's size).

Steps: ``--warmup`` steps (default ``--switch-every`` - 1: the first block, which BAdam trains one
step less), then ``--blocks`` blocks of ``--switch-every`` steps each, every step recorded (warm-up
ones flagged). The block order is ``--switch-mode`` (default ``descending``: from the top layer
down, BAdam's default; truncation saves least on the low blocks, so ``--start-block`` with
``ascending`` measures those).

Measured per step, on every rank, reported by rank 0: wall time (perf_counter around the step,
with ``cuda.synchronize``; forward / backward / optimizer split by CUDA events), the max over the
ranks; tokens/s of the whole world (world x batch x seq / step time); peak memory per GPU
(``cuda.max_memory_allocated`` within the step, max over the ranks by an all_reduce MAX; on the CPU
the processes' peak RSS instead); the loss (mean over the ranks, must be finite).

Communication, per step and per rank, is counted analytically from the sharded model (fields
``*_bytes_model``, computed, not measured). Sizes are those of the collectives' full buffers: the
all-gather's output, the reduce-scatter's input, the all-reduce's tensor. With W ranks, a FSDP2
unit's full bytes are ``sum over its parameters of ceil(rows / W) * W * (numel / rows) * itemsize``
(FSDP2 pads dim 0 to a multiple of W), the itemsize being the parameters' dtype (no mp_policy:
bf16 parameters all-gather in bf16 and reduce-scatter bf16 gradients). With the active block's
lowest layer l, L layers and the root unit R (nothing before the stack trainable)::

    allgather_forward     = sum(all units)                            (every layer runs forward)
    allgather_backward    = sum(layers l..L-1) + R
                            (the units backward visits: the root, resharded after forward since
                            shard_model passes reshard_after_forward=True, and the layers from l
                            up; truncate_backward stops FSDP2's prefetch of the layer below l)
    reducescatter         = sum over the active block's parameters of their padded bytes (bf16
                            gradients of bf16 parameters: the same sizes)
    allreduce             = 4 (the fp32 squared gradient norm of ShardedBlockOptimizer)
    wire (sent per rank)  = (W-1)/W * (allgather + reducescatter) + 2(W-1)/W * allreduce

the wire line being what each rank sends with ring algorithms. For comparison, per step on the
same model and world (``comm_baselines_per_step``): plain FSDP2 full fine-tuning all-gathers every
unit in forward and again in backward and reduce-scatters every gradient (``fsdp_full_*``); plain
DDP all-reduces every gradient, a buffer of P = the parameters' bytes, so ``ddp_wire_bytes_model``
= 2(W-1)/W * P, about 2P. On one rank FSDP2 issues no all-gather or reduce-scatter at all: the
buffer sizes are still given, the wire bytes are 0. Unless ``--no-count-comm``, the collectives
are also counted as they are issued (``*_bytes_counted``, the max over the ranks: wrappers around
``torch.distributed``'s all-gather, reduce-scatter and all-reduce functions, no profiler), a check
of the model.

Out of memory on any rank, at build, optimizer construction or any step, is a result: the ranks
agree on it (an all_reduce of a per-rank flag) and the JSON says ``status: "OOM"`` with where and
on which ranks. The agreement needs every rank to reach it, which holds when the ranks fail at the
same point (they hold equal shards and batches); a rank failing alone in the middle of FSDP2's
collectives would leave the others waiting, so rank 0 also rewrites the JSON after every step
(``status: "running"``): a run that dies keeps what it measured.

Only rank 0 writes: ``benchmarks/results/bench_scale_<shape>_<W>gpu_<device>_<date>.json`` (``proc``
for CPU processes; ``$BENCH_RESULTS_DIR`` overrides the folder, ``--out`` the file) and a PNG of
tokens/s and peak memory per step beside it.

``--parallel replicated`` runs the same loop data parallel instead: the whole model on every rank
(the same weights), ``DataParallelBlockOptimizer``, one all-reduce of the active block's flat
gradient buffer per step (``allreduce_bytes_model``; nothing is gathered). The 1 vs 2 GPU
comparison on the 8B shape::

    torchrun --nproc-per-node 1 benchmarks/bench_scale.py --shape 8b --batch 2 --seq 1024 --parallel replicated
    torchrun --nproc-per-node 2 benchmarks/bench_scale.py --shape 8b --batch 2 --seq 1024 --parallel replicated
    torchrun --nproc-per-node 2 benchmarks/bench_scale.py --shape 8b --batch 2 --seq 1024   # sharded

The 70B run on 8 GPUs::

    torchrun --nproc-per-node 8 benchmarks/bench_scale.py --shape 70b

The CPU smoke test (2 processes, gloo)::

    torchrun --nproc-per-node 2 benchmarks/bench_scale.py --shape tiny --seq 32 --blocks 3 --switch-every 2
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))
from common import LLAMA_SHAPES, command_line, device_record, median, result_path, write_json  # noqa: E402

from badam_kernels.cli import count_or_all  # noqa: E402
from badam_kernels.distributed import (DataParallelBlockOptimizer, comm_device, init_distributed,  # noqa: E402
                                       is_main_process)
from badam_kernels.models import enable_gradient_checkpointing, find_layer_stack  # noqa: E402
from badam_kernels.schedule import SWITCH_MODES  # noqa: E402
from badam_kernels.sharded import ShardedBlockOptimizer, shard_model  # noqa: E402
from badam_kernels.truncate import truncate_backward  # noqa: E402

SHAPES = {
    **LLAMA_SHAPES,
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True),
}
LR = 1e-5
ROPE_THETA = 500000.0  # Llama 3's
OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
GiB = 2**30


# ----------------------------------------------------------------------------------- the model
def build_model(shape: str, seq: int, device: torch.device, seed: int, rank: int, world: int,
                sharded: bool = True):
    """The Llama of ``shape``, sharded over the world and initialised shard by shard (never whole);
    ``sharded=False``: whole on every rank, the same weights everywhere (data parallel)."""
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(seq, 4096), rope_theta=ROPE_THETA,
                         attn_implementation="sdpa")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device("meta"):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.train()
    model.config.use_cache = False
    enable_gradient_checkpointing(model, use_reentrant=False)
    model.enable_input_require_grads()  # what the HF Trainer does: the embedding output requires grad
    if sharded:
        shard_model(model, mesh=init_device_mesh(device.type, (world,)))
    model.to_empty(device=device)
    if not sharded and config.tie_word_embeddings:
        model.tie_weights()  # to_empty gave lm_head storage of its own (FSDP2 keeps the tie: one parameter)
    init_local_shards(model, device, seed * 1_000_003 + (rank if sharded else 0))
    return model


@torch.no_grad()
def init_local_shards(model, device: torch.device, seed: int) -> None:
    """normal(0, 0.02) on each parameter's local shard (norm weights 1), rotary buffers recomputed."""
    from torch.distributed.tensor import DTensor

    gen = torch.Generator(device=device).manual_seed(seed)
    norms = {id(p) for m in model.modules() if "norm" in type(m).__name__.lower() for p in m.parameters(recurse=False)}
    for p in model.parameters():  # tied weights come once
        local = p.to_local() if isinstance(p, DTensor) else p
        if id(p) in norms:
            local.fill_(1.0)
        else:
            local.normal_(0.0, 0.02, generator=gen)
    for module in model.modules():
        buffers = dict(module.named_buffers(recurse=False))
        if not buffers:
            continue
        if "inv_freq" not in buffers:
            raise RuntimeError(f"{type(module).__name__} holds buffers {sorted(buffers)} that to_empty left "
                               "uninitialised and this benchmark does not know how to recompute")
        # LlamaRotaryEmbedding computes inv_freq (and original_inv_freq) in __init__ from the config:
        # a fresh one on the CPU has the values to copy in
        with torch.device("cpu"):
            fresh = type(module)(config=module.config)
        for name, buf in fresh.named_buffers(recurse=False):
            buffers[name].copy_(buf)
        if hasattr(fresh, "attention_scaling"):
            module.attention_scaling = fresh.attention_scaling


def make_batches(vocab: int, batch: int, seq: int, device: torch.device, seed: int, rank: int, count: int = 4):
    """A few fixed batches of random tokens per rank, cycled."""
    gen = torch.Generator().manual_seed(seed * 7919 + rank)
    return [torch.randint(0, vocab, (batch, seq), generator=gen).to(device) for _ in range(count)]


# ----------------------------------------------------------------------------------- bytes model
def full_bytes(param, world: int) -> int:
    """What FSDP2 all-gathers of a parameter: dim 0 padded to a multiple of the world, in its dtype."""
    if param.dim() == 0:
        return param.element_size() * world
    rows = param.shape[0]
    per_row = param.numel() // rows if rows else 0
    return math.ceil(rows / world) * world * per_row * param.element_size()


def plain_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


class CommModel:
    """The FSDP2 units of the sharded model and what a step moves (see the module docstring)."""

    def __init__(self, model, world: int, sharded: bool = True):
        self.world, self.sharded = world, sharded
        self.layers = list(find_layer_stack(model))
        in_stack = {id(p) for layer in self.layers for p in layer.parameters()}
        seen = set()
        self.root_params = []
        for p in model.parameters():
            if id(p) not in in_stack and id(p) not in seen:
                seen.add(id(p))
                self.root_params.append(p)
        self.layer_params = [list(layer.parameters()) for layer in self.layers]
        pad_to = world if sharded else 1  # FSDP2 pads dim 0 to a multiple of the world
        self.layer_bytes = [sum(full_bytes(p, pad_to) for p in ps) for ps in self.layer_params]
        self.root_bytes = sum(full_bytes(p, pad_to) for p in self.root_params)
        self.total_bytes = sum(self.layer_bytes) + self.root_bytes  # padded, as gathered
        self.param_bytes = plain_bytes(self.root_params) + sum(plain_bytes(ps) for ps in self.layer_params)
        self.num_params = sum(p.numel() for p in self.root_params) + sum(p.numel() for ps in self.layer_params
                                                                          for p in ps)

    def describe(self) -> dict:
        return {"units": len(self.layers) + 1, "layer_unit_bytes": self.layer_bytes[0] if self.layers else 0,
                "root_unit_bytes": self.root_bytes, "all_units_bytes": self.total_bytes,
                "param_bytes": self.param_bytes, "num_params": self.num_params}

    def wire(self, allgather: int, reducescatter: int, allreduce: int) -> float:
        w = self.world
        return (w - 1) / w * (allgather + reducescatter) + 2 * (w - 1) / w * allreduce

    def step(self) -> dict:
        """The bytes of one BAdam step with the parameters that require grad now (the active block)."""
        trainable_root = any(p.requires_grad for p in self.root_params)
        trainable_layers = [i for i, ps in enumerate(self.layer_params) if any(p.requires_grad for p in ps)]
        lowest = -1 if trainable_root else (trainable_layers[0] if trainable_layers else len(self.layers))
        forward = self.total_bytes
        if lowest < 0:  # something before the stack trains: no truncation, backward visits everything
            backward = self.total_bytes
        else:
            backward = self.root_bytes + sum(self.layer_bytes[lowest:])
        grads = [p for p in self.root_params if p.requires_grad]
        grads += [p for ps in self.layer_params for p in ps if p.requires_grad]
        if self.sharded:
            reducescatter = sum(full_bytes(p, self.world) for p in grads)
            allreduce = 4
        else:  # DataParallelBlockOptimizer: one all-reduce of the active block's flat gradient buffer
            forward = backward = reducescatter = 0
            allreduce = self.active_grad_buffer_bytes(grads)
        allgather = forward + backward
        return {"lowest_layer": lowest, "allgather_forward_bytes_model": forward,
                "allgather_backward_bytes_model": backward, "allgather_bytes_model": allgather,
                "reducescatter_bytes_model": reducescatter, "allreduce_bytes_model": allreduce,
                "active_param_bytes": plain_bytes(grads),
                "wire_bytes_model": self.wire(allgather, reducescatter, allreduce)}

    @staticmethod
    def active_grad_buffer_bytes(grads) -> int:
        """The flat gradient buffer's bytes (block_state.layout: each tensor padded to ALIGN elements)."""
        from badam_kernels.block_state import ALIGN

        return sum(-(-p.numel() // ALIGN) * ALIGN * p.element_size() for p in grads)

    def baselines(self) -> dict:
        """Per step: plain FSDP2 full fine-tuning and plain DDP on the same model and world."""
        fsdp_ag, fsdp_rs = 2 * self.total_bytes, self.total_bytes
        return {"fsdp_full_allgather_bytes_model": fsdp_ag, "fsdp_full_reducescatter_bytes_model": fsdp_rs,
                "fsdp_full_wire_bytes_model": self.wire(fsdp_ag, fsdp_rs, 0),
                "ddp_allreduce_bytes_model": self.param_bytes,
                "ddp_wire_bytes_model": self.wire(0, 0, self.param_bytes)}


class CommCounter:
    """Counts the bytes of the collectives issued while ``active``: wrappers around torch.distributed's
    all-gather, reduce-scatter and all-reduce functions (FSDP2 looks them up at each call)."""

    KINDS = {"all_gather_single": "allgather", "all_gather_into_tensor": "allgather",
             "reduce_scatter_single": "reducescatter", "reduce_scatter_tensor": "reducescatter",
             "all_reduce": "allreduce"}

    def __init__(self):
        self.active = False
        self.depth = 0  # one collective implemented by another counts once
        self.counts = {"allgather": 0, "reducescatter": 0, "allreduce": 0}
        self.calls = {"allgather": 0, "reducescatter": 0, "allreduce": 0}
        self._originals = {}
        for name, kind in self.KINDS.items():
            original = getattr(dist, name, None)
            if original is not None:
                self._originals[name] = original
                setattr(dist, name, self._wrap(original, kind))

    def _wrap(self, original, kind):
        counter = self

        def counted(*args, **kwargs):
            if counter.active and counter.depth == 0:
                if kind == "allgather":  # the output: the full buffer
                    t = kwargs.get("output_tensor", args[0] if args else None)
                elif kind == "reducescatter":  # the input: the full buffer
                    t = kwargs.get("input", kwargs.get("input_tensor", args[1] if len(args) > 1 else None))
                else:
                    t = kwargs.get("tensor", args[0] if args else None)
                if torch.is_tensor(t):
                    counter.counts[kind] += t.numel() * t.element_size()
                    counter.calls[kind] += 1
            counter.depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                counter.depth -= 1

        counted.__wrapped__ = original
        return counted

    def reset(self) -> None:
        for kind in self.counts:
            self.counts[kind] = self.calls[kind] = 0

    def remove(self) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)


# ----------------------------------------------------------------------------------- agreement
class Agreement:
    """The ranks' collective verdicts: OOM flags (one per rank) and per-step maxima and means."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.device = comm_device()

    def oom_ranks(self, failed: bool) -> List[int]:
        flags = torch.zeros(self.world, dtype=torch.float64, device=self.device)
        flags[self.rank] = float(failed)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return [r for r, f in enumerate(flags.tolist()) if f]

    def max(self, values: List[float]) -> List[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def mean(self, values: List[float]) -> List[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return (t / self.world).tolist()


def simulate_oom(model, now) -> None:
    """``--fail-oom-at``: every rank raises OutOfMemoryError in the middle of the forward when ``now()``,
    as ranks holding equal shards do when a step does not fit."""
    layers = find_layer_stack(model)

    def hook(*_):
        if now():
            raise OOM("simulated out of memory (--fail-oom-at)")

    layers[len(layers) // 2].mlp.register_forward_pre_hook(hook)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


# ----------------------------------------------------------------------------------- the run
def timed_step(model, opt, ids, device: torch.device, counter: Optional[CommCounter]) -> dict:
    """One training step: forward, backward, optimizer step (with its switch) and zero_grad."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()  # every rank starts the clock together (rank 0 wrote the JSON after the last step)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
    if counter is not None:
        counter.reset()
        counter.active = True
    try:
        t0 = time.perf_counter()
        if cuda:
            events[0].record()
        loss = model(input_ids=ids, labels=ids).loss
        t1 = time.perf_counter()
        if cuda:
            events[1].record()
        loss.backward()
        t2 = time.perf_counter()
        if cuda:
            events[2].record()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            events[3].record()
            torch.cuda.synchronize()
        t3 = time.perf_counter()
    finally:
        if counter is not None:
            counter.active = False
    if cuda:
        fwd, bwd, step = (events[j].elapsed_time(events[j + 1]) / 1e3 for j in range(3))
        peak, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    else:
        fwd, bwd, step = t1 - t0, t2 - t1, t3 - t2
        peak = reserved = float("nan")
    row = {"step_s": t3 - t0, "forward_s": fwd, "backward_s": bwd, "optimizer_s": step,
           "peak_mem_bytes": peak, "peak_reserved_bytes": reserved, "max_rss_bytes": max_rss_bytes(),
           "loss": float(loss.detach().float())}
    if counter is not None:
        row.update({f"{k}_bytes_counted": v for k, v in counter.counts.items()})
        row.update({f"{k}_calls_counted": v for k, v in counter.calls.items()})
    return row


def run(args, rank: int, world: int, device: torch.device) -> dict:
    agree = Agreement(rank, world)
    cuda = device.type == "cuda"
    payload = {"experiment": "sharded_badam_fsdp2" if args.parallel == "sharded" else "data_parallel_badam",
               "parallel": args.parallel, "shape": args.shape, "config": SHAPES[args.shape],
               "world_size": world, "batch_per_rank": args.batch, "seq": args.seq,
               "tokens_per_step": world * args.batch * args.seq, "switch_every": args.switch_every,
               "switch_mode": args.switch_mode, "start_block": args.start_block, "blocks": args.blocks,
               "warmup": args.warmup, "keep_activations": args.keep_activations,
               "dtype": "bfloat16" if cuda else "float32", "backend": dist.get_backend(),
               "gradient_checkpointing": True, "truncate_backward": True, "status": "running", "steps": []}
    out_path = output_path(args, world, cuda)
    sharded = args.parallel == "sharded"
    model, failed = attempt(lambda: build_model(args.shape, args.seq, device, args.seed, rank, world, sharded),
                            cuda)
    if stop_on_oom(agree, failed, "build", payload):
        return finish(args, payload, out_path, rank, world, cuda)
    comm = CommModel(model, world, sharded)
    payload.update(model=comm.describe(), comm_baselines_per_step=comm.baselines(),
                   model_shard_bytes=torch.cuda.memory_allocated() if cuda else None)
    opt, failed = attempt(lambda: make_optimizer(model, args), cuda)
    if stop_on_oom(agree, failed, "optimizer", payload):
        return finish(args, payload, out_path, rank, world, cuda)
    payload.update(num_blocks=opt.num_blocks,
                   after_optimizer_bytes=torch.cuda.memory_allocated() if cuda else None)

    batches = make_batches(SHAPES[args.shape]["vocab_size"], args.batch, args.seq, device, args.seed, rank)
    counter = CommCounter() if args.count_comm else None
    if args.fail_oom_at is not None:
        simulate_oom(model, lambda: i == args.fail_oom_at)
    total = args.warmup + args.blocks * args.switch_every
    try:
        for i in range(total):
            stage = f"step {i}"
            block, model_bytes = opt.active_block, comm.step()
            row, failed = None, False
            try:
                row = timed_step(model, opt, batches[i % len(batches)], device, counter)
            except OOM:
                failed = True
                opt.zero_grad(set_to_none=True)
                free_memory(device)
            if stop_on_oom(agree, failed, stage, payload):
                break
            # the step is as slow as the slowest rank; memory is per GPU, its max over the ranks
            maxima = agree.max([row["step_s"], row["forward_s"], row["backward_s"], row["optimizer_s"],
                                row["peak_mem_bytes"], row["peak_reserved_bytes"], row["max_rss_bytes"]]
                               + ([row[f"{k}_bytes_counted"] for k in counter.counts] if counter else []))
            (loss,) = agree.mean([row["loss"]])
            rec = {"step": i, "warmup": i < args.warmup, "block": block, "switched": bool(opt.switched),
                   "step_s": maxima[0], "forward_s": maxima[1], "backward_s": maxima[2], "optimizer_s": maxima[3],
                   "tokens_per_s": world * args.batch * args.seq / maxima[0],
                   "peak_mem_bytes": None if math.isnan(maxima[4]) else int(maxima[4]),
                   "peak_reserved_bytes": None if math.isnan(maxima[5]) else int(maxima[5]),
                   "max_rss_bytes": int(maxima[6]), "loss": loss, **model_bytes}
            if counter:
                for j, k in enumerate(counter.counts):
                    # the maximum over the ranks: every rank issues the same collectives
                    rec[f"{k}_bytes_counted"] = int(maxima[7 + j])
                    rec[f"{k}_calls_counted"] = row[f"{k}_calls_counted"]
            payload["steps"].append(rec)
            if rank == 0:
                print(f"step {i:3d} block {block:3d}{' (warmup)' if rec['warmup'] else ''}: "
                      f"{rec['step_s'] * 1e3:9.1f} ms  {rec['tokens_per_s']:10.1f} tok/s  loss {loss:.4f}  "
                      + (f"peak {rec['peak_mem_bytes'] / GiB:.2f} GiB" if rec["peak_mem_bytes"] is not None else
                         f"rss {rec['max_rss_bytes'] / GiB:.2f} GiB"), flush=True)
                write_payload(out_path, payload)  # a run that dies later keeps this
        else:
            payload["status"] = "ok"
    finally:
        if counter is not None:
            counter.remove()
    payload["summary"] = summarise(payload, comm)
    return finish(args, payload, out_path, rank, world, cuda)


def attempt(build, cuda: bool):
    """``build()`` and whether it ran out of memory (synchronised, so that a late CUDA OOM shows here)."""
    try:
        value = build()
        if cuda:
            torch.cuda.synchronize()
        return value, False
    except OOM:
        return None, True


def make_optimizer(model, args):
    """The sharded (or data-parallel) BAdam optimizer, with the backward truncated below its active block."""
    base = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    cls = ShardedBlockOptimizer if args.parallel == "sharded" else DataParallelBlockOptimizer
    opt = cls(base, list(model.named_parameters()), switch_block_every=args.switch_every,
                                switch_mode=args.switch_mode, start_block=args.start_block, verbose=0,
                                seed=args.seed)
    truncate_backward(model, keep_activations=args.keep_activations)
    return opt


def stop_on_oom(agree: Agreement, failed: bool, stage: str, payload: dict) -> bool:
    """All ranks agree whether any ran out of memory; if so the payload says where and on which."""
    ranks = agree.oom_ranks(failed)
    if ranks:
        payload.update(status="OOM", oom_at=stage, oom_ranks=ranks)
        return True
    return False


def summarise(payload: dict, comm: CommModel) -> dict:
    rows = [r for r in payload["steps"] if not r["warmup"]] or payload["steps"]
    if not rows:
        return {}
    mean_s = sum(r["step_s"] for r in rows) / len(rows)
    by_block: Dict[int, List[dict]] = {}
    for r in rows:
        by_block.setdefault(r["block"], []).append(r)
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    base = comm.baselines()
    peaks = [r["peak_mem_bytes"] for r in rows if r["peak_mem_bytes"] is not None]
    return {
        "measured_steps": len(rows),
        "step_s_mean": mean_s, "step_s_median": median([r["step_s"] for r in rows]),
        "tokens_per_s": payload["tokens_per_step"] / mean_s,
        "tokens_per_s_per_rank": payload["tokens_per_step"] / mean_s / payload["world_size"],
        "tokens_per_s_by_block": {str(b): payload["tokens_per_step"] / (sum(r["step_s"] for r in rs) / len(rs))
                                  for b, rs in by_block.items()},
        "peak_mem_GiB": max(peaks) / GiB if peaks else None,
        "max_rss_GiB": max(r["max_rss_bytes"] for r in rows) / GiB,
        "loss_first": payload["steps"][0]["loss"], "loss_last": payload["steps"][-1]["loss"],
        "allgather_bytes_model_mean": mean("allgather_bytes_model"),
        "reducescatter_bytes_model_mean": mean("reducescatter_bytes_model"),
        "wire_bytes_model_mean": mean("wire_bytes_model"),
        "wire_vs_fsdp_full": (mean("wire_bytes_model") / base["fsdp_full_wire_bytes_model"]
                              if base["fsdp_full_wire_bytes_model"] else None),
        "wire_vs_ddp": (mean("wire_bytes_model") / base["ddp_wire_bytes_model"]
                        if base["ddp_wire_bytes_model"] else None),
    }


# ----------------------------------------------------------------------------------- output
def result_stem(args, world: int, cuda: bool) -> str:
    mode = "" if args.parallel == "sharded" else "_replicated"
    return f"bench_scale_{args.shape}{mode}_{world}{'gpu' if cuda else 'proc'}"


def output_path(args, world: int, cuda: bool) -> Path:
    """``--out``, else common.result_path's name for this shape and world."""
    return Path(args.out) if args.out is not None else result_path(result_stem(args, world, cuda), "json")


_DEVICE: Optional[dict] = None


def write_payload(path: Path, payload: dict) -> None:
    """common.write_json's record (device, date, command, payload) at ``path`` (``--out``, and the
    progress written after every step), replaced atomically."""
    global _DEVICE
    _DEVICE = _DEVICE or device_record()
    full = {"device": _DEVICE, "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "command": command_line(), **payload}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(full, indent=1, default=str))
    os.replace(tmp, path)


def finish(args, payload: dict, path: Path, rank: int, world: int, cuda: bool) -> dict:
    """Rank 0 writes the final JSON (common.write_json unless ``--out``) and the PNG beside it."""
    if rank != 0:
        return payload
    if args.out is not None:
        write_payload(path, payload)
    else:
        final = write_json(result_stem(args, world, cuda), payload)
        if final != path and path.exists():  # the date changed during the run: no stale progress file
            path.unlink()
        path = final
    try:
        plot(payload, path.with_suffix(".png"))
    except Exception as exc:  # a missing matplotlib must not lose the JSON
        print(f"no plot: {exc}", file=sys.stderr)
    print(f"status {payload['status']}; wrote {path}", flush=True)
    return payload


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["steps"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    title = (f"{payload['shape']} Llama, sharded BAdam on {payload['world_size']} ranks, "
             f"{payload['batch_per_rank']}x{payload['seq']} tokens per rank: {payload['status']}")
    if rows:
        xs = [r["step"] for r in rows]
        colors = ["0.7" if r["warmup"] else "C0" for r in rows]
        ax1.bar(xs, [r["tokens_per_s"] for r in rows], color=colors)
        ax1.set_xlabel("step (grey: warm-up)")
        ax1.set_ylabel("tokens/s (all ranks)")
        for r in rows:
            if r["switched"]:
                ax1.axvline(r["step"] + 0.5, color="k", lw=0.5, ls=":")
        gpu = rows[0]["peak_mem_bytes"] is not None
        key = "peak_mem_bytes" if gpu else "max_rss_bytes"
        ax2.plot(xs, [r[key] / GiB for r in rows], "o-", color="C1")
        ax2.set_xlabel("step")
        ax2.set_ylabel("peak memory per GPU (GiB)" if gpu else "peak RSS per process (GiB)")
        ax2.set_ylim(bottom=0)
        blocks = [r["block"] for r in rows]
        ax1.set_title(f"blocks {blocks[0]} .. {blocks[-1]}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------- main
def positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="70b")
    parser.add_argument("--parallel", choices=["sharded", "replicated"], default="sharded",
                        help="FSDP2 with ShardedBlockOptimizer, or the whole model on every rank with "
                             "DataParallelBlockOptimizer (one all-reduce of the active block's gradients)")
    parser.add_argument("--batch", type=positive, default=1, help="sequences per rank")
    parser.add_argument("--seq", type=positive, default=2048)
    parser.add_argument("--blocks", type=positive, default=10, help="blocks measured")
    parser.add_argument("--switch-every", type=positive, default=3, help="steps per block")
    parser.add_argument("--warmup", type=int, default=None,
                        help="steps before the measured blocks (default: switch-every - 1, the first block)")
    parser.add_argument("--switch-mode", choices=SWITCH_MODES, default="descending")
    parser.add_argument("--start-block", type=int, default=None, help="first block (default: the mode's)")
    parser.add_argument("--keep-activations", type=count_or_all, default=0,
                        help="truncate_backward's keep_activations: layers (or 'all') not checkpointed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="the JSON's path (PNG beside it)")
    parser.add_argument("--no-count-comm", dest="count_comm", action="store_false",
                        help="do not count the collectives' bytes as they are issued (the model only)")
    parser.add_argument("--fail-oom-at", type=int, default=None, metavar="STEP",
                        help="tests only: every rank raises OutOfMemoryError in this step's forward")
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = args.switch_every - 1
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world, device = init_distributed()
    try:
        if is_main_process():
            print(f"bench_scale: {args.shape} on {world} rank(s), {device.type}, batch {args.batch} x {args.seq} "
                  f"per rank, {args.blocks} blocks x {args.switch_every} steps after {args.warmup} warm-up",
                  flush=True)
        run(args, rank, world, device)
        dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
