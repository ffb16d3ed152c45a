"""The main job as a user runs it, against the fastest configuration bench_e2e.py measured.

For each shape (``8b``: Llama-3-8B at 2 x 1024 tokens; ``1b``: the 1.2B at 4 x 1024; ``tiny``: a
CPU smoke run), a random-weight Llama model folder is saved (bf16 on a GPU, no tokenizer: the job
reads bytes) with a text file of random words, then, each in a fresh process:

* ``badam-finetune --model DIR --data FILE`` with the default options (the fast path's plan on a
  GPU), the batch of the shape and ``--switch-every K``, for two warm-up blocks and two block epochs
  (every block K steps): tokens/s over the second epoch from ``metrics.jsonl`` (the first epoch still
  meets guard combinations torch.compile has not seen, e.g. the first block whose input requires
  grad, and pays a recompile; its figure is kept as ``tokens_per_s_first_epoch``), the per-step
  seconds, the plan from ``config.json``, the peak from ``summary.json``; then two blocks more under
  ``--profile-steps``, whose operators' table (by GPU time) goes into the row as ``profile_ops``;
* on the 8B shape the same with ``--memory-budget 24``, then again as on a 24 GiB card (``as_card.py``:
  the allocator capped at 24 GiB less the process' CUDA context), which shows whether the plan fits a
  real card, not only its own estimate (the budget counts allocated memory; the card also holds the
  context and the allocator's reserve);
* bench_e2e.py's fastest configuration (``ours_fast_ce8_compiled``: liger's fused cross-entropy with
  chunk_mem_const 8, compiled layers, checkpointing with every layer kept; ``ours_fast`` on the CPU)
  over one block epoch at the same batch, as bench_e2e measures it.

Writes ``results/finetune_<shape>_<device>_<date>.json`` and ``.png`` (tokens/s and peak memory of
each run). ``--shape all`` (the default) runs 8b then 1b; each 8B run loads a 16 GB folder (about a
minute) so give one shape per call where a command's time is limited.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LLAMA_SHAPES, in_fresh_process, result_path, write_json  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHAPES = {
    # budgets: (--memory-budget GiB, the card's GiB a GPU run is capped at)
    "8b": dict(model=LLAMA_SHAPES["8b"], batch=2, seq=1024, budgets=[(24.0, None), (24.0, 24.0)]),
    "1b": dict(model=LLAMA_SHAPES["1b"], batch=4, seq=1024, budgets=[]),
    # bench_e2e's tiny shape; on the CPU the budget run turns the fast path on to show a plan
    "tiny": dict(model=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True), batch=2, seq=64,
                 budgets=[(0.05, None)]),
}
LR = 1e-5
PROFILED_BLOCKS = 2  # blocks run under torch.profiler after the timed epochs
PROFILE_LINES = 40  # of the operators' table, kept in the JSON


def save_model_folder(shape: str, folder: Path, device: str) -> Path:
    """A random-weight Llama of the shape, saved with save_pretrained (once: reused when present)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return folder
    config = LlamaConfig(**SHAPES[shape]["model"], max_position_embeddings=4096)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


def write_text(path: Path, tokens: int) -> Path:
    """Random words, at least ``tokens`` bytes (the job's byte tokenizer: a byte is a token)."""
    if path.is_file() and path.stat().st_size >= tokens:
        return path
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    out, size = [], 0
    while size < tokens:
        line = " ".join(rng.choice(words) for _ in range(12)) + "\n"
        out.append(line)
        size += len(line)
    path.write_text("".join(out))
    return path


def run_job(name: str, model: Path, data: Path, out: Path, batch: int, seq: int, K: int, layers: int,
            extra: List[str], timeout: int, card_gib: Optional[float] = None) -> Dict:
    """``python -m badam_kernels`` (the CLI) in a fresh process; tokens/s over the second block epoch
    after two warm-up blocks, and over the first; then ``PROFILED_BLOCKS`` blocks more under
    ``--profile-steps`` (after the timed steps, which the profiler would slow), whose operators' table
    goes into the row. ``card_gib``: run as on a GPU of that size (``as_card.py``)."""
    warm, epoch = 2 * K, layers * K
    timed = warm + 2 * epoch
    steps = timed + PROFILED_BLOCKS * K
    launcher = ["-m"] if card_gib is None else [str(Path(__file__).with_name("as_card.py")), f"{card_gib:g}"]
    cmd = [sys.executable, *launcher, "badam_kernels", "--model", str(model), "--data", str(data), "--out", str(out),
           "--batch-size", str(batch), "--seq-len", str(seq), "--switch-every", str(K), "--steps", str(steps),
           "--lr", str(LR), "--no-progress", "--log-every", str(steps), "--profile-steps", f"{timed + 1}-{steps}",
           *extra]
    began = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(out.parent))
    row = dict(name=name, command=" ".join(cmd[1:]), wall_s=round(time.perf_counter() - began, 1),
               stdout=proc.stdout[-3000:], stderr=proc.stderr[-3000:])
    if proc.returncode != 0:
        return dict(row, status="OOM" if "OutOfMemoryError" in proc.stderr else f"exit {proc.returncode}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    elapsed = {r["step"]: r["elapsed_s"] for r in records}
    summary = json.loads((out / "summary.json").read_text())
    plan = json.loads((out / "config.json").read_text())["plan"]
    ops = (out / "profile" / "ops.txt").read_text().splitlines()
    loss_last = next(r["loss"] for r in records if r["step"] == timed)
    return dict(row, status="ok", tokens_per_s=_tokens_per_s(records, warm + epoch, timed),
                tokens_per_s_first_epoch=_tokens_per_s(records, warm, warm + epoch),
                step_seconds=[round(elapsed[k] - elapsed.get(k - 1, 0.0), 4) for k in sorted(elapsed)],
                peak_mem_GiB=summary["peak_mem_mib"] / 1024, peak_reserved_mib=summary.get("peak_reserved_mib"),
                device_used_mib=summary.get("device_used_mib"), card_gib=card_gib, plan=plan, loss_last=loss_last,
                steps_timed=epoch, profile_ops=ops[:PROFILE_LINES],
                notes=[line for line in proc.stderr.splitlines() if "note:" in line])


def _tokens_per_s(records: List[Dict], after: int, last: int) -> float:
    """Tokens over steps ``after + 1 .. last`` of ``metrics.jsonl`` divided by their elapsed seconds."""
    window = [r for r in records if after < r["step"] <= last]
    before = next(r for r in records if r["step"] == after)["elapsed_s"]
    return sum(r["tokens"] for r in window) / (window[-1]["elapsed_s"] - before)


def run_e2e(shape: str, batch: int, seq: int, K: int, layers: int, device: str) -> Dict:
    """bench_e2e.py's fastest configuration over one block epoch, in a fresh process, as bench_e2e runs it."""
    import bench_e2e

    method = "ours_fast_ce8_compiled" if device == "cuda" else "ours_fast"
    row = bench_e2e.measure_isolated(shape, method, True, batch, seq, layers * K, warmup=K - 1, K=K, device=device)
    return dict(row, name="bench_e2e fastest", e2e_method=method)


def bench_shape(shape: str, args, device: str, record) -> None:
    """The shape's runs, each row handed to ``record`` as soon as it is measured."""
    spec = SHAPES[shape]
    batch, seq, layers, K = spec["batch"], spec["seq"], spec["model"]["num_hidden_layers"], args.switch_every
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    # in a process of its own on a GPU: this one holds no CUDA context while the jobs run (as_card.py
    # counts what the device holds)
    save = (lambda *a: in_fresh_process(save_model_folder, *a)) if device == "cuda" else save_model_folder
    model = save(shape, work / f"llama_{shape}", device)
    data = write_text(work / "words.txt", 4 * (2 + 2 * layers + PROFILED_BLOCKS) * K * batch * (seq + 1))
    runs = [("badam-finetune (defaults)", [], None)]
    for budget, card in spec["budgets"]:
        extra = ["--memory-budget", f"{budget:g}"] + (["--fast", "on", "--no-compile"] if device != "cuda" else [])
        card = card if device == "cuda" else None
        runs.append((f"badam-finetune --memory-budget {budget:g}" + (f" on a {card:g} GiB card" if card else ""),
                     extra, card))
    for k, (name, extra, card) in enumerate(runs):
        out = work / f"run_{shape}_{k}_{int(time.time())}"
        row = run_job(name, model, data, out, batch, seq, K, layers, extra, args.timeout, card)
        record(dict(row, shape=shape, batch=batch, seq=seq))
    row = run_e2e(shape, batch, seq, K, layers, device)
    record(dict(row, shape=shape, batch=batch, seq=seq))


def _print(row: Dict) -> None:
    plan = (row.get("plan") or {}).get("line", row.get("e2e_method", ""))
    tps, peak, reserved = row.get("tokens_per_s"), row.get("peak_mem_GiB"), row.get("peak_reserved_mib")
    print(f"{row['shape']:>5} {row['name']:<46} {row.get('status'):>6}  "
          f"{'' if tps is None else f'{tps:,.0f} tok/s'}  {'' if peak is None else f'peak {peak:.1f} GiB'}"
          f"{'' if reserved is None else f' (reserved {reserved / 1024:.1f})'}  {plan}", flush=True)
    if row.get("status") != "ok" and row.get("stderr"):
        print(row["stderr"][-1500:], file=sys.stderr)


def plot(payload: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in payload["rows"] if r.get("status") == "ok"]
    labels = [f"{r['shape']}: {r['name']}" for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 1.2 + 0.6 * max(1, len(rows))))
    ax1.barh(labels, [r["tokens_per_s"] for r in rows], color="tab:blue")
    ax1.set_xlabel("tokens/s over a block epoch")
    ax1.invert_yaxis()
    ax2.barh(labels, [r.get("peak_mem_GiB", 0.0) for r in rows], color="tab:orange")
    for r, y in zip(rows, range(len(rows))):
        plan = r.get("plan") or {}
        if plan.get("budget_gib") is not None and "--memory-budget" in r["name"]:
            ax2.plot([plan["budget_gib"]] * 2, [y - 0.4, y + 0.4], color="k", linestyle="--")
    ax2.set_xlabel("peak memory (GiB); dashed: the budget")
    ax2.set_yticks([])
    ax2.invert_yaxis()
    fig.suptitle("badam-finetune with its defaults against bench_e2e's fastest configuration")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=["all", "8b", "1b", "tiny"], default="all")
    parser.add_argument("--switch-every", type=int, default=3, help="steps per block (bench_e2e's default)")
    parser.add_argument("--work", default=os.environ.get("BENCH_WORK", "/tmp/bench_finetune"),
                        help="where the model folders, the data and the run folders go")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per job run")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = ["8b", "1b"] if args.shape == "all" else [args.shape]
    rows: List[Dict] = []
    stem = f"finetune_{args.shape}"
    payload = {"experiment": "finetune_defaults", "shapes": shapes, "switch_every": args.switch_every, "rows": rows,
               "complete": False}

    def record(row: Dict) -> None:  # the JSON after every run: a call cut short keeps what it measured
        rows.append(row)
        _print(row)
        write_json(stem, payload)

    for shape in shapes:
        bench_shape(shape, args, device, record)
    payload["complete"] = True
    json_path = write_json(stem, payload)
    plot(payload, result_path(stem, "png"))
    print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
