"""The job's training options: gradient accumulation, LR schedules, ``--config`` files, the speed plan
and the fused loss (CPU; the fused loss through Triton's interpreter, in a subprocess)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from badam_kernels.finetune import cli
from badam_kernels.finetune.config import ConfigError
from badam_kernels.finetune.lr import LR_SCHEDULES, build_scheduler, lr_factor
from badam_kernels.finetune.plan import (GiB, DeviceFacts, ModelShape, default_budget, estimate_peak, make_plan)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from common import LLAMA_SHAPES  # noqa: E402

TINY = ["--seq-len", "32", "--switch-every", "2", "--no-progress", "--log-every", "100"]


def run_cli(*args):
    return cli.main([str(a) for a in args])


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def weights(run):
    return load_file(str(run / "checkpoint" / "model.safetensors"))


def max_rel_diff(a, b):
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-30)).item() for k in a)


# ------------------------------------------------------------------------------------ accumulation

def _pairs(path):
    rows = [{"instruction": "say " + "a" * (i % 7), "response": "b" * (3 + 5 * (i % 4))} for i in range(24)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize("data", ["text", "pairs"])
def test_accumulation_2_x_b_equals_1_x_2b(tmp_path, data):
    extra = [] if data == "text" else ["--data", _pairs(tmp_path / "pairs.jsonl"), "--seq-len", 96]
    big, acc = tmp_path / "big", tmp_path / "acc"
    assert run_cli("--steps", 5, "--batch-size", 4, "--out", big, *TINY, *extra) == 0
    assert run_cli("--steps", 5, "--batch-size", 2, "--grad-accum", 2, "--out", acc, *TINY, *extra) == 0
    a, b = read_jsonl(big / "metrics.jsonl"), read_jsonl(acc / "metrics.jsonl")
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    assert [r["tokens"] for r in b] == [r["tokens"] for r in a]
    # --switch-every counts optimizer steps: the same blocks at the same steps
    assert [r["active_block"] for r in b] == [r["active_block"] for r in a]
    assert max_rel_diff(weights(big), weights(acc)) < 1e-5
    state = torch.load(acc / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["data_position"] == 5 * 2 * 2 and state["micro_batches"] == 10


def test_interrupted_accumulating_run_resumes_bit_exact(tmp_path, monkeypatch):
    """A run heading to 6 steps, stopped after 3 (as Ctrl-C would), resumed: the uninterrupted run's weights."""
    from badam_kernels.finetune import loop

    common = ["--batch-size", 2, "--grad-accum", 2, "--lr-schedule", "linear", "--warmup-steps", 2, *TINY]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run_cli("--steps", 6, "--out", whole, *common) == 0
    original = loop._step

    def stop_after_3(run, progress, stop):
        record, stopping = original(run, progress, stop)
        return record, stopping or record["step"] == 3

    monkeypatch.setattr(loop, "_step", stop_after_3)
    assert run_cli("--steps", 6, "--out", cut, *common) == 130
    monkeypatch.undo()
    assert run_cli("--resume", cut, "--no-progress") == 0
    a, b = weights(whole), weights(cut)
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run differs from the uninterrupted one"
    assert [r["lr"] for r in read_jsonl(cut / "metrics.jsonl")] == [r["lr"] for r in read_jsonl(whole / "metrics.jsonl")]


# ------------------------------------------------------------------------------------ LR schedules

def _torch_schedule(optimizer, kind, warmup, total):
    from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, SequentialLR

    decay = {"constant": lambda: ConstantLR(optimizer, factor=1.0, total_iters=0),
             "linear": lambda: LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=total - warmup),
             "cosine": lambda: CosineAnnealingLR(optimizer, T_max=total - warmup)}[kind]
    if not warmup:
        return decay()
    warm = LinearLR(optimizer, start_factor=1.0 / warmup, end_factor=1.0, total_iters=warmup - 1)
    return SequentialLR(optimizer, [warm, decay()], milestones=[warmup])


@pytest.mark.parametrize("kind", LR_SCHEDULES)
@pytest.mark.parametrize("warmup", [0, 3])
def test_schedules_match_torchs(kind, warmup):
    total, lr = 12, 0.5

    def lrs(make):
        param = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([param], lr=lr)
        scheduler = make(opt)
        out = []
        for _ in range(total):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            scheduler.step()
        return out

    ours = lrs(lambda opt: build_scheduler(opt, kind, warmup, total))
    theirs = lrs(lambda opt: _torch_schedule(opt, kind, warmup, total))
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12)
    assert ours == pytest.approx([lr * lr_factor(s, kind, warmup, total) for s in range(total)])
    assert ours[0] > 0  # never a step at LR 0


def test_job_follows_the_schedule_and_warmup_ratio(tmp_path):
    run = tmp_path / "run"
    assert run_cli("--steps", 8, "--batch-size", 2, "--lr", 0.01, "--lr-schedule", "linear", "--warmup-ratio", 0.25,
                   "--out", run, *TINY) == 0
    lrs = [r["lr"] for r in read_jsonl(run / "metrics.jsonl")]
    assert lrs == pytest.approx([0.01 * lr_factor(s, "linear", 2, 8) for s in range(8)])
    assert lrs[:3] == pytest.approx([0.005, 0.01, 0.01]) and lrs[-1] == pytest.approx(0.01 / 6)


# ------------------------------------------------------------------------------------ --config

def test_config_file_sets_options_and_the_command_line_overrides_it(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(textwrap.dedent("""\
        # a recipe
        steps: 3
        batch-size: 2
        --seq-len: 32
        lr: 1e-3            # YAML reads this as text: taken as the command line would
        switch_every: 2
        lr_schedule: cosine
        grad_accum: 2
        no-progress: true
        keep_activations: ALL
        grad_checkpointing: true
        active_modules: []
        """))
    run = tmp_path / "run"
    assert run_cli("--config", config, "--steps", 2, "--out", run) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["steps"] == 2 and saved["batch_size"] == 2 and saved["lr"] == 1e-3 and saved["seq_len"] == 32
    assert saved["switch_block_every"] == 2 and saved["lr_schedule"] == "cosine" and saved["grad_accum"] == 2
    assert saved["progress"] is False and saved["keep_activations"] == "all" and saved["grad_checkpointing"]
    assert len(read_jsonl(run / "metrics.jsonl")) == 2
    # the run folder's config.json is a --config: the same recipe again, the same weights
    again = tmp_path / "again"
    assert run_cli("--config", run / "config.json", "--out", again) == 0
    assert max_rel_diff(weights(run), weights(again)) == 0.0
    # and the run resumes as any other (the file's options count as given)
    assert run_cli("--resume", run, "--steps", 1, "--no-progress") == 0
    # on --resume a file's options count as given: those that may not change must be the run's
    assert run_cli("--resume", run, "--config", config, "--steps", 1) == 0
    other = tmp_path / "other.yaml"
    other.write_text("batch_size: 3\n")
    assert run_cli("--resume", run, "--config", other, "--steps", 1, "--no-progress") == 2


CONFIG_ERRORS = {  # case: (file text, what the error line must name)
    "unknown key": ("steps: 2\nfrobnicate: 3\n", "unknown option 'frobnicate'"),
    "bad value": ("lr: -1\n", "lr: --lr must be a positive number"),
    "bad text value": ("batch_size: many\n", "batch_size: expected a positive integer"),
    "bad choice": ("lr_schedule: step\n", "--lr-schedule must be one of constant, linear, cosine"),
    "not a mapping": ("- steps\n- 2\n", "expected a mapping"),
    "not YAML": ("steps: [2\n", "not valid YAML"),
    "a key twice": ("switch_every: 2\nswitch_block_every: 3\n", "a second time"),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_bad_config_file_gives_one_error_line(case, tmp_path, capsys, monkeypatch):
    text, expected = CONFIG_ERRORS[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert run_cli("--config", path, "--no-progress") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("badam-finetune: error: --config"), lines
    assert expected in lines[0], lines[0]


def _saved_run(path):
    assert run_cli("--steps", 1, "--batch-size", 2, "--out", path, *TINY) == 0
    return path


BAD_INPUTS = {  # case: (arguments given the test's tmp folder, what the error line must name)
    "zero grad-accum": (lambda d: ["--grad-accum", "0"], "--grad-accum: must be a positive integer"),
    "grad-accum not a number": (lambda d: ["--grad-accum", "two"], "--grad-accum: expected a positive integer"),
    "unknown schedule": (lambda d: ["--lr-schedule", "step"], "--lr-schedule"),
    "warmup ratio above 1": (lambda d: ["--warmup-ratio", "1.5"], "--warmup-ratio: must be a number between 0 and 1"),
    "warmup steps and ratio": (lambda d: ["--warmup-ratio", "0.1", "--warmup-steps", "3"],
                               "give --warmup-steps or --warmup-ratio, not both"),
    "unknown fast mode": (lambda d: ["--fast", "fastest"], "--fast"),
    "negative memory budget": (lambda d: ["--memory-budget", "-1"], "--memory-budget: must be a positive number"),
    "memory budget not a number": (lambda d: ["--memory-budget", "lots"], "--memory-budget: expected a positive"),
    "kept layers without checkpointing": (lambda d: ["--keep-activations", "2", "--no-grad-checkpointing"],
                                          "--keep-activations only applies with --grad-checkpointing"),
    "kept layers on the plain path": (lambda d: ["--keep-activations", "2", "--fast", "off"],
                                      "--keep-activations only applies with --grad-checkpointing"),
    "profile steps reversed": (lambda d: ["--profile-steps", "5-2"], "--profile-steps: must be two step numbers A-B"),
    "profile steps not a range": (lambda d: ["--profile-steps", "40"], "--profile-steps: must be two step numbers"),
    "profile from step 0": (lambda d: ["--profile-steps", "0-3"], "--profile-steps: must be two step numbers A-B"),
    "missing config file": (lambda d: ["--config", d / "nope.yaml"], "--config"),
    "resume with another grad-accum": (lambda d: ["--resume", _saved_run(d / "run"), "--grad-accum", "2"],
                                       "--grad-accum cannot change on --resume"),
    "resume with another schedule": (lambda d: ["--resume", _saved_run(d / "run"), "--lr-schedule", "cosine"],
                                     "--lr-schedule cannot change on --resume"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_error_line(case, tmp_path, monkeypatch, capsys):
    make_args, expected = BAD_INPUTS[case]
    args = [str(a) for a in make_args(tmp_path)]
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    code = run_cli(*args, "--steps", "1", "--no-progress")
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("badam-finetune: error:"), err
    assert expected in lines[0] and "Traceback" not in err, lines[0]


# ------------------------------------------------------------------------------------ the plan

def shape(name, **kw):
    from transformers import LlamaConfig

    return ModelShape.from_config(LlamaConfig(**LLAMA_SHAPES[name]), **kw)


H200 = DeviceFacts("cuda", free_bytes=int(139 * GiB), total_bytes=int(139.8 * GiB))


def test_plan_keeps_as_many_layers_as_fit_the_budget():
    s8 = shape("8b")
    plan = make_plan(s8, 2, 1024, H200, budget_bytes=24 * GiB)
    assert plan.fast and plan.fused_ce and plan.compile_layers and plan.grad_checkpointing
    k = plan.keep_activations
    assert isinstance(k, int) and 0 < k < 32 and plan.fits and plan.peak_gib <= 24

    def peak(keep):
        return estimate_peak(s8, 2048, fused_ce=True, compiled=True, grad_checkpointing=True,
                             keep_activations=keep)["total"]

    assert peak(k) <= 24 * GiB < peak(k + 1)  # the most that fit
    roomy = make_plan(s8, 2, 1024, H200)  # default budget: the free memory less the margin
    assert roomy.keep_activations == "all" and roomy.budget_gib == pytest.approx(default_budget(H200) / GiB, abs=0.01)
    assert default_budget(H200) == int(139 * GiB - 2 * GiB - 0.05 * 139.8 * GiB)
    tight = make_plan(s8, 2, 1024, H200, budget_bytes=16 * GiB)
    assert tight.keep_activations == 0 and not tight.fits and "exceeds the memory budget" in tight.notes[-1]
    line = plan.describe()
    assert "fused linear cross-entropy" in line and "compiled" in line and f"{k} of 32 layers" in line
    assert "expected peak" in line and "24.0 GiB budget" in line


def test_plan_without_liger_falls_back_and_keeps_fewer_layers():
    s8 = shape("8b")
    with_ce = make_plan(s8, 2, 1024, H200, budget_bytes=23 * GiB)
    without = make_plan(s8, 2, 1024, dataclass_replace(H200, fused_ce="liger-kernel is not installed"),
                        budget_bytes=23 * GiB)
    assert not without.fused_ce and without.notes == ["fused cross-entropy: liger-kernel is not installed; "
                                                       "plain cross-entropy"]
    assert without.keep_activations < with_ce.keep_activations  # the logits take what layers would have kept


def dataclass_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def test_plan_takes_every_explicit_choice():
    s1 = shape("1b")
    plan = make_plan(s1, 4, 1024, H200, budget_bytes=8 * GiB, fused_ce=False, compile_layers=False,
                     keep_activations=3)
    assert (plan.fused_ce, plan.compile_layers, plan.grad_checkpointing, plan.keep_activations) == (False, False,
                                                                                                   True, 3)
    assert set(plan.given) == {"fused_ce", "compile_layers", "keep_activations"}
    off = make_plan(s1, 4, 1024, H200, fast="off")
    assert (off.fast, off.fused_ce, off.compile_layers, off.grad_checkpointing, off.keep_activations) == \
           (False, False, False, False, 0)
    cpu = make_plan(s1, 4, 1024, DeviceFacts("cpu"))  # auto: the plain path on the CPU
    assert not cpu.fast and not cpu.compile_layers and not cpu.grad_checkpointing
    cpu_on = make_plan(s1, 4, 1024, DeviceFacts("cpu"), fast="on", fused_ce=False)  # no budget: keep everything
    assert cpu_on.compile_layers and cpu_on.grad_checkpointing and cpu_on.keep_activations == "all"
    no_ckpt = make_plan(s1, 4, 1024, H200, grad_checkpointing=False)
    assert not no_ckpt.grad_checkpointing and no_ckpt.keep_activations == 0
    with pytest.raises(ConfigError, match="--keep-activations only applies"):
        make_plan(s1, 4, 1024, H200, grad_checkpointing=False, keep_activations=2)
    sharded = make_plan(s1, 2, 1024, H200, world=2, shard=True)
    assert not sharded.fused_ce and "--shard" in sharded.notes[0]


MEASURED = {  # bench_e2e method: (fused CE, compiled, kept layers)
    "ours": (False, False, 0), "ours_fast": (False, False, "all"), "ours_fused_ce": (True, False, 0),
    "ours_fast_ce": (True, False, "all"), "ours_fast_ce8": (True, False, "all"),
    "ours_fast_ce8_compiled": (True, True, "all"), "ours_compiled": (False, True, 0),
}


@pytest.mark.parametrize("name,tokens", [("8b", 2048), ("1b", 4096)])
def test_peak_estimate_is_calibrated_on_the_measured_peaks(name, tokens):
    import glob

    s = shape(name)
    checked = 0
    for path in sorted(glob.glob(os.path.join(REPO, "benchmarks", "results", f"e2e_epoch_{name}*_h200_2026-12-01.json"))):
        for row in json.load(open(path))["rows"]:
            if row.get("status") != "ok" or row["method"] not in MEASURED:
                continue
            fused, compiled, keep = MEASURED[row["method"]]
            estimate = estimate_peak(s, tokens, fused_ce=fused, compiled=compiled,
                                     grad_checkpointing=row["checkpointing"], keep_activations=keep)["total"] / GiB
            assert estimate == pytest.approx(row["peak_mem_GiB"], rel=0.04), (path, row["method"])
            checked += 1
    assert checked >= 7


def test_model_shape_of_a_loaded_model_matches_its_config():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=3000, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    loaded, computed = ModelShape.from_model(model), ModelShape.from_config(config, dtype_bytes=4)
    assert loaded.params == computed.params == sum(p.numel() for p in model.parameters())
    assert loaded.block_params == computed.block_params == sum(p.numel() for p in model.model.layers[0].parameters())
    assert loaded.kv_dim == 32 and loaded.dtype_bytes == 4
    with_head = ModelShape.from_model(model, include_lm_head=True, include_embedding=True)
    assert with_head.block_params == 3000 * 64 + 64 == ModelShape.from_config(config, include_lm_head=True).block_params


# ------------------------------------------------------------------------------------ the job's fast path

def test_cpu_default_is_the_plain_path_and_says_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli("--steps", 1, "--batch-size", 2, "--out", run, *TINY) == 0
    captured = capsys.readouterr()
    assert "plan" not in captured.out and "note" not in captured.err
    plan = json.loads((run / "config.json").read_text())["plan"]
    assert not plan["fast"] and not plan["fused_ce"] and not plan["compile_layers"]
    assert json.loads((run / "summary.json").read_text())["plan"]["line"] == plan["line"]


def test_missing_liger_is_said_once_and_the_plain_loss_trains(tmp_path, capsys, monkeypatch):
    from badam_kernels.finetune import fast

    monkeypatch.setattr(fast, "liger_problem", lambda: "liger-kernel is not installed (pip install ...)")
    run = tmp_path / "run"
    assert run_cli("--steps", 3, "--batch-size", 2, "--fast", "on", "--no-compile", "--memory-budget", 1,
                   "--out", run, *TINY) == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if "note:" in line]
    assert notes == ["badam-finetune: note: fused cross-entropy: liger-kernel is not installed (pip install ...); "
                     "plain cross-entropy"]
    assert captured.out.count("plan (fast): plain cross-entropy, layers eager, gradient checkpointing") == 1
    plan = json.loads((run / "config.json").read_text())["plan"]
    assert plan["grad_checkpointing"] and plan["keep_activations"] == "all" and plan["budget_gib"] == 1.0
    # the plan is remade on resume; what was left to it may be given now
    assert run_cli("--resume", run, "--steps", 1, "--keep-activations", 1, "--no-progress") == 0
    assert json.loads((run / "config.json").read_text())["plan"]["keep_activations"] == 1


def test_fused_loss_equals_the_plain_loss_through_tritons_interpreter(tmp_path, capsys):
    """liger's kernels on CPU tensors: conftest sets TRITON_INTERPRET=1 before triton is imported."""
    pytest.importorskip("liger_kernel")
    from transformers import LlamaConfig, LlamaForCausalLM

    from badam_kernels.finetune.fast import fused_ce_problem, fused_loss, patch_model, plain_loss

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    assert fused_ce_problem(model, "cpu") is None
    ids = torch.randint(0, 300, (3, 20))
    labels = ids.clone()
    labels[0, :7] = -100
    labels[2, 15:] = -100
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0
    inputs = dict(input_ids=ids, attention_mask=mask)
    plain = plain_loss(model, labels, **inputs)
    plain.backward()
    g_plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    fused = fused_loss(model, labels, **inputs)
    fused.backward()
    g_fused = [p.grad.clone() for p in model.parameters()]
    assert fused.item() == pytest.approx(plain.item(), abs=1e-5)
    assert max((a - b).abs().max().item() for a, b in zip(g_plain, g_fused)) < 1e-5
    assert patch_model(model) is None  # liger's model patching: the Trainer's way in
    assert model(labels=labels, **inputs).loss.item() == pytest.approx(plain.item(), abs=1e-5)
    # the job with the fused loss follows the plain one
    plain_run, fused_run = tmp_path / "plain", tmp_path / "fused"
    assert run_cli("--steps", 3, "--batch-size", 2, "--out", plain_run, *TINY) == 0
    capsys.readouterr()
    assert run_cli("--fused-ce", "--steps", 3, "--batch-size", 2, "--out", fused_run, *TINY) == 0
    assert "note:" not in capsys.readouterr().err
    plan = json.loads((fused_run / "config.json").read_text())["plan"]
    assert plan["fused_ce"] and plan["given"] == ["fused_ce"]
    losses = [[r["loss"] for r in read_jsonl(run / "metrics.jsonl")] for run in (plain_run, fused_run)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert max_rel_diff(weights(plain_run), weights(fused_run)) < 1e-4


@pytest.fixture
def no_compile(monkeypatch):
    from badam_kernels import layers

    compiled = []
    monkeypatch.setattr(layers, "compile_layers", lambda model, layers=None: compiled.append(model))
    return compiled


def test_trainer_fast_switch_patches_compiles_and_keeps(tmp_path, no_compile, monkeypatch):
    pytest.importorskip("liger_kernel")
    from helpers import tiny_llama
    from test_integrations import Tokens, trainer_args

    from badam_kernels.integrations import hf

    from badam_kernels import truncate

    seen = {}
    original = truncate.truncate_backward

    def recording(model, **kw):
        seen.update(kw)
        return original(model, **kw)

    monkeypatch.setattr(truncate, "truncate_backward", recording)
    losses = {}
    for fast in (False, True):
        trainer = hf.BAdamTrainer(model=tiny_llama(), args=trainer_args(tmp_path / str(fast), max_steps=3),
                                  train_dataset=Tokens(), badam=hf.BAdamConfig(switch_block_every=2, fast=fast))
        trainer.train()
        losses[fast] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert getattr(trainer.model, "_badam_fused_ce") is True  # liger's patched forward took the loss
    assert no_compile == [trainer.model] and seen["keep_activations"] == "all"
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    with pytest.raises(ValueError, match="fast"):
        hf.BAdamConfig(fast="yes")


def test_trainer_fast_switch_without_liger_warns(no_compile, monkeypatch):
    from helpers import tiny_llama

    from badam_kernels.finetune import fast
    from badam_kernels.integrations import hf

    monkeypatch.setattr(fast, "liger_problem", lambda: "liger-kernel is not installed")
    model = tiny_llama()
    with pytest.warns(UserWarning, match=r"fast=True\): liger-kernel is not installed; the model keeps its plain loss"):
        hf.make_badam_optimizer(model, hf.BAdamConfig(fast=True), lr=1e-3)
    assert no_compile == [model] and not model._badam_fused_ce


# ------------------------------------------------------------------------------------ the benchmark

def test_bench_finetune_tiny_runs_on_the_cpu(tmp_path):
    env = {**os.environ, "BENCH_RESULTS_DIR": str(tmp_path),
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_finetune.py"), "--shape", "tiny",
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [json_path] = list(tmp_path.glob("finetune_tiny_*.json"))
    payload = json.loads(json_path.read_text())
    rows = {r["name"]: r for r in payload["rows"]}
    assert {"badam-finetune (defaults)", "bench_e2e fastest"} <= set(rows)
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in rows.values()), rows
    assert rows["badam-finetune (defaults)"]["plan"]["line"].startswith("plan")
    assert any("aten::mm" in line for line in rows["badam-finetune (defaults)"]["profile_ops"])
    assert list(tmp_path.glob("finetune_tiny_*.png"))


# ------------------------------------------------------------------------------------ profiling

@pytest.mark.parametrize("steps, profiled", [(5, "2-3"), (3, "2-3")], ids=["within the run", "cut by the run's end"])
def test_profile_steps_write_the_operators_and_a_trace(tmp_path, capsys, steps, profiled):
    """--profile-steps 2-3 (2-9 where the run ends at 3): torch.profiler's table of the steps' operators and
    a Chrome trace in profile/ of the run folder; the other steps run unprofiled."""
    import gzip

    asked = "2-3" if steps == 5 else "2-9"
    assert run_cli("--out", tmp_path / "run", "--steps", steps, "--profile-steps", asked, *TINY) == 0
    ops = (tmp_path / "run" / "profile" / "ops.txt").read_text()
    assert ops.startswith(f"steps {profiled}: 2 steps, wall seconds")
    assert "aten::mm" in ops and "step 2" in ops and "step 3" in ops and "step 4" not in ops, ops[:2000]
    with gzip.open(tmp_path / "run" / "profile" / "trace.json.gz", "rt") as f:
        events = json.load(f)["traceEvents"]
    assert {"step 2", "step 3"} <= {e.get("name") for e in events}
    assert f"profile of steps {profiled}" in capsys.readouterr().out


def test_profile_steps_outside_the_run_say_so(tmp_path, capsys):
    assert run_cli("--out", tmp_path / "run", "--steps", 2, "--profile-steps", "5-6", *TINY) == 0
    assert "note: --profile-steps 5-6: this run takes steps 1 to 2; nothing is profiled" in capsys.readouterr().out
    assert not (tmp_path / "run" / "profile").exists()
