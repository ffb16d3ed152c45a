"""The optimizer step of one BAdam block: this package's fused step against torch, at the bandwidth ceiling.

One block is one Llama-3-8B decoder layer: 218,112,000 parameters (q and o 4096x4096, k and v
1024x4096, gate and up 14336x4096, down 4096x14336, two 4096 norms), bf16 params and grads, fp32
master, m and v, random data (never zeros). The step is memory bound, so every method is reported as
time and as effective bandwidth, i.e. the bytes the fused step must move for that configuration
divided by the time:

* ``copy``: a device-to-device copy (bytes read + written), the practical ceiling;
* ``<backend>``: this package's fused step (``triton``; ``cuda`` where the extension is built),
  28 B/param; ``+check`` adds the non-finite check (one more read of grad: 30 B/param);
  ``-sr``: no master, stochastic rounding (22 B/param); ``-sr-bf16``: bf16 m and v too (14 B/param);
* ``torch-fused+cast``: ``torch.optim.AdamW(fused=True)`` on the fp32 master with the cast-in and
  copy-out of badam 1.4 (``hp.grad = lp.grad.float()``, step, ``lp.copy_(hp.to(lp.dtype))``);
* ``torch-foreach+cast``: the same with badam 1.4's default, ``torch.optim.AdamW()`` (foreach);
* ``torch-fused-fp32``: ``torch.optim.AdamW(fused=True)`` on fp32 params and grads, no casts;
* ``floor``: the time of 28 B/param at the measured copy bandwidth.

Times are medians of ``triton.testing.do_bench`` (warm-up first, L2 flushed before every call); with
``--cuda-graph`` every step is captured once and the graph is replayed, which removes the launch
overhead that dominates small blocks. The sweep repeats the main methods for blocks of 1M to 1B
parameters (the layer's tensors scaled alike) for the plot: GB/s against block size, log x, the copy
bandwidth drawn as the ceiling. Output: a table, and JSON + PNG in ``benchmarks/results/`` named
with the device and the date.
"""
from __future__ import annotations

import argparse
import gc
import math
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT.parent))
from common import LLAMA_SHAPES, layer_shapes, result_path, write_json  # noqa: E402

HIDDEN = LLAMA_SHAPES["8b"]["hidden_size"]
# one Llama-3-8B decoder layer (common.layer_shapes); the two norms last (they do not decay)
LAYER_SHAPES = [(name.split(".")[-2], shape) for name, shape in layer_shapes("8b").items()]
LAYER_NUMEL = sum(math.prod(s) for _, s in LAYER_SHAPES)
assert LAYER_NUMEL == 218_112_000
NORM_NUMEL = 2 * HIDDEN
LR, BETAS, EPS, WEIGHT_DECAY = 1e-5, (0.9, 0.999), 1e-8, 0.01
SWEEP = [2**20, 2**22, 2**24, 2**26, LAYER_NUMEL, 2**30]
DEVICE = "cuda"
QUICK_SWEEP = [2**20, 2**24, LAYER_NUMEL]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quick", action="store_true", help="a short run: fewer sizes, shorter timing")
    p.add_argument("--sizes", type=float, nargs="*", default=None,
                   help="block sizes of the sweep in parameters (default 1M..1B; none: no sweep)")
    p.add_argument("--backends", nargs="*", default=None,
                   help="this package's backends to time (default: triton, and cuda where it loads)")
    p.add_argument("--cuda-graph", action="store_true", help="time replays of a captured CUDA graph")
    p.add_argument("--tune", action="store_true",
                   help="also time the Triton step for several BLOCK / num_warps at the layer size")
    p.add_argument("--warmup", type=int, default=None, help="do_bench warm-up in ms (default 25, quick 10)")
    p.add_argument("--rep", type=int, default=None, help="do_bench repetition time in ms (default 100, quick 40)")
    p.add_argument("--no-plot", action="store_true", help="write the JSON only")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------
# Buffers
# ----------------------------------------------------------------------------------------------------


def scaled_shapes(numel: int) -> List[Tuple[int, ...]]:
    """The layer's nine tensors scaled to about ``numel`` parameters in all (the layer itself at its size)."""
    if numel == LAYER_NUMEL:
        return [s for _, s in LAYER_SHAPES]
    f = math.sqrt(numel / LAYER_NUMEL)
    shapes = [tuple(max(1, round(d * f)) for d in s) if len(s) == 2 else (max(1, round(s[0] * f)),)
              for _, s in LAYER_SHAPES]
    return shapes


def random_(t: torch.Tensor, scale: float, positive: bool = False) -> torch.Tensor:
    """Fill with random values, never zero."""
    x = torch.randn(t.shape, device=t.device) * scale
    x = x.abs() + scale * 1e-3 if positive else torch.where(x == 0, torch.full_like(x, scale), x)
    return t.copy_(x)


class FusedBlock:
    """Flat buffers of one block, as ``badam_kernels`` keeps them, and its fused step."""

    def __init__(self, numel: int, backend: str, master: bool = True, state_dtype=torch.float32,
                 check_finite: bool = False, device=DEVICE):
        from badam_kernels import ops

        self.ops, self.backend, self.check_finite = ops, backend, check_finite
        self.param = random_(torch.empty(numel, dtype=torch.bfloat16, device=device), 0.02)
        self.grad = random_(torch.empty(numel, dtype=torch.bfloat16, device=device), 1e-3)
        self.master = self.param.float() if master else None
        self.exp_avg = random_(torch.empty(numel, dtype=state_dtype, device=device), 1e-4)
        self.exp_avg_sq = random_(torch.empty(numel, dtype=state_dtype, device=device), 1e-6, positive=True)
        self.step_t = torch.full((1,), 10.0, device=device)
        self.decay_numel = numel - min(NORM_NUMEL, numel // 2)
        self.seed = 0

    def step(self):
        self.seed += 1
        self.ops.adamw_step(self.param, self.grad, self.master, self.exp_avg, self.exp_avg_sq, self.step_t,
                            lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, decay_numel=self.decay_numel,
                            check_finite=self.check_finite, seed=self.seed, backend=self.backend)


class TorchBlock:
    """Per-tensor parameters as badam 1.4 holds them, stepped by a torch AdamW."""

    def __init__(self, numel: int, impl: str, capturable: bool, device=DEVICE):
        shapes = scaled_shapes(numel)
        self.cast = impl != "fused-fp32"
        dtype = torch.bfloat16 if self.cast else torch.float32
        self.lp = [random_(torch.empty(s, dtype=dtype, device=device), 0.02) for s in shapes]
        self.lp_grad = [random_(torch.empty(s, dtype=dtype, device=device), 1e-3) for s in shapes]
        if self.cast:  # badam 1.4: an fp32 copy per parameter, the base optimizer steps those
            self.hp = [torch.nn.Parameter(p.float()) for p in self.lp]
        else:
            self.hp = [torch.nn.Parameter(p) for p in self.lp]
            for hp, g in zip(self.hp, self.lp_grad):
                hp.grad = g
        groups = [{"params": self.hp[:-2], "weight_decay": WEIGHT_DECAY}, {"params": self.hp[-2:], "weight_decay": 0.0}]
        kwargs = dict(fused=True) if impl.startswith("fused") else {}
        self.opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, capturable=capturable, **kwargs)
        self.step()  # the states exist from the first step on; make them random, never zero
        for state in self.opt.state.values():
            random_(state["exp_avg"], 1e-4)
            random_(state["exp_avg_sq"], 1e-6, positive=True)

    def step(self):
        if not self.cast:
            self.opt.step()
            return
        for hp, g in zip(self.hp, self.lp_grad):  # badam 1.4 _grad_to_hp
            hp.grad = g.float()
        self.opt.step()
        for lp, hp in zip(self.lp, self.hp):  # badam 1.4 _update_param
            lp.data.copy_(hp.to(lp.dtype).data)
        for hp in self.hp:  # badam 1.4 _clean_hp_grad
            hp.grad = None


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------


def graphed(fn: Callable[[], None]) -> Callable[[], None]:
    """Capture ``fn`` once in a CUDA graph (after warm-up on a side stream); return its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


class Timer:
    def __init__(self, warmup: int, rep: int, cuda_graph: bool):
        self.warmup, self.rep, self.cuda_graph = warmup, rep, cuda_graph

    def ms(self, fn: Callable[[], None]) -> float:
        from triton.testing import do_bench

        if self.cuda_graph:
            fn = graphed(fn)
        return float(do_bench(fn, warmup=self.warmup, rep=self.rep, return_mode="median"))


def free():
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def copy_bandwidth(timer: Timer, nbytes: int) -> float:
    """GB/s of a device-to-device copy of ``nbytes`` (counted twice: read and written)."""
    src = torch.randn(nbytes // 4, device=DEVICE)
    dst = torch.empty_like(src)
    ms = timer.ms(lambda: dst.copy_(src))
    del src, dst
    free()
    return 2 * nbytes / (ms * 1e-3) / 1e9


# bytes per parameter each method must move (the fused step's traffic for that configuration)
FUSED_VARIANTS = {  # suffix: (master, state dtype, check_finite, bytes/param)
    "": (True, torch.float32, False, 28),
    "+check": (True, torch.float32, True, 30),
    "-sr": (False, torch.float32, False, 22),
    "-sr-bf16": (False, torch.bfloat16, False, 14),
}
TORCH_METHODS = {"torch-fused+cast": "fused", "torch-foreach+cast": "foreach", "torch-fused-fp32": "fused-fp32"}


def measure(method: str, numel: int, timer: Timer, backends: List[str]) -> Optional[Dict]:
    """One method at one block size: median ms and GB/s at its byte count (None where it does not fit)."""
    try:
        if method in TORCH_METHODS:
            block = TorchBlock(numel, TORCH_METHODS[method], capturable=timer.cuda_graph)
            nbytes = 28
        else:
            backend, suffix = next((b, method[len(b):]) for b in backends if method.startswith(b))
            master, state_dtype, check, nbytes = FUSED_VARIANTS[suffix]
            block = FusedBlock(numel, backend, master, state_dtype, check)
        ms = timer.ms(block.step)
    except torch.cuda.OutOfMemoryError:
        free()
        return None
    del block
    free()
    return {"ms": ms, "bytes_per_param": nbytes, "GBps": nbytes * numel / (ms * 1e-3) / 1e9}


def tune(timer: Timer) -> List[Dict]:
    """The Triton step at the layer size for several tilings (the module reads them at every launch)."""
    from badam_kernels.ops import triton_adamw

    saved = triton_adamw.BLOCK, triton_adamw.NUM_WARPS
    rows = []
    try:
        for block, warps in [(1024, 4), (1024, 8), (2048, 8), (2048, 16), (4096, 8), (4096, 16), (4096, 32), (8192, 16)]:
            triton_adamw.BLOCK, triton_adamw.NUM_WARPS = block, warps
            r = measure("triton", LAYER_NUMEL, timer, ["triton"])
            rows.append({"BLOCK": block, "num_warps": warps, **(r or {})})
            print(f"  tune BLOCK={block:5d} num_warps={warps:2d}: {r['ms']:.3f} ms {r['GBps']:.0f} GB/s")
    finally:
        triton_adamw.BLOCK, triton_adamw.NUM_WARPS = saved
    return rows


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


def print_table(rows: Dict[str, Dict], copy_gbps: float, reference: str):
    base = rows.get(reference)
    print(f"\nOne Llama-3-8B layer ({LAYER_NUMEL:,} params); copy bandwidth {copy_gbps:.0f} GB/s")
    print(f"{'method':24s} {'B/param':>7s} {'ms':>9s} {'GB/s':>7s} {'% copy':>7s} {'x ' + reference:>12s}")
    for name, r in rows.items():
        if r is None:
            print(f"{name:24s} {'':>7s} {'OOM':>9s}")
            continue
        ratio = f"{r['ms'] / base['ms']:.2f}" if base else "-"
        print(f"{name:24s} {r['bytes_per_param']:7d} {r['ms']:9.3f} {r['GBps']:7.0f} "
              f"{100 * r['GBps'] / copy_gbps:6.1f}% {ratio:>12s}")


def plot(sweep: Dict[str, Dict[int, Optional[Dict]]], copy_gbps: float, title: str, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    ax.axhline(copy_gbps, color="black", linestyle="--", linewidth=1, label=f"copy ({copy_gbps:.0f} GB/s)")
    for name, by_size in sweep.items():
        done = {n: r for n, r in by_size.items() if r is not None}
        if done:
            sizes = sorted(done)
            nbytes = done[sizes[0]]["bytes_per_param"]
            ax.plot(sizes, [done[n]["GBps"] for n in sizes], marker="o", label=f"{name} ({nbytes} B/param)")
    ax.axvline(LAYER_NUMEL, color="grey", linewidth=0.8, alpha=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("block size (parameters)")
    ax.set_ylabel("GB/s (bytes the fused step moves / time)")
    ax.set_ylim(0, copy_gbps * 1.1)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_step.py needs a CUDA device")
    from badam_kernels import ops

    backends = args.backends
    if backends is None:
        backends = [b for b in ("triton", "cuda") if ops.load_backend(b) is not None]
    for b in backends:
        if ops.load_backend(b) is None:
            sys.exit(f"backend {b!r} is not available: {ops.backend_report()[b]}")
    timer = Timer(args.warmup if args.warmup is not None else (10 if args.quick else 25),
                  args.rep if args.rep is not None else (40 if args.quick else 100), args.cuda_graph)
    torch.manual_seed(0)
    name = torch.cuda.get_device_name()
    print(f"{name}; torch {torch.__version__}, CUDA {torch.version.cuda}; backends {backends}; "
          f"{'CUDA graphs' if args.cuda_graph else 'eager'}")

    copy_gbps = copy_bandwidth(timer, (1 if args.quick else 4) * 2**30)
    fused = [b + s for b in backends for s in FUSED_VARIANTS]
    methods = fused + list(TORCH_METHODS)
    layer = {m: measure(m, LAYER_NUMEL, timer, backends) for m in methods}
    floor_ms = 28 * LAYER_NUMEL / (copy_gbps * 1e9) * 1e3
    layer["floor"] = {"ms": floor_ms, "bytes_per_param": 28, "GBps": copy_gbps}
    reference = backends[0] if backends else "torch-fused+cast"
    print_table(layer, copy_gbps, reference)
    ratios = {}
    for b in backends:
        if layer.get(b):
            for m in TORCH_METHODS:
                if layer.get(m):
                    ratios[f"{m} / {b}"] = layer[m]["ms"] / layer[b]["ms"]
            ratios[f"{b} / floor"] = layer[b]["ms"] / floor_ms
    for k, v in ratios.items():
        print(f"  {k}: {v:.2f}x")

    tuning = tune(timer) if args.tune and "triton" in backends else None

    sizes = [int(s) for s in (args.sizes if args.sizes is not None else (QUICK_SWEEP if args.quick else SWEEP))]
    sweep_methods = [b + s for b in backends for s in ("", "-sr-bf16")] + list(TORCH_METHODS)
    sweep: Dict[str, Dict[int, Optional[Dict]]] = {m: {} for m in sweep_methods}
    for n in sizes:
        for m in sweep_methods:
            sweep[m][n] = layer[m] if n == LAYER_NUMEL else measure(m, n, timer, backends)
        print(f"  sweep {n:>13,d}: " + ", ".join(f"{m} {r['GBps']:.0f}" if r else f"{m} OOM"
                                                 for m, r in ((m, sweep[m][n]) for m in sweep_methods)) + " GB/s")

    payload = {"layer_numel": LAYER_NUMEL, "timing": "cuda graph replay" if args.cuda_graph else "eager",
               "do_bench": {"warmup_ms": timer.warmup, "rep_ms": timer.rep, "return_mode": "median"},
               "hyper": {"lr": LR, "betas": BETAS, "eps": EPS, "weight_decay": WEIGHT_DECAY},
               "copy_GBps": copy_gbps, "floor_ms": floor_ms, "layer": layer, "ratios": ratios,
               "sweep": {m: {str(n): r for n, r in by.items()} for m, by in sweep.items()}, "tune": tuning}
    json_path = write_json("bench_step", payload)
    print(f"wrote {json_path}")
    if not args.no_plot and sizes:
        png = result_path("bench_step", "png")
        plot(sweep, copy_gbps, f"AdamW step of one BAdam block, {name}", png)
        print(f"wrote {png}")


if __name__ == "__main__":
    main()
