"""BAdam's ratio mode: step time and peak memory of ours against the official ratio mode and our layer mode.

    python benchmarks/bench_ratio.py                    # the 1.2B Llama shape on the GPU, bf16, batch 4 x 1024
    python benchmarks/bench_ratio.py --shape tiny       # a CPU smoke run

Methods, each in a fresh process on the GPU, the same random bf16 weights and data, gradient
checkpointing on (every layer trains in ratio mode, so backward runs through all of them):

* ``ours_ratio``: ``badam_kernels.ratio.BlockOptimizerRatio`` (dense gradients, one fused masked
  Adam launch per step, fp32 master + m + v of the masked entries), its kernel picked automatically;
  ``ours_ratio_cuda`` and ``ours_ratio_triton`` force the backend;
* ``badam_ratio``: ``badam.BlockOptimizerRatio`` 1.4 (sparse gradients from a hook, sparse Adam);
  on the tied-embedding 1.2B shape it is built with ``include_lm_head=True``, since it fails on a model
  with no parameter named lm_head (the tied head is frozen with the embedding either way);
* ``ours_layer``: ``badam_kernels.BlockOptimizer`` (one layer per block, truncated backward), the
  block in the middle of the stack active.

Before the methods, on the GPU, the masked step alone (``ops.masked_adamw_step``) on one flat group of
the size of a Llama-3-8B layer (218,112,000 bf16 parameters, ``--ratio`` of them masked, steady state:
master, m and v read and written), for each backend and both mask modes, against its floor: 32 bytes
per masked entry (index 4, grad 2, master + m + v 12 read and 12 written, param 2) at the measured
device-to-device copy bandwidth; the scattered gather/scatter moves whole 32-byte sectors, so its floor
is only the compact part's. On the CPU (``--shape tiny``) the same code times the reference on 65,536
parameters, so that it cannot rot before a GPU runs it.

Reported per method: the median step time over the timed steps (forward + backward + step, a switch
included every ``--switch-every`` steps), the optimizer's step alone, peak memory and the memory held
after the step (weights, states), and the loss. JSON and PNG go to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LLAMA_SHAPES, in_fresh_process, median, result_path, write_json  # noqa: E402

SHAPES = {
    "1b": dict(LLAMA_SHAPES["1b"], batch=4, seq=1024),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, batch=2, seq=64),
}
METHODS = ("ours_ratio", "ours_ratio_cuda", "ours_ratio_triton", "badam_ratio", "ours_layer")
GPU_ONLY = ("ours_ratio_cuda", "ours_ratio_triton")
KERNEL_NUMEL = 218_112_000  # one Llama-3-8B decoder layer (benchmarks/bench_step.py)
BYTES_PER_ENTRY = 32
LR = 1e-5


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                        help="default: all (on the CPU, not the ones that force a GPU kernel)")
    parser.add_argument("--ratio", type=float, default=0.1, help="update_ratio of the ratio modes")
    parser.add_argument("--mask-mode", choices=("adjacent", "scatter"), default="adjacent")
    parser.add_argument("--switch-every", type=int, default=10, help="steps per mask / per block")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--checkpointing", choices=("on", "off"), default="on")
    return parser.parse_args(argv)


def build_model(shape: str, device: str, checkpointing: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = {k: v for k, v in SHAPES[shape].items() if k not in ("batch", "seq")}
    config = LlamaConfig(**spec, max_position_embeddings=4096)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.train()
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def build_optimizer(method: str, model, args):
    named = list(model.named_parameters())
    tied = not any("lm_head" in n for n, _ in named)
    if method.startswith("ours_ratio"):
        from badam_kernels.ratio import BlockOptimizerRatio

        backend = method.split("_")[-1] if method != "ours_ratio" else None
        return BlockOptimizerRatio(model.parameters(), named, update_ratio=args.ratio, switch_every=args.switch_every,
                                   mask_mode=args.mask_mode, lr=LR, verbose=0, backend=backend), None
    if method == "badam_ratio":
        import badam

        warnings.filterwarnings("ignore", message="Sparse invariant checks")
        return badam.BlockOptimizerRatio([{"params": list(model.parameters())}], named, update_ratio=args.ratio,
                                         switch_every=args.switch_every, mask_mode=args.mask_mode, lr=LR,
                                         verbose=0, include_lm_head=tied), None
    from badam_kernels import BlockOptimizer, truncate_backward

    layers = SHAPES[args.shape]["num_hidden_layers"]
    base = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    opt = BlockOptimizer(base, named, switch_block_every=args.switch_every, switch_mode="fixed",
                         start_block=layers // 2, verbose=0)
    return opt, truncate_backward(model)


def measure(method: str, args) -> Dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    spec = SHAPES[args.shape]
    model = build_model(args.shape, device, args.checkpointing == "on")
    gen = torch.Generator().manual_seed(1)
    data = [torch.randint(0, spec["vocab_size"], (spec["batch"], spec["seq"]), generator=gen).to(device)
            for _ in range(args.warmup + args.steps)]
    opt, _hooks = build_optimizer(method, model, args)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_s, opt_s, losses = [], [], []
    for k, ids in enumerate(data):
        sync()
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        sync()
        before_step = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        end = time.perf_counter()
        losses.append(float(loss))
        if k >= args.warmup:
            step_s.append(end - start)
            opt_s.append(end - before_step)
    row = dict(method=method, status="ok", step_s=median(step_s), optimizer_step_s=median(opt_s),
               tokens_per_s=spec["batch"] * spec["seq"] / median(step_s), loss_first=losses[0], loss_last=losses[-1],
               params=sum(p.numel() for p in model.parameters()))
    if device == "cuda":
        row.update(peak_gib=torch.cuda.max_memory_allocated() / 2**30, held_gib=torch.cuda.memory_allocated() / 2**30)
    if hasattr(opt, "state_bytes"):
        row["state_gib"] = opt.state_bytes() / 2**30
    return row


def kernel_rows(ratio: float, numel: int = KERNEL_NUMEL, device: str = "cuda",
                backends=("cuda", "triton")) -> List[Dict]:
    """The masked step alone on one flat group of ``numel`` bf16 parameters (by default an 8B layer's):
    ms and GB/s per backend and mask mode, against a device-to-device copy (on the CPU: a smoke run)."""
    from badam_kernels import ops

    def timed(fn) -> float:  # ms
        if device == "cuda":
            from triton.testing import do_bench

            return do_bench(fn, warmup=25, rep=100)
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return median(times)

    src = torch.randn(numel // 2, device=device)  # a copy of 2 * numel bytes, read and written
    dst = torch.empty_like(src)
    copy_gbps = 2 * src.numel() * 4 / (timed(lambda: dst.copy_(src)) * 1e-3) / 1e9
    del src, dst
    gen = torch.Generator(device=device).manual_seed(0)
    param = torch.randn(numel, device=device, generator=gen).mul_(0.02).bfloat16()
    grad = torch.randn(numel, device=device, generator=gen).mul_(1e-3).bfloat16()
    entries = int(numel * ratio)
    tiles = -(-entries // ops.MASKED_TILE)
    rows = []
    for mask_mode in ("adjacent", "scatter"):
        if mask_mode == "adjacent":
            offsets = torch.arange(entries, device=device) + (numel - entries) // 2
        else:
            offsets = torch.randperm(numel, device=device, generator=gen)[:entries].sort().values
        index = torch.full((tiles * ops.MASKED_TILE,), -1, dtype=torch.int32, device=device)
        index[:entries] = offsets.int()
        del offsets
        states = ops.MaskedStates(index, param[index.clamp(min=0).long()].float(),
                                  torch.randn(index.numel(), device=device, generator=gen).mul_(1e-3),
                                  torch.rand(index.numel(), device=device, generator=gen).mul_(1e-6),
                                  torch.zeros(tiles, dtype=torch.int64, device=device),
                                  torch.ones(tiles, device=device))  # steady state: no tile is fresh
        for backend in backends:
            try:
                ms = timed(lambda: ops.masked_adamw_step(param, grad, states, lr=LR, backend=backend))
            except RuntimeError as exc:  # e.g. the extension is not built here
                rows.append(dict(backend=backend, mask_mode=mask_mode, status=str(exc)[:200]))
                continue
            gbps = BYTES_PER_ENTRY * entries / (ms * 1e-3) / 1e9
            rows.append(dict(backend=backend, mask_mode=mask_mode, status="ok", ms=ms, entries=entries, gbps=gbps,
                             of_copy=gbps / copy_gbps, floor_ms=BYTES_PER_ENTRY * entries / (copy_gbps * 1e9) * 1e3))
            print(f"masked step {backend:9s} {mask_mode:8s}: {ms:.3f} ms, {gbps:.0f} GB/s ({gbps / copy_gbps:.0%} of copy)",
                  flush=True)
        del states, index
    for row in rows:
        row.update(copy_gbps=copy_gbps, numel=numel)
    return rows


def safe_measure(method: str, args) -> Dict:
    try:
        return measure(method, args)
    except Exception as exc:  # a method that fails (out of memory, the official's errors) is a result too
        return dict(method=method, status=f"{type(exc).__name__}: {str(exc)[:300]}")


def plot(rows: List[Dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    names = [r["method"] for r in ok]
    axes[0].bar(names, [r["step_s"] * 1e3 for r in ok])
    axes[0].set_ylabel("step time (ms)")
    axes[1].bar(names, [r.get("peak_gib", 0.0) for r in ok])
    axes[1].set_ylabel("peak memory (GiB; 0 on CPU)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if args.shape != "tiny" and not on_gpu:
        print(f"--shape {args.shape} needs a CUDA device (use --shape tiny on CPU)", file=sys.stderr)
        return 2
    stem, rows = f"ratio_{args.shape}", []
    payload = dict(shape=args.shape, spec=SHAPES[args.shape], ratio=args.ratio, mask_mode=args.mask_mode,
                   switch_every=args.switch_every, steps=args.steps, warmup=args.warmup,
                   checkpointing=args.checkpointing, rows=rows, complete=False)
    # the masked step alone: an 8B layer's worth on the GPU; on the CPU a small smoke run of the reference
    payload["masked_step"] = (in_fresh_process(kernel_rows, args.ratio) if on_gpu
                              else kernel_rows(args.ratio, numel=1 << 16, device="cpu", backends=("reference",)))
    write_json(stem, payload)  # after every part: a call cut short keeps what it measured
    for method in args.methods or [m for m in METHODS if on_gpu or m not in GPU_ONLY]:
        row = in_fresh_process(safe_measure, method, args) if on_gpu else safe_measure(method, args)
        rows.append(row)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
        print(shown, flush=True)
        write_json(stem, payload)
    payload["complete"] = True
    write_json(stem, payload)
    plot(rows, result_path(stem, "png"), f"ratio mode, {args.shape}, ratio {args.ratio} ({args.mask_mode})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
