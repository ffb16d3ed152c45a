"""``--config FILE``: any option of the job from a YAML file (JSON is YAML), the command line over it.

Keys are ``TrainConfig`` field names or the command line's flags, with or without the dashes and
with ``-`` or ``_`` (``switch_block_every``, ``switch-every``, ``--switch-every``; ``no-progress:
true`` is ``progress: false``); values as YAML writes them (``lr: 2.0e-5``, ``keep_activations:
all``, ``active_modules: [model.norm]``) or as the command line would (``lr: 1e-5``, which YAML
reads as text, or ``active_modules: "model.norm,lm_head"``). Each value gets the option's own check;
an unknown key or a bad value ends the job with one line naming the file and the key.

A run folder's ``config.json`` is a valid ``--config``: what the run recorded beside its options
(``world_size``, ``plan``, the ``config`` it was read from) is left aside, and so are its ``out`` and
``resume`` (a new run of the same recipe gets a folder of its own). Paths are taken from the current
folder, as on the command line.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Optional, Set, Tuple

from ..options import boolean, flag_of, problem
from .config import FIELDS, RENAMED, ConfigError, TrainConfig, one_line

RUN_RECORD_KEYS = ("world_size", "plan", "config")  # written into a run's config.json beside the options
RUN_FOLDER_KEYS = ("out", "resume")  # where that run was: not carried into a new one


def _normal(key: str) -> str:
    return key.strip().lstrip("-").replace("-", "_").lower()


def key_table() -> Dict[str, Tuple[str, bool]]:
    """Every spelling of every option: normalised key -> (field name, whether the value is negated)."""
    table: Dict[str, Tuple[str, bool]] = {}
    for name, field in FIELDS.items():
        flag = _normal(flag_of(field))
        is_bool = field.metadata["check"] is boolean
        negated_flag = is_bool and flag.startswith("no_") and field.default is True  # --no-progress
        table[name] = (name, False)
        table[flag] = (name, negated_flag)
        if is_bool and not negated_flag:
            table["no_" + name] = (name, True)
            table["no_" + flag] = (name, True)
    for old, new in RENAMED.items():
        table.setdefault(old, (new, False))
    return table


def _convert(field: dataclasses.Field, value: Any, where: str) -> Any:
    """Text as the command line would read it (``1e-5``, ``ALL``, ``a,b``); the option's check then."""
    from .cli import CONVERT, _argument_type

    if isinstance(value, str) and (field.metadata["parse"] or field.metadata["check"] in CONVERT):
        import argparse

        try:
            value = _argument_type(field)(value)
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    if isinstance(value, tuple):
        value = list(value)
    message = problem(field, value, cli=True)
    if message is not None:
        raise ConfigError(f"{where}: {message}")
    return value


def load_config_file(path: str) -> Dict[str, Any]:
    """The options a config file sets, by field name, checked; a ``ConfigError`` names what is wrong."""
    import yaml

    where = f"--config {path}"
    if not os.path.exists(path):
        raise ConfigError(f"{where}: file not found")
    if not os.path.isfile(path):
        raise ConfigError(f"{where}: not a file")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where}: not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        reason = getattr(exc, "problem", None) or one_line(exc)
        raise ConfigError(f"{where}: not valid YAML{at}: {reason}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of option names to values, got {type(data).__name__}")
    record = "world_size" in data  # a run folder's config.json
    table = key_table()
    values: Dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}: option names are text, got {key!r}")
        normal = _normal(key)
        if normal in RUN_RECORD_KEYS or (record and normal in RUN_FOLDER_KEYS):
            continue
        if normal not in table:
            raise ConfigError(f"{where}: unknown option {key!r} (see badam-finetune --help)")
        name, negated = table[normal]
        if name in values:
            raise ConfigError(f"{where}: {key!r} sets {flag_of(FIELDS[name])} a second time")
        field = FIELDS[name]
        if negated and isinstance(value, bool):
            value = not value
        values[name] = _convert(field, value, f"{where}: {key}")
    return values


def apply_config_file(cfg: TrainConfig, given: Optional[Set[str]]) -> Tuple[TrainConfig, Optional[Set[str]]]:
    """``cfg`` with the options of its ``--config`` file where not given otherwise, and the names given
    now (the file's count as given: ``--resume`` checks them like the command line's). ``given`` None
    (from Python): the fields that differ from their defaults are the given ones."""
    if cfg.config is None:
        return cfg, given
    values = load_config_file(cfg.config)
    if given is None:
        default = TrainConfig()
        given = {name for name in FIELDS if getattr(cfg, name) != getattr(default, name)}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in values.items() if k not in given})
    return cfg, set(given) | set(values)
