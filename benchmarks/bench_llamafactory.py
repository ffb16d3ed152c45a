"""One LLaMA-Factory SFT YAML, the official badam and badam_kernels: tokens/s over a block epoch, peak memory, loss.

    python benchmarks/bench_llamafactory.py --shape 1b            # on the GPU machine (LLaMA-Factory's wheels on PYTHONPATH)
    python benchmarks/bench_llamafactory.py --shape 8b

On the GPU machine through ``benchmarks/device_run.sh`` (``BENCH=llamafactory LF_SHAPE=1b``, carry
``[".whl", ".whl-lf"]``), after fetching here what its image lacks or holds in another version (CPython
3.12 wheels, 19 MB; the versions of ``requirements-llamafactory.txt``)::

    repo=$PWD; mkdir /tmp/lfw && cd /tmp/lfw && git init -q && $repo/../shared/tools/device-wheels transformers==5.6.0 \
      tokenizers==0.22.2 peft==0.18.1 trl==0.24.0 accelerate==1.11.0 datasets==4.0.0 dill==0.3.8 \
      multiprocess==0.70.16 omegaconf==2.4.0 fire==0.7.1 termcolor==3.3.0 tyro==0.8.14 shtab==1.13.0 \
      docstring_parser==0.18.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
      typing-inspection==0.4.5 llamafactory==0.9.5 badam==1.4 && mkdir -p $repo/.whl-lf && cp .whl/*.whl $repo/.whl-lf/
    scripts/venv-llamafactory python benchmarks/bench_llamafactory.py --shape tiny --examples 64   # CPU smoke run

What it does:

1. ``prepare``: saves a random-weight Llama of ``benchmarks/common.py`` ``LLAMA_SHAPES[shape]`` as a model
   folder (bf16 on a GPU; ``tiny``: 4 layers of width 64, fp32) with a byte-level tokenizer (each byte a
   token, made here: nothing is downloaded), and generates ``--examples`` instruction/answer pairs of random
   words in LLaMA-Factory's alpaca format with its ``dataset_info.json`` (long enough that every example is
   cut at ``cutoff_len``, so every step sees the same number of tokens).
2. One SFT YAML (``use_badam: true``, ``badam_switch_interval`` K, LLaMA-Factory's defaults otherwise:
   ascending switch mode, its gradient checkpointing) with ``max_steps`` = warmup + one block epoch (D blocks
   x K steps).
3. Each method in a fresh process, through LLaMA-Factory's own CLI entry (``llamafactory.cli.main``, what
   ``llamafactory-cli`` runs): ``official`` as it is; ``ours`` after
   ``badam_kernels.integrations.llamafactory.install()`` (what ``badam-llamafactory`` does); ``ours_fast``
   with ``BADAM_KERNELS_COMPILE=1 BADAM_KERNELS_FUSED_CE=1`` (the main job's fast path: compiled layers,
   liger's fused loss alone); ``ours_fast_24g`` the same with ``BADAM_KERNELS_MEMORY_BUDGET=24`` (the most top
   layers whose activations fit 24 GiB keep them, the others are recomputed; LLaMA-Factory's own checkpoint
   function keeps every frozen layer's, whatever the memory); ``ours_fast_all`` with
   ``BADAM_KERNELS_FAST=1`` (all of it, the budget the GPU's free memory); ``ours_compiled`` with the compile
   only; ``ours_liger`` and ``official_liger`` with ``enable_liger_kernel: true`` (liger's loss and its layer
   kernels, eager). The only addition to the run is a callback that times each step (synchronised), counts
   its tokens (``include_num_input_tokens_seen``) and reads the peak allocated memory.

Reports, per method: tokens/s over the block epoch (warmup steps excluded; steps taking over 5x the median,
torch.compile's first passes, reported apart as ``slow_steps_s``), peak memory, the loss of the last step and
the mean over the last block, as JSON + PNG in benchmarks/results/ (``llamafactory_<shape>_<device>_<date>``).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=300, tie_word_embeddings=False)
SPECIAL = ["<pad>", "<s>", "</s>"]
WORDS = ("the of and to in is was that for on with as by at from his her they be this which an are have not had "
         "one were all but we there when can more will what about would their if so up out said some time like "
         "only into over also after new first two may any most such then these should year make way people").split()
METHODS = {  # method -> (install badam_kernels, extra environment, extra YAML)
    "official": (False, {}, {}),
    "ours": (True, {}, {}),
    # the main job's fast path: compiled layers and liger's fused loss alone (LLaMA-Factory's own liger switch
    # also swaps the layers' modules, and compiled layers holding them crashed: the integration drops the
    # compile there, so ours_liger is eager)
    "ours_fast": (True, {"BADAM_KERNELS_COMPILE": "1", "BADAM_KERNELS_FUSED_CE": "1"}, {}),
    # within a 24 GiB budget: LLaMA-Factory's checkpoint function keeps every frozen layer's activations
    # whatever the memory; the main job's plan (finetune/plan.py) keeps the most top layers that fit
    "ours_fast_24g": (True, {"BADAM_KERNELS_COMPILE": "1", "BADAM_KERNELS_FUSED_CE": "1",
                             "BADAM_KERNELS_MEMORY_BUDGET": "24"}, {}),
    # all of it by one switch: the activations planned within the GPU's free memory (the main job's default)
    "ours_fast_all": (True, {"BADAM_KERNELS_FAST": "1"}, {}),
    "ours_compiled": (True, {"BADAM_KERNELS_COMPILE": "1"}, {}),
    "ours_liger": (True, {}, {"enable_liger_kernel": True}),
    "official_liger": (False, {}, {"enable_liger_kernel": True}),  # the official with liger's kernels
}


# ------------------------------------------------------------------------------------ model, tokenizer, data

def byte_tokenizer():
    """A byte-level BPE tokenizer without merges: every byte one token (ids 3..258), three special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    vocab.update({ch: len(SPECIAL) + i for i, ch in enumerate(sorted(alphabet))})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def save_model(folder: Path, shape: str, seed: int = 0) -> None:
    """A random-weight Llama of the shape as a Hugging Face model folder, with the byte tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from common import LLAMA_SHAPES

    dims = TINY if shape == "tiny" else LLAMA_SHAPES[shape]
    tokenizer = byte_tokenizer()
    config = LlamaConfig(**dims, max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    on_gpu = torch.cuda.is_available() and shape != "tiny"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    torch.manual_seed(seed)
    with torch.device("cuda" if on_gpu else "cpu"):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model


def write_dataset(folder: Path, examples: int, answer_bytes: int, seed: int = 0, name: str = "bench") -> None:
    """``examples`` alpaca records of random words (an instruction of about a fifth of ``answer_bytes``, an
    answer of about ``answer_bytes``) and LLaMA-Factory's ``dataset_info.json`` naming them ``name``."""
    rng = random.Random(seed)

    def text(n_bytes: int) -> str:
        words, size = [], 0
        while size < n_bytes:
            words.append(rng.choice(WORDS))
            size += len(words[-1]) + 1
        return " ".join(words)

    records = [{"instruction": text(answer_bytes // 5), "input": "", "output": text(answer_bytes)}
               for _ in range(examples)]
    (folder / f"{name}.json").write_text(json.dumps(records))
    (folder / "dataset_info.json").write_text(json.dumps({name: {"file_name": f"{name}.json"}}))


def write_yaml(path: Path, **values) -> None:
    """A flat YAML mapping (what LLaMA-Factory reads), written without a YAML library."""
    lines = [f"{key}: {json.dumps(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else value}"
             for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")


def sft_yaml(model: Path, data: Path, out: Path, **overrides) -> dict:
    """The SFT configuration every method runs (``overrides`` last)."""
    values = dict(model_name_or_path=str(model), stage="sft", do_train=True, finetuning_type="full",
                  use_badam=True, badam_mode="layer", badam_switch_interval=3, badam_verbose=0,
                  dataset="bench", dataset_dir=str(data), template="default", cutoff_len=1024,
                  overwrite_cache=True, output_dir=str(out), logging_steps=1, save_strategy="no",
                  report_to="none", per_device_train_batch_size=2, gradient_accumulation_steps=1,
                  learning_rate=1.0e-5, max_steps=10, lr_scheduler_type="constant", seed=0,
                  include_num_input_tokens_seen=True, disable_tqdm=True, plot_loss=False,
                  dataloader_num_workers=0, overwrite_output_dir=True)
    values.update(overrides)
    return values


# ------------------------------------------------------------------------------------ the measured child

def child(method: str, config: str, record: str) -> None:
    """Run LLaMA-Factory's CLI on ``config`` in this process, with badam_kernels installed for ours, and a
    callback appending one JSON line per step to ``record``."""
    import torch
    from transformers import TrainerCallback

    from llamafactory.train import tuner

    cuda = torch.cuda.is_available()

    class Timer(TrainerCallback):
        def __init__(self):
            self.out = open(record, "a")
            self.t0, self.tokens0 = None, 0

        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.t0, self.tokens0 = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            row = dict(step=state.global_step, seconds=time.perf_counter() - self.t0,
                       tokens=state.num_input_tokens_seen - self.tokens0,
                       peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)
            self.out.write(json.dumps(row) + "\n")
            self.out.flush()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.out.write(json.dumps(dict(step=state.global_step, loss=logs["loss"])) + "\n")
                self.out.flush()

        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            inner = optimizer
            while inner is not None and hasattr(inner, "optimizer"):
                inner = inner.optimizer
            self.out.write(json.dumps(dict(optimizer=f"{type(inner).__module__}.{type(inner).__name__}")) + "\n")
            self.out.flush()

    original = tuner.run_exp
    tuner.run_exp = lambda args=None, callbacks=None: original(args, (callbacks or []) + [Timer()])
    if METHODS[method][0]:
        from badam_kernels.integrations.llamafactory import install
        install()
    sys.argv = ["llamafactory-cli", "train", config]
    from llamafactory.cli import main as llamafactory_main
    llamafactory_main()


def summarise(record: Path, warmup: int, last_block: int) -> dict:
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    steps = [r for r in rows if "seconds" in r]
    losses = [r for r in rows if "loss" in r]
    optimizer = next((r["optimizer"] for r in rows if "optimizer" in r), None)
    window = [r for r in steps if r["step"] > warmup]
    times = sorted(r["seconds"] for r in window)
    median = times[len(times) // 2] if times else float("nan")
    slow = [r for r in window if r["seconds"] > 5 * median]
    fast = [r for r in window if r["seconds"] <= 5 * median]
    peaks = [r["peak_gib"] for r in steps if r.get("peak_gib") is not None]
    return dict(
        optimizer=optimizer, steps_measured=len(window),
        tokens_per_s=sum(r["tokens"] for r in window) / sum(r["seconds"] for r in window) if window else None,
        tokens_per_s_without_slow_steps=(sum(r["tokens"] for r in fast) / sum(r["seconds"] for r in fast)
                                         if fast else None),
        slow_steps_s=[round(r["seconds"], 2) for r in slow], median_step_s=median,
        tokens_per_step=window[0]["tokens"] if window else None,
        peak_gib=max(peaks) if peaks else None,
        final_loss=losses[-1]["loss"] if losses else None,
        last_block_mean_loss=(sum(r["loss"] for r in losses[-last_block:]) / len(losses[-last_block:])
                              if losses else None),
        losses=[r["loss"] for r in losses], step_seconds=[round(r["seconds"], 4) for r in steps])


def run_method(method: str, config: Path, record: Path, timeout: float) -> int:
    env = dict(os.environ, **METHODS[method][1])
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("DISABLE_VERSION_CHECK", "0")
    record.unlink(missing_ok=True)
    with open(record.with_suffix(".log"), "w") as log:
        proc = subprocess.run([sys.executable, __file__, "_child", method, str(config), str(record)], env=env,
                              stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    return proc.returncode


# ------------------------------------------------------------------------------------ main

def plot(payload: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = payload["results"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    names = list(results)
    axes[0].bar(names, [results[n].get("tokens_per_s") or 0 for n in names], color="tab:blue")
    axes[0].set_title("tokens/s over a block epoch")
    axes[1].bar(names, [results[n].get("peak_gib") or 0 for n in names], color="tab:orange")
    axes[1].set_title("peak allocated GiB")
    for name in names:
        axes[2].plot(results[name].get("losses", []), label=name)
    axes[2].set_title("loss per step")
    axes[2].set_xlabel("step")
    axes[2].legend()
    fig.suptitle(f"LLaMA-Factory SFT, {payload['shape']} shape, {payload['device'].get('name')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        child(*argv[1:4])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="1b", help="tiny, 1b, 8b (benchmarks/common.py LLAMA_SHAPES)")
    parser.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                        help="default: official ours ours_fast ours_liger (on a GPU), official ours (CPU)")
    parser.add_argument("--work", default=None, help="where the model, data and runs go (default: /tmp/bench_llamafactory_<shape>)")
    parser.add_argument("--examples", type=int, default=3000)
    parser.add_argument("--cutoff-len", type=int, default=None, help="default 1024 (tiny: 64)")
    parser.add_argument("--batch", type=int, default=None, help="per-device batch (default: 8b 2, 1b 4, tiny 2)")
    parser.add_argument("--switch-interval", type=int, default=3, help="badam_switch_interval K")
    parser.add_argument("--warmup", type=int, default=3, help="steps before the measured block epoch")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)

    import torch

    from common import LLAMA_SHAPES, device_record, result_path, write_json

    cuda = torch.cuda.is_available()
    tiny = args.shape == "tiny"
    layers = (TINY if tiny else LLAMA_SHAPES[args.shape])["num_hidden_layers"]
    cutoff = args.cutoff_len or (64 if tiny else 1024)
    batch = args.batch or {"8b": 2, "1b": 4}.get(args.shape, 2)
    methods = args.methods or (["official", "ours", "ours_fast", "ours_fast_24g"] if cuda else ["official", "ours"])
    work = Path(args.work or f"/tmp/bench_llamafactory_{args.shape}")
    model, data = work / "model", work / "data"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not (model / "config.json").exists():
        save_model(model, args.shape)
    data.mkdir(exist_ok=True)
    write_dataset(data, args.examples, answer_bytes=int(cutoff * 1.3))
    prepare_s = time.perf_counter() - t0
    epoch = layers * args.switch_interval
    overrides = dict(per_device_train_batch_size=batch, cutoff_len=cutoff, badam_switch_interval=args.switch_interval,
                     max_steps=args.warmup + epoch, preprocessing_num_workers=min(8, os.cpu_count() or 1))
    if cuda:
        overrides["bf16"] = True
    print(f"{args.shape}: {layers} blocks x K={args.switch_interval} = {epoch} measured steps after {args.warmup} "
          f"warmup, batch {batch} x {cutoff} tokens; prepared in {prepare_s:.0f} s", flush=True)

    results = {}
    stem = f"llamafactory_{args.shape}{args.tag}"

    def save(complete: bool) -> Path:  # after every method too: a call cut short keeps what it measured
        payload = dict(shape=args.shape, blocks=layers, switch_interval=args.switch_interval, warmup_steps=args.warmup,
                       batch=batch, cutoff_len=cutoff, examples=args.examples,
                       yaml=sft_yaml(model, data, work / "out", **overrides), llamafactory=_version("llamafactory"),
                       transformers_here=_version("transformers"), prepare_s=prepare_s, results=results,
                       complete=complete)
        official = results.get("official", {}).get("tokens_per_s")
        for r in results.values():
            if official and r.get("tokens_per_s"):
                r["speedup_vs_official"] = r["tokens_per_s"] / official
        return write_json(stem, payload)

    for method in methods:
        config = work / f"{method}.yaml"
        write_yaml(config, **sft_yaml(model, data, work / f"out_{method}", **overrides, **METHODS[method][2]))
        record = work / f"{method}.jsonl"
        t1 = time.perf_counter()
        code = run_method(method, config, record, args.timeout)
        wall = time.perf_counter() - t1
        # LLaMA-Factory saves the trained model at the end: 16 GB a method on 8B, and the GPU machine's disk
        # (64 GB) does not hold three of them beside the model folder
        shutil.rmtree(work / f"out_{method}", ignore_errors=True)
        if code != 0 or not record.exists():
            tail = record.with_suffix(".log").read_text()[-3000:]
            results[method] = dict(error=f"exit {code}", log_tail=tail, wall_s=wall)
            print(f"{method}: FAILED (exit {code}); log {record.with_suffix('.log')}\n{tail}", flush=True)
            save(complete=False)
            continue
        results[method] = dict(summarise(record, args.warmup, args.switch_interval), wall_s=wall)
        r = results[method]
        print(f"{method}: {r['tokens_per_s']:,.0f} tokens/s over the block epoch ({r['steps_measured']} steps), peak "
              f"{r['peak_gib'] if r['peak_gib'] is not None else float('nan'):.1f} GiB, loss {r['final_loss']:.4f} "
              f"(last block {r['last_block_mean_loss']:.4f}), optimizer {r['optimizer']}, {wall:.0f} s", flush=True)
        save(complete=False)

    path = save(complete=True)
    payload = json.loads(path.read_text())
    payload["device"] = device_record()
    plot(payload, result_path(stem, "png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0 if all("error" not in r for r in results.values()) else 1


def _version(name: str):
    import importlib.metadata
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
