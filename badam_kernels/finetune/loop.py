"""The training loop behind ``badam-finetune``, usable from Python: ``train(TrainConfig(...))``.

In three phases: :func:`build_run` (the configuration, the processes, the model, the optimizer, the
scheduler, the batches, where to start and where to stop), :func:`run_loop` (the steps, one line of
``metrics.jsonl`` each) and :func:`finish` (the checkpoint, the loss plot, the summary). The step is
the usual one::

    optimizer = BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=lr), list(model.named_parameters()),
                               **options.optimizer_kwargs())
    truncate_backward(model)
    for step in range(start, target):
        model(**batch(step)).loss.backward()
        optimizer.step(); scheduler.step(); optimizer.zero_grad(set_to_none=True)

``TrainConfig(resume=run_dir)`` continues a run exactly: the batch of a step depends only on the
seed and the step index, and every other state is restored from the checkpoint (``checkpoint.py``
describes the run folder), so N steps in one go and N/2 + N/2 resumed give the same weights bit for
bit on the CPU. Under ``torchrun`` every rank runs the loop on its rows of each batch (``launch.py``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from .. import __version__
from ..memory import format_bytes, memory_report
from .checkpoint import (check_out, checkpoint_dir, load_optimizer, load_weights, prepare_run_dir, resume_point,
                         rng_state, save_checkpoint, set_rng_state)
from .config import (DEFAULT_SOURCES, DTYPES, EMBEDDED_DATA_STEPS, ConfigError, TrainConfig, badam_options,
                     config_for_resume, one_line, resolve)
from .data import build_data
from .evaluate import Evaluation
from .launch import (PeakMemory, StopFlag, agree_over_ranks, check_backend, on_every_rank, optimizer_class, processes,
                     shard_model)
from .model import check_layer_stack, load_model, prepare_for_training, warn_past_positions
from .plots import plot_loss, read_metrics
from .profiling import StepProfiler
from .accumulation import forward_backward
from .config_file import apply_config_file
from .fast import loss_function
from .lr import build_scheduler, warmup_steps
from .plan import announce_plan, apply_plan, explicit_switches, plan_for_run, record_plan

__all__ = ["ConfigError", "Run", "TrainConfig", "build_run", "finish", "load_model", "run_loop", "train"]


@dataclass
class Run:
    """What the phases hand on: the resolved configuration, the processes, the model and its training."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module
    tokenizer: Any
    model_desc: str
    config_as_loaded: Dict[str, Any]  # the model config's settings before training changed them
    batches: Any
    optimizer: Any
    scheduler: Any
    truncation: Any
    start: int
    target: int
    run_dir: str
    trainer_state: Optional[dict]  # the checkpoint's, on resume
    log: Callable[[str], None]
    evaluation: Optional[Evaluation] = None  # the eval loss and samples (evaluate.py), if asked for
    plan: Any = None  # the speed plan (plan.py): loss, compiled layers, kept activations, expected peak
    loss_fn: Optional[Callable] = None  # loss(**batch.model_inputs(device)): fused or plain (fast.py)
    memory: PeakMemory = field(init=False)  # the steps' allocated peak, the evaluations' apart (launch.py)

    def __post_init__(self):
        self.memory = PeakMemory(self.device)

    @property
    def main(self) -> bool:  # rank 0 reports and writes
        return self.rank == 0

    @property
    def writes_checkpoint(self) -> bool:  # a sharded checkpoint takes every rank
        return self.main or self.cfg.shard


@dataclass
class Progress:
    """How far the loop got."""

    step: int
    elapsed: float = 0.0  # seconds in steps, over the whole run (resumed runs included)
    tokens_seen: int = 0  # over the whole run
    tokens_before: int = 0  # at the start of this process
    losses: List[float] = field(default_factory=list)  # this process' steps
    nonfinite: int = 0
    wall: float = 0.0  # seconds of this process' loop
    stopped_by: Optional[str] = None  # before the last step: "signal", "time limit" or "another rank"


def train(config: TrainConfig, given: Optional[set] = None, log=print) -> Dict[str, Any]:
    """Run (or resume) a job; returns a summary dict (also written to ``summary.json``).

    ``given``: the option names set explicitly (only matters with ``resume``); ``log``: where the
    text lines go (``print`` by default).
    """
    started = time.monotonic()  # --time-limit counts the loading too: it is what a batch job's limit counts
    run = build_run(config, given, log)
    deadline = None if run.cfg.time_limit is None else started + run.cfg.time_limit
    return finish(run, run_loop(run, deadline))


# ------------------------------------------------------------------------------------ build

def build_run(config: TrainConfig, given: Optional[set] = None, log=print) -> Run:
    """Everything the loop needs, in an order that fails early: the configuration, the processes and
    the run folder are checked before the model loads; a resumed run gets its weights, optimizer,
    scheduler and RNG states back."""
    config, given = apply_config_file(config, given)
    if config.resume is not None:
        config = config_for_resume(config, given)
    cfg = resolve(config)
    rank, world, device = processes(cfg)
    if rank == 0:
        check_out(cfg)
    else:  # the other ranks of a torchrun job compute, rank 0 reports and writes
        log = _silent
    cfg = dataclasses.replace(cfg, dtype=cfg.dtype or ("bf16" if device.type == "cuda" else "fp32"))
    check_backend(cfg.backend, device)
    explicit_switches(cfg.fast, device.type, cfg.grad_checkpointing, cfg.keep_activations)  # before the model loads
    model, tokenizer, model_desc = load_model(cfg, DTYPES[cfg.dtype])
    check_layer_stack(model, cfg)
    if rank == 0:
        warn_past_positions(model, cfg.seq_len)
    batches, eval_set = build_data(cfg, tokenizer)
    evaluation = Evaluation.build(cfg, eval_set, tokenizer, batches)
    packing_warning = batches.use_attention(model) if hasattr(batches, "use_attention") else None
    if packing_warning and rank == 0:
        print(f"badam-finetune: warning: {packing_warning}", file=sys.stderr)
    ckpt_dir = checkpoint_dir(cfg.resume, cfg.shard) if cfg.resume else None
    if ckpt_dir:
        load_weights(model, os.path.join(ckpt_dir, "model.safetensors"))
    new_target = EMBEDDED_DATA_STEPS if cfg.data is None else -(-batches.steps_per_epoch() // cfg.grad_accum)
    trainer_state, start, target = resume_point(cfg, ckpt_dir, new_target)

    plan = plan_for_run(cfg, model, device, world)
    given_cfg, cfg = cfg, apply_plan(cfg, plan)  # config.json keeps what was given, the plan beside it
    config_as_loaded = prepare_for_training(model, cfg, device)
    if cfg.shard:
        shard_model(model, device, world)
    optimizer, scheduler, truncation = build_optimizer(cfg, model, world, total=target)
    if ckpt_dir:
        load_optimizer(optimizer, ckpt_dir, cfg.shard)
        scheduler.load_state_dict(trainer_state["scheduler"])
        set_rng_state(trainer_state["rng"])
    run_dir = on_every_rank(prepare_run_dir(given_cfg, start, world) if rank == 0 else None, world)
    if rank == 0:
        record_plan(run_dir, plan)
    run = Run(cfg, rank, world, device, model, tokenizer, model_desc, config_as_loaded, batches, optimizer,
              scheduler, truncation, start, target, run_dir, trainer_state, log, evaluation)
    run.plan, run.loss_fn = plan, loss_function(model, plan.fused_ce)
    _announce(run, ckpt_dir)
    announce_plan(plan, device.type, log)
    return run


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module, world: int, total: Optional[int] = None):
    """(optimizer, LR scheduler, truncation handle): AdamW inside the job's BlockOptimizer class with
    the configuration's BAdam options, the truncated backward (after ``shard_model``: it wraps it),
    the compiled layers and the LR schedule (``lr.py``) over ``total`` optimizer steps."""
    base = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    block_optimizer, parallel = optimizer_class(cfg.shard, world)
    try:
        options = badam_options(cfg)
        optimizer = block_optimizer(base, list(model.named_parameters()), **options.optimizer_kwargs(), **parallel)
    except (ValueError, TypeError) as exc:
        raise ConfigError(one_line(exc)) from None
    truncation = options.prepare_model(model)  # after shard_model: it wraps it
    total = total or cfg.steps or 0
    scheduler = build_scheduler(optimizer, cfg.lr_schedule, warmup_steps(cfg.warmup_steps, cfg.warmup_ratio or 0.0,
                                                                        total), total)
    return optimizer, scheduler, truncation


def _announce(run: Run, ckpt_dir: Optional[str]) -> None:
    cfg, log = run.cfg, run.log
    n_params = sum(p.numel() for p in run.model.parameters())
    log(f"badam-finetune {__version__}: {run.model_desc}, {n_params / 1e6:.2f}M parameters, "
        f"{run.optimizer.num_blocks} blocks of {cfg.switch_block_every} steps ({cfg.switch_mode}), "
        f"{run.device.type} {cfg.dtype}" + (f", {run.world} processes" if run.world > 1 else "")
        + (", sharded (FSDP2)" if cfg.shard else ""))
    log(f"data: {cfg.data or DEFAULT_SOURCES['data']}: {run.batches.describe()}, "
        f"batch {cfg.batch_size} x {cfg.seq_len} tokens; steps {run.start} -> {run.target}; run folder {run.run_dir}")
    if run.evaluation is not None:
        log(run.evaluation.describe())
    if ckpt_dir and os.path.basename(ckpt_dir) == "checkpoint.old":
        log(f"resuming from {ckpt_dir}: the last checkpoint save was cut short")


# ------------------------------------------------------------------------------------ loop

def run_loop(run: Run, deadline: Optional[float] = None) -> Progress:
    """The steps from ``run.start`` to ``run.target``, each a line of ``metrics.jsonl`` written at once;
    Ctrl-C or SIGTERM (on any rank), or the clock passing ``deadline`` (a ``time.monotonic()``), stops every
    rank after the current step."""
    from tqdm.auto import tqdm

    cfg, target = run.cfg, run.target
    saved = run.trainer_state or {}
    progress = Progress(run.start, float(saved.get("elapsed_s", 0.0)), int(saved.get("tokens_seen", 0)),
                        int(saved.get("tokens_seen", 0)))
    bar = tqdm(total=target, initial=run.start, desc="badam", unit="step", dynamic_ncols=True,
               disable=not cfg.progress or not run.main, file=sys.stderr)
    say = (lambda line: bar.write(line, file=sys.stdout)) if cfg.progress and run.main else run.log  # the bar whole
    metrics_path = os.path.join(run.run_dir, "metrics.jsonl") if run.main else os.devnull
    began = time.perf_counter()
    # line-buffered: each step's line reaches the disk at once (a step may take seconds on a real model)
    profiler = (StepProfiler.from_config(cfg.profile_steps, run.run_dir, run.device, run.start, target, say)
                if run.main else None)
    with StopFlag(deadline) as stop, open(metrics_path, "a", encoding="utf-8", buffering=1) as metrics:
        stopping = False
        while progress.step < target and not stopping:
            if profiler is None:
                record, stopping = _step(run, progress, stop)
            else:
                record, stopping = profiler.around(progress.step + 1, lambda: _step(run, progress, stop))
            if run.evaluation is not None:
                with run.memory.evaluating():
                    record.update(run.evaluation.at_step(run, record["step"], target, say))
            metrics.write(json.dumps(record) + "\n")
            step, loss, block, peak = record["step"], record["loss"], record["active_block"], record["peak_mem_mib"]
            bar.set_postfix_str(f"loss {loss:.3f}{run.evaluation.postfix() if run.evaluation else ''}, "
                                f"{record['tokens_per_s']:,.0f} tok/s, "
                                f"block {block}/{run.optimizer.num_blocks}, peak {peak:,.0f} MiB", refresh=False)
            bar.update(1)
            if step % cfg.log_every == 0 or step == target:
                say(f"step {step}/{target}  loss {loss:.4f}  lr {record['lr']:.3g}  block {block}  "
                    f"{record['tokens_per_s']:,.0f} tok/s  peak {peak:,.0f} MiB")
            if run.writes_checkpoint and cfg.save_every and step % cfg.save_every == 0 and step < target:
                _save(run, progress)
        if progress.step < target:
            progress.stopped_by = stop.reason
    if profiler is not None:
        profiler.write()  # a run that stopped inside the range keeps the steps it profiled
    bar.close()
    progress.wall = time.perf_counter() - began
    return progress


def _step(run: Run, progress: Progress, stop: StopFlag):
    """One optimizer step on this rank's rows of the batch; (its metrics record, whether to stop now)."""
    t0 = time.perf_counter()
    block, lr = run.optimizer.active_block, run.optimizer.param_groups[0]["lr"]
    step_loss, num_tokens = forward_backward(run, progress.step)  # --grad-accum micro-batches (accumulation.py)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    loss, stopping = agree_over_ranks(step_loss, stop.requested, run.world)
    grad_norm = run.optimizer.last_grad_norm
    dt = time.perf_counter() - t0
    progress.step += 1
    progress.elapsed += dt
    progress.tokens_seen += num_tokens
    progress.losses.append(loss)
    progress.nonfinite += not math.isfinite(loss)
    record = {"step": progress.step, "loss": loss, "lr": lr, "tokens_per_s": num_tokens / dt,
              "active_block": block, "grad_norm": None if grad_norm is None else float(grad_norm),
              "peak_mem_mib": round(run.memory.steps_mib(), 1), "tokens": num_tokens,
              "elapsed_s": round(progress.elapsed, 4)}
    return record, stopping


def _save(run: Run, progress: Progress) -> str:
    step, cfg = progress.step, run.cfg
    examples = step * cfg.grad_accum * cfg.batch_size  # the data position counts micro-batches of examples
    trainer_state = {"step": step, "target_step": run.target, "data_position": examples,
                     "micro_batches": step * cfg.grad_accum,
                     "epoch": examples // run.batches.num_examples, "elapsed_s": progress.elapsed,
                     "tokens_seen": progress.tokens_seen, "rng": rng_state(run.device), "version": __version__}
    return save_checkpoint(run.run_dir, run.model, run.tokenizer, run.optimizer, run.scheduler, trainer_state,
                           cfg.shard, run.config_as_loaded)


# ------------------------------------------------------------------------------------ finish

def finish(run: Run, progress: Progress) -> Dict[str, Any]:
    """The last checkpoint, then on rank 0 the loss plot, ``summary.json`` and the closing lines;
    returns the summary (another rank's: its step and last loss)."""
    held = memory_report(run.optimizer, run.model)
    run.truncation.remove()
    ckpt = _save(run, progress) if run.writes_checkpoint else None
    losses, step, target = progress.losses, progress.step, run.target
    last_loss = losses[-1] if losses else None
    if not run.main:
        return {"rank": run.rank, "step": step, "interrupted": step < target, "last_loss": last_loss}
    cfg, run_dir, wall = run.cfg, run.run_dir, progress.wall
    plot = os.path.join(run_dir, "loss.png")
    plot_loss(read_metrics(os.path.join(run_dir, "metrics.jsonl")), plot,
              title=f"badam-finetune: {run.model_desc}, switch every {cfg.switch_block_every} steps")
    tail = losses[-10:]
    summary = {
        "run_dir": run_dir, "checkpoint": ckpt, "start_step": run.start, "step": step, "target_step": target,
        "interrupted": step < target, "stopped_by": progress.stopped_by,
        "first_loss": losses[0] if losses else None, "last_loss": last_loss,
        "mean_loss_last_10": sum(tail) / len(tail) if tail else None, "wall_s": round(wall, 2),
        "tokens_per_s": round((progress.tokens_seen - progress.tokens_before) / wall, 1) if wall else None,
        "peak_mem_mib": round(run.memory.overall_mib(), 1), "steps_peak_mem_mib": round(run.memory.steps_mib(), 1),
        "eval_peak_mem_mib": None if run.memory.eval_mib is None else round(run.memory.eval_mib, 1),
        **run.memory.held_mib(),
        "num_blocks": run.optimizer.num_blocks, "device": run.device.type, "dtype": cfg.dtype,
        "nonfinite_steps": progress.nonfinite, "memory_bytes": held,
        "shard": cfg.shard, "world_size": run.world, "grad_accum": cfg.grad_accum,
        "plan": run.plan.as_dict() if run.plan is not None else None, **(run.evaluation.summary() if run.evaluation else {}),
    }
    with open(os.path.join(run_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    why = "at the time limit" if progress.stopped_by == "time limit" else "interrupted"
    note = f" ({why}: continue with --resume {run_dir})" if summary["interrupted"] else ""
    if progress.nonfinite:
        note += f" ({progress.nonfinite} steps had a non-finite loss and were skipped; try a smaller --lr)"
    losses_text = f"loss {losses[0]:.4f} -> {last_loss:.4f}, " if losses else ""
    run.log(f"done{note}: step {step}, {losses_text}{wall:.1f} s; checkpoint {ckpt}; plot {plot}")
    run.log("memory held: " + ", ".join(f"{k.replace('_', '-')} {format_bytes(v)}" for k, v in held.items()))
    return summary


def _silent(*_args, **_kwargs) -> None:
    pass
