"""The job's model: the embedded tiny Llama or a local model folder / GGUF file, with its tokenizer, and
the config settings that only training wants."""
from __future__ import annotations

import copy
import os
import sys
from typing import Any, Dict

import torch

from ..layers import enable_gradient_checkpointing, find_layer_stack
from .config import ConfigError, TrainConfig, one_line, require
from .data import ByteTokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")

# Model config settings that only training wants: the KV cache serves generate(), not a training step.
# A checkpoint's config.json keeps the values the model came with, so the fine-tuned model generates at
# full speed when loaded with from_pretrained.
TRAINING_CONFIG = dict(use_cache=False)


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
        raise ConfigError(f"could not load the model from {path}: {one_line(exc)}") from None
    if extra or any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **extra)
        except Exception as exc:
            raise ConfigError(f"could not load the tokenizer from {path}: {one_line(exc)}") from None
    else:
        tokenizer = ByteTokenizer()
    vocab = model.get_input_embeddings().num_embeddings
    require(len(tokenizer) <= vocab, f"--model {path}: the tokenizer has {len(tokenizer)} tokens but the "
            f"model's embedding only {vocab}" + ("" if not isinstance(tokenizer, ByteTokenizer)
                                                  else " (no tokenizer files: bytes are used as tokens)"))
    return model, tokenizer, f"{type(model).__name__} from {path}"


def check_layer_stack(model, cfg: TrainConfig) -> None:
    """The model has a layer stack for BAdam to make blocks of."""
    try:
        stack = find_layer_stack(model)
    except ValueError as exc:
        raise ConfigError(f"--model {cfg.model or '(embedded)'}: {one_line(exc)}") from None
    require(len(stack) > 0, f"--model {cfg.model}: the layer stack is empty, there is nothing to train")


def prepare_for_training(model, cfg: TrainConfig, device: torch.device) -> Dict[str, Any]:
    """The model on ``device`` in training mode, with ``TRAINING_CONFIG`` and (``--grad-checkpointing``)
    gradient checkpointing; returns the config values it came with (``use_training_config``)."""
    model.to(device)
    model.train()
    as_loaded = use_training_config(model)
    if cfg.grad_checkpointing:
        require(getattr(model, "supports_gradient_checkpointing", False),
                f"--grad-checkpointing: {type(model).__name__} does not support gradient checkpointing")
        enable_gradient_checkpointing(model, use_reentrant=False)
    return as_loaded


def warn_past_positions(model, seq_len: int) -> None:
    """A --seq-len beyond the positions the model was trained on runs (rotary positions extrapolate),
    but it is rarely what the user meant: say so, once, on stderr."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        print(f"badam-finetune: warning: --seq-len {seq_len} exceeds the model's max_position_embeddings "
              f"{limit}: positions past {limit} are untrained (learned position embeddings would fail)",
              file=sys.stderr)


def use_training_config(model) -> Dict[str, Any]:
    """Set ``TRAINING_CONFIG`` on the model's config; returns the values it had (for the checkpoint)."""
    config = getattr(model, "config", None)
    as_loaded = {k: getattr(config, k) for k in TRAINING_CONFIG if hasattr(config, k)}
    for name in as_loaded:
        setattr(config, name, TRAINING_CONFIG[name])
    return as_loaded


def save_model_config(model, folder: str, as_loaded: Dict[str, Any]) -> None:
    """The model's config.json with the settings it came with (``use_training_config``'s return)."""
    config = copy.deepcopy(model.config)  # the training run keeps its own settings
    for name, value in as_loaded.items():
        setattr(config, name, value)
    config.save_pretrained(folder)
