"""The training loop behind ``badam-finetune``, usable from Python: ``train(TrainConfig(...))``.

It uses the package only through its public API, so it doubles as the reference loop to copy::

    optimizer = BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=lr), list(model.named_parameters()),
                               switch_block_every=k, ...)
    truncate_backward(model)
    for step in range(steps):
        loss = model(**batch(step)).loss
        loss.backward()
        optimizer.step(); scheduler.step(); optimizer.zero_grad(set_to_none=True)

A run folder holds ``config.json`` (the resolved configuration), ``metrics.jsonl`` (one line per
step), ``loss.png``, ``summary.json`` and ``checkpoint/``: a Hugging Face model folder
(``config.json``, ``model.safetensors``, the tokenizer when there is one) plus ``optimizer.pt``
(``optimizer.state_dict()``) and ``trainer_state.pt`` (step, data position, RNG states, LR
scheduler). ``TrainConfig(resume=run_dir)`` continues such a run exactly: the batch of a step depends
only on the seed and the step index, and every other state is restored, so N steps in one go and
N/2 + N/2 resumed give the same weights bit for bit on the CPU.

Under ``torchrun`` each rank takes its rows of every global batch and rank 0 reports and writes. By
default every rank holds the whole model (data parallel); ``shard=True`` shards the model and the
optimizer states over the ranks with FSDP2 (``badam_kernels.sharded``). A sharded run's checkpoint
holds the same full ``model.safetensors`` (gathered to rank 0) and, instead of ``optimizer.pt``,
``optimizer_dcp/``: a ``torch.distributed.checkpoint`` of the optimizer that every rank writes its
shards into, so that it resumes on any number of processes.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from .. import __version__
from ..block_state import local_shard
from .data import ByteTokenizer, DataError, build_batches
from ..memory import format_bytes, memory_report
from ..layers import enable_gradient_checkpointing
from ..ops import BACKEND_NAMES
from ..optimizer import STATE_POLICIES
from ..truncate import KEEP_MODES
from .plots import plot_loss, read_metrics
from ..schedule import SWITCH_MODES

BACKENDS = ("auto",) + BACKEND_NAMES
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DEVICES = ("auto", "cpu", "cuda")
RUNS_DIR = "runs"  # where a run folder goes without --out
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "trainer_state.pt")
SHARDED_CHECKPOINT_FILES = ("model.safetensors", "optimizer_dcp/.metadata", "trainer_state.pt")

# Defaults that depend on the job: the embedded tiny model learns from scratch (large steps, embedding
# and lm_head trained too); a pretrained --model is fine-tuned (small steps, layers only, as in BAdam).
EMBEDDED_DEFAULTS = dict(batch_size=16, seq_len=128, lr=2e-3, switch_every=20, include_embedding=True,
                         include_lm_head=True, active_modules=[])
PRETRAINED_DEFAULTS = dict(batch_size=8, seq_len=512, lr=1e-5, switch_every=50, include_embedding=False,
                           include_lm_head=False, active_modules=[])
EMBEDDED_DATA_STEPS = 400  # steps on the shipped text; a --data file gets one pass by default
DEFAULT_SOURCES = dict(model="the embedded tiny Llama", data="the shipped Shakespeare excerpt")  # what None means

# Model config settings that only training wants: the KV cache serves generate(), not a training step.
# A checkpoint's config.json keeps the values the model came with, so the fine-tuned model generates at
# full speed when loaded with from_pretrained.
TRAINING_CONFIG = dict(use_cache=False)

# Options a resumed run may change; every other one is the saved run's.
RESUME_MAY_CHANGE = ("steps", "out", "resume", "log_every", "save_every", "backend", "progress", "device",
                     "keep_activations", "keep_mode", "compile")


class ConfigError(ValueError):
    """A configuration that cannot run; the message says which option and why."""


@dataclass
class TrainConfig:
    """Everything a run needs. ``None`` means: the default for this job (see the module constants)."""

    model: Optional[str] = None  # a local Hugging Face folder or a .gguf file; None: the embedded tiny Llama
    data: Optional[str] = None  # .jsonl instruction/response pairs or a text file; None: the shipped Shakespeare
    steps: Optional[int] = None  # steps to run now (on resume: more steps; None: to the saved target)
    batch_size: Optional[int] = None
    seq_len: Optional[int] = None
    lr: Optional[float] = None
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up of the learning rate, then constant
    max_grad_norm: float = 1.0  # 0: no clipping
    switch_every: Optional[int] = None  # steps per block
    switch_mode: str = "descending"
    start_block: Optional[int] = None
    include_embedding: Optional[bool] = None
    include_lm_head: Optional[bool] = None
    active_modules: Optional[List[str]] = None  # name prefixes trained with every block
    state_policy: str = "reset"
    backend: str = "auto"
    grad_checkpointing: bool = False
    keep_activations: Union[int, str] = 0  # top layers from the active block up not checkpointed; "all"
    keep_mode: str = "all"  # what those layers keep: "all" activations or "matmuls" (recompute elementwise ops)
    compile: bool = False  # torch.compile each layer of the stack (compile_layers)
    shard: bool = False  # FSDP2: model and optimizer states sharded over the processes (else data parallel)
    seed: int = 0
    dtype: Optional[str] = None  # bf16 on a GPU, fp32 on the CPU
    device: str = "auto"
    out: Optional[str] = None  # run folder; None: runs/<timestamp>/
    resume: Optional[str] = None  # a run folder to continue
    log_every: int = 50  # a log line every this many steps
    save_every: int = 0  # also checkpoint every this many steps (0: only at the end)
    progress: bool = True  # the tqdm bar


# ------------------------------------------------------------------------------------ configuration

def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: TrainConfig) -> None:
    """Reject values that cannot work, naming the option."""
    for name in ("steps", "batch_size", "seq_len", "switch_every", "log_every"):
        value = getattr(cfg, name)
        _require(value is None or (isinstance(value, int) and value > 0),
                 f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    _require(cfg.seq_len is None or cfg.seq_len >= 2, f"--seq-len must be at least 2, got {cfg.seq_len}: each "
             "token is trained to predict the next one, so a sequence of 1 token has no target")
    for name in ("warmup_steps", "save_every", "seed"):
        value = getattr(cfg, name)
        _require(isinstance(value, int) and value >= 0,
                 f"--{name.replace('_', '-')} must be a non-negative integer, got {value!r}")
    _require(cfg.start_block is None or (isinstance(cfg.start_block, int) and cfg.start_block >= 0),
             f"--start-block must be a non-negative integer, got {cfg.start_block!r}")
    _require(cfg.lr is None or (math.isfinite(cfg.lr) and cfg.lr > 0), f"--lr must be positive, got {cfg.lr!r}")
    _require(math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0,
             f"--weight-decay must be non-negative, got {cfg.weight_decay!r}")
    _require(math.isfinite(cfg.max_grad_norm) and cfg.max_grad_norm >= 0,
             f"--max-grad-norm must be non-negative (0: no clipping), got {cfg.max_grad_norm!r}")
    _require(cfg.switch_mode in SWITCH_MODES, f"--switch-mode must be one of {', '.join(SWITCH_MODES)}")
    _require(cfg.switch_mode != "fixed" or cfg.start_block is not None,
             "--switch-mode fixed needs --start-block (the block to train)")
    _require(cfg.state_policy in STATE_POLICIES, f"--state-policy must be one of {', '.join(STATE_POLICIES)}")
    _require(cfg.backend in BACKENDS, f"--backend must be one of {', '.join(BACKENDS)}")
    _require(cfg.dtype is None or cfg.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}")
    _require(cfg.device in DEVICES, f"--device must be one of {', '.join(DEVICES)}")
    keep = cfg.keep_activations
    _require(keep == "all" or (isinstance(keep, int) and not isinstance(keep, bool) and keep >= 0),
             f"--keep-activations must be a non-negative integer or 'all', got {keep!r}")
    _require(keep == 0 or cfg.grad_checkpointing, "--keep-activations only applies with --grad-checkpointing "
             "(without it every layer keeps its activations anyway)")
    _require(cfg.keep_mode in KEEP_MODES, f"--keep-mode must be one of {', '.join(KEEP_MODES)}, got {cfg.keep_mode!r}")
    _require(isinstance(cfg.shard, bool), f"--shard must be true or false, got {cfg.shard!r}")
    _require(isinstance(cfg.compile, bool), f"--compile must be true or false, got {cfg.compile!r}")
    if cfg.model is not None:
        _require(os.path.exists(cfg.model), f"model not found: {cfg.model} (give a local Hugging Face "
                 "model folder or a .gguf file; nothing is downloaded)")
        _require(os.path.isdir(cfg.model) or cfg.model.lower().endswith(".gguf"),
                 f"--model {cfg.model}: a model file must be a .gguf file (or give a model folder)")
        _require(not os.path.isdir(cfg.model) or os.path.isfile(os.path.join(cfg.model, "config.json")),
                 f"--model {cfg.model}: no config.json, not a Hugging Face model folder")
    if cfg.data is not None:
        _require(os.path.exists(cfg.data), f"data file not found: {cfg.data}")
        _require(os.path.isfile(cfg.data), f"--data {cfg.data}: not a file")


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill in the job-dependent defaults (not ``steps``: that needs the data) and absolutise paths."""
    validate(cfg)
    defaults = EMBEDDED_DEFAULTS if cfg.model is None else PRETRAINED_DEFAULTS
    changes = {k: v for k, v in defaults.items() if getattr(cfg, k) is None}
    for name in ("model", "data"):
        if getattr(cfg, name) is not None:
            changes[name] = os.path.abspath(getattr(cfg, name))
    return dataclasses.replace(cfg, **changes)


def _config_for_resume(cfg: TrainConfig, given: Optional[set]) -> TrainConfig:
    """The saved run's configuration, with the options that may change taken from ``cfg``.

    ``given`` names the options the user set explicitly (the CLI knows); from Python, any field that
    differs from the TrainConfig default counts as given.
    """
    run_dir = cfg.resume
    _require(os.path.isdir(run_dir), f"--resume {run_dir}: no such run folder")
    _require(os.path.isfile(os.path.join(run_dir, "config.json")), f"--resume {run_dir}: no config.json, not a run folder")
    try:
        with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
            saved = json.load(f)
        saved_cfg = TrainConfig(**{k: v for k, v in saved.items() if k in _field_names()})
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"--resume {run_dir}: unreadable config.json ({exc})") from None
    _checkpoint_dir(run_dir, saved_cfg.shard)  # there is one to resume from
    if given is None:
        default = TrainConfig()
        given = {f for f in _field_names() if getattr(cfg, f) != getattr(default, f)}
    for name in sorted(given - set(RESUME_MAY_CHANGE)):
        mine, theirs = getattr(cfg, name), getattr(saved_cfg, name)
        if name in ("model", "data") and mine is not None:
            mine = os.path.abspath(mine)
        _require(mine == theirs, f"--{name.replace('_', '-')} cannot change on --resume "
                 f"(the run used {_shown(name, theirs)}, got {_shown(name, mine)})")
    changes = {name: getattr(cfg, name) for name in RESUME_MAY_CHANGE if name in given}
    changes["resume"] = run_dir
    changes.setdefault("steps", None)  # not given: run up to the step the saved run was heading to
    changes.setdefault("out", None)  # not given: write into the resumed folder (wherever it is now)
    return dataclasses.replace(saved_cfg, **changes)


def _shown(name: str, value: Any) -> str:
    """An option's value in a message: what ``None`` stands for where it means the job's default."""
    if value is None and name in DEFAULT_SOURCES:
        return DEFAULT_SOURCES[name]
    return repr(value)


def _checkpoint_dir(run_dir: str, sharded: bool) -> str:
    """The run's complete checkpoint: ``checkpoint/``, or ``checkpoint.old/`` when a save was killed
    between its two renames (``save_checkpoint`` keeps one of them complete at every moment)."""
    files = SHARDED_CHECKPOINT_FILES if sharded else CHECKPOINT_FILES
    for folder in ("checkpoint", "checkpoint.old"):
        path = os.path.join(run_dir, folder)
        if all(os.path.isfile(os.path.join(path, f)) for f in files):
            return path
    lacking = next(f for f in files if not os.path.isfile(os.path.join(run_dir, "checkpoint", f)))
    raise ConfigError(f"--resume {run_dir}: no checkpoint/{lacking}, the run has no complete checkpoint")


def _field_names() -> List[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _require(name != "cuda" or torch.cuda.is_available(), "--device cuda: no CUDA device is available")
    return torch.device(name)


# ------------------------------------------------------------------------------------ model

def default_model_config():
    """The embedded model: a tiny Llama over bytes (vocabulary 256, 6 layers, 3.6M parameters)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=256, hidden_size=192, intermediate_size=768, num_hidden_layers=6,
                       num_attention_heads=4, num_key_value_heads=4, head_dim=48,
                       max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0,
                       tie_word_embeddings=False, bos_token_id=None, eos_token_id=0, pad_token_id=None,
                       attention_dropout=0.0)  # use_cache left on: the checkpoint is for generate()


def load_model(cfg: TrainConfig, dtype: torch.dtype):
    """(model, tokenizer, description) on the CPU.

    The embedded model is initialised from ``cfg.seed``. A model folder gets its own tokenizer when it
    has tokenizer files, else the byte tokenizer (ids are bytes; needs a vocabulary of at least 256);
    a GGUF file gets the tokenizer stored in it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    if cfg.model is None:
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(default_model_config()).to(dtype)
        return model, ByteTokenizer(), "embedded tiny Llama (bytes)"
    path = cfg.model
    folder, extra = (path, {}) if os.path.isdir(path) else (os.path.dirname(path) or ".",
                                                            {"gguf_file": os.path.basename(path)})
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True, **extra)
    except Exception as exc:  # transformers raises many kinds; all mean the same to the user
        raise ConfigError(f"could not load the model from {path}: {_one_line(exc)}") from None
    if extra or any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **extra)
        except Exception as exc:
            raise ConfigError(f"could not load the tokenizer from {path}: {_one_line(exc)}") from None
    else:
        tokenizer = ByteTokenizer()
    vocab = model.get_input_embeddings().num_embeddings
    _require(len(tokenizer) <= vocab, f"--model {path}: the tokenizer has {len(tokenizer)} tokens but the "
             f"model's embedding only {vocab}" + ("" if not isinstance(tokenizer, ByteTokenizer)
                                                   else " (no tokenizer files: bytes are used as tokens)"))
    return model, tokenizer, f"{type(model).__name__} from {path}"


def _warn_past_positions(model, seq_len: int) -> None:
    """A --seq-len beyond the positions the model was trained on runs (rotary positions extrapolate),
    but it is rarely what the user meant: say so, once, on stderr."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        print(f"badam-finetune: warning: --seq-len {seq_len} exceeds the model's max_position_embeddings "
              f"{limit}: positions past {limit} are untrained (learned position embeddings would fail)",
              file=sys.stderr)


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
        raise ConfigError(f"the checkpoint {path} does not fit this model: {_one_line(exc)}") from None
    if missing or unexpected:
        raise ConfigError(f"the checkpoint {path} is from another model: missing {_few(missing)}, "
                          f"unexpected {_few(unexpected)}")


def _few(names) -> str:
    names = sorted(names)
    return f"{len(names)} tensors" + (f" ({', '.join(names[:3])}{' ...' if len(names) > 3 else ''})" if names else "")


def _one_line(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ------------------------------------------------------------------------------------ run folder

def _check_out(cfg: TrainConfig) -> None:
    """Refuse, before any work (the model may take minutes to load), a run folder that cannot be
    written or that holds another run (nothing is overwritten)."""
    out = cfg.out
    if out is None:  # runs/<timestamp>/, or on resume the resumed folder
        _check_writable(cfg.resume or RUNS_DIR, f"--resume {cfg.resume}" if cfg.resume
                        else f"the default run folder {RUNS_DIR}/ (give --out)")
        return
    _require(out.strip() != "", "--out is empty: give the folder to write the run into")
    _check_writable(out, f"--out {out}")
    if not os.path.exists(out):
        return
    if cfg.resume is not None and os.path.abspath(out) == os.path.abspath(cfg.resume):
        return
    _require(not os.path.exists(os.path.join(out, "metrics.jsonl")),
             f"--out {out} already holds a run; continue it with --resume {out} or choose another --out")


def _check_writable(folder: str, option: str) -> None:
    """``folder`` is a folder we may write in, or can be made: its nearest existing ancestor is one."""
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    _require(os.path.isdir(path), f"{option}: {path} is not a folder")
    _require(os.access(path, os.W_OK | os.X_OK), f"{option}: {path} is not writable")


def _new_run_dir(out: Optional[str]) -> str:
    if out is None:
        base = os.path.join(RUNS_DIR, time.strftime("%Y%m%d-%H%M%S"))
        out, n = base, 1
        while os.path.exists(out):
            n += 1
            out = f"{base}-{n}"
    os.makedirs(out, exist_ok=True)
    return out


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory so far: allocated CUDA memory on a GPU, the process' peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def _rng_state(device: torch.device) -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _use_training_config(model) -> Dict[str, Any]:
    """Set ``TRAINING_CONFIG`` on the model's config; returns the values it had (for the checkpoint)."""
    config = getattr(model, "config", None)
    as_loaded = {k: getattr(config, k) for k in TRAINING_CONFIG if hasattr(config, k)}
    for name in as_loaded:
        setattr(config, name, TRAINING_CONFIG[name])
    return as_loaded


def _save_config(model, folder: str, as_loaded: Dict[str, Any]) -> None:
    """The model's config.json with the settings it came with (``_use_training_config``'s return)."""
    config = copy.deepcopy(model.config)  # the training run keeps its own settings
    for name, value in as_loaded.items():
        setattr(config, name, value)
    config.save_pretrained(folder)


def save_checkpoint(run_dir: str, model, tokenizer, optimizer, scheduler, trainer_state: dict,
                    sharded: bool = False, config_as_loaded: Optional[Dict[str, Any]] = None) -> str:
    """Write ``run_dir/checkpoint`` whole or not at all (written aside, then renamed into place).

    Called by rank 0 alone; ``sharded`` (a ``ShardedBlockOptimizer``): by every rank, which gather the
    full weights to rank 0 and each write their shards of the optimizer states to ``optimizer_dcp/``.
    ``config_as_loaded``: config settings to save instead of the training ones (``_use_training_config``).
    At every moment ``checkpoint/``, or else ``checkpoint.old/``, is complete (``_checkpoint_dir``).
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
        _save_config(model, tmp, config_as_loaded or {})
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


def _load_optimizer(optimizer, ckpt_dir: str, sharded: bool) -> None:
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
        raise ConfigError(f"--resume {os.path.dirname(ckpt_dir)}: {_one_line(exc)}") from None


class _StopFlag:
    """Ctrl-C asks the loop to stop after the current step and save (a second Ctrl-C interrupts at once)."""

    def __init__(self):
        self.set = False
        self._previous = None

    def __enter__(self):
        if hasattr(signal, "SIGINT") and _in_main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ------------------------------------------------------------------------------------ train

def train(config: TrainConfig, given: Optional[set] = None, log=print) -> Dict[str, Any]:
    """Run (or resume) a job; returns a summary dict (also written to ``summary.json``).

    ``given``: the option names set explicitly (only matters with ``resume``); ``log``: where the
    text lines go (``print`` by default).
    """
    from .. import compile_layers, find_layer_stack, truncate_backward

    if config.resume is not None:
        config = _config_for_resume(config, given)
    cfg = resolve(config)
    rank, world, device = _processes(cfg)
    main = rank == 0
    if not main:  # the other ranks of a torchrun job compute, rank 0 reports and writes
        log = _silent
    if main:
        _check_out(cfg)
    dtype_name = cfg.dtype or ("bf16" if device.type == "cuda" else "fp32")
    cfg = dataclasses.replace(cfg, dtype=dtype_name)
    dtype = DTYPES[dtype_name]
    backend = None if cfg.backend == "auto" else cfg.backend
    if backend is not None:
        from .. import ops

        try:
            ops.resolve_backend(backend, device)
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(f"--backend {backend}: {_one_line(exc)}") from None

    model, tokenizer, model_desc = load_model(cfg, dtype)
    try:
        stack = find_layer_stack(model)
    except ValueError as exc:
        raise ConfigError(f"--model {cfg.model or '(embedded)'}: {_one_line(exc)}") from None
    _require(len(stack) > 0, f"--model {cfg.model}: the layer stack is empty, there is nothing to train")
    if main:
        _warn_past_positions(model, cfg.seq_len)
    batches = build_batches(cfg.data, tokenizer, cfg.seq_len, cfg.batch_size, cfg.seed)

    ckpt_dir = _checkpoint_dir(cfg.resume, cfg.shard) if cfg.resume else None
    if ckpt_dir:
        load_weights(model, os.path.join(ckpt_dir, "model.safetensors"))
        trainer_state = torch.load(os.path.join(ckpt_dir, "trainer_state.pt"), weights_only=True)
        start = int(trainer_state["step"])
        _require(trainer_state["data_position"] == start * cfg.batch_size,
                 f"--resume {cfg.resume}: the checkpoint's data position does not match its step")
        if cfg.steps is not None:
            target = start + cfg.steps
        else:
            target = int(trainer_state["target_step"])
            _require(target > start, f"--resume {cfg.resume}: the run already reached step {start}; "
                     "give --steps to train more")
    else:
        trainer_state = None
        start = 0
        target = cfg.steps or (EMBEDDED_DATA_STEPS if cfg.data is None else batches.steps_per_epoch())

    model.to(device)
    model.train()
    config_as_loaded = _use_training_config(model)
    if cfg.grad_checkpointing:
        _require(getattr(model, "supports_gradient_checkpointing", False),
                 f"--grad-checkpointing: {type(model).__name__} does not support gradient checkpointing")
        enable_gradient_checkpointing(model, use_reentrant=False)
    if cfg.shard:
        _shard_model(model, device, world)

    base = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    optimizer_class, parallel = _optimizer_class(cfg.shard, world)
    try:
        optimizer = optimizer_class(
            base, list(model.named_parameters()), switch_block_every=cfg.switch_every,
            start_block=cfg.start_block, switch_mode=cfg.switch_mode,
            active_modules=cfg.active_modules, include_embedding=cfg.include_embedding,
            include_lm_head=cfg.include_lm_head, verbose=0,
            state_policy=cfg.state_policy, backend=backend,
            max_grad_norm=cfg.max_grad_norm or None, seed=cfg.seed, **parallel)
    except (ValueError, TypeError) as exc:
        raise ConfigError(_one_line(exc)) from None
    truncation = truncate_backward(model, keep_activations=cfg.keep_activations, keep_mode=cfg.keep_mode)  # after shard_model: wraps it
    if cfg.compile:
        compile_layers(model)  # each new role compiles once, in the first blocks
    warmup = cfg.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
    if ckpt_dir:
        _load_optimizer(optimizer, ckpt_dir, cfg.shard)
        scheduler.load_state_dict(trainer_state["scheduler"])
        _set_rng_state(trainer_state["rng"])

    run_dir = _on_every_rank(_prepare_run_dir(cfg, start) if main else None, world)
    if main:
        with open(os.path.join(run_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump({**dataclasses.asdict(dataclasses.replace(cfg, out=run_dir)), "world_size": world}, f, indent=2)

    n_params = sum(p.numel() for p in model.parameters())
    log(f"badam-finetune {__version__}: {model_desc}, {n_params / 1e6:.2f}M parameters, "
        f"{optimizer.num_blocks} blocks of {cfg.switch_every} steps ({cfg.switch_mode}), "
        f"{device.type} {dtype_name}" + (f", {world} processes" if world > 1 else "")
        + (", sharded (FSDP2)" if cfg.shard else ""))
    log(f"data: {cfg.data or 'the shipped Shakespeare excerpt'}: {batches.num_examples} examples, "
        f"batch {cfg.batch_size} x {cfg.seq_len} tokens; steps {start} -> {target}; run folder {run_dir}")
    if ckpt_dir and os.path.basename(ckpt_dir) == "checkpoint.old":
        log(f"resuming from {ckpt_dir}: the last checkpoint save was cut short")

    from tqdm.auto import tqdm

    metrics_path = os.path.join(run_dir, "metrics.jsonl") if main else os.devnull
    elapsed = float(trainer_state["elapsed_s"]) if trainer_state else 0.0
    tokens_seen = tokens_before = int(trainer_state["tokens_seen"]) if trainer_state else 0
    losses: List[float] = []
    first_loss = None
    nonfinite = 0
    step = start
    bar = tqdm(total=target, initial=start, desc="badam", unit="step", dynamic_ncols=True,
               disable=not cfg.progress or not main, file=sys.stderr)

    def say(message: str) -> None:  # a log line that does not tear the progress bar
        bar.write(message, file=sys.stdout) if cfg.progress else log(message)

    def state_now() -> dict:
        return {"step": step, "target_step": target, "data_position": step * cfg.batch_size,
                "epoch": step * cfg.batch_size // batches.num_examples, "elapsed_s": elapsed,
                "tokens_seen": tokens_seen, "rng": _rng_state(device), "version": __version__}

    def save() -> str:
        return save_checkpoint(run_dir, model, tokenizer, optimizer, scheduler, state_now(), cfg.shard,
                               config_as_loaded)

    writes = main or cfg.shard  # the ranks that take part in a checkpoint (sharded: all of them)
    run_start = time.perf_counter()
    # line-buffered: each step's line reaches the disk at once (a step may take seconds on a real model)
    with _StopFlag() as stop, open(metrics_path, "a", encoding="utf-8", buffering=1) as metrics:
        stopping = False
        while step < target and not stopping:
            t0 = time.perf_counter()
            batch = batches.batch(step)
            shard = _shard(batch, rank, world)
            block = optimizer.active_block
            lr = optimizer.param_groups[0]["lr"]
            out = model(input_ids=shard.input_ids.to(device), labels=shard.labels.to(device),
                        attention_mask=None if shard.attention_mask is None else shard.attention_mask.to(device))
            out.loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss, stopping = _agree_over_ranks(out.loss.detach(), stop.set, world)
            del out  # the logits: not kept alive through the next forward
            grad_norm = None if optimizer.last_grad_norm is None else float(optimizer.last_grad_norm)
            dt = time.perf_counter() - t0
            step += 1
            elapsed += dt
            tokens_seen += batch.num_tokens
            peak = peak_memory_mib(device)
            record = {"step": step, "loss": loss, "lr": lr, "tokens_per_s": batch.num_tokens / dt,
                      "active_block": block, "grad_norm": grad_norm, "peak_mem_mib": round(peak, 1),
                      "tokens": batch.num_tokens, "elapsed_s": round(elapsed, 4)}
            metrics.write(json.dumps(record) + "\n")
            first_loss = loss if first_loss is None else first_loss
            losses.append(loss)
            nonfinite += not math.isfinite(loss)
            bar.set_postfix_str(f"loss {loss:.3f}, {record['tokens_per_s']:,.0f} tok/s, "
                                f"block {block}/{optimizer.num_blocks}, peak {peak:,.0f} MiB", refresh=False)
            bar.update(1)
            if step % cfg.log_every == 0 or step == target:
                say(f"step {step}/{target}  loss {loss:.4f}  lr {lr:.3g}  block {block}  "
                    f"{record['tokens_per_s']:,.0f} tok/s  peak {peak:,.0f} MiB")
            if writes and cfg.save_every and step % cfg.save_every == 0 and step < target:
                save()
    bar.close()
    wall = time.perf_counter() - run_start
    held = memory_report(optimizer, model)
    truncation.remove()
    ckpt = None
    if writes:
        ckpt = save()
    if not main:
        return {"rank": rank, "step": step, "interrupted": step < target, "last_loss": losses[-1] if losses else None}
    records = read_metrics(metrics_path)
    plot_loss(records, os.path.join(run_dir, "loss.png"),
              title=f"badam-finetune: {model_desc}, switch every {cfg.switch_every} steps")
    tail = losses[-10:]
    summary = {
        "run_dir": run_dir, "checkpoint": ckpt, "start_step": start, "step": step, "target_step": target,
        "interrupted": step < target, "first_loss": first_loss, "last_loss": losses[-1] if losses else None,
        "mean_loss_last_10": sum(tail) / len(tail) if tail else None, "wall_s": round(wall, 2),
        "tokens_per_s": round((tokens_seen - tokens_before) / wall, 1) if wall else None,
        "peak_mem_mib": round(peak_memory_mib(device), 1), "num_blocks": optimizer.num_blocks,
        "device": device.type, "dtype": dtype_name, "nonfinite_steps": nonfinite, "memory_bytes": held,
        "shard": cfg.shard, "world_size": world,
    }
    with open(os.path.join(run_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    note = f" (interrupted: continue with --resume {run_dir})" if summary["interrupted"] else ""
    if nonfinite:
        note += f" ({nonfinite} steps had a non-finite loss and were skipped; try a smaller --lr)"
    losses_text = f"loss {first_loss:.4f} -> {losses[-1]:.4f}, " if losses else ""
    log(f"done{note}: step {step}, {losses_text}{wall:.1f} s; checkpoint {ckpt}; "
        f"plot {os.path.join(run_dir, 'loss.png')}")
    log("memory held: " + ", ".join(f"{k.replace('_', '-')} {format_bytes(v)}" for k, v in held.items()))
    return summary


def _silent(*_args, **_kwargs) -> None:
    pass


def _processes(cfg: TrainConfig):
    """(rank, world size, device): one process, or the ranks of a ``torchrun`` job; ``shard`` always
    joins a process group (of one process, without torchrun)."""
    device = pick_device(cfg.device)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and not cfg.shard:
        return 0, 1, device
    _require(torch.distributed.is_available(), "--shard and torchrun need torch.distributed, which this "
             "torch build lacks")
    from ..parallel.data_parallel import init_distributed

    rank, world, device = init_distributed("gloo" if device.type == "cpu" else None)
    _require(cfg.batch_size % world == 0,
             f"--batch-size {cfg.batch_size} must divide evenly over the {world} processes of the job")
    return rank, world, device


def _optimizer_class(shard: bool, world: int):
    """(class, extra arguments) of the job's optimizer: sharded (FSDP2), data parallel or one process."""
    if shard:
        from ..parallel.fsdp import ShardedBlockOptimizer

        return ShardedBlockOptimizer, {}
    if world == 1:
        from .. import BlockOptimizer

        return BlockOptimizer, {}
    from ..parallel.data_parallel import DataParallelBlockOptimizer

    return DataParallelBlockOptimizer, {"sync_module_states": True}


def _shard_model(model: torch.nn.Module, device: torch.device, world: int) -> None:
    """``shard_model`` over a mesh of every process of the job, on the job's device type.

    Every rank built the same weights (the same seed, or the same files), so each keeps its shard of
    its own copy; there is nothing to broadcast.
    """
    from torch.distributed.device_mesh import init_device_mesh

    from ..parallel.fsdp import shard_model

    shard_model(model, mesh=init_device_mesh(device.type, (world,)))


def _on_every_rank(value, world: int):
    """Rank 0's ``value`` (a picklable object) on every rank of the job."""
    if world == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _shard(batch, rank: int, world: int):
    """This rank's rows of the global batch (all of it in a single process)."""
    if world == 1:
        return batch
    rows = batch.input_ids.shape[0] // world
    take = slice(rank * rows, (rank + 1) * rows)
    mask = None if batch.attention_mask is None else batch.attention_mask[take]
    return dataclasses.replace(batch, input_ids=batch.input_ids[take], labels=batch.labels[take],
                               attention_mask=mask)


def _agree_over_ranks(loss: torch.Tensor, stop_requested: bool, world: int) -> Tuple[float, bool]:
    """The loss of the global batch (mean of the ranks' shard losses), for the log, and whether any
    rank was asked to stop: in one all-reduce, so that every rank stops after the same step (a rank
    stopping alone would leave the others waiting in a collective)."""
    if world == 1:
        return loss.item(), stop_requested
    import torch.distributed as dist

    both = torch.stack([loss.detach().float().reshape(()), torch.tensor(float(stop_requested), device=loss.device)])
    dist.all_reduce(both)
    return (both[0] / world).item(), bool(both[1] > 0)


def _prepare_run_dir(cfg: TrainConfig, start: int) -> str:
    """The folder to write: a new one, or on resume the old one (or --out, seeded with its history)."""
    if cfg.resume is None:
        return _new_run_dir(cfg.out)
    source = cfg.resume
    run_dir = source if cfg.out is None or os.path.abspath(cfg.out) == os.path.abspath(source) \
        else _new_run_dir(cfg.out)
    old = os.path.join(source, "metrics.jsonl")
    kept = [r for r in read_metrics(old) if r["step"] <= start] if os.path.isfile(old) else []
    with open(os.path.join(run_dir, "metrics.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)  # drops steps after the checkpoint, if any
    return run_dir
