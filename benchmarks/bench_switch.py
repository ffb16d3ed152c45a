"""The stall a block switch adds to the training loop: ``reset`` and ``offload`` against badam 1.4.

Each block is one Llama-3-8B decoder layer (218,112,000 parameters, bf16), and the model a stack of
``--blocks`` of them. A training step is emulated: ``--step-ms`` of matrix products on the compute
stream (the forward and backward of a real model keep the GPU busy the same way), random gradients
for the active block (never zeros), then ``optimizer.step()``. The stall of a switch is the wall
time of the switching step and the step after it minus two median plain steps; each step waits
for the compute stream only, as a loop's ``loss.item()`` does.

What moves at a switch: with ``reset``, the incoming block's fp32 master is built from its bf16
params and its moments are zeroed (12 B/param written, 2 read: about 0.7 ms at 4 TB/s); with
``offload``, the outgoing block's master, m and v (1.75 GB for one layer) go to pinned host memory
and the incoming block's come back, 32 ms each way at 55 GB/s: hidden when the copies run on a side
stream during the steps around the switch (the next block is prefetched during the last step).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import just_switched, layer_shapes, median, result_path, write_json  # noqa: E402

LAYER_SHAPES = layer_shapes("8b")  # one Llama-3-8B decoder layer (common.layer_shapes)


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        for name, shape in LAYER_SHAPES.items():
            module_name, param = name.rsplit(".", 1)
            target = self
            for part in module_name.split("."):
                if not hasattr(target, part):
                    target.add_module(part, nn.Module())
                target = getattr(target, part)
            target.register_parameter(param, nn.Parameter(torch.randn(shape, dtype=torch.bfloat16, device="cuda")))


def build(blocks: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Module()
    model.layers = nn.ModuleList(Layer() for _ in range(blocks))
    return model


class Compute:
    """``ms`` milliseconds of bf16 matrix products on the current stream."""

    def __init__(self, ms: float):
        self.a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
        self.b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(3):
            self.a @ self.b
        start.record()
        for _ in range(10):
            self.a @ self.b
        end.record()
        torch.cuda.synchronize()
        self.repeats = max(1, round(ms / (start.elapsed_time(end) / 10)))

    def __call__(self):
        for _ in range(self.repeats):
            self.a @ self.b


def make_optimizer(kind: str, model: nn.Module, every: int):
    base = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    named = list(model.named_parameters())
    if kind == "badam_official":
        import badam

        return badam.BlockOptimizer(base, named, switch_block_every=every, switch_mode="descending", verbose=0)
    from badam_kernels import BlockOptimizer

    policy = kind.split("_", 1)[1]
    return BlockOptimizer(base, named, switch_block_every=every, switch_mode="descending", verbose=0,
                          state_policy=policy)


def measure(kind: str, blocks: int, every: int, epochs: int, compute: Compute) -> dict:
    model = build(blocks)
    built = time.perf_counter()
    opt = make_optimizer(kind, model, every)
    construct_s = time.perf_counter() - built
    noise = {}
    walls, switched = [], []
    steps = epochs * blocks * every
    for step in range(steps):
        torch.cuda.current_stream().synchronize()
        t0 = time.perf_counter()
        compute()
        for p in model.parameters():
            if p.requires_grad:
                key = tuple(p.shape)
                if key not in noise:
                    noise[key] = torch.randn(p.shape, dtype=p.dtype, device="cuda") * 1e-3
                p.grad = noise[key].clone()
        opt.step()
        opt.zero_grad(set_to_none=True)
        # what a training loop's loss.item() waits for: the compute stream, not the side stream
        # whose copies to host go on during the next step
        torch.cuda.current_stream().synchronize()
        walls.append((time.perf_counter() - t0) * 1e3)
        switched.append(just_switched(opt))
    # the first epoch pays one-time costs (offload parks blocks for the first time); judge the rest
    # A switch may also slow the step after it (the parking copies run during it), so a stall is
    # the excess of the switching step and the next one over two plain steps.
    first = blocks * every
    at_switch = [i for i in range(first, steps - 1) if switched[i]]
    touched = set(at_switch) | {i + 1 for i in at_switch}
    plain = [walls[i] for i in range(first, steps) if i not in touched]
    base = median(plain)
    switches = [walls[i] for i in at_switch]
    stalls = [walls[i] + walls[i + 1] - 2 * base for i in at_switch]
    row = dict(method=kind, blocks=blocks, switch_every=every, steps=steps, construct_s=construct_s,
               plain_step_ms=base, switch_step_ms=median(switches), stall_ms_median=median(stalls),
               stall_ms_max=max(stalls) if stalls else None,
               peak_mem_GiB=torch.cuda.max_memory_allocated() / 2**30)
    del opt, model
    torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=3, help="layers in the model (each one block)")
    parser.add_argument("--switch-every", type=int, default=5, help="steps a block stays active")
    parser.add_argument("--step-ms", type=float, default=200.0, help="emulated forward+backward per step")
    parser.add_argument("--epochs", type=int, default=2, help="block epochs (the first is not judged)")
    parser.add_argument("--methods", nargs="+", default=["ours_reset", "ours_offload", "badam_official"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    compute = Compute(args.step_ms)
    rows = []
    print(f"{'method':>16} {'plain ms':>9} {'switch ms':>10} {'stall ms':>9} {'max stall':>10} {'build s':>8}")
    for kind in args.methods:
        torch.cuda.reset_peak_memory_stats()
        row = measure(kind, args.blocks, args.switch_every, args.epochs, compute)
        rows.append(row)
        print(f"{kind:>16} {row['plain_step_ms']:9.1f} {row['switch_step_ms']:10.1f} {row['stall_ms_median']:9.2f} "
              f"{row['stall_ms_max']:10.2f} {row['construct_s']:8.2f}")
    path = write_json("bench_switch", {"config": vars(args), "rows": rows})
    plot(rows, result_path("bench_switch", "png"))
    print(f"wrote {path}")
    return 0


def plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    stalls = [max(r["stall_ms_median"], 0.0) for r in rows]
    bars = ax.bar([r["method"] for r in rows], stalls)
    ax.bar_label(bars, labels=[f"{v:.2f} ms" for v in stalls])  # ours are too short to read off the axis
    ax.set_ylabel("stall a switch adds (ms)")
    ax.set_title(f"one Llama-3-8B layer per block, {rows[0]['switch_every']} steps per block")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
