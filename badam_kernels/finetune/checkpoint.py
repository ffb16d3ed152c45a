"""The run folder and its checkpoints: checking and creating the folder, writing a checkpoint whole or
not at all, and reading one back to resume exactly.

A run folder holds ``config.json`` (the resolved configuration), ``metrics.jsonl`` (one line per
step), ``loss.png``, ``summary.json`` and ``checkpoint/``: a Hugging Face model folder
(``config.json``, ``model.safetensors``, the tokenizer when there is one) plus ``optimizer.pt``
(``optimizer.state_dict()``) and ``trainer_state.pt`` (step, data position, RNG states, LR
scheduler). A sharded run's checkpoint holds the same full ``model.safetensors`` (gathered to rank
0) and, instead of ``optimizer.pt``, ``optimizer_dcp/``: a ``torch.distributed.checkpoint`` of the
optimizer that every rank writes its shards into, so that it resumes on any number of processes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import time
from typing import Any, Dict, Optional, Tuple

import torch

from ..block_state import local_shard
from .config import ConfigError, TrainConfig, one_line, require
from .model import save_model_config
from .plots import read_metrics

RUNS_DIR = "runs"  # where a run folder goes without --out
CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "trainer_state.pt")
SHARDED_CHECKPOINT_FILES = ("model.safetensors", "optimizer_dcp/.metadata", "trainer_state.pt")


# ------------------------------------------------------------------------------------ run folder

def check_out(cfg: TrainConfig) -> None:
    """Refuse, before any work (the model may take minutes to load), a run folder that cannot be
    written or that holds another run (nothing is overwritten)."""
    out = cfg.out
    if out is None:  # runs/<timestamp>/, or on resume the resumed folder
        _check_writable(cfg.resume or RUNS_DIR, f"--resume {cfg.resume}" if cfg.resume
                        else f"the default run folder {RUNS_DIR}/ (give --out)")
        return
    require(out.strip() != "", "--out is empty: give the folder to write the run into")
    _check_writable(out, f"--out {out}")
    if not os.path.exists(out):
        return
    if cfg.resume is not None and os.path.abspath(out) == os.path.abspath(cfg.resume):
        return
    require(not os.path.exists(os.path.join(out, "metrics.jsonl")),
            f"--out {out} already holds a run; continue it with --resume {out} or choose another --out")


def _check_writable(folder: str, option: str) -> None:
    """``folder`` is a folder we may write in, or can be made: its nearest existing ancestor is one."""
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    require(os.path.isdir(path), f"{option}: {path} is not a folder")
    require(os.access(path, os.W_OK | os.X_OK), f"{option}: {path} is not writable")


def prepare_run_dir(cfg: TrainConfig, start: int, world: int) -> str:
    """The folder to write, with the run's ``config.json``: a new one, or on resume the old one (or
    --out, seeded with its history up to the checkpoint)."""
    if cfg.resume is None:
        run_dir = _new_run_dir(cfg.out)
    else:
        source = cfg.resume
        run_dir = source if cfg.out is None or os.path.abspath(cfg.out) == os.path.abspath(source) \
            else _new_run_dir(cfg.out)
        old = os.path.join(source, "metrics.jsonl")
        kept = [r for r in read_metrics(old) if r["step"] <= start] if os.path.isfile(old) else []
        with open(os.path.join(run_dir, "metrics.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)  # drops steps after the checkpoint, if any
    with open(os.path.join(run_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump({**dataclasses.asdict(dataclasses.replace(cfg, out=run_dir)), "world_size": world}, f, indent=2)
    return run_dir


def _new_run_dir(out: Optional[str]) -> str:
    if out is None:
        base = os.path.join(RUNS_DIR, time.strftime("%Y%m%d-%H%M%S"))
        out, n = base, 1
        while os.path.exists(out):
            n += 1
            out = f"{base}-{n}"
    os.makedirs(out, exist_ok=True)
    return out


# ------------------------------------------------------------------------------------ weights

def save_weights(model: torch.nn.Module, path: str, full: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """The model's weights as safetensors, one copy of each tied tensor (Hugging Face's file layout).

    ``safetensors.torch.save_model`` refuses tensors that are views into a larger buffer, which the
    active block's parameters are (the optimizer keeps them in one flat buffer), so the tensors are
    copied out and tied duplicates dropped here (the first name is kept, as ``save_pretrained`` does).
    ``full``: for a sharded model, its full CPU tensors by name (``_full_weights``), written instead of
    the shards; which names are tied duplicates is still read from the model's own tensors.
    """
    from safetensors.torch import save_file

    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = _storage_key(tensor)
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        tensors[name] = (tensor.detach().to("cpu", copy=True) if full is None else full[name]).contiguous()
    save_file(tensors, path, metadata={"format": "pt"})


def _storage_key(tensor: torch.Tensor) -> tuple:
    """Where a tensor's data lives, to tell tied tensors from equal ones (a DTensor's: its local shard's)."""
    return local_shard(tensor).data_ptr(), tuple(tensor.shape), tensor.dtype


def _full_weights(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """A sharded model's weights as full CPU tensors on rank 0 (an empty dict elsewhere); every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_weights(model: torch.nn.Module, path: str) -> None:
    """Load ``save_weights``' file into a model whose parameters are not yet in the optimizer's buffers."""
    from safetensors.torch import load_model as st_load_model

    try:
        missing, unexpected = st_load_model(model, path, strict=False)
    except RuntimeError as exc:
        raise ConfigError(f"the checkpoint {path} does not fit this model: {one_line(exc)}") from None
    if missing or unexpected:
        raise ConfigError(f"the checkpoint {path} is from another model: missing {_few(missing)}, "
                          f"unexpected {_few(unexpected)}")


def _few(names) -> str:
    names = sorted(names)
    return f"{len(names)} tensors" + (f" ({', '.join(names[:3])}{' ...' if len(names) > 3 else ''})" if names else "")


# ------------------------------------------------------------------------------------ checkpoints

def save_checkpoint(run_dir: str, model, tokenizer, optimizer, scheduler, trainer_state: dict,
                    sharded: bool = False, config_as_loaded: Optional[Dict[str, Any]] = None) -> str:
    """Write ``run_dir/checkpoint`` whole or not at all (written aside, then renamed into place).

    Called by rank 0 alone; ``sharded`` (a ``ShardedBlockOptimizer``): by every rank, which gather the
    full weights to rank 0 and each write their shards of the optimizer states to ``optimizer_dcp/``.
    ``config_as_loaded``: config settings to save instead of the training ones (``use_training_config``).
    At every moment ``checkpoint/``, or else ``checkpoint.old/``, is complete (``checkpoint_dir``).
    """
    final = os.path.join(run_dir, "checkpoint")
    tmp, old = final + ".tmp", final + ".old"
    main = not sharded or torch.distributed.get_rank() == 0
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    full = None
    if sharded:
        torch.distributed.barrier()  # the folder is fresh before any rank writes into it
        full = _full_weights(model)
        from ..parallel.fsdp import save_checkpoint as save_sharded

        save_sharded(os.path.join(tmp, "optimizer_dcp"), None, optimizer)  # returns once every rank wrote
    if not main:
        return final
    if hasattr(model, "config"):
        save_model_config(model, tmp, config_as_loaded or {})
    save_weights(model, os.path.join(tmp, "model.safetensors"), full)
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(tmp)
    if not sharded:
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
    torch.save({**trainer_state, "scheduler": scheduler.state_dict()}, os.path.join(tmp, "trainer_state.pt"))
    if os.path.exists(final):  # else old may be the only complete checkpoint (a save cut short): keep it
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_dir(run_dir: str, sharded: bool) -> str:
    """The run's complete checkpoint: ``checkpoint/``, or ``checkpoint.old/`` when a save was killed
    between its two renames (``save_checkpoint`` keeps one of them complete at every moment)."""
    files = SHARDED_CHECKPOINT_FILES if sharded else CHECKPOINT_FILES
    for folder in ("checkpoint", "checkpoint.old"):
        path = os.path.join(run_dir, folder)
        if all(os.path.isfile(os.path.join(path, f)) for f in files):
            return path
    lacking = next(f for f in files if not os.path.isfile(os.path.join(run_dir, "checkpoint", f)))
    raise ConfigError(f"--resume {run_dir}: no checkpoint/{lacking}, the run has no complete checkpoint")


def resume_point(cfg: TrainConfig, ckpt_dir: Optional[str], new_target: int) -> Tuple[Optional[dict], int, int]:
    """(the checkpoint's trainer state, the start step, the target step): (None, 0, ``--steps`` or
    ``new_target``) for a new run; a resumed run goes ``--steps`` further, or to its saved target."""
    if ckpt_dir is None:
        return None, 0, cfg.steps or new_target
    trainer_state = torch.load(os.path.join(ckpt_dir, "trainer_state.pt"), weights_only=True)
    start = int(trainer_state["step"])
    require(trainer_state["data_position"] == start * cfg.batch_size * cfg.grad_accum,
            f"--resume {cfg.resume}: the checkpoint's data position does not match its step")
    if cfg.steps is not None:
        return trainer_state, start, start + cfg.steps
    target = int(trainer_state["target_step"])
    require(target > start, f"--resume {cfg.resume}: the run already reached step {start}; give --steps to train more")
    return trainer_state, start, target


def load_optimizer(optimizer, ckpt_dir: str, sharded: bool) -> None:
    """Restore the optimizer from ``optimizer.pt``, or a sharded run's from ``optimizer_dcp/``."""
    errors: tuple = (ValueError,)
    try:
        if sharded:
            from torch.distributed.checkpoint import CheckpointException

            from ..parallel.fsdp import load_checkpoint as load_sharded

            errors += (CheckpointException,)
            load_sharded(os.path.join(ckpt_dir, "optimizer_dcp"), None, optimizer)
        else:
            optimizer.load_state_dict(torch.load(os.path.join(ckpt_dir, "optimizer.pt"), weights_only=True))
    except errors as exc:
        raise ConfigError(f"--resume {os.path.dirname(ckpt_dir)}: {one_line(exc)}") from None


def rng_state(device: torch.device) -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
