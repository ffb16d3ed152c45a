"""The ``badam-finetune`` job: the default run, exact resume, the data paths and clean errors.

The CLI is called in-process (``cli.main`` returns the exit status) on tiny settings; one test runs
``python -m badam_kernels --help`` in a subprocess, and the torchrun tests run 2 CPU processes (gloo).
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from badam_kernels.finetune import cli
from badam_kernels.finetune.data import IGNORE_INDEX, ByteTokenizer, encode_pair

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--seq-len", "32", "--batch-size", "4", "--switch-every", "2", "--no-progress", "--log-every", "100"]
TEXT = ("Full fathom five thy father lies;\nOf his bones are coral made;\n"
        "Those are pearls that were his eyes:\nNothing of him that doth fade\n\n") * 20


def run_cli(*args):
    return cli.main([str(a) for a in args])


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def tiny_llama_folder(path, vocab_size=256, layers=2, tokenizer=None):
    """A randomly initialised Llama saved with save_pretrained (and a tokenizer, if given)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return str(path)


def offline_tokenizer():
    """A small word-level Hugging Face tokenizer built here, from the test text (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>", "<pad>"])
    tok.train_from_iterator([TEXT, "Instruction Response name a sea creature what is coral tell me"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


def assert_run_folder(run, steps):
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for r in records:
        assert {"step", "loss", "lr", "tokens_per_s", "active_block", "grad_norm", "peak_mem_mib"} <= set(r)
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and r["peak_mem_mib"] > 0
    with open(run / "loss.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    for name in ("model.safetensors", "optimizer.pt", "trainer_state.pt", "config.json"):
        assert (run / "checkpoint" / name).is_file()
    return records


def test_default_job_writes_metrics_plot_and_checkpoint(tmp_path):
    run = tmp_path / "run"
    assert run_cli("--steps", 6, "--out", run, *TINY) == 0
    records = assert_run_folder(run, 6)
    assert len({r["active_block"] for r in records}) >= 3  # the blocks took turns
    summary = json.loads((run / "summary.json").read_text())
    held = summary["memory_bytes"]
    assert set(held) == {"weights", "master", "moments", "grads", "host_parked"} and held["weights"] > 0
    assert summary["step"] == 6 and not summary["interrupted"]
    assert summary["peak_reserved_mib"] is None and summary["device_used_mib"] is None  # GPU figures only
    # the checkpoint is a Hugging Face model folder: it can be fine-tuned further with --model
    assert run_cli("--model", run / "checkpoint", "--steps", 2, "--out", tmp_path / "again", *TINY) == 0


@pytest.mark.gpu
def test_gpu_summary_says_what_the_card_holds(tmp_path):
    run = tmp_path / "run"
    assert run_cli("--steps", 2, "--out", run, "--device", "cuda", *TINY) == 0
    summary = json.loads((run / "summary.json").read_text())
    # reserved covers allocated; the device's use adds the CUDA context to what the allocator keeps
    assert summary["peak_reserved_mib"] >= summary["peak_mem_mib"] > 0
    assert summary["device_used_mib"] > 0


def test_resume_mid_run_is_exact(tmp_path):
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    assert run_cli("--steps", 8, "--out", whole, "--warmup-steps", 5, *TINY) == 0
    assert run_cli("--steps", 4, "--out", halves, "--warmup-steps", 5, *TINY) == 0
    assert run_cli("--resume", halves, "--steps", 4, "--no-progress") == 0
    a = load_file(str(whole / "checkpoint" / "model.safetensors"))
    b = load_file(str(halves / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    assert [r["loss"] for r in read_jsonl(whole / "metrics.jsonl")] == \
           [r["loss"] for r in read_jsonl(halves / "metrics.jsonl")]


def test_jsonl_pairs_with_a_local_model_and_its_tokenizer(tmp_path):
    tok = offline_tokenizer()
    model = tiny_llama_folder(tmp_path / "model", vocab_size=len(tok), tokenizer=tok)
    data = tmp_path / "pairs.jsonl"
    lines = [{"instruction": "name a sea creature", "response": "coral"},
             {"prompt": "what is coral", "completion": "bones made of pearls"},
             {"instruction": "tell me", "input": "Full fathom five", "response": "thy father lies"}]
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    run = tmp_path / "run"
    assert run_cli("--model", model, "--data", data, "--steps", 3, "--out", run, *TINY) == 0
    assert_run_folder(run, 3)
    assert (run / "checkpoint" / "tokenizer.json").is_file()


def test_text_data_with_a_model_folder_without_tokenizer_uses_bytes(tmp_path):
    model = tiny_llama_folder(tmp_path / "model", vocab_size=256)
    data = tmp_path / "tempest.txt"
    data.write_text(TEXT)
    run = tmp_path / "run"
    assert run_cli("--model", model, "--data", data, "--out", run, *TINY) == 0
    records = assert_run_folder(run, len(TEXT.encode()) // 32 // 4 - 1 + 1)  # default: one pass
    assert records[-1]["tokens"] == 4 * 32


def test_loss_is_on_response_tokens_only():
    ids, labels = encode_pair(ByteTokenizer(), "Say hi", "hi", seq_len=1000)
    assert len(ids) == len(labels)
    trained = [t for t in labels if t != IGNORE_INDEX]
    assert bytes(trained[:-1]) == b"hi" and trained[-1] == ByteTokenizer.eos_token_id
    assert labels[:len(ids) - 3] == [IGNORE_INDEX] * (len(ids) - 3)


def test_checkpoint_config_keeps_the_models_use_cache(tmp_path):
    """Training runs without the KV cache; the saved model must generate with it, as it came."""
    from transformers import AutoConfig

    model = tiny_llama_folder(tmp_path / "model")
    run = tmp_path / "run"
    assert run_cli("--model", model, "--steps", 1, "--out", run, *TINY) == 0
    as_loaded = AutoConfig.from_pretrained(model).use_cache
    assert AutoConfig.from_pretrained(run / "checkpoint").use_cache == as_loaded


def test_seq_len_beyond_the_models_positions_warns_once(tmp_path, capsys):
    model = tiny_llama_folder(tmp_path / "model")  # max_position_embeddings 128
    data = _write(tmp_path / "tempest.txt", TEXT)
    assert run_cli("--model", model, "--data", data, "--seq-len", 160, "--batch-size", 2, "--steps", 2,
                   "--log-every", 1, "--out", tmp_path / "run", "--no-progress") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "max_position_embeddings" in line]
    assert len(warnings) == 1, warnings
    assert "--seq-len 160" in warnings[0] and "128" in warnings[0]


@pytest.mark.parametrize("out", ["", "notes.txt/run"])
def test_unusable_out_is_refused_before_the_model_loads(out, tmp_path, monkeypatch, capsys):
    from badam_kernels.finetune import loop as train_module

    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "notes.txt", "x")
    monkeypatch.setattr(train_module, "load_model", lambda *a: pytest.fail("the model loaded before --out was checked"))
    capsys.readouterr()
    assert run_cli("--out", out, "--steps", 1, "--no-progress") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("badam-finetune: error: --out"), lines


def test_metrics_reach_the_disk_every_step(tmp_path, monkeypatch):
    """Each step's line is on disk before the next step starts, whatever --log-every (100 in TINY)."""
    from badam_kernels.finetune.data import TextBatches

    run = tmp_path / "run"
    on_disk = []
    original = TextBatches.batch

    def batch(self, step):  # called at the start of each step
        on_disk.append(len(read_jsonl(run / "metrics.jsonl")))
        return original(self, step)

    monkeypatch.setattr(TextBatches, "batch", batch)
    assert run_cli("--steps", 3, "--out", run, *TINY) == 0
    assert on_disk == [0, 1, 2]
    assert_run_folder(run, 3)  # and the plot is drawn from it as before


def test_info_says_triton_runs_on_the_cpu_only_through_its_interpreter(tmp_path, monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("about a machine without CUDA")
    pytest.importorskip("triton")
    from badam_kernels import ops

    ops.load_backend("triton")  # imported under conftest's TRITON_INTERPRET=1: it can interpret
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert run_cli("--backend", "triton", "--steps", 1, "--no-progress") == 2  # refused on this machine
    capsys.readouterr()
    assert run_cli("info") == 0
    triton_line = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("triton:")]
    assert len(triton_line) == 1 and "refused" in triton_line[0] and "TRITON_INTERPRET=1" in triton_line[0]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert run_cli("info") == 0
    triton_line = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("triton:")]
    assert "interpreter" in triton_line[0] and "refused" not in triton_line[0]


def test_loss_plot_title_fits_a_long_model_path(tmp_path, monkeypatch):
    import matplotlib.figure

    from badam_kernels.finetune.plots import plot_loss

    drawn = []  # (title as drawn, its box, the figure's box) when the figure is saved
    savefig = matplotlib.figure.Figure.savefig

    def measured(fig, *args, **kwargs):
        savefig(fig, *args, **kwargs)
        title = fig.axes[0].title
        drawn.append((title.get_text(), title.get_window_extent(fig.canvas.get_renderer()), fig.bbox))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", measured)
    path = "/home/someone/models/" + "/".join(["checkpoints-of-a-long-fine-tuning-campaign"] * 4)
    title = f"badam-finetune: LlamaForCausalLM from {path}, switch every 50 steps"
    records = [{"step": s, "loss": 5.0 - s / 10, "active_block": s // 4} for s in range(1, 12)]
    plot_loss(records, str(tmp_path / "loss.png"), title=title)
    text, box, figure = drawn[0]
    assert 0 <= box.x0 and box.x1 <= figure.x1 and box.y1 <= figure.y1, (box, figure)
    assert "".join(title.split()) in "".join(text.split())  # wrapped, not cut


def test_resume_finds_checkpoint_old_after_a_kill_between_the_renames(tmp_path, monkeypatch):
    import shutil

    run = tmp_path / "run"
    assert run_cli("--steps", 1, "--out", run, *TINY) == 0
    shutil.copytree(run / "checkpoint", tmp_path / "step1")
    assert run_cli("--resume", run, "--steps", 1, "--no-progress") == 0
    step2 = weights(run)
    # as a save of step 2 leaves it when killed between its two renames: the step-1 checkpoint moved
    # aside to checkpoint.old, step 2 complete in checkpoint.tmp, no checkpoint/
    os.replace(run / "checkpoint", run / "checkpoint.tmp")
    os.replace(tmp_path / "step1", run / "checkpoint.old")

    def killed(src, dst, replace=os.replace):  # this time the kill lands after the first rename
        if str(src).endswith("checkpoint.tmp"):
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    assert run_cli("--resume", run, "--steps", 1, "--no-progress") == 130
    monkeypatch.undo()
    assert (run / "checkpoint.old" / "model.safetensors").is_file()  # never a moment without a checkpoint
    assert run_cli("--resume", run, "--steps", 1, "--no-progress") == 0
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]
    assert max_rel_diff(step2, weights(run)) == 0.0  # resumed from step 1 exactly
    assert not (run / "checkpoint.old").exists() and not (run / "checkpoint.tmp").exists()


def test_run_folder_of_version_0_1_0_resumes(tmp_path):
    """Its config.json spells switch_block_every and compile_layers as switch_every and compile."""
    run = tmp_path / "run"
    assert run_cli("--steps", 1, "--out", run, *TINY) == 0
    saved = json.loads((run / "config.json").read_text())
    saved["switch_every"], saved["compile"] = saved.pop("switch_block_every"), saved.pop("compile_layers")
    (run / "config.json").write_text(json.dumps(saved))
    assert run_cli("--resume", run, "--steps", 1, "--no-progress") == 0
    assert json.loads((run / "config.json").read_text())["switch_block_every"] == 2
    assert run_cli("--resume", run, "--steps", 1, "--switch-every", 3, "--no-progress") == 2  # still the run's


def test_command_line_is_generated_from_the_declared_options():
    import dataclasses

    from badam_kernels.finetune.config import RESUME_MAY_CHANGE, TrainConfig
    from badam_kernels.options import BAdamOptions, declared, flag_of

    parser = cli.build_parser()
    flags = {s for action in parser._actions for s in action.option_strings}
    assert {flag_of(f) for f in declared(TrainConfig)} <= flags
    assert {"--switch-every", "--compile", "--no-progress", "--no-include-embedding"} <= flags
    badam = {f.name: f for f in dataclasses.fields(BAdamOptions)}
    for field in declared(TrainConfig):  # the BAdam fields are BAdamOptions' declarations
        if field.name in badam and field.name not in ("max_grad_norm", "seed"):
            assert field.metadata["check"] is badam[field.name].metadata["check"], field.name
            assert field.metadata["help"] == badam[field.name].metadata["help"], field.name
    assert set(RESUME_MAY_CHANGE) == {"steps", "out", "resume", "log_every", "save_every", "backend", "progress",
                                      "device", "keep_activations", "keep_mode", "compile_layers",
                                      # speed and evaluation knobs added since (issue 17): they change no math
                                      "config", "fast", "memory_budget", "fused_ce", "grad_checkpointing",
                                      "eval_every", "eval_batch_size",
                                      # what is profiled changes no math either, nor where the process stops
                                      "profile_steps", "time_limit"}


def _write(path, text):
    path.write_text(text)
    return path


def _finished_run(path):
    path.mkdir()
    (path / "metrics.jsonl").write_text("")
    return path


def _saved_run(path):
    assert run_cli("--steps", 2, "--out", path, *TINY) == 0
    return path


BAD_INPUTS = {  # case: (arguments given the test's tmp folder, what the error line must name)
    "missing data file": (lambda d: ["--data", d / "nope.jsonl"], "not found"),
    "malformed JSONL line": (lambda d: ["--data", _write(d / "bad.jsonl", '{"instruction": "a", "response": "b"}\n'
                                                          '{"instruction": "a", "response": \n')], "bad.jsonl:2:"),
    "JSONL line with unknown keys": (lambda d: ["--data", _write(d / "keys.jsonl", '{"prompt": "a", "completion": "b"}'
                                                                  '\n\n{"question": "a", "answer": "b"}\n')],
                                     "keys.jsonl:3:"),
    "unknown option": (lambda d: ["--frobnicate", "3"], "--frobnicate"),
    "missing model": (lambda d: ["--model", d / "no-model"], "model not found"),
    "model without a layer stack": (lambda d: ["--model", tiny_llama_folder(d / "one", layers=1)], "layer stack"),
    "zero steps": (lambda d: ["--steps", "0"], "--steps"),
    "negative lr": (lambda d: ["--lr", "-1e-3"], "--lr"),
    "zero batch size": (lambda d: ["--batch-size", "0"], "--batch-size"),
    "not a number": (lambda d: ["--seq-len", "many"], "--seq-len"),
    "unknown switch mode": (lambda d: ["--switch-mode", "sideways"], "--switch-mode"),
    "resume from a non-run folder": (lambda d: ["--resume", d], "--resume"),
    "out holds a run": (lambda d: ["--out", _finished_run(d / "finished")], "already holds a run"),
    "resume with another batch size": (lambda d: ["--resume", _saved_run(d / "run"), "--batch-size", "3"],
                                       "--batch-size cannot change"),
    "resume an unsharded run sharded": (lambda d: ["--resume", _saved_run(d / "run"), "--shard"],
                                        "--shard cannot change"),
    "keep-activations not a number": (lambda d: ["--keep-activations", "some"],
                                      "argument --keep-activations: expected a non-negative integer or 'all'"),
    "negative keep-activations": (lambda d: ["--keep-activations", "-1"], "or 'all', got '-1'"),
    "keep-activations without checkpointing": (lambda d: ["--keep-activations", "2"],
                                               "--keep-activations only applies with --grad-checkpointing"),
    "seq-len of one token leaves no target": (lambda d: ["--seq-len", "1"], "--seq-len must be at least 2"),
    "out below a file": (lambda d: ["--out", _write(d / "notes.txt", "x") / "run"], "notes.txt is not a folder"),
    "empty out": (lambda d: ["--out", ""], "--out is empty"),
    "resume the embedded model with another": (lambda d: ["--resume", _saved_run(d / "run"),
                                                           "--model", tiny_llama_folder(d / "model")],
                                               "the run used the embedded tiny Llama"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_error_line(case, tmp_path, monkeypatch, capsys):
    make_args, expected = BAD_INPUTS[case]
    args = [str(a) for a in make_args(tmp_path)]
    capsys.readouterr()  # only what the CLI writes counts
    monkeypatch.chdir(tmp_path)  # should a case not fail, its run folder lands here
    code = run_cli(*args, *([] if "--steps" in args else ["--steps", "1"]), "--no-progress")
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("badam-finetune: error:"), err
    assert expected in lines[0] and "Traceback" not in err


def test_info_reports_versions_and_backends(capsys):
    assert run_cli("info") == 0
    out = capsys.readouterr().out
    assert "badam-kernels" in out and "torch" in out and "triton" in out and "reference" in out


def test_module_entry_point_prints_help():
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "badam_kernels", "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage: badam-finetune" in proc.stdout and "--resume" in proc.stdout


TORCH_ENV = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}


def torchrun(*args, nproc=2):
    """``torchrun --nproc-per-node 2 -m badam_kernels ARGS`` on the CPU; returns the finished process."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), "-m", "badam_kernels", *map(str, args)],
                          capture_output=True, text=True, env=TORCH_ENV, timeout=300)
    reasons = [line for line in proc.stderr.splitlines() if "rror" in line or "terminate" in line or "what()" in line]
    assert proc.returncode == 0, "\n".join(reasons[:20]) + "\n" + proc.stderr[-1500:]
    return proc


def test_torchrun_two_processes_train_data_parallel(tmp_path):
    """`torchrun --nproc-per-node 2 -m badam_kernels`: each rank a half of every batch, rank 0 writes."""
    common = ["--steps", "3", "--batch-size", "4", "--seq-len", "32", "--switch-every", "2", "--no-progress"]
    single = subprocess.run([sys.executable, "-m", "badam_kernels", "--out", str(tmp_path / "one"), *common],
                            capture_output=True, text=True, env=TORCH_ENV, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    two = torchrun("--out", tmp_path / "two", *common)
    assert "2 processes" in two.stdout and two.stdout.count("badam-finetune 0.1.0") == 1  # rank 0 alone reports
    one_rows = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two_rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two_rows] == [1, 2, 3]
    # before any update the loss of the global batch is the mean of the two halves' losses
    assert abs(two_rows[0]["loss"] - one_rows[0]["loss"]) <= 1e-5 * one_rows[0]["loss"]
    assert (tmp_path / "two" / "checkpoint" / "model.safetensors").is_file()


# offload: the DCP checkpoint holds parked blocks too; checkpointing with the top layer kept: truncation
# installed after shard_model
SHARDED = [*TINY, "--state-policy", "offload", "--grad-checkpointing", "--keep-activations", "1"]


def max_rel_diff(a, b):
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).norm() / a[k].norm()).item() for k in a)


def weights(run):
    return load_file(str(run / "checkpoint" / "model.safetensors"))


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    """2 sharded ranks: 2 steps (checkpointed after each), and 4 steps uninterrupted."""
    out = tmp_path_factory.mktemp("sharded")
    half = torchrun("--shard", "--steps", 2, "--save-every", 1, "--out", out / "half", *SHARDED)
    torchrun("--shard", "--steps", 4, "--out", out / "whole", *SHARDED)
    return out, half.stdout


def test_torchrun_sharded_equals_one_unsharded_process(sharded_runs, tmp_path):
    """FSDP2 over 2 ranks, each half of every batch, follows the one-process run on the whole batches."""
    out, stdout = sharded_runs
    half = out / "half"
    assert "2 processes, sharded (FSDP2)" in stdout and stdout.count("badam-finetune 0.1.0") == 1
    assert run_cli("--steps", 2, "--out", tmp_path / "one", *SHARDED) == 0
    one_rows, two_rows = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(half / "metrics.jsonl")
    assert [r["step"] for r in two_rows] == [1, 2]
    assert abs(two_rows[0]["loss"] - one_rows[0]["loss"]) <= 1e-5 * one_rows[0]["loss"]
    assert max_rel_diff(weights(tmp_path / "one"), weights(half)) <= 1e-5  # same names: full tensors, untied
    ckpt = half / "checkpoint"
    assert (ckpt / "optimizer_dcp" / ".metadata").is_file() and not (ckpt / "optimizer.pt").exists()
    summary, config = (json.loads((half / name).read_text()) for name in ("summary.json", "config.json"))
    assert summary["shard"] and summary["world_size"] == 2
    assert config["shard"] and config["world_size"] == 2 and config["keep_activations"] == 1


@pytest.mark.slow
def test_torchrun_sharded_with_compiled_layers_follows_the_eager_run(sharded_runs, tmp_path):
    """--compile under FSDP2 (each layer compiled inside its fully_shard wrapper) on 2 ranks."""
    out, _ = sharded_runs
    torchrun("--shard", "--compile", "--steps", 4, "--out", tmp_path / "compiled", *SHARDED)
    eager_rows = read_jsonl(out / "whole" / "metrics.jsonl")
    compiled_rows = read_jsonl(tmp_path / "compiled" / "metrics.jsonl")
    assert [r["loss"] for r in compiled_rows] == pytest.approx([r["loss"] for r in eager_rows], rel=1e-4)
    assert max_rel_diff(weights(out / "whole"), weights(tmp_path / "compiled")) < 1e-3


def test_sharded_checkpoint_of_two_ranks_resumes_on_one_process(sharded_runs, tmp_path):
    """Saved on 2 ranks, resumed on 1 (sharded over a mesh of one): ends where the 2-rank run ended."""
    out, _ = sharded_runs
    resumed = tmp_path / "resumed"
    assert run_cli("--resume", out / "half", "--shard", "--steps", 2, "--out", resumed, "--no-progress") == 0
    assert max_rel_diff(weights(out / "whole"), weights(resumed)) <= 1e-5
    assert max_rel_diff(weights(out / "whole"), weights(out / "half")) > 1e-3  # the resumed steps did train
    rows, whole_rows = read_jsonl(resumed / "metrics.jsonl"), read_jsonl(out / "whole" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["active_block"] for r in rows] == [r["active_block"] for r in whole_rows]
    assert rows[3]["loss"] == pytest.approx(whole_rows[3]["loss"], rel=1e-5)
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["shard"] and summary["world_size"] == 1 and summary["start_step"] == 2


def test_sharded_tied_model_saves_one_copy_and_resumes(tmp_path):
    """A world of one without torchrun; the tied lm_head is written once, as an unsharded run writes it."""
    model = tiny_llama_folder(tmp_path / "model")
    plain, sharded = tmp_path / "plain", tmp_path / "sharded"
    assert run_cli("--model", model, "--steps", 2, "--out", plain, *TINY) == 0
    assert run_cli("--model", model, "--shard", "--steps", 2, "--out", sharded, *TINY) == 0
    assert "lm_head.weight" not in weights(sharded)
    assert max_rel_diff(weights(plain), weights(sharded)) == 0.0  # a mesh of one: the same arithmetic
    assert run_cli("--resume", sharded, "--steps", 1, "--no-progress") == 0  # sharded again: the saved run's
    assert json.loads((sharded / "summary.json").read_text())["shard"]


def test_keep_activations_is_passed_recorded_and_may_change_on_resume(tmp_path, monkeypatch):
    from badam_kernels import truncate

    seen = []
    original = truncate.truncate_backward

    def recording(model, **kwargs):
        seen.append((kwargs.get("keep_activations"), kwargs.get("keep_mode")))
        return original(model, **kwargs)

    monkeypatch.setattr(truncate, "truncate_backward", recording)
    run = tmp_path / "run"
    assert run_cli("--steps", 1, "--grad-checkpointing", "--keep-activations", 2, "--out", run, *TINY) == 0
    assert json.loads((run / "config.json").read_text())["keep_activations"] == 2
    assert run_cli("--resume", run, "--steps", 1, "--keep-activations", "ALL", "--keep-mode", "matmuls",
                   "--no-progress") == 0
    assert json.loads((run / "config.json").read_text())["keep_activations"] == "all"
    assert seen == [(2, "all"), ("all", "matmuls")]


@pytest.mark.slow
def test_compile_trains_like_eager_and_is_recorded(tmp_path):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    common = ("--steps", 4, *TINY)
    assert run_cli(*common, "--out", eager) == 0
    assert run_cli(*common, "--compile", "--out", compiled) == 0
    assert json.loads((compiled / "config.json").read_text())["compile_layers"] is True
    # inductor reorders fp32 reductions: equal to rounding, not to the bit
    losses = [[row["loss"] for row in read_jsonl(run / "metrics.jsonl")] for run in (eager, compiled)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    assert max_rel_diff(weights(eager), weights(compiled)) < 1e-3


def _stop_agreement_worker(rank: int, port: int, out_dir: str) -> None:
    import datetime

    import torch.distributed as dist

    from badam_kernels.finetune.launch import agree_over_ranks

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        # only rank 1 was interrupted (Ctrl-C reached it a step earlier): both must stop now
        results = [agree_over_ranks(torch.tensor(float(rank + 1)), stop, 2) for stop in (False, rank == 1)]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ranks_agree_to_stop_after_the_same_step(tmp_path):
    import torch.multiprocessing as mp

    from helpers import free_port

    mp.spawn(_stop_agreement_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt") == [(1.5, False), (1.5, True)]


def test_time_limit_stops_after_the_step_saves_and_is_not_kept_on_resume(tmp_path):
    """--time-limit 0: the clock is past it after the first step, so the job stops there, saves and exits 130;
    a --resume without the limit (it is the process', not the run's) trains to the end, and the weights are
    an uninterrupted run's."""
    import torch

    whole, parted = tmp_path / "whole", tmp_path / "parted"
    assert run_cli("--steps", 3, "--out", whole, *TINY) == 0
    assert run_cli("--steps", 3, "--out", parted, "--time-limit", 0, *TINY) == 130
    summary = json.loads((parted / "summary.json").read_text())
    assert summary["interrupted"] and summary["step"] == 1 == len(read_jsonl(parted / "metrics.jsonl"))
    assert summary["stopped_by"] == "time limit"
    assert run_cli("--resume", parted, "--time-limit", 0, "--no-progress") == 130
    assert len(read_jsonl(parted / "metrics.jsonl")) == 2
    assert run_cli("--resume", parted, "--no-progress") == 0
    assert json.loads((parted / "summary.json").read_text())["stopped_by"] is None
    assert [r["loss"] for r in read_jsonl(parted / "metrics.jsonl")] == [r["loss"] for r in
                                                                         read_jsonl(whole / "metrics.jsonl")]
    a, b = (load_file(str(run / "checkpoint" / "model.safetensors")) for run in (whole, parted))
    assert all(torch.equal(a[k], b[k]) for k in a), "the run stopped by its time limit differs"


def test_time_limit_must_not_be_negative(tmp_path, capsys):
    assert run_cli("--steps", 1, "--out", tmp_path / "run", "--time-limit", -1, *TINY) == 2
    assert "--time-limit" in capsys.readouterr().err


def test_stop_flag_says_what_asked_for_the_stop():
    """A signal wins over the clock; with neither, the request came from another rank (the agreement)."""
    import signal
    import time

    from badam_kernels.finetune.launch import StopFlag

    running, late = StopFlag(), StopFlag(deadline=time.monotonic() - 1.0)
    assert not running.requested and running.reason == "another rank"
    assert late.requested and late.reason == "time limit"
    assert not StopFlag(deadline=time.monotonic() + 3600).requested
    late._handle(signal.SIGTERM, None)
    assert late.requested and late.reason == "signal"


def test_sigterm_stops_after_the_step_and_saves_a_checkpoint_to_resume_from(tmp_path):
    """What a batch scheduler or a preempted machine sends: the job stops after the current step, saves, and
    says so (exit status 130, ``interrupted``); ``--resume`` goes on from that step."""
    import signal
    import time

    run = tmp_path / "run"
    job = subprocess.Popen([sys.executable, "-m", "badam_kernels", "--steps", "100000", "--out", str(run), *TINY],
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = run / "metrics.jsonl", time.time() + 240
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and job.poll() is None:
        assert time.time() < deadline, "the job wrote no steps in 240 s"
        time.sleep(0.2)
    job.send_signal(signal.SIGTERM)
    out, err = job.communicate(timeout=240)
    assert job.returncode == 130, err[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    steps = len(read_jsonl(metrics))
    assert summary["interrupted"] and summary["step"] == steps < 100000 and summary["stopped_by"] == "signal"
    saved = torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert saved["step"] == steps and f"--resume {run}" in out + err
    assert run_cli("--resume", run, "--steps", 1, "--no-progress") == 0
    assert read_jsonl(metrics)[-1]["step"] == steps + 1
