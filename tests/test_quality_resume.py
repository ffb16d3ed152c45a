"""A quality study's run that passes its call's deadline pauses and goes on in the next call exactly where
it stopped: the same losses and validation curve (and, fine-tuning, generations) as the run without a pause,
for every method of the pretraining study and each kind of fine-tuning run (benchmarks/quality/, the
scripts' --quick shapes on the CPU). The pretraining study's runs pause and go on on the GPU too where the `gpu`
tests run: a pause file read back there holds its tensors, RNG states included, on the GPU. (Both studies
read their pauses with one function, ``common.resume_pause``; the fine-tuning tests make their data with
reasoning-gym, which the GPU image lacks, so they run on the CPU only.)"""
import json
import os
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path[:0] = [str(BENCHMARKS), str(BENCHMARKS / "quality")]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def quick_args(script, tmp_path_factory):
    """``script``'s (a study module's) arguments with its --quick settings, in a work folder of the test's."""
    os.environ["QUALITY_WORK"] = str(tmp_path_factory.mktemp("work"))
    try:
        a = script.parser().parse_args(["--quick"])
        script.quick_settings(a)
    finally:
        del os.environ["QUALITY_WORK"]
    return a


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """pretrain_llama with its quick settings and tokens; (module, args, train tokens, val tokens)."""
    import pretrain_llama

    a = quick_args(pretrain_llama, tmp_path_factory)
    pretrain_llama.tokenize(a)
    a.eval_every = 1  # a point on the validation curve at every step, paused or not
    return pretrain_llama, a, pretrain_llama.load_tokens("train"), pretrain_llama.load_tokens("val")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["adamw", "badam", "badam_offload", "galore", "fira", "apollo", "lowrank"])
def test_a_paused_run_goes_on_exactly_where_it_stopped(study, method, device, tmp_path, monkeypatch):
    import torch

    pl, a, train, val = study
    lr = pl.LR_GRID[method][1]
    device = torch.device(device)

    def results(work):
        return json.loads((work / "results" / f"{a.size}_{method}_lr{lr:g}.json").read_text())

    monkeypatch.setattr(pl, "WORK", tmp_path / "whole")
    pl.run_one(a, method, lr, device, train, val)
    whole = results(tmp_path / "whole")
    assert whole["status"] == "ok", whole  # (e.g. the peer's package missing: an error run, not a pause to test)

    paused = tmp_path / "paused"
    monkeypatch.setattr(pl, "WORK", paused)
    for call in range(1, a.steps):  # a deadline already past: each call takes one step, then pauses
        pl.run_one(a, method, lr, device, train, val, stop_at=0.0)
        assert not list((paused / "results").glob("*.json")), call  # no result while it is paused
        assert pl.checkpoint_path(f"{a.size}_{method}_lr{lr:g}").is_file(), call
    pl.run_one(a, method, lr, device, train, val, stop_at=0.0)
    resumed = results(paused)

    assert whole["status"] == resumed["status"] == "ok", (whole, resumed)
    assert resumed["losses"] == whole["losses"] and len(whole["losses"]) == a.steps
    assert resumed["val_loss_curve"] == whole["val_loss_curve"] and len(whole["val_loss_curve"]) == a.steps + 1
    assert (whole["calls"], resumed["calls"]) == (1, a.steps)
    assert not pl.checkpoint_path(f"{a.size}_{method}_lr{lr:g}").exists()  # a finished run leaves none


def test_the_next_call_takes_up_the_paused_runs_first(study, tmp_path, monkeypatch):
    import torch

    pl, a, train, val = study
    monkeypatch.setattr(pl, "WORK", tmp_path)
    monkeypatch.setattr(a, "methods", list(pl.METHODS))
    lr = float(dict(x.split("=") for x in a.lr)["fira"])
    assert pl.pending(a)[0] != ("fira", lr)  # the sweep's own order
    pl.run_one(a, "fira", lr, torch.device("cpu"), train, val, stop_at=0.0)
    assert pl.pending(a)[0] == ("fira", lr) and len(pl.pending(a)) == len(pl.METHODS)


# ----------------------------------------------------------------------------------- fine-tuning (finetune_rg.py)
@pytest.fixture(scope="module")
def finetune(tmp_path_factory):
    """finetune_rg with its quick settings, data and tiny model; (module, args)."""
    import finetune_rg

    a = quick_args(finetune_rg, tmp_path_factory)
    a.stop_at = None
    finetune_rg.make_data(a)
    finetune_rg.make_model(a)
    return finetune_rg, a


def finetune_run(ft, a, method, results, stop_at):
    """One run of ``method`` into the folder ``results``, in calls until its JSON is there; (JSON, calls)."""
    import torch

    a.results = results
    lr = ft.LR_GRID[method][1]
    out = results / f"{ft.run_name(method, lr, 0)}.json"
    for call in range(1, 20):
        ft.run_one(a, method, lr, 0, torch.device("cpu"), stop_at)
        if out.is_file():
            return json.loads(out.read_text()), call
    raise AssertionError(f"{method} did not finish in 19 calls")


@pytest.mark.parametrize("method", ["badam_offload", "adamw", "lora", "galore", "apollo"])  # offload: parked states too
def test_a_paused_finetuning_run_goes_on_exactly_where_it_stopped(finetune, method, tmp_path):
    """Past the deadline every method pauses after one step a call (peers in this process, BAdam as
    badam-finetune's --time-limit 0); the losses, the validation curve and the generations are the whole run's."""
    ft, a = finetune
    whole, calls = finetune_run(ft, a, method, tmp_path / "whole", None)
    assert calls == 1 and whole["status"] == "ok" and whole["calls"] == 1, whole
    paused, calls = finetune_run(ft, a, method, tmp_path / "paused", 0.0)
    assert paused["status"] == "ok", paused
    assert paused["calls"] == calls == a.steps
    for key in ("losses", "val_loss_curve", "test_answers", "val_answers"):
        assert paused[key] == whole[key], key
    folder = ft.run_folder(a, ft.run_name(method, ft.LR_GRID[method][1], 0))  # (a.results: the paused run's)
    if method.startswith("badam"):  # the job's command is the first call's, not the --resume
        assert paused["info"]["command"].replace("/paused/", "/") == whole["info"]["command"].replace("/whole/", "/")
        assert not (folder / "checkpoint").exists()  # the model went to the generations; the metrics stay
    else:
        assert not folder.exists()  # the paused state is gone with the run's end


def test_badam_official_cannot_pause_and_runs_through(finetune, tmp_path):
    ft, a = finetune
    result, calls = finetune_run(ft, a, "badam_official", tmp_path / "official", 0.0)
    assert result["status"] == "ok" and calls == result["calls"] == 1
