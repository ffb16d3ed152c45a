"""The main job's evaluation: the eval loss (token-weighted, equal to a direct computation), the
held-out split, samples, the metrics/plot/summary, --resume with packing and evaluation, and the
new options' bad input (one line, exit status 2)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from badam_kernels.finetune import cli
from badam_kernels.finetune.data import Source, build_data, hold_out
from badam_kernels.finetune.evaluate import Evaluation, eval_loss_direct, load_prompts
from badam_kernels.finetune.formats import DataError, parse_line
from test_finetune_data import CONVERSATION, _examples, _model, chat_tokenizer, mixed_lines, tiny_model_folder, \
    write_jsonl

TINY = ["--seq-len", "128", "--batch-size", "2", "--switch-every", "2", "--no-progress", "--log-every", "100"]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer()


@pytest.fixture(scope="module")
def job(tmp_path_factory, tok):
    """A tiny Llama folder with the chat tokenizer, a JSONL file of every format and sample prompts."""
    d = tmp_path_factory.mktemp("job")
    model = tiny_model_folder(d / "model", tok, vocab_size=len(tok))
    data = write_jsonl(d / "mixed.jsonl", mixed_lines(12))
    prompts = d / "prompts.txt"
    prompts.write_text("name a sea creature\n\nwhat is coral?\n")
    return d, model, data, str(prompts)


# ------------------------------------------------------------------------------------ the loss

@pytest.mark.parametrize("batch_size", [1, 3])
def test_eval_loss_equals_a_direct_computation(tok, batch_size):
    examples = _examples(tok)
    model = _model(len(tok), "sdpa")
    model.train()
    evaluation = Evaluation(examples, "test", 0, tok.pad_token_id, batch_size)
    loss, tokens = evaluation.loss(model, "cpu")
    assert tokens == sum(sum(1 for label in labels[1:] if label != -100) for _, labels in examples)
    assert loss == pytest.approx(eval_loss_direct(model, examples), rel=1e-5)
    assert model.training  # put back as it was


def test_eval_loss_is_token_weighted_not_a_mean_of_batches(tok):
    """A long example weighs by its tokens: the mean of per-batch means would differ."""
    examples = _examples(tok)
    model = _model(len(tok), "sdpa")
    per_example = [eval_loss_direct(model, [e]) for e in examples]
    loss, _ = Evaluation(examples, "test", 0, tok.pad_token_id, 1).loss(model, "cpu")
    assert abs(loss - sum(per_example) / len(per_example)) > 1e-4


# ------------------------------------------------------------------------------------ the split

def _source(n):
    lines = mixed_lines(n)
    return Source("f.jsonl", examples=[parse_line(json.dumps(o), f"f.jsonl:{i + 1}") for i, o in enumerate(lines)],
                  where=[f"f.jsonl:{i + 1}" for i in range(n)])


def test_eval_fraction_holds_out_a_seeded_subset():
    train, held = hold_out(_source(40), 0.25, seed=3, seq_len=64)
    assert len(held.examples) == 10 and len(train.examples) == 30
    assert sorted(train.where + held.where, key=lambda w: int(w.split(":")[1])) == _source(40).where
    again_train, again = hold_out(_source(40), 0.25, seed=3, seq_len=64)
    assert again.where == held.where and again_train.where == train.where  # the same split every time
    assert hold_out(_source(40), 0.25, seed=4, seq_len=64)[1].where != held.where  # drawn from the seed
    assert held.where != _source(40).where[-10:]  # not simply the tail


def test_eval_fraction_of_a_text_is_its_tail():
    ids = torch.arange(1000)
    train, held = hold_out(Source("t.txt", ids=ids), 0.1, seed=0, seq_len=32)
    assert torch.equal(train.ids, ids[:900]) and torch.equal(held.ids, ids[900:])
    with pytest.raises(DataError, match="--eval-fraction 0.99"):
        hold_out(Source("t.txt", ids=ids), 0.99, seed=0, seq_len=32)


def test_build_data_keeps_the_held_out_examples_out_of_training(job, tok):
    from badam_kernels.finetune.config import TrainConfig, resolve

    d, model, data, _ = job
    cfg = resolve(TrainConfig(model=model, data=data, eval_fraction=0.25, seq_len=128, batch_size=2))
    batches, (name, examples) = build_data(cfg, tok)
    assert batches.num_examples == 9 and len(examples) == 3 and name == f"0.25 of {data} held out"


# ------------------------------------------------------------------------------------ the job

def test_eval_every_writes_metrics_samples_summary_and_plot(job, tok, tmp_path, capsys):
    d, model, data, prompts = job
    run = tmp_path / "run"
    assert cli.main(["--model", model, "--data", data, "--eval-fraction", "0.25", "--eval-every", "2",
                     "--sample-prompts", prompts, "--sample-tokens", "5", "--steps", "5", "--out", str(run),
                     *TINY]) == 0
    out = capsys.readouterr().out
    assert f"eval: 0.25 of {data} held out: 3 examples, " in out
    assert "2 sample prompts; every 2 steps and at the end" in out
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4, 5]
    assert all(r["eval_tokens"] > 0 for r in records if "eval_loss" in r)
    for step in (2, 4, 5):
        samples = read_jsonl(run / "samples" / f"step_{step}.jsonl")
        assert [s["prompt"] for s in samples] == ["name a sea creature", "what is coral?"]
        assert all(s["step"] == step and isinstance(s["output"], str) and s["new_tokens"] <= 5 for s in samples)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_loss"] == records[-1]["eval_loss"]
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # the last eval loss is the checkpoint's loss on the held-out examples, computed directly
    from transformers import AutoModelForCausalLM

    from badam_kernels.finetune.config import saved_config

    trained = AutoModelForCausalLM.from_pretrained(run / "checkpoint").eval()
    _, (_, held) = build_data(saved_config(str(run)), tok)
    assert records[-1]["eval_loss"] == pytest.approx(eval_loss_direct(trained, held), rel=1e-5)


def test_eval_batch_size_changes_the_forwards_not_the_eval_loss(job, tmp_path, monkeypatch):
    """--eval-batch-size: the eval set in fewer, larger forwards; the same losses as batches of --batch-size."""
    d, model, data, _ = job
    widths = []
    real_loss = Evaluation.loss

    def counted(self, *args, **kwargs):
        widths.append(self.batch_size)
        return real_loss(self, *args, **kwargs)

    monkeypatch.setattr(Evaluation, "loss", counted)
    runs = {}
    for name, extra in (("train_batch", []), ("eval_batch", ["--eval-batch-size", "3"])):
        runs[name] = tmp_path / name
        assert cli.main(["--model", model, "--data", data, "--eval-fraction", "0.25", "--eval-every", "2",
                         "--steps", "3", "--out", str(runs[name]), *TINY, *extra]) == 0
    assert widths == [2, 2, 3, 3]  # TINY's --batch-size 2, then 3; evaluations at steps 2 and 3
    default, wider = (read_jsonl(runs[name] / "metrics.jsonl") for name in ("train_batch", "eval_batch"))
    assert [r["loss"] for r in default] == [r["loss"] for r in wider]
    evals = [[(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r] for records in (default, wider)]
    assert [step for step, _ in evals[1]] == [step for step, _ in evals[0]] == [2, 3]
    assert [loss for _, loss in evals[1]] == pytest.approx([loss for _, loss in evals[0]], rel=1e-5)


def test_the_evaluation_takes_the_runs_fused_loss(job, tok, tmp_path, monkeypatch):
    """With --fused-ce the eval set's forwards go through the fused loss too (no whole logits: a wide eval batch
    stays small), and give the loss the plain model gives the checkpoint (conftest: TRITON_INTERPRET=1)."""
    from badam_kernels.finetune import fast
    from badam_kernels.finetune.config import saved_config

    d, model, data, _ = job
    calls = []
    real_fused = fast.fused_loss

    def counted(*args, **kwargs):
        calls.append(torch.is_grad_enabled())  # False: an evaluation's forward
        return real_fused(*args, **kwargs)

    monkeypatch.setattr(fast, "fused_loss", counted)
    run = tmp_path / "run"
    assert cli.main(["--model", model, "--data", data, "--eval-fraction", "0.25", "--eval-every", "2", "--steps", "2",
                     "--fused-ce", "--eval-batch-size", "3", "--out", str(run), *TINY]) == 0
    assert calls.count(True) == 2 and calls.count(False) == 1  # two steps of one micro-batch; 3 eval rows, one forward
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(run / "checkpoint").eval()
    _, (_, held) = build_data(saved_config(str(run)), tok)
    last = read_jsonl(run / "metrics.jsonl")[-1]
    assert last["eval_loss"] == pytest.approx(eval_loss_direct(trained, held), rel=1e-5)

def test_eval_data_file_and_default_text_run(tmp_path, capsys):
    """The embedded model on the shipped text, evaluated on a text file; prompts are text to continue."""
    evald = tmp_path / "eval.txt"
    evald.write_text("Full fathom five thy father lies;\nOf his bones are coral made;\n" * 4)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('"Full fathom"\n{"text": "Of his bones"}\n')
    run = tmp_path / "run"
    assert cli.main(["--eval-data", str(evald), "--sample-prompts", str(prompts), "--steps", "2", "--seq-len", "32",
                     "--batch-size", "4", "--no-progress", "--out", str(run)]) == 0
    records = read_jsonl(run / "metrics.jsonl")
    n = len(evald.read_bytes())
    assert "eval_loss" not in records[0] and records[-1]["eval_tokens"] == n - -(-n // 32)  # windows of 32 bytes
    samples = read_jsonl(run / "samples" / "step_2.jsonl")
    assert [s["prompt"] for s in samples] == ["Full fathom", "Of his bones"]


def test_prompts_files(tmp_path, tok):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"messages": CONVERSATION}) + "\n" + json.dumps({"instruction": "hi"}) + "\n")
    prompts = load_prompts(str(p))
    assert prompts[0].example.messages == CONVERSATION[:4] and prompts[1].shown == "hi"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('"ok"\n{"question": 1}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: no known format"):
        load_prompts(str(bad))


def _weights(run):
    return load_file(str(run / "checkpoint" / "model.safetensors"))


def test_resume_with_packing_and_evaluation_is_exact(job, tmp_path):
    d, model, data, prompts = job
    common = ["--model", model, "--data", data, "--packing", "--eval-fraction", "0.25", "--eval-every", "2",
              "--batch-size", "1", "--seq-len", "128", "--switch-every", "2", "--no-progress"]
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    assert cli.main([*common, "--steps", "6", "--out", str(whole)]) == 0
    assert cli.main([*common, "--steps", "3", "--out", str(halves)]) == 0
    # the eval cadence may change on resume; the split and the packing may not
    assert cli.main(["--resume", str(halves), "--steps", "3", "--eval-every", "2", "--no-progress"]) == 0
    a, b = _weights(whole), _weights(halves)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
    ra, rb = read_jsonl(whole / "metrics.jsonl"), read_jsonl(halves / "metrics.jsonl")
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]
    assert [(r["step"], r["eval_loss"]) for r in ra if "eval_loss" in r] == \
           [(r["step"], r["eval_loss"]) for r in rb if "eval_loss" in r and r["step"] != 3]


def _saved(path, job):
    d, model, data, _ = job
    if not (path / "checkpoint").exists():
        assert cli.main(["--model", model, "--data", data, "--packing", "--eval-fraction", "0.25", "--steps", "1",
                         "--out", str(path), *TINY]) == 0
    return path


BAD = {  # arguments (given tmp folder and the job): what the one error line must name
    "eval fraction zero": (lambda t, j: ["--eval-fraction", "0"],
                           "--eval-fraction: must be a number between 0 and 1 (exclusive), got '0'"),
    "eval fraction one and a half": (lambda t, j: ["--eval-fraction", "1.5"], "between 0 and 1"),
    "eval fraction not a number": (lambda t, j: ["--eval-fraction", "some"],
                                   "--eval-fraction: expected a number between 0 and 1"),
    "eval data and fraction": (lambda t, j: ["--eval-data", j[2], "--eval-fraction", "0.1"],
                               "give --eval-data or --eval-fraction, not both"),
    "missing eval data": (lambda t, j: ["--eval-data", t / "nope.jsonl"], "--eval-data"),
    "eval data a folder": (lambda t, j: ["--eval-data", t], "not a file"),
    "malformed eval data": (lambda t, j: ["--eval-data", write_jsonl(t / "e.jsonl", [{"q": 1}])],
                            "e.jsonl:1: no known format"),
    "negative eval every": (lambda t, j: ["--eval-every", "-2"], "--eval-every"),
    "eval every with nothing to evaluate": (lambda t, j: ["--eval-every", "5"], "--eval-every 5: nothing to evaluate"),
    "eval batch size with nothing to evaluate": (lambda t, j: ["--eval-batch-size", "8"],
                                                 "--eval-batch-size 8: no eval set to batch"),
    "zero eval batch size": (lambda t, j: ["--eval-data", j[2], "--eval-batch-size", "0"], "--eval-batch-size"),
    "missing sample prompts": (lambda t, j: ["--sample-prompts", t / "p.txt"], "--sample-prompts"),
    "empty sample prompts": (lambda t, j: ["--sample-prompts", _touch(t / "p.txt")], "no prompts"),
    "zero sample tokens": (lambda t, j: ["--sample-tokens", "0"], "--sample-tokens"),
    "fraction leaves nothing to train": (lambda t, j: ["--data", write_jsonl(t / "one.jsonl", mixed_lines(1)),
                                                       "--eval-fraction", "0.5"], "leaves none to train on"),
    "resume with another eval fraction": (lambda t, j: ["--resume", _saved(t / "run", j), "--eval-fraction", "0.5"],
                                          "--eval-fraction cannot change on --resume"),
    "resume with eval data": (lambda t, j: ["--resume", _saved(t / "run", j), "--eval-data", j[2]],
                              "--eval-data cannot change on --resume"),
}


def _touch(path):
    path.write_text("\n")
    return path


@pytest.mark.parametrize("case", list(BAD))
def test_bad_evaluation_input_gives_one_error_line(case, job, tmp_path, monkeypatch, capsys):
    make, expected = BAD[case]
    args = [str(a) for a in make(tmp_path, job)]
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    code = cli.main([*args, *([] if "--steps" in args else ["--steps", "1"]), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("badam-finetune: error:"), err
    assert expected in lines[0], lines[0]


def test_resume_may_not_change_packing(job, tmp_path):
    from badam_kernels.finetune.config import ConfigError, TrainConfig, config_for_resume

    run = _saved(tmp_path / "run", job)
    with pytest.raises(ConfigError, match="--packing cannot change on --resume"):
        config_for_resume(TrainConfig(resume=str(run), packing=False), {"packing"})


def _eval_worker(rank: int, port: int, out_dir: str) -> None:
    import datetime
    import os

    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        tok = chat_tokenizer()
        examples = _examples(tok)
        result = Evaluation(examples, "test", 0, tok.pad_token_id, 3).loss(_model(len(tok), "sdpa"), "cpu", rank, 2)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_eval_loss_over_two_ranks_equals_one_process(tmp_path, tok):
    """Each rank takes every other row of each eval batch (7 examples in batches of 3: one rank has
    a row of no loss in the last batch); the sums over the ranks give the one-process loss."""
    import torch.multiprocessing as mp

    from helpers import free_port

    mp.spawn(_eval_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    one = Evaluation(_examples(tok), "test", 0, tok.pad_token_id, 3).loss(_model(len(tok), "sdpa"), "cpu")
    for rank in range(2):
        loss, tokens = torch.load(tmp_path / f"rank{rank}.pt")
        assert tokens == one[1] and loss == pytest.approx(one[0], rel=1e-6)


# ------------------------------------------------------------------------------------ memory: the steps' and the evaluations'

class FakeCudaAllocator:
    """CUDA's one allocated-peak counter, in MiB: what PeakMemory reads and resets around an evaluation."""

    def __init__(self):
        self.allocated = self.peak = 0.0

    def hold(self, mib):  # allocate (or, negative, free) and move the peak
        self.allocated += mib
        self.peak = max(self.peak, self.allocated)

    def max_memory_allocated(self, device=None):
        return self.peak * 2**20

    def reset_peak_memory_stats(self, device=None):
        self.peak = self.allocated

    max_memory_reserved = max_memory_allocated  # an allocator that caches nothing: reserved is allocated

    def mem_get_info(self, device=None):
        return 0, 2**40


def test_peak_memory_keeps_an_evaluations_peak_out_of_the_steps(monkeypatch):
    from badam_kernels.finetune.launch import PeakMemory

    cuda = FakeCudaAllocator()
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", cuda.max_memory_allocated)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", cuda.reset_peak_memory_stats)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", cuda.max_memory_reserved)
    monkeypatch.setattr(torch.cuda, "mem_get_info", cuda.mem_get_info)
    memory = PeakMemory(torch.device("cuda"))
    cuda.hold(50)                # the weights
    cuda.hold(100), cuda.hold(-100)  # a step's gradients and activations
    assert memory.steps_mib() == 150 and memory.eval_mib is None
    with memory.evaluating():    # a wide eval batch's logits
        cuda.hold(400), cuda.hold(-400)
    assert memory.eval_mib == 450
    cuda.hold(80), cuda.hold(-80)  # a smaller step after it: the steps' peak before the evaluation stays
    assert memory.steps_mib() == 150 and memory.overall_mib() == 450
    cuda.hold(120), cuda.hold(-120)
    assert memory.steps_mib() == 170
    with memory.evaluating():    # a narrower evaluation leaves the evaluations' peak where it was
        cuda.hold(10), cuda.hold(-10)
    assert (memory.steps_mib(), memory.eval_mib, memory.overall_mib()) == (170, 450, 450)
    assert memory.held_mib()["peak_reserved_mib"] == 450  # the reserved peak is the whole run's, resets or not


def test_the_summary_gives_the_steps_and_the_evaluations_peaks(job, tmp_path):
    """On the CPU both are the process' peak resident set when read (it cannot be reset); without an evaluation,
    no evaluations' peak."""
    d, model, data, _ = job
    for name, extra in (("eval", ["--eval-fraction", "0.25", "--eval-every", "2"]), ("none", [])):
        assert cli.main(["--model", model, "--data", data, "--steps", "2", "--out", str(tmp_path / name),
                         *TINY, *extra]) == 0
    evaluated, plain = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("eval", "none"))
    assert evaluated["steps_peak_mem_mib"] > 0 and evaluated["eval_peak_mem_mib"] > 0
    assert evaluated["peak_mem_mib"] == max(evaluated["steps_peak_mem_mib"], evaluated["eval_peak_mem_mib"])
    assert plain["eval_peak_mem_mib"] is None and plain["peak_mem_mib"] == plain["steps_peak_mem_mib"] > 0


@pytest.mark.gpu
def test_on_a_gpu_a_wide_eval_batch_shows_in_the_evaluations_peak_not_the_steps(tok, tmp_path):
    """An evaluation of 64 rows a forward through the plain loss holds hundreds of MiB of logits (a 32k vocabulary);
    a training step of 2 rows, a few. A run that evaluates after every step has the steps' peak of one that
    evaluates only after its last step (whose steps' peak no evaluation can touch), give or take what a library
    allocates once and keeps from then on (cuBLAS' workspaces, tens of MiB, counted as allocated from the first
    forward that takes them; on an H100 an evaluation a row at a time showed 50 MiB of it); both runs'
    evaluations' peaks lie far above. Each run a process of its own, as the job is run: CUDA's peak counter is
    the process'."""
    import subprocess
    import sys

    model = tiny_model_folder(tmp_path / "model", tok, vocab_size=32768)
    data = write_jsonl(tmp_path / "many.jsonl", mixed_lines(256))  # 128 held out: two forwards of 64 rows
    runs = {}
    for name, every in (("at_the_end", 0), ("every_step", 1)):
        out = tmp_path / name
        done = subprocess.run([sys.executable, "-m", "badam_kernels", "--model", model, "--data", data,
                               "--eval-fraction", "0.5", "--eval-every", str(every), "--eval-batch-size", "64",
                               "--no-fused-ce", "--steps", "2", "--device", "cuda", "--out", str(out), "--seed", "0",
                               *TINY], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        summary = json.loads((out / "summary.json").read_text())
        records = read_jsonl(out / "metrics.jsonl")
        assert records[-1]["peak_mem_mib"] == summary["steps_peak_mem_mib"]  # the steps' peak, evaluations apart
        assert summary["peak_mem_mib"] == max(summary["steps_peak_mem_mib"], summary["eval_peak_mem_mib"])
        assert summary["peak_reserved_mib"] >= summary["peak_mem_mib"]  # the allocator's, over the counters' resets
        runs[name] = dict(steps=summary["steps_peak_mem_mib"], evals=summary["eval_peak_mem_mib"],
                          each_step=[r["peak_mem_mib"] for r in records])
    kept_once = 64.0  # MiB: more than the one-time workspaces, far less than the evaluation's logits
    assert runs["every_step"]["steps"] <= runs["at_the_end"]["steps"] + kept_once, runs
    assert min(run["evals"] for run in runs.values()) > runs["at_the_end"]["steps"] + 4 * kept_once, runs
