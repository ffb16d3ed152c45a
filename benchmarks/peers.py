"""One registry of the methods the benchmarks compare: this package's BAdam and its peers.

Used by ``bench_e2e.py``, ``profile_step.py`` and the quality studies (``quality/*.py``), so that
every benchmark builds a method the same way::

    from peers import PEERS, build
    method = build("galore", model, lr=1e-4, rank=128)
    loss = method.loss(ids, labels=labels, attention_mask=mask)
    method.run_backward(loss)
    method.clip(1.0)           # does nothing for methods that clip inside their step (LOMO) or themselves
    method.run_step()

A builder takes the model and the learning rate plus its own options, and returns a :class:`Method`
(the optimizer, the module to call: for LoRA the peft wrapper, and how backward and step run:
LOMO and AdaLomo fuse the update into backward). ``unavailable(name)`` says why a peer cannot be
built here (its package is not installed) without raising, so a study can record it and go on.

Peers and their packages (PyPI): ``badam`` 1.4 (official BAdam), ``peft`` (LoRA),
``galore-torch`` 1.0 (GaLore), ``lomo-optim`` 0.1.1 (LOMO, AdaLomo), ``apollo-torch`` 1.0.3
(APOLLO, APOLLO-Mini), ``fira`` 1.0.2 (Fira). The last three import ``bitsandbytes`` for 8-bit
variants that are not used here; :func:`import_peer` stubs it, while they import, where it is not installed.
"""
from __future__ import annotations

import importlib
import sys
import types
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

LINEAR_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf_loss(model, ids, labels=None, attention_mask=None):
    """The Hugging Face causal-LM loss; ``labels`` default to the inputs (language modelling)."""
    return model(input_ids=ids, labels=ids if labels is None else labels, attention_mask=attention_mask).loss


@dataclass
class Method:
    """How one method trains: the module to call, a loss function, a backward, an optimizer step."""

    optimizer: object
    loss_fn: Callable = hf_loss  # loss_fn(model, ids, ...) -> loss; model: the one the caller passes
    backward: Optional[Callable] = None  # LOMO fuses the update into backward
    module: Optional[torch.nn.Module] = None  # what to call (the peft wrapper for LoRA); None: the model
    hooks: object = None  # truncate_backward's handle (BAdam), removed by close()
    clips_itself: bool = False  # the optimizer clips the gradient (BlockOptimizer's max_grad_norm, LOMO)
    info: Dict[str, object] = field(default_factory=dict)  # what the study should record
    # the optimizer's state where its state_dict() misses it (AdaLomo keeps it in attributes): (save, load)
    optimizer_state: Optional[tuple] = None
    resumable: bool = True  # False: its state cannot be put back (badam 1.4 rebuilds its optimizer on a switch)

    def loss(self, ids, **kwargs):
        return self.loss_fn(self.module, ids, **kwargs)

    def run_backward(self, loss):
        if self.backward is not None:
            self.backward(loss)
        else:
            loss.backward()

    def clip(self, max_norm: float) -> None:
        if max_norm and self.backward is None and not self.clips_itself:
            params = [p for p in self.module.parameters() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, max_norm)

    def run_step(self):
        if self.backward is None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        """What a paused run keeps: the module's weights and the optimizer's state."""
        save = self.optimizer_state[0] if self.optimizer_state else self.optimizer.state_dict
        return dict(module=self.module.state_dict(), optimizer=save())

    def load_state_dict(self, saved: dict) -> None:
        if not self.resumable:
            raise ValueError("this method's state cannot be put back")
        self.module.load_state_dict(saved["module"])
        load = self.optimizer_state[1] if self.optimizer_state else self.optimizer.load_state_dict
        load(saved["optimizer"])

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters() if p.requires_grad)

    def close(self) -> None:
        if self.hooks is not None:
            self.hooks.remove()
            self.hooks = None


_BNB_STUBS = ("bitsandbytes", "bitsandbytes.optim", "bitsandbytes.optim.optimizer", "bitsandbytes.functional")


def import_peer(module: str):
    """``module``, imported. galore_torch, apollo_torch and fira import bitsandbytes at package import for
    their 8-bit variants, which are not used here: where bitsandbytes does not import, stub modules stand in
    during that import only. A stub left in ``sys.modules`` (a module without a spec) makes a later
    ``importlib.util.find_spec('bitsandbytes')``, as peft's LoRA makes, raise ValueError."""
    if module not in ("galore_torch", "fira", "apollo_torch"):
        return importlib.import_module(module)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass
    else:  # (outside the try: an ImportError of the peer itself is its own, not a cue to stub)
        return importlib.import_module(module)
    before = {name: sys.modules.get(name) for name in _BNB_STUBS}
    sys.modules.update({name: types.ModuleType(name) for name in _BNB_STUBS})
    sys.modules["bitsandbytes.optim.optimizer"].Optimizer2State = object
    try:
        return importlib.import_module(module)
    finally:
        for name, was in before.items():
            if was is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = was


def matrices(model, where=("self_attn", "mlp")) -> List[torch.nn.Parameter]:
    """The 2-D weights of the attention and MLP projections (what low-rank methods project)."""
    return [p for n, p in model.named_parameters() if p.dim() == 2 and p.requires_grad and any(w in n for w in where)]


def _split(model, chosen):
    ids = {id(p) for p in chosen}
    return [p for p in model.parameters() if id(p) not in ids and p.requires_grad]


# ----------------------------------------------------------------------------------- the builders
def badam(model, lr, K=50, start_block=None, switch_mode=None, policy="reset", backend=None, fused_ce=False,
          keep_activations=0, keep_mode="all", ce_chunk_mem=1, compiled=False, block_prefix_list=None,
          include_embedding=False, include_lm_head=False, max_grad_norm=None, truncate=True, seed=None,
          weight_decay=0.0, **extra):
    """This package's BlockOptimizer over AdamW (``policy``: ``reset`` as BAdam, ``offload`` as HiFT),
    with truncated backward."""
    from badam_kernels import BlockOptimizer, compile_layers, truncate_backward

    base = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    mode = switch_mode or ("fixed" if start_block is not None else "descending")
    opt = BlockOptimizer(base, list(model.named_parameters()), switch_block_every=K, switch_mode=mode,
                         start_block=start_block, verbose=0, backend=backend, state_policy=policy,
                         block_prefix_list=block_prefix_list, include_embedding=include_embedding,
                         include_lm_head=include_lm_head, max_grad_norm=max_grad_norm, seed=seed, **extra)
    hooks = truncate_backward(model, keep_activations=keep_activations, keep_mode=keep_mode) if truncate else None
    if compiled:
        compile_layers(model)
    loss_fn = hf_loss
    if fused_ce:
        import functools

        loss_fn = functools.partial(fused_ce_loss, chunk_mem_const=ce_chunk_mem)
    return Method(opt, loss_fn, module=model, hooks=hooks, clips_itself=max_grad_norm is not None,
                  info=dict(blocks=opt.num_blocks, switch_every=K, policy=policy))


def badam_official(model, lr, K=50, start_block=None, switch_mode=None, block_prefix_list=None,
                   include_embedding=False, include_lm_head=False, weight_decay=0.0):
    """PyPI ``badam`` 1.4 over AdamW (the reference implementation)."""
    import badam as badam_package

    base = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    mode = switch_mode or ("fixed" if start_block is not None else "descending")
    opt = badam_package.BlockOptimizer(base, list(model.named_parameters()), switch_block_every=K,
                                       switch_mode=mode, start_block=start_block, verbose=0,
                                       block_prefix_list=block_prefix_list,
                                       include_embedding=include_embedding, include_lm_head=include_lm_head)
    return Method(opt, module=model, info=dict(blocks=len(opt.block_prefix_list), switch_every=K), resumable=False)


def adamw(model, lr, fused=None, weight_decay=0.0):
    """Full-parameter AdamW (fused kernel on a GPU unless told otherwise)."""
    if fused is None:
        fused = next(model.parameters()).is_cuda
    return Method(torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=fused), module=model)


def lora(model, lr, r=8, alpha=None, targets=None, modules_to_save=None, fused=None, weight_decay=0.0):
    """peft LoRA on the decoder's linear layers (all seven projections unless ``targets``); rank ``r``,
    alpha ``2r`` by default; ``modules_to_save`` (e.g. embedding and LM head from scratch) trained in full."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha or 2 * r, lora_dropout=0.0, target_modules=targets or LINEAR_TARGETS,
                        modules_to_save=modules_to_save)
    peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    if fused is None:
        fused = params[0].is_cuda
    return Method(torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused), module=peft_model,
                  info=dict(r=r))


def galore(model, lr, rank=128, update_proj_gap=200, scale=0.25, weight_decay=0.0):
    """``galore_torch.GaLoreAdamW`` on the attention and MLP matrices, AdamW on the rest."""
    GaLoreAdamW = import_peer("galore_torch").GaLoreAdamW

    low = matrices(model)
    groups = [{"params": _split(model, low)},
              {"params": low, "rank": rank, "update_proj_gap": update_proj_gap, "scale": scale, "proj_type": "std"}]
    return Method(GaLoreAdamW(groups, lr=lr, weight_decay=weight_decay, no_deprecation_warning=True), module=model,
                  info=dict(rank=rank, update_proj_gap=update_proj_gap, scale=scale))


def fira(model, lr, rank=128, update_proj_gap=200, alpha=0.25, weight_decay=0.0):
    """``fira.FiraAdamW``: GaLore's projection plus the scaled residual of the full-rank gradient."""
    FiraAdamW = import_peer("fira").FiraAdamW

    low = matrices(model)
    groups = [{"params": _split(model, low)},
              {"params": low, "rank": rank, "update_proj_gap": update_proj_gap, "alpha": alpha, "proj_type": "std"}]
    return Method(FiraAdamW(groups, lr=lr, weight_decay=weight_decay), module=model,
                  info=dict(rank=rank, update_proj_gap=update_proj_gap, alpha=alpha))


def apollo(model, lr, rank=256, update_proj_gap=200, scale=1.0, scale_type="channel", weight_decay=0.0):
    """``apollo_torch.APOLLOAdamW``: random projection, channel-wise scaling of the raw gradient
    (``rank=1, scale_type='tensor'`` is APOLLO-Mini)."""
    APOLLOAdamW = import_peer("apollo_torch").APOLLOAdamW

    low = matrices(model)
    groups = [{"params": _split(model, low)},
              {"params": low, "rank": rank, "proj": "random", "scale_type": scale_type, "scale": scale,
               "update_proj_gap": update_proj_gap, "proj_type": "std"}]
    return Method(APOLLOAdamW(groups, lr=lr, weight_decay=weight_decay), module=model,
                  info=dict(rank=rank, update_proj_gap=update_proj_gap, scale=scale, scale_type=scale_type))


def lomo(model, lr, clip_grad_norm=None):
    """``lomo_optim.Lomo``: SGD fused into backward (no optimizer state, no stored gradients)."""
    from lomo_optim import Lomo

    opt = Lomo(model, lr=lr, clip_grad_norm=clip_grad_norm)
    return Method(opt, backward=lambda loss: opt.fused_backward(loss, opt.lr), module=model)  # opt.lr: a schedule may set it


def adalomo(model, lr, clip_grad_norm=None):
    """``lomo_optim.AdaLomo``: LOMO with Adafactor-style factored second moments."""
    from lomo_optim import AdaLomo

    opt = AdaLomo(model, lr=lr, clip_grad_norm=clip_grad_norm)
    kept = ("step_num", "exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col")  # its factored second moments, by name

    def save():
        return {name: getattr(opt, name) for name in kept}

    def load(saved):
        for name in kept:
            setattr(opt, name, saved[name])

    return Method(opt, backward=lambda loss: opt.fused_backward(loss, opt.lr), module=model,  # opt.lr: a schedule may set it
                  optimizer_state=(save, load))


def fused_ce_loss(model, ids, labels=None, attention_mask=None, chunk_mem_const: int = 1):
    """Liger's fused linear cross-entropy: the 128256-wide logits are never materialised whole.

    ``chunk_mem_const`` bounds the logits of a chunk to that many times the hidden states (liger's
    default 1: on the 8B shape at 2x1024 tokens, 32 chunks of 128 tokens, small matrix products
    that cost about 13 ms of forward; 8 gives 4 chunks of 1024 for about 0.5 GiB more).
    """
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    hidden = model.model(input_ids=ids, attention_mask=attention_mask).last_hidden_state[:, :-1]
    targets = (ids if labels is None else labels)[:, 1:]
    loss, *_ = LigerFusedLinearCrossEntropyFunction.apply(  # (loss, z_loss, accuracy, predictions)
        hidden.reshape(-1, hidden.shape[-1]), model.lm_head.weight, targets.reshape(-1), None, None, -100, 0.0,
        0.0, "mean", None, False, None, False, False, False, None, None, chunk_mem_const)
    return loss


PEERS: Dict[str, Callable] = {
    "badam": badam,
    "badam_official": badam_official,
    "adamw": adamw,
    "lora": lora,
    "galore": galore,
    "fira": fira,
    "apollo": apollo,
    "lomo": lomo,
    "adalomo": adalomo,
}

# the PyPI distribution each peer needs (besides torch and transformers)
PACKAGES = {"badam": "badam-kernels", "badam_official": "badam", "lora": "peft", "galore": "galore-torch",
            "fira": "fira", "apollo": "apollo-torch", "lomo": "lomo-optim", "adalomo": "lomo-optim"}
_MODULES = {"badam_official": "badam", "lora": "peft", "galore": "galore_torch", "fira": "fira",
            "apollo": "apollo_torch", "lomo": "lomo_optim", "adalomo": "lomo_optim"}


def build(name: str, model, lr: float, **options) -> Method:
    """The method ``name`` over ``model`` at learning rate ``lr``; ``options`` are the builder's."""
    if name not in PEERS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(PEERS))}")
    return PEERS[name](model, lr, **options)


def unavailable(name: str) -> Optional[str]:
    """None if ``name`` can be built here, else why not (the package that does not import)."""
    module = _MODULES.get(name)
    if module is None:
        return None
    try:
        import_peer(module)
    except Exception as exc:  # ImportError, or a package that breaks at import
        return f"{PACKAGES[name]} does not import: {type(exc).__name__}: {exc}"
    return None


def versions() -> Dict[str, Optional[str]]:
    """Installed versions of the peers' packages (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in sorted(set(PACKAGES.values()) | {"torch", "transformers"}):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out
