"""A pretraining run that passes its call's deadline pauses (a checkpoint) and goes on in the next call
exactly where it stopped: the same losses and validation curve as the same run without a pause, for
every method of the study (benchmarks/quality/pretrain_llama.py, its --quick shapes on the CPU)."""
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path[:0] = [str(BENCHMARKS), str(BENCHMARKS / "quality")]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """pretrain_llama with its quick settings and tokens; (module, args, train tokens, val tokens)."""
    import os

    import pretrain_llama

    os.environ["QUALITY_WORK"] = str(tmp_path_factory.mktemp("work"))
    try:
        a = pretrain_llama.parser().parse_args(["--quick"])
        pretrain_llama.quick_settings(a)
        pretrain_llama.tokenize(a)
    finally:
        del os.environ["QUALITY_WORK"]
    a.eval_every = 1  # a point on the validation curve at every step, paused or not
    return pretrain_llama, a, pretrain_llama.load_tokens("train"), pretrain_llama.load_tokens("val")


@pytest.mark.parametrize("method", ["adamw", "badam", "badam_offload", "galore", "fira", "apollo", "lowrank"])
def test_a_paused_run_goes_on_exactly_where_it_stopped(study, method, tmp_path, monkeypatch):
    import torch

    pl, a, train, val = study
    lr = pl.LR_GRID[method][1]
    cpu = torch.device("cpu")

    def results(work):
        return json.loads((work / "results" / f"{a.size}_{method}_lr{lr:g}.json").read_text())

    monkeypatch.setattr(pl, "WORK", tmp_path / "whole")
    pl.run_one(a, method, lr, cpu, train, val)
    whole = results(tmp_path / "whole")

    paused = tmp_path / "paused"
    monkeypatch.setattr(pl, "WORK", paused)
    for call in range(1, a.steps):  # a deadline already past: each call takes one step, then pauses
        pl.run_one(a, method, lr, cpu, train, val, stop_at=0.0)
        assert not list((paused / "results").glob("*.json")), call  # no result while it is paused
        assert pl.checkpoint_path(f"{a.size}_{method}_lr{lr:g}").is_file(), call
    pl.run_one(a, method, lr, cpu, train, val, stop_at=0.0)
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
