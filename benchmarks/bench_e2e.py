"""End to end: fine-tuning step time, tokens/s and peak memory, this package against its peers.

Llama-architecture models built with Hugging Face transformers in bf16 with random weights (no hub):

* ``1b``: hidden 2048, intermediate 8192, 16 layers, 32 heads, 8 KV heads, vocab 128256, tied
  embeddings, batch 4 x 1024;
* ``8b``: hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 KV heads, vocab 128256, batch 2 x 1024.

``--quick``: step time with block 0, the middle block and the top block active (fixed), official
badam 1.4 against this package, 1.2B shape, gradient checkpointing on.

Default (the full run): every method over one whole block epoch (every block active once for the
same number of steps, switches included): tokens/s, peak memory measured after the model is built,
forward / backward / optimizer-step / switch breakdown, and the loss after the epoch, on the same
data with the same seed. Methods that do not fit say OOM.

The data are a few fixed batches of random tokens, cycled, so the loss falls and can be compared
between methods; never zeros.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import gc
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402
from common import LLAMA_SHAPES, in_fresh_process, just_switched, median, result_path, write_json  # noqa: E402
from peers import Method, fused_ce_loss, hf_loss  # noqa: E402,F401  (profile_step and older callers import them here)

SHAPES = {
    "1b": dict(LLAMA_SHAPES["1b"], batch=4, seq=1024),
    "8b": dict(LLAMA_SHAPES["8b"], batch=2, seq=1024),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, batch=2, seq=64),
}
LR = 1e-5
STEADY_K = 50  # steps per block in typical BAdam runs (badam's default switch_block_every)


# ----------------------------------------------------------------------------------- model and data
def build_model(shape: str, checkpointing: bool, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = {k: v for k, v in SHAPES[shape].items() if k not in ("batch", "seq")}
    config = LlamaConfig(**spec, max_position_embeddings=4096, attn_implementation="sdpa")
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.train()
    model.config.use_cache = False
    if checkpointing:
        from badam_kernels.models import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)  # transformers' default variant, as a user's would be
    return model


def make_batches(shape: str, batch: int, seq: int, device: str, count: int = 8):
    gen = torch.Generator().manual_seed(1234)
    vocab = SHAPES[shape]["vocab_size"]
    return [torch.randint(0, vocab, (batch, seq), generator=gen).to(device) for _ in range(count)]


# ----------------------------------------------------------------------------------- the methods
# built by the shared registry (peers.py); here at this benchmark's learning rates
def method_ours(model, K, start_block=None, backend=None, policy="reset", fused_ce=False, keep_activations=0,
                keep_mode="all", ce_chunk_mem=1, compiled=False, **extra):
    return peers.badam(model, LR, K=K, start_block=start_block, backend=backend, policy=policy, fused_ce=fused_ce,
                       keep_activations=keep_activations, keep_mode=keep_mode, ce_chunk_mem=ce_chunk_mem,
                       compiled=compiled, **extra)


def method_badam_official(model, K, start_block=None):
    return peers.badam_official(model, LR, K=K, start_block=start_block)


def method_adamw(model, K):
    return peers.adamw(model, LR, fused=True)


def method_lora(model, K):
    return peers.lora(model, 1e-4, r=8, alpha=16, fused=True)


def method_galore(model, K):
    return peers.galore(model, LR, rank=128, update_proj_gap=200, scale=0.25)


def method_lomo(model, K):
    return peers.lomo(model, LR)


DEFAULT_METHODS = {
    "1b": ["ours", "ours_fast", "ours_fast_ce", "ours_fused_ce", "ours_lowmem", "ours_offload", "ours_cuda", "badam_official", "adamw_fused",
           "lora_r8", "galore", "lomo"],
    # GaLore's first step takes a full SVD of 224 large matrices (minutes); offload would pin 84 GB of host memory
    "8b": ["ours", "ours_fast", "ours_fast_ce", "ours_fused_ce", "ours_lowmem", "badam_official", "adamw_fused", "lora_r8", "lomo"],
    "tiny": ["ours", "ours_fast", "ours_offload", "badam_official", "adamw_fused", "lora_r8", "galore", "lomo"],
}

METHODS: Dict[str, Callable] = {
    "ours": method_ours,
    "ours_offload": lambda m, K, **kw: method_ours(m, K, policy="offload", **kw),
    "ours_fused_ce": lambda m, K, **kw: method_ours(m, K, fused_ce=True, **kw),
    # no recompute above the active block: frozen layers keep their activations
    "ours_fast": lambda m, K, **kw: method_ours(m, K, keep_activations="all", **kw),
    # the kept layers save only matrix-product and attention outputs, recompute the elementwise ops
    "ours_fast_sac": lambda m, K, **kw: method_ours(m, K, keep_activations="all", keep_mode="matmuls", **kw),
    "ours_fast_ce": lambda m, K, **kw: method_ours(m, K, fused_ce=True, keep_activations="all", **kw),
    # fewer, larger cross-entropy chunks: faster forward, a few hundred MB more
    "ours_fast_ce8": lambda m, K, **kw: method_ours(m, K, fused_ce=True, keep_activations="all", ce_chunk_mem=8,
                                                   **kw),
    # each layer compiled (torch.compile, inductor): fused elementwise work, fewer launches
    "ours_compiled": lambda m, K, **kw: method_ours(m, K, compiled=True, **kw),
    "ours_fast_compiled": lambda m, K, **kw: method_ours(m, K, keep_activations="all", compiled=True, **kw),
    "ours_fast_ce8_compiled": lambda m, K, **kw: method_ours(m, K, fused_ce=True, keep_activations="all",
                                                            ce_chunk_mem=8, compiled=True, **kw),
    "ours_lowmem": lambda m, K, **kw: method_ours(m, K, fused_ce=True, master_weights=False,
                                                 state_dtype=torch.bfloat16, **kw),
    "ours_reference": lambda m, K, **kw: method_ours(m, K, backend="reference", **kw),
    "ours_triton": lambda m, K, **kw: method_ours(m, K, backend="triton", **kw),
    "ours_cuda": lambda m, K, **kw: method_ours(m, K, backend="cuda", **kw),
    "badam_official": method_badam_official,
    "adamw_fused": method_adamw,
    "lora_r8": method_lora,
    "galore": method_galore,
    "lomo": method_lomo,
}


# ----------------------------------------------------------------------------------- measuring
def compiled_graphs() -> int:
    """How many graphs torch.compile has made in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def timed_steps(model, method: Method, batches, steps: int, warmup: int, device: str) -> dict:
    """Run warmup + steps; per step: forward, backward, optimizer (incl. switch) milliseconds.

    Steps that compiled a graph (compiled layers meeting a role for the first time: a one-off of a
    few seconds in a run of thousands of steps) are left out of the means and reported on their own,
    so that every method trains on the same schedule and its loss stays comparable."""
    rows = []
    loss = None
    phase_peaks = PhasePeaks(device)
    compiling = {"steps": 0, "s": 0.0}
    for i in range(warmup + steps):
        graphs_before = compiled_graphs()
        ids = batches[i % len(batches)]
        if device == "cuda":
            events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
            events[0].record()
        t0 = time.perf_counter()
        loss = method.loss(ids)
        if device == "cuda":
            events[1].record()
        phase_peaks.end("forward")
        method.run_backward(loss)
        if device == "cuda":
            events[2].record()
        phase_peaks.end("backward")
        method.run_step()
        phase_peaks.end("step")
        if device == "cuda":
            events[3].record()
            torch.cuda.synchronize()
            fwd, bwd, opt = (events[j].elapsed_time(events[j + 1]) for j in range(3))
        else:
            fwd = bwd = opt = float("nan")
        wall = (time.perf_counter() - t0) * 1e3
        if compiled_graphs() != graphs_before:
            compiling["steps"] += 1
            compiling["s"] += wall / 1e3
        elif i >= warmup:
            rows.append(dict(forward_ms=fwd, backward_ms=bwd, optimizer_ms=opt, step_ms=wall,
                             switched=just_switched(method.optimizer)))
    plain = [r for r in rows if not r["switched"]] or rows
    switches = [r for r in rows if r["switched"]]
    opt_plain = median([r["optimizer_ms"] for r in plain])
    plain_s = sum(r["step_ms"] for r in plain) / len(plain) / 1e3
    switch_extra_s = (sum(r["step_ms"] for r in switches) / len(switches) / 1e3 - plain_s) if switches else 0.0
    return {
        "steps": steps,
        "plain_step_s_mean": plain_s,
        "switch_extra_s": switch_extra_s,
        # what a run that switches every STEADY_K steps would see: the same steps, fewer switches
        f"step_s_at_K{STEADY_K}": plain_s + switch_extra_s / STEADY_K,
        "step_s_mean": sum(r["step_ms"] for r in rows) / len(rows) / 1e3,
        "step_s_median": median([r["step_ms"] for r in rows]) / 1e3,
        "forward_ms": median([r["forward_ms"] for r in plain]),
        "backward_ms": median([r["backward_ms"] for r in plain]),
        "optimizer_ms": opt_plain,
        "switch_ms": median([r["optimizer_ms"] - opt_plain for r in switches]) if switches else None,
        "loss_last": float(loss.detach().float()) if loss is not None else None,
        "compiling_steps": compiling["steps"],
        "compiling_s": compiling["s"],
        **phase_peaks.report(),
    }


class PhasePeaks:
    """Peak allocated memory within each phase of a step (forward, backward, step with its switch),
    over all steps: where a method's peak sits. The peak counter is reset at each phase's end."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.peaks: Dict[str, int] = {}

    def end(self, phase: str) -> None:
        if self.cuda:
            self.peaks[phase] = max(self.peaks.get(phase, 0), torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()

    def report(self) -> dict:
        return {f"peak_{phase}_GiB": peak / 2**30 for phase, peak in self.peaks.items()}


def measure(shape: str, name: str, checkpointing: bool, batch: int, seq: int, steps: int, warmup: int,
            K: int, device: str, memory_gib: Optional[float] = None, **method_kw) -> dict:
    """One method on a fresh model; OOM is a result, not a crash. ``memory_gib`` caps what this
    process may allocate (the capacity experiment's GPU size)."""
    row = dict(shape=shape, method=name, batch=batch, seq=seq, checkpointing=checkpointing, **method_kw)
    model = method = None
    if memory_gib is not None and device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, memory_gib * 2**30 / total))
    try:
        model = build_model(shape, checkpointing, device)
        batches = make_batches(shape, batch, seq, device)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
        method = METHODS[name](model, K, **method_kw)
        result = timed_steps(model, method, batches, steps, warmup, device)
        row.update(result, status="ok", tokens_per_s=batch * seq / result["step_s_mean"])
        row[f"tokens_per_s_at_K{STEADY_K}"] = batch * seq / result[f"step_s_at_K{STEADY_K}"]
        if device == "cuda":  # the phases' peaks cover the whole run (model building excluded)
            peak = max(result.get(f"peak_{p}_GiB", 0.0) for p in ("forward", "backward", "step"))
            row.update(peak_mem_GiB=max(peak, torch.cuda.max_memory_allocated() / 2**30), model_GiB=base_mem / 2**30)
    except torch.cuda.OutOfMemoryError:
        row.update(status="OOM")
    except ImportError as exc:
        row.update(status=f"unavailable: {exc}")
    finally:
        del model, method
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def measure_isolated(*args, **kwargs) -> dict:
    """``measure`` in a fresh process: no method's leftovers (or leaks) raise the next one's peak."""
    try:
        return in_fresh_process(measure, *args, **kwargs)
    except concurrent.futures.process.BrokenProcessPool:
        return dict(shape=args[0], method=args[1], batch=args[3], status="crashed",
                    start_block=kwargs.get("start_block"))


def print_table(rows: List[dict], keys: List[str]) -> None:
    widths = [max(len(k), 10) for k in keys]
    print("  ".join(k.rjust(w) for k, w in zip(keys, widths)))
    for r in rows:
        cells = []
        for k, w in zip(keys, widths):
            v = r.get(k)
            cells.append((f"{v:.4g}" if isinstance(v, float) else str(v)).rjust(w))
        print("  ".join(cells))


# ----------------------------------------------------------------------------------- experiments
def run_quick(args, device) -> dict:
    """Step time with block 0, middle and top fixed active: the official badam against this package."""
    layers = SHAPES[args.shape]["num_hidden_layers"]
    blocks = [0, layers // 2, layers - 1]
    batch, seq = args.batch or SHAPES[args.shape]["batch"], args.seq or SHAPES[args.shape]["seq"]
    rows = []
    for block in blocks:
        for name in ("badam_official", "ours"):
            row = measure_isolated(args.shape, name, True, batch, seq, args.steps, args.warmup, K=10_000,
                          device=device, start_block=block)
            rows.append(row)
            print_table([row], ["method", "start_block", "step_s_median", "forward_ms", "backward_ms",
                                "optimizer_ms", "peak_mem_GiB", "status"])
    speedups = {}
    for block in blocks:
        ours = next(r for r in rows if r["method"] == "ours" and r["start_block"] == block)
        theirs = next(r for r in rows if r["method"] == "badam_official" and r["start_block"] == block)
        if ours.get("status") == theirs.get("status") == "ok":
            speedups[str(block)] = theirs["step_s_median"] / ours["step_s_median"]
    print("speed-up over official badam by active block:", {k: round(v, 2) for k, v in speedups.items()})
    return {"experiment": "quick_blocks", "shape": args.shape, "rows": rows, "speedup_by_block": speedups}


def run_full(args, device) -> dict:
    layers = SHAPES[args.shape]["num_hidden_layers"]
    batch, seq = args.batch or SHAPES[args.shape]["batch"], args.seq or SHAPES[args.shape]["seq"]
    K = args.switch_every
    steps = layers * K  # one block epoch, every block K steps (after the first partial block, below)
    rows = []
    methods = args.methods or DEFAULT_METHODS[args.shape]
    for checkpointing in {"on": [True], "off": [False], "both": [True, False]}[args.checkpointing]:
        for name in methods:
            # offload is timed over its second epoch, when every block's states come back from the host
            warmup = K - 1 + (steps if "offload" in name else 0)
            row = measure_isolated(args.shape, name, checkpointing, batch, seq, steps, warmup=warmup, K=K, device=device)
            rows.append(row)
            print_table([row], ["method", "checkpointing", "tokens_per_s", f"tokens_per_s_at_K{STEADY_K}", "forward_ms",
                                "backward_ms", "optimizer_ms", "switch_ms", "peak_mem_GiB", "peak_forward_GiB",
                                "peak_backward_GiB", "peak_step_GiB", "loss_last", "compiling_s", "status"])
    return {"experiment": "block_epoch", "shape": args.shape, "switch_every": K, "rows": rows}


def run_capacity(args, device) -> dict:
    """The largest batch that fits in ``--memory-gib`` for this package and the official badam."""
    seq = args.seq or SHAPES[args.shape]["seq"]
    rows = []
    for name in args.methods or ["ours_fused_ce", "ours", "badam_official"]:
        for batch in args.capacity or [2, 4, 8, 16, 32, 64]:
            # block 0 active: the whole stack keeps its checkpointed inputs, the worst case for truncation
            row = measure_isolated(args.shape, name, True, batch, seq, steps=2, warmup=1, K=10_000, device=device,
                                   memory_gib=args.memory_gib, start_block=0)
            rows.append(row)
            print_table([row], ["method", "batch", "tokens_per_s", "peak_mem_GiB", "status"])
            if row["status"] != "ok":
                break
    largest = {}
    for r in rows:
        if r["status"] == "ok":
            largest[r["method"]] = max(largest.get(r["method"], 0), r["batch"])
    print(f"largest batch x {seq} tokens in {args.memory_gib:g} GiB:", largest)
    return {"experiment": "capacity", "shape": args.shape, "memory_gib": args.memory_gib, "rows": rows,
            "largest_batch": largest}


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in payload["rows"] if r.get("status") == "ok"]
    if payload["experiment"] == "quick_blocks":
        fig, ax = plt.subplots(figsize=(7, 4))
        blocks = sorted({r["start_block"] for r in rows})
        for offset, name in ((-0.2, "badam_official"), (0.2, "ours")):
            ys = [next((r["step_s_median"] for r in rows if r["method"] == name and r["start_block"] == b), 0)
                  for b in blocks]
            ax.bar([i + offset for i in range(len(blocks))], ys, width=0.4, label=name)
        ax.set_xticks(range(len(blocks)), [f"block {b} active" for b in blocks])
        ax.set_ylabel("step time (s), lower is better")
        ax.legend()
        ax.set_title(f"{payload['shape']} Llama, batch {rows[0]['batch']}x{rows[0]['seq']}, checkpointing on")
    elif payload["experiment"] == "capacity":
        fig, ax = plt.subplots(figsize=(7, 4))
        for name in sorted({r["method"] for r in rows}):
            mine = [r for r in rows if r["method"] == name]
            ax.plot([r["batch"] for r in mine], [r.get("peak_mem_GiB", 0.0) for r in mine], "o-", label=name)
        ax.axhline(payload["memory_gib"], color="k", ls="--", label=f"{payload['memory_gib']:g} GiB limit")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"batch (x {rows[0]['seq']} tokens)")
        ax.set_ylabel("peak memory (GiB)")
        ax.set_title(f"{payload['shape']} Llama, block {rows[0]['start_block']} active, checkpointing on")
        ax.legend()
    else:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        labels = [f"{r['method']}{'' if r['checkpointing'] else ' (no ckpt)'}" for r in rows]
        ax1.barh(labels, [r["tokens_per_s"] for r in rows])
        ax1.set_xlabel("tokens/s over a block epoch")
        ax2.barh(labels, [r.get("peak_mem_GiB", 0.0) for r in rows])
        ax2.set_xlabel("peak memory (GiB)")
        fig.suptitle(f"{payload['shape']} Llama")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="block 0 / middle / top step times, badam vs ours")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--methods", nargs="+", default=None, choices=sorted(METHODS),
                        help="default: every method that is practical at the shape (DEFAULT_METHODS)")
    parser.add_argument("--capacity", nargs="*", type=int, metavar="BATCH",
                        help="largest batch that fits: try these batch sizes for ours and badam")
    parser.add_argument("--memory-gib", type=float, default=80.0,
                        help="memory limit for --capacity (an 80 GB card on a larger one)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per quick measurement")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--switch-every", type=int, default=3, help="steps per block in the block epoch")
    parser.add_argument("--checkpointing", choices=["on", "off", "both"], default="on",
                        help="gradient checkpointing of every method (the epoch run); 'both' gives two tables")
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    parser.add_argument("--replot", type=Path, help="redraw the PNG of a result JSON and exit")
    args = parser.parse_args(argv)
    if args.replot:
        import json

        plot(json.loads(args.replot.read_text()), args.replot.with_suffix(".png"))
        return 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.capacity is not None:
        payload, kind = run_capacity(args, device), "capacity"
    elif args.quick:
        payload, kind = run_quick(args, device), "quick"
    else:
        payload, kind = run_full(args, device), "epoch"
    stem = f"e2e_{kind}_{args.shape}{args.tag}"
    json_path = write_json(stem, payload)
    plot(payload, result_path(stem, "png"))
    print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
