"""The main job's configuration: ``TrainConfig``, its checks, the job's defaults and the resumed run's config.

Every field is an option declared once (``badam_kernels.options.option``): its default, help text,
choices and check, the command-line flag, its section of ``--help`` and whether ``--resume`` may
change it. The BAdam fields are ``BAdamOptions``' own declarations, with the job's defaults where
they differ; the command line (``cli.py``) is generated from the fields, and :func:`badam_options`
turns a configuration into the optimizer's options.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

import torch

from ..options import (BAdamOptions, boolean, declared, flag_of, non_negative_float, non_negative_int, option,
                       positive_float, positive_int, with_default)
from ..options import validate as validate_options
from .lr import LR_SCHEDULES
from .plan import FAST_MODES
from .profiling import step_range

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # the model's; None: bf16 on a GPU, fp32 on the CPU
DEVICES = ("auto", "cpu", "cuda")
GROUPS = ("job", "training", "evaluation", "BAdam", "output")  # the sections of --help, in order

# Defaults that depend on the job: the embedded tiny model learns from scratch (large steps, embedding
# and lm_head trained too); a pretrained --model is fine-tuned (small steps, layers only, as in BAdam).
EMBEDDED_DEFAULTS = dict(batch_size=16, seq_len=128, lr=2e-3, switch_block_every=20, include_embedding=True,
                         include_lm_head=True, active_modules=[])
PRETRAINED_DEFAULTS = dict(batch_size=8, seq_len=512, lr=1e-5, switch_block_every=50, include_embedding=False,
                           include_lm_head=False, active_modules=[])
EMBEDDED_DATA_STEPS = 400  # steps on the shipped text; a --data file gets one pass by default
DEFAULT_SOURCES = dict(model="the embedded tiny Llama", data="the shipped Shakespeare excerpt")  # what None means
RENAMED = dict(switch_every="switch_block_every", compile="compile_layers")  # in run folders of version 0.1.0
PATH_OPTIONS = ("model", "data", "eval_data", "sample_prompts")  # made absolute; compared as such on --resume


class ConfigError(ValueError):
    """A configuration that cannot run; the message says which option and why."""


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def one_line(exc: BaseException, limit: int = 400) -> str:
    """An exception's message on one line, cut to ``limit`` characters (for a ConfigError)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def fraction(value) -> Optional[str]:
    """An option check: a number strictly between 0 and 1."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1
    return None if ok else "a number between 0 and 1 (exclusive)"


def _badam(name: str, group: str = "BAdam", **changes) -> Any:
    """``BAdamOptions``' declaration of ``name`` (``default=``: the job's default instead of its own)."""
    declaration = next(f for f in dataclasses.fields(BAdamOptions) if f.name == name)
    return with_default(BAdamOptions, name, changes.pop("default", declaration.default), group=group, **changes)


@dataclass
class TrainConfig:
    """Everything a run needs. ``None`` means: the default for this job (see ``EMBEDDED_DEFAULTS``)."""

    # job
    model: Optional[str] = option(None, "a local Hugging Face model folder or a .gguf file (nothing is "
                                  "downloaded); a folder without tokenizer files is read with the byte tokenizer. "
                                  "Default: the embedded tiny Llama", none=True, metavar="PATH", group="job")
    data: Optional[str] = option(None, "a .jsonl file, one example a line: chat (messages), sharegpt "
                                 "(conversations), alpaca (instruction/input/output), instruction/response, "
                                 "prompt/completion or text; conversations go through the tokenizer's chat template "
                                 "and the loss is on the assistant turns only. Or a text file. Default: the shipped "
                                 "Shakespeare excerpt", none=True, metavar="FILE", group="job")
    steps: Optional[int] = option(None, f"steps to run (on --resume: more steps). Default: {EMBEDDED_DATA_STEPS} on "
                                  "the shipped text, one pass over a --data file; on --resume: up to the step the "
                                  "run was heading to", check=positive_int, none=True, metavar="N", group="job",
                                  resume_may_change=True)
    out: Optional[str] = option(None, "run folder (default: runs/<timestamp>/)", none=True, metavar="DIR",
                                group="job", resume_may_change=True)
    resume: Optional[str] = option(None, "continue the run saved in RUN_DIR, exactly", none=True, metavar="RUN_DIR",
                                   group="job", resume_may_change=True)
    config: Optional[str] = option(None, "a YAML (or JSON) file of options: keys are option names (switch_every "
                                   "or --switch-every), the command line overrides it; a run folder's config.json "
                                   "is one", none=True, metavar="FILE", group="job", resume_may_change=True)
    # training
    batch_size: Optional[int] = option(None, "sequences per step", check=positive_int, none=True, metavar="N",
                                       group="training")
    seq_len: Optional[int] = option(None, "tokens per sequence", check=positive_int, none=True, metavar="N",
                                    group="training")
    lr: Optional[float] = option(None, "learning rate", check=positive_float, none=True, metavar="LR",
                                 group="training")
    weight_decay: float = option(0.0, "AdamW weight decay", check=non_negative_float, metavar="WD", group="training")
    warmup_steps: int = option(0, "linear LR warm-up steps, then --lr-schedule", check=non_negative_int, metavar="N",
                               group="training")
    warmup_ratio: Optional[float] = option(None, "the warm-up as a fraction of the run's steps (instead of "
                                           "--warmup-steps)", check=fraction, parse=float, none=True, metavar="R",
                                           group="training")
    lr_schedule: str = option("constant", "the LR after the warm-up: constant, or a linear or cosine decay to 0 at "
                              "the last step", choices=LR_SCHEDULES, group="training")
    grad_accum: int = option(1, "gradient accumulation: micro-batches of --batch-size per optimizer step (--steps, "
                             "--switch-every and the warm-up count optimizer steps)", check=positive_int, metavar="N",
                             group="training")
    max_grad_norm: float = _badam("max_grad_norm", group="training", default=1.0, none=False,
                                  check=non_negative_float, help="clip the active block's gradients to this "
                                  "global L2 norm (fused); 0: no clipping")
    seed: int = option(0, "seed of the model init, the data order and the random block order",
                       check=non_negative_int, metavar="N", group="training")
    dtype: Optional[str] = option(None, "model dtype (default: bf16 on a GPU, fp32 on the CPU)", choices=tuple(DTYPES),
                                  none=True, group="training")
    device: str = option("auto", "where to train; auto: the GPU if there is one", choices=DEVICES, group="training",
                         resume_may_change=True)
    packing: bool = option(False, "pack short examples into full --seq-len sequences, loss masks kept; the "
                           "examples of a sequence do not attend to each other where the model's attention "
                           "implementation allows (sdpa, eager, flex, flash; else a warning says so). No effect on "
                           "plain text, which is cut into full sequences anyway", check=boolean, group="training")
    shard: bool = option(False, "under torchrun: shard the model and the optimizer states over the processes with "
                         "FSDP2, each holding 1/N of every layer (default: data parallel, each a whole copy); "
                         "checkpoints then resume on any number of processes; cannot change on --resume",
                         check=boolean, group="training")
    # evaluation
    eval_data: Optional[str] = option(None, "held-out data in any --data format, evaluated every --eval-every steps "
                                      "and at the end (token-weighted mean loss of its trained tokens)", none=True,
                                      metavar="FILE", group="evaluation")
    eval_fraction: Optional[float] = option(None, "hold this fraction of the --data examples out of training as the "
                                            "eval set (drawn from --seed; of a text file, its last part)",
                                            check=fraction, parse=float, none=True, metavar="F", group="evaluation")
    eval_every: int = option(0, "evaluate every N steps, and at the end; 0: at the end only", check=non_negative_int,
                             metavar="N", group="evaluation", resume_may_change=True)
    eval_batch_size: Optional[int] = option(None, "sequences per evaluation forward (default: --batch-size); an "
                                            "evaluation keeps no activations for a backward, so more fit, and "
                                            "fewer forwards take less time", check=positive_int, none=True,
                                            metavar="N", group="evaluation", resume_may_change=True)
    sample_prompts: Optional[str] = option(None, "prompts (one a line, or JSONL) answered greedily at each evaluation, "
                                           "into samples/step_N.jsonl in the run folder", none=True, metavar="FILE",
                                           group="evaluation")
    sample_tokens: int = option(64, "new tokens per sample", check=positive_int, metavar="N", group="evaluation")
    # BAdam
    switch_block_every: Optional[int] = _badam("switch_block_every", default=None, none=True)
    switch_mode: str = _badam("switch_mode")
    start_block: Optional[int] = _badam("start_block")
    state_policy: str = _badam("state_policy")
    include_embedding: Optional[bool] = _badam("include_embedding", default=None, none=True)
    include_lm_head: Optional[bool] = _badam("include_lm_head", default=None, none=True)
    active_modules: Optional[List[str]] = _badam("active_modules")
    backend: str = _badam("backend", default="auto", none=False, resume_may_change=True)
    fast: str = option("auto", "the fast path: liger-kernel's fused cross-entropy, compiled layers, gradient "
                       "checkpointing with as many layers keeping their activations as fit --memory-budget (each "
                       "choice given explicitly wins); auto: on for a GPU; off: the plain path", choices=FAST_MODES,
                       group="BAdam", resume_may_change=True)
    memory_budget: Optional[float] = option(None, "GiB of GPU memory the fast path plans for (default: what the GPU "
                                            "has free, less 2 GiB and 5%)", check=positive_float, none=True,
                                            metavar="GiB", group="BAdam", resume_may_change=True)
    fused_ce: Optional[bool] = option(None, "liger-kernel's fused linear cross-entropy: the logits are never whole "
                                      "(default: with the fast path where installed)", check=boolean, none=True,
                                      group="BAdam", resume_may_change=True)
    grad_checkpointing: Optional[bool] = option(None, "recompute the layers' activations in backward (Hugging Face "
                                                "gradient checkpointing; default: with the fast path)", check=boolean,
                                                none=True, group="BAdam", resume_may_change=True)
    keep_activations: Optional[Union[int, str]] = _badam("keep_activations", default=None, none=True)
    keep_mode: str = _badam("keep_mode")
    compile_layers: Optional[bool] = _badam("compile_layers", default=None, none=True)
    # output
    log_every: int = option(50, "a log line every N steps", check=positive_int, metavar="N", group="output",
                            resume_may_change=True)
    save_every: int = option(0, "also checkpoint every N steps; 0: only at the end", check=non_negative_int,
                             metavar="N", group="output", resume_may_change=True)
    time_limit: Optional[float] = option(None, "stop after the step that passes this many seconds of this "
                                         "process (loading counted), save and exit 130 as Ctrl-C does: for a batch "
                                         "job's time limit; --resume goes on", check=non_negative_float, none=True,
                                         metavar="SECONDS", group="output", resume_may_change=True)
    progress: bool = option(True, "a progress bar on stderr, or none with --no-progress", check=boolean,
                            flag="--no-progress", group="output", resume_may_change=True)
    profile_steps: Optional[str] = option(None, "profile optimizer steps A to B (e.g. 40-45) with torch.profiler: the "
                                          "operators' table and a Chrome trace in profile/ of the run folder",
                                          check=step_range, parse=str, none=True, metavar="A-B", group="output",
                                          resume_may_change=True)


FIELDS = {f.name: f for f in declared(TrainConfig)}
RESUME_MAY_CHANGE = tuple(name for name, f in FIELDS.items() if f.metadata["resume_may_change"])


def badam_options(cfg: TrainConfig) -> BAdamOptions:
    """The optimizer's options of a resolved configuration: its BAdam fields (and ``seed``), silent."""
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(BAdamOptions) if f.name in FIELDS}
    shared.update(backend=None if cfg.backend == "auto" else cfg.backend, max_grad_norm=cfg.max_grad_norm or None,
                  verbose=0)
    return BAdamOptions(**shared)


# ------------------------------------------------------------------------------------ checks

def validate(cfg: TrainConfig) -> None:
    """Reject values that cannot work, naming the option: each field's own check, then the rules
    between fields and the paths."""
    validate_options(cfg, cli=True, error=ConfigError)
    require(cfg.seq_len is None or cfg.seq_len >= 2, f"--seq-len must be at least 2, got {cfg.seq_len}: each "
            "token is trained to predict the next one, so a sequence of 1 token has no target")
    require(cfg.switch_mode != "fixed" or cfg.start_block is not None,
            "--switch-mode fixed needs --start-block (the block to train)")
    require(cfg.keep_activations in (None, 0) or cfg.grad_checkpointing is not False, "--keep-activations only "
            "applies with --grad-checkpointing (without it every layer keeps its activations anyway)")
    require(not (cfg.warmup_steps and cfg.warmup_ratio), "give --warmup-steps or --warmup-ratio, not both")
    if cfg.model is not None:
        require(os.path.exists(cfg.model), f"model not found: {cfg.model} (give a local Hugging Face "
                "model folder or a .gguf file; nothing is downloaded)")
        require(os.path.isdir(cfg.model) or cfg.model.lower().endswith(".gguf"),
                f"--model {cfg.model}: a model file must be a .gguf file (or give a model folder)")
        require(not os.path.isdir(cfg.model) or os.path.isfile(os.path.join(cfg.model, "config.json")),
                f"--model {cfg.model}: no config.json, not a Hugging Face model folder")
    if cfg.data is not None:
        require(os.path.exists(cfg.data), f"data file not found: {cfg.data}")
        require(os.path.isfile(cfg.data), f"--data {cfg.data}: not a file")
    _validate_evaluation(cfg)


def _validate_evaluation(cfg: TrainConfig) -> None:
    require(cfg.eval_data is None or cfg.eval_fraction is None, "give --eval-data or --eval-fraction, not both")
    require(cfg.eval_every == 0 or cfg.eval_data or cfg.eval_fraction or cfg.sample_prompts,
            f"--eval-every {cfg.eval_every}: nothing to evaluate; give --eval-data, --eval-fraction or "
            "--sample-prompts")
    require(cfg.eval_batch_size is None or cfg.eval_data or cfg.eval_fraction,
            f"--eval-batch-size {cfg.eval_batch_size}: no eval set to batch; give --eval-data or --eval-fraction")
    for flag, path in (("--eval-data", cfg.eval_data), ("--sample-prompts", cfg.sample_prompts)):
        if path is not None:
            require(os.path.exists(path), f"{flag} {path}: file not found")
            require(os.path.isfile(path), f"{flag} {path}: not a file")


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill in the job-dependent defaults (not ``steps``: that needs the data) and absolutise paths."""
    validate(cfg)
    defaults = EMBEDDED_DEFAULTS if cfg.model is None else PRETRAINED_DEFAULTS
    changes = {k: v for k, v in defaults.items() if getattr(cfg, k) is None}
    for name in PATH_OPTIONS:
        if getattr(cfg, name) is not None:
            changes[name] = os.path.abspath(getattr(cfg, name))
    return dataclasses.replace(cfg, **changes)


# ------------------------------------------------------------------------------------ resume

def config_for_resume(cfg: TrainConfig, given: Optional[set]) -> TrainConfig:
    """The saved run's configuration, with the options that may change taken from ``cfg``.

    ``given`` names the options the user set explicitly (the CLI knows); from Python, any field that
    differs from the TrainConfig default counts as given.
    """
    from .checkpoint import checkpoint_dir

    run_dir = cfg.resume
    saved = saved_config(run_dir)
    checkpoint_dir(run_dir, saved.shard)  # there is one to resume from
    if given is None:
        default = TrainConfig()
        given = {name for name in FIELDS if getattr(cfg, name) != getattr(default, name)}
    for name in sorted(given - set(RESUME_MAY_CHANGE)):
        mine, theirs = getattr(cfg, name), getattr(saved, name)
        if name in PATH_OPTIONS and mine is not None:
            mine = os.path.abspath(mine)
        require(mine == theirs, f"{flag_of(FIELDS[name])} cannot change on --resume "
                f"(the run used {_shown(name, theirs)}, got {_shown(name, mine)})")
    changes = {name: getattr(cfg, name) for name in RESUME_MAY_CHANGE if name in given}
    changes["resume"] = run_dir
    changes.setdefault("steps", None)  # not given: run up to the step the saved run was heading to
    changes.setdefault("out", None)  # not given: write into the resumed folder (wherever it is now)
    changes.setdefault("time_limit", None)  # a limit is the process's (a batch job's), not the run's
    return dataclasses.replace(saved, **changes)


def saved_config(run_dir: str) -> TrainConfig:
    """The configuration a run folder's ``config.json`` holds (written by this or an older version)."""
    path = os.path.join(run_dir, "config.json")
    require(os.path.isdir(run_dir), f"--resume {run_dir}: no such run folder")
    require(os.path.isfile(path), f"--resume {run_dir}: no config.json, not a run folder")
    try:
        with open(path, encoding="utf-8") as f:
            saved: Dict[str, Any] = {RENAMED.get(k, k): v for k, v in json.load(f).items()}
        return TrainConfig(**{k: v for k, v in saved.items() if k in FIELDS})
    except (ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f"--resume {run_dir}: unreadable config.json ({exc})") from None


def _shown(name: str, value: Any) -> str:
    """An option's value in a message: what ``None`` stands for where it means the job's default."""
    if value is None and name in DEFAULT_SOURCES:
        return DEFAULT_SOURCES[name]
    return repr(value)
