"""Where a training step's GPU time goes: methods side by side, operator by operator.

Each method (as in ``bench_e2e.py``) trains the same model with one block fixed active; after
warm-up, ``torch.profiler`` records a few steps, and the device time each operator launches itself
(its kernels, not its children's) is summed per step; per phase (forward, backward, optimizer
step) the GPU span between CUDA events is set against the kernel time inside it, the rest being
time the GPU waited for the host. The table lists the operators whose time differs most between
the first method and the others: the place to look when one method is slower than another at the
same block.

    python benchmarks/profile_step.py --shape 1b --block 0 --methods ours badam_official

Without CUDA the times are CPU self times (a smoke test of the script, not a measurement).
"""
from __future__ import annotations

import argparse
import gc
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import METHODS, SHAPES, build_model, make_batches  # noqa: E402
from common import in_fresh_process, write_json  # noqa: E402

PHASES = ("forward", "backward", "step")


def one_step(model, method, ids, marks: List) -> None:
    """One training step, its phases named for the profiler and bounded by CUDA events in ``marks``."""
    def mark():
        if torch.cuda.is_available():
            marks.append(torch.cuda.Event(enable_timing=True))
            marks[-1].record()

    mark()
    with record_function("forward"):
        loss = method.loss(ids)
    mark()
    with record_function("backward"):
        method.run_backward(loss)
    mark()
    with record_function("step"):
        method.run_step()
    mark()


def phase_of(event) -> str:
    """The phase a CPU-side event ran in: its outermost caller's name; backward runs on autograd's
    own thread, outside the main thread's ``backward`` range, so anything else is backward."""
    while event.cpu_parent is not None:
        event = event.cpu_parent
    return event.name if event.name in PHASES else "backward"


def profile_method(shape: str, name: str, block: int, checkpointing: bool, batch: int, seq: int,
                   steps: int, warmup: int) -> dict:
    """For one method, per step in milliseconds: each operator's own kernels, and per phase the GPU
    span (between CUDA events) against the kernel time inside it; the difference is the GPU idle."""
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model = build_model(shape, checkpointing, device)
    batches = make_batches(shape, batch, seq, device)
    method = METHODS[name](model, 10_000, start_block=block)
    for i in range(warmup):
        one_step(model, method, batches[i % len(batches)], [])
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    marks: List = []
    with profile(activities=activities) as prof:
        for i in range(steps):
            one_step(model, method, batches[i % len(batches)], marks)
        if cuda:
            torch.cuda.synchronize()
    operators: Dict[str, float] = defaultdict(float)
    busy: Dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type != DeviceType.CPU:
            continue  # kernels are counted through the host operators that launched them
        if event.name not in PHASES:
            operators[event.name] += (event.self_device_time_total if cuda else event.self_cpu_time_total) / 1e3
        if event.kernels:
            busy[phase_of(event)] += sum(kernel.duration for kernel in event.kernels) / 1e3
    span: Dict[str, float] = defaultdict(float)
    for i in range(0, len(marks), 4):  # four marks a step bound its three phases
        for phase, start, end in zip(PHASES, marks[i:i + 3], marks[i + 1:i + 4]):
            span[phase] += start.elapsed_time(end)
    del model, method
    gc.collect()
    per_step = lambda table: {k: v / steps for k, v in table.items() if v > 0}  # noqa: E731
    return {"method": name, "gpu_span_ms": per_step(span), "kernel_ms": per_step(busy),
            "operators_ms": per_step(operators), "total_kernel_ms": sum(busy.values()) / steps}


def differences(results: List[dict], top: int) -> List[dict]:
    """Operators ranked by the largest gap between the first method and any other."""
    names = set().union(*(r["operators_ms"] for r in results))
    rows = []
    for op in names:
        times = [r["operators_ms"].get(op, 0.0) for r in results]
        rows.append({"operator": op, "ms_per_step": dict(zip((r["method"] for r in results), times)),
                     "gap_ms": max((abs(t - times[0]) for t in times[1:]), default=times[0])})
    return sorted(rows, key=lambda r: -r["gap_ms"])[:top]


def print_report(results: List[dict], rows: List[dict]) -> None:
    methods = [r["method"] for r in results]
    head = f"{'operator (own kernels, ms per step)':<60}" + "".join(f"{m[:16]:>17}" for m in methods)
    print(head)
    for phase in PHASES:
        for label, key in (("GPU span", "gpu_span_ms"), ("kernels", "kernel_ms")):
            print(f"{f'[{phase}: {label}]':<60}" + "".join(f"{r[key].get(phase, 0.0):>17.2f}" for r in results))
    print(f"{'[all kernels]':<60}" + "".join(f"{r['total_kernel_ms']:>17.2f}" for r in results))
    for row in rows:
        print(f"{row['operator'][:59]:<60}" + "".join(f"{row['ms_per_step'][m]:>17.2f}" for m in methods))


parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=["ours", "badam_official"])
parser.add_argument("--block", type=int, default=0, help="the block fixed active")
parser.add_argument("--no-checkpointing", action="store_true")
parser.add_argument("--batch", type=int, default=None)
parser.add_argument("--seq", type=int, default=None)
parser.add_argument("--steps", type=int, default=3, help="profiled steps")
parser.add_argument("--warmup", type=int, default=3)
parser.add_argument("--top", type=int, default=25, help="operators listed")


def main(argv=None) -> int:
    args = parser.parse_args(argv)
    batch, seq = args.batch or SHAPES[args.shape]["batch"], args.seq or SHAPES[args.shape]["seq"]
    results = [in_fresh_process(profile_method, args.shape, name, args.block, not args.no_checkpointing, batch, seq, args.steps,
                                args.warmup) for name in args.methods]
    rows = differences(results, args.top)
    print_report(results, rows)
    path = write_json(f"profile_{args.shape}_block{args.block}", {
        "experiment": "profile", "shape": args.shape, "block": args.block, "batch": batch, "seq": seq,
        "checkpointing": not args.no_checkpointing, "time": "device" if torch.cuda.is_available() else "cpu",
        "methods": results, "largest_gaps": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
