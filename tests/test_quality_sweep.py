"""The quality studies' learning-rate sweeps step past a grid edge that is best (benchmarks/common.sweep_lrs),
and finetune_rg.py schedules those steps, then the seeds at the chosen lr."""
import json
import os
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
sys.path.insert(0, str(BENCHMARKS / "quality"))
from common import device_record, machine_id, machines_note, result_path, runs_device, sweep_lrs, to_time  # noqa: E402


@pytest.mark.parametrize("scores,expected", [
    ({}, [1e-5, 3e-5, 1e-4]),                                          # nothing done: the grid
    ({1e-5: 1, 3e-5: 2}, [1e-5, 3e-5, 1e-4]),                           # the grid not done yet
    ({1e-5: 1, 3e-5: 3, 1e-4: 2}, [1e-5, 3e-5, 1e-4]),                  # best inside: no step
    ({1e-5: 1, 3e-5: 2, 1e-4: 3}, [1e-5, 3e-5, 1e-4, 3e-4]),            # best at the top: one step up
    ({1e-5: 1, 3e-5: 2, 1e-4: 3, 3e-4: 4}, [1e-5, 3e-5, 1e-4, 3e-4, 9e-4]),
    ({1e-5: 1, 3e-5: 2, 1e-4: 3, 3e-4: 4, 9e-4: 5}, [1e-5, 3e-5, 1e-4, 3e-4, 9e-4]),  # extend=2 ran out
    ({1e-5: 3, 3e-5: 2, 1e-4: 1}, [3.33e-6, 1e-5, 3e-5, 1e-4]),         # best at the bottom: one step down
    ({1e-5: 3, 3e-5: 2, 1e-4: 1, 3.33e-6: 2}, [3.33e-6, 1e-5, 3e-5, 1e-4]),  # the step down was worse: done
    ({3e-5: 2, 1e-4: 1}, [1e-5, 3e-5, 1e-4]),                          # a fall upwards: the lr below may win
    ({3e-5: 2, 1e-5: 3}, [3.33e-6, 1e-5, 3e-5]),                        # a fall upwards from the best: 1e-4
                                                                        # cannot win; the bottom edge is best
    ({3e-5: -float("inf"), 1e-5: 1}, [3.33e-6, 1e-5, 3e-5]),            # a failed middle: beyond it too
    ({3e-5: 2, 1e-5: 3, 1e-4: 1}, [3.33e-6, 1e-5, 3e-5, 1e-4]),         # a run done is never left out
])
def test_sweep_steps_past_a_best_edge(scores, expected):
    assert sweep_lrs([3e-5, 1e-5, 1e-4], scores) == expected


def test_one_at_a_time_a_job_the_run_before_it_ruled_out_is_not_run():
    from common import run_jobs

    scores, ran = {}, []
    perplexity = {1e-3: 40.0, 3e-3: 45.0, 3.33e-4: 42.0}  # no 1e-2: running it would raise

    def run_job(lr):
        ran.append(lr)
        scores[lr] = -perplexity[lr]
        return None

    def pending():
        return [lr for lr in sweep_lrs([1e-3, 3e-3, 1e-2], scores) if lr not in scores]

    assert pending() == [1e-3, 3e-3, 1e-2]
    assert run_jobs(pending, run_job, 1, 0.0, "test") == 0
    assert ran == [1e-3, 3e-3, 3.33e-4]  # 3e-3 fell from 1e-3: 1e-2 cannot win; 1e-3 is the bottom edge: a step down


def test_whole_runs_start_only_the_jobs_expected_to_end_before_the_deadline(capsys):
    from common import WALL_MARGIN, run_jobs

    ran = []
    walls = {"long": 100.0, "unpriced": None, "short": 10.0}
    stop_at = time.time() + 50 * WALL_MARGIN  # "long" would pause, "short" ends with time to spare
    def walls_of(todo):
        return [walls[job] for job in todo]

    assert run_jobs(lambda: [j for j in walls if j not in ran], ran.append, 1, 0.0, "test", walls_of, stop_at) == 3
    assert ran == ["short"]  # a shorter job after one that does not fit still starts
    out = capsys.readouterr().out
    assert "not started: long (about 100 s x1.25" in out and "not started: unpriced (its wall time not priced yet)" in out
    assert "2 of 3 runs not started" in out
    ran.clear()  # without prices (no --whole-runs) every job starts, the deadline notwithstanding
    assert run_jobs(lambda: [j for j in walls if j not in ran], ran.append, 1, 0.0, "test", None, stop_at) == 0
    assert ran == ["long", "unpriced", "short"]


@pytest.mark.parametrize("study", ["finetune_rg", "pretrain_llama"])
def test_whole_runs_need_a_deadline(study, capsys):
    module = __import__(study)
    with pytest.raises(SystemExit):
        module.main(["run", "--whole-runs"])
    assert "--whole-runs starts the runs that end before --stop-after-s" in capsys.readouterr().err


def test_pretraining_with_whole_runs_starts_the_runs_its_plan_says_end_in_time(tmp_path, monkeypatch, capsys):
    import pretrain_llama

    results = tmp_path / "pretrain" / "results"
    results.mkdir(parents=True)
    monkeypatch.setattr(pretrain_llama, "WORK", tmp_path / "pretrain")
    (results / "130m_adamw_speed.json").write_text(json.dumps(dict(tokens_per_s=100_000.0)))
    (results / "130m_badam_speed.json").write_text(json.dumps(dict(tokens_per_s=200_000.0)))
    ran = []

    def run_job(a, work, stop_at, job):
        ran.append(job)
        method, lr = job
        (results / f"130m_{method}_lr{lr:g}.json").write_text(
            json.dumps(dict(size="130m", method=method, lr=lr, status="ok", val_ppl=50.0)))

    monkeypatch.setattr(pretrain_llama, "run_job", run_job)
    a = Namespace(size="130m", lr=["adamw=1e-3", "badam=1e-3", "galore=3e-3"], methods=["adamw", "badam", "galore"],
                  extend=0, grid_from=None, steps=1200, batch=64, seq=256, workers=1, budget_s=0.0, whole_runs=True)
    assert pretrain_llama.expected_walls(a, [("adamw", 1e-3), ("galore", 3e-3)]) == \
        [pytest.approx(1200 * 64 * 256 / 100_000.0), None]  # 197 s; GaLore's speed not known
    a.stop_at = time.time() + 200.0  # BAdam's 98 s fits with its margin, AdamW's 197 s does not; GaLore has no price
    assert pretrain_llama.run(a) == 3
    assert ran == [("badam", 1e-3)]
    assert "not started: ('adamw', 0.001)" in capsys.readouterr().out


def test_fine_tuning_with_whole_runs_prices_each_run_as_its_methods_runs_took(tmp_path, monkeypatch):
    import finetune_rg

    results = tmp_path / "finetune" / "results"
    results.mkdir(parents=True)
    monkeypatch.setattr(finetune_rg, "WORK", tmp_path / "finetune")
    for lr, exact in ((1e-5, 0.1), (3e-5, 0.3), (1e-4, 0.2)):
        _result(results, "adamw", lr, 0, exact)
        path = results / f"adamw_lr{lr:g}_s0.json"
        path.write_text(json.dumps(dict(json.loads(path.read_text()), concurrent_runs=1, steps=100, train_s=50.0,
                                        wall_s=80.0)))
    ran = []

    def run_job(a, work, job):
        ran.append(job)
        _result(results, *job, 0.3)

    monkeypatch.setattr(finetune_rg, "run_job", run_job)
    a = Namespace(lr=["adamw=1e-5,3e-5,1e-4", "lora=1e-4"], methods=["adamw", "lora"], extend=0, seeds=3,
                  stage="seeds", steps=100, evals=2, switch_every=5, results=results, workers=1, whole_runs=True)
    assert finetune_rg.expected_walls(a, [("adamw", 3e-5, 1), ("lora", 1e-4, 1)]) == \
        [pytest.approx(80.0), None]  # 0.5 s a step, 30 s besides; lora has no run
    a.stop_at = time.time() + 90.0  # one run of 80 s x1.25 does not fit: none starts
    assert finetune_rg.run_stage(a, "seeds") == 3 and ran == []
    a.stop_at = time.time() + 120.0
    assert finetune_rg.run_stage(a, "seeds") == 0
    assert ran == [("adamw", 3e-5, 1), ("adamw", 3e-5, 2)]  # lora, swept by no run, has no seeds to make


def _result(folder, method, lr, seed, exact, status="ok"):
    run = dict(method=method, lr=lr, seed=seed, status=status)
    if status == "ok":
        run.update(val=dict(exact_mean=exact, score_mean=exact), val_loss_curve=[[1, 1.0 - exact]])
    (folder / f"{method}_lr{lr:g}_s{seed}.json").write_text(json.dumps(run))


def test_finetune_rg_schedules_the_steps_out_then_the_seeds(tmp_path, monkeypatch):
    import finetune_rg

    results = tmp_path / "finetune" / "results"
    results.mkdir(parents=True)
    monkeypatch.setattr(finetune_rg, "WORK", tmp_path / "finetune")
    a = Namespace(lr=["adamw=1e-5,3e-5,1e-4", "lora=1e-4,3e-4,1e-3"], methods=["adamw", "lora"], extend=2, seeds=3,
                  results=results)
    assert [j for j in finetune_rg.jobs(a, "sweep")] == [  # middle lrs first, no step out before a grid is done
        ("adamw", 3e-5, 0), ("lora", 3e-4, 0), ("adamw", 1e-5, 0), ("lora", 1e-4, 0), ("adamw", 1e-4, 0), ("lora", 1e-3, 0)]
    for lr, exact in ((1e-5, 0.1), (3e-5, 0.2), (1e-4, 0.3)):  # adamw: best at the top edge
        _result(results, "adamw", lr, 0, exact)
    for lr, exact in ((1e-4, 0.1), (3e-4, 0.3), (1e-3, 0.2)):  # lora: best inside
        _result(results, "lora", lr, 0, exact)
    assert finetune_rg.jobs(a, "sweep")[-1:] == [("adamw", 3e-4, 0)]
    assert finetune_rg.jobs(a, "seeds") == [("lora", 3e-4, 1), ("lora", 3e-4, 2)]  # adamw's sweep is not done
    # both: adamw's step out, and meanwhile lora's seeds (a worker need not wait for adamw's sweep)
    not_done = [j for j in finetune_rg.jobs(a, "both") if not (results / f"{finetune_rg.run_name(*j)}.json").is_file()]
    assert not_done == [("adamw", 3e-4, 0), ("lora", 3e-4, 1), ("lora", 3e-4, 2)]
    _result(results, "adamw", 3e-4, 0, 0.25)  # the step up is worse: adamw's sweep is done at 1e-4
    assert finetune_rg.jobs(a, "seeds") == [("adamw", 1e-4, 1), ("lora", 3e-4, 1), ("adamw", 1e-4, 2), ("lora", 3e-4, 2)]
    # a study of another length does not build on these runs: its own folder, its own sweep from the start
    longer = Namespace(**{**vars(a), "quick": False, "steps": 3 * finetune_rg.DEFAULT_STEPS})
    longer.results = finetune_rg.results_folder(longer)
    assert longer.results == tmp_path / "finetune" / f"results_{3 * finetune_rg.DEFAULT_STEPS}steps"
    assert finetune_rg.jobs(longer, "both")[:2] == [("adamw", 3e-5, 0), ("lora", 3e-4, 0)]
    assert finetune_rg.jobs(longer, "seeds") == []
    default = Namespace(**{**vars(longer), "steps": finetune_rg.DEFAULT_STEPS})
    assert finetune_rg.results_folder(default) == results


def test_plan_prices_the_runs_left_by_each_methods_speed_alone(tmp_path, monkeypatch, capsys):
    import finetune_rg

    results = tmp_path / "finetune" / "results"
    (results / "speed").mkdir(parents=True)
    monkeypatch.setattr(finetune_rg, "WORK", tmp_path / "finetune")
    a = Namespace(lr=["adamw=1e-5,3e-5,1e-4", "badam_time=1e-4,3e-4,1e-3"], methods=["adamw", "badam_time"], extend=0,
                  seeds=2, stage="both", steps=100, evals=2, switch_every=5, results=results, workers=1)
    for lr, exact in ((1e-5, 0.1), (3e-5, 0.3), (1e-4, 0.2)):
        _result(results, "adamw", lr, 0, exact)
        path = results / f"adamw_lr{lr:g}_s0.json"
        path.write_text(json.dumps(dict(json.loads(path.read_text()), tokens=1000, steps=100)))  # 10 tokens a step
    (results / "speed" / "adamw.json").write_text(json.dumps(dict(tokens_per_s=50.0)))
    (results / "speed" / "badam.json").write_text(json.dumps(dict(tokens_per_s=200.0)))
    # left: adamw's seed 1 (100 steps at 50 tokens/s: 20 s) and badam_time's three lrs at BAdam's speed
    # (7/3 of 100 steps: 233 steps of 10 tokens at 200 tokens/s, 11.65 s each)
    assert finetune_rg.plan(a) == pytest.approx(20 + 3 * 233 * 10 / 200)
    out = capsys.readouterr().out
    assert "adamw_lr3e-05_s1: 100 steps, training about 20 s alone" in out and "(at badam's speed)" in out
    _result(results, "adamw", 3e-5, 1, 0.3)  # adamw's runs all made: nothing left of it, and the plan says so
    a.methods = ["adamw"]
    assert finetune_rg.plan(a) == 0.0 and "no runs left to make (stage both, methods adamw)" in capsys.readouterr().out


def test_plan_lays_the_runs_left_out_side_by_side_as_runs_made_side_by_side_took(tmp_path, monkeypatch):
    import finetune_rg

    monkeypatch.setattr(finetune_rg, "WORK", tmp_path / "finetune")
    monkeypatch.setattr(finetune_rg, "speed_record", lambda method: None)  # variants step as BAdam does

    def made(method, side_by_side, train_s, wall_s, steps=100):
        return dict(method=method, concurrent_runs=side_by_side, train_s=train_s, wall_s=wall_s, steps=steps)

    done = [made("adamw", 2, 10.0, 15.0), made("adamw", 8, 40.0, 50.0), made("adamw", 8, 60.0, 70.0),
            made("badam", 7, 20.0, 50.0), made("badam", 9, 90.0, 90.0), made("lora", 8, 1.0, 1.0)]
    a = Namespace(workers=8, steps=300, evals=3, switch_every=5)
    todo = [("adamw", 1e-5, 0), ("adamw", 3e-5, 0), ("badam_time", 1e-4, 0)]
    # 8 side by side: adamw 0.5 s a step (the median of 0.4 and 0.6) and 10 s besides, 300 steps: 160 s;
    # badam_time steps as BAdam, whose runs at 7 and 9 are as near: 0.55 s a step, 15 s besides, 7/3 x 300 steps
    assert finetune_rg.side_by_side(a, todo, done) == pytest.approx([160, 160, 0.55 * 700 + 15])
    # 2 side by side: adamw's run at 2 (0.1 s a step, 5 s besides: 35 s), BAdam's at 7 (0.2 s, 30 s: 170 s)
    a.workers = 2
    walls = finetune_rg.side_by_side(a, todo, done)
    assert walls == pytest.approx([35, 35, 170])
    # laid out: the longest first, then each on the first free worker
    assert finetune_rg.laid_out(walls, 2) == pytest.approx(170)  # 170 | 35 + 35
    assert finetune_rg.laid_out(walls + [35, 35, 35], 2) == pytest.approx(5 * 35)  # 170 | 35 x 5: the 5th at 140
    assert finetune_rg.laid_out(walls, 1) == pytest.approx(170 + 2 * 35)
    assert finetune_rg.side_by_side(a, todo + [("galore", 1e-4, 0)], done) is None  # galore never ran side by side


def test_failed_runs_count_as_done_and_rank_last(tmp_path, monkeypatch):
    import finetune_rg

    results = tmp_path / "finetune" / "results"
    results.mkdir(parents=True)
    monkeypatch.setattr(finetune_rg, "WORK", tmp_path / "finetune")
    a = Namespace(lr=["adamw=1e-5,3e-5,1e-4", "lora=1e-4,3e-4,1e-3"], methods=["adamw", "lora"], extend=2, seeds=2,
                  results=results)
    _result(results, "adamw", 1e-5, 0, 0, status="error")  # the bottom edge failed: it is not "best"
    _result(results, "adamw", 3e-5, 0, 0.2)
    _result(results, "adamw", 1e-4, 0, 0.1)
    for lr in (1e-4, 3e-4, 1e-3):  # every lora run failed: no edge to step past, nothing to choose
        _result(results, "lora", lr, 0, 0, status="OOM")
    assert [j for j in finetune_rg.jobs(a, "sweep") if not (results / f"{j[0]}_lr{j[1]:g}_s0.json").is_file()] == []
    assert finetune_rg.jobs(a, "seeds") == [("adamw", 3e-5, 1)]


def test_pretrain_llama_steps_past_the_edge_with_the_lowest_perplexity(tmp_path, monkeypatch):
    import pretrain_llama

    results = tmp_path / "pretrain" / "results"
    results.mkdir(parents=True)
    monkeypatch.setattr(pretrain_llama, "WORK", tmp_path / "pretrain")
    a = Namespace(size="60m", lr=["adamw=1e-3,3e-3,6e-3", "galore=3e-3,6e-3,1e-2"], methods=["adamw", "galore"], extend=2, grid_from=None)
    assert pretrain_llama.pending(a) == [("adamw", 3e-3), ("galore", 6e-3), ("adamw", 1e-3), ("galore", 3e-3),
                                         ("adamw", 6e-3), ("galore", 1e-2)]
    for method, ppls in (("adamw", {1e-3: 40.0, 3e-3: 35.0, 6e-3: 33.0}), ("galore", {3e-3: 50.0, 6e-3: 45.0, 1e-2: 48.0})):
        for lr, ppl in ppls.items():
            (results / f"60m_{method}_lr{lr:g}.json").write_text(
                json.dumps(dict(size="60m", method=method, lr=lr, status="ok", val_ppl=ppl)))
    assert pretrain_llama.pending(a) == [("adamw", 0.018)]  # adamw's best is its top edge; galore's is inside


def test_pretraining_plan_prices_a_larger_size_by_a_smaller_ones_speed(tmp_path, monkeypatch, capsys):
    import pretrain_llama

    # a token's matmul weights at 60M: 8 layers of q, k, v, o (512 x 512) and the MLP (3 x 512 x 1376), the head
    assert pretrain_llama.matmul_params("60m") == 8 * (4 * 512 * 512 + 3 * 512 * 1376) + 512 * 49152
    results = tmp_path / "pretrain" / "results"
    results.mkdir(parents=True)
    monkeypatch.setattr(pretrain_llama, "WORK", tmp_path / "pretrain")
    (results / "60m_adamw_speed.json").write_text(json.dumps(dict(tokens_per_s=300_000.0)))
    a = Namespace(size="130m", lr=["adamw=1e-3", "galore=3e-3"], methods=["adamw", "galore"], extend=2, grid_from=None,
                  steps=1200, batch=64, seq=256)
    ratio = pretrain_llama.matmul_params("60m") / pretrain_llama.matmul_params("130m")
    expected = 1200 * 64 * 256 / (300_000.0 * ratio)
    assert pretrain_llama.plan(a) == pytest.approx(expected)  # galore: no speed at any size, not counted
    out = capsys.readouterr().out
    assert f"130m_adamw_lr0.001: 19.7M tokens, about {expected:.0f} s alone (60m's speed pass x {ratio:.2f})" in out
    assert "130m_galore_lr0.003: its speed not yet measured at any size" in out
    (results / "130m_adamw_speed.json").write_text(json.dumps(dict(tokens_per_s=100_000.0)))  # its own size's, first
    assert pretrain_llama.plan(a) == pytest.approx(1200 * 64 * 256 / 100_000.0)
    a.extend = 0  # the grid only: once its runs are made, nothing is left, and the plan says so
    for method, lr in (("adamw", 1e-3), ("galore", 3e-3)):
        (results / f"130m_{method}_lr{lr:g}.json").write_text(
            json.dumps(dict(size="130m", method=method, lr=lr, status="ok", val_ppl=50.0)))
    capsys.readouterr()
    assert pretrain_llama.plan(a) == 0.0 and "no runs left to make at 130m" in capsys.readouterr().out


def test_pretraining_plan_prices_by_the_sizes_own_runs_made_alone(tmp_path, monkeypatch, capsys):
    """A run that had the GPU to itself (``--workers 1``) measured its method's speed at this size: better than
    another size's scaled; a run that shared the GPU did not, and this size's speed pass comes first."""
    import pretrain_llama

    results = tmp_path / "pretrain" / "results"
    results.mkdir(parents=True)
    monkeypatch.setattr(pretrain_llama, "WORK", tmp_path / "pretrain")
    (results / "60m_adamw_speed.json").write_text(json.dumps(dict(tokens_per_s=300_000.0)))
    for lr, tokens_per_s, concurrent in ((3e-3, 150_000.0, 1), (6e-3, 170_000.0, 1), (1e-2, 50_000.0, 3)):
        (results / f"130m_adamw_lr{lr:g}.json").write_text(json.dumps(dict(
            size="130m", method="adamw", lr=lr, status="ok", val_ppl=50.0 + lr, tokens_per_s=tokens_per_s,
            concurrent_runs=concurrent)))
    a = Namespace(size="130m", lr=["adamw=1e-3,3e-3,6e-3,1e-2"], methods=["adamw"], extend=0, grid_from=None,
                  steps=1200, batch=64, seq=256)
    assert pretrain_llama.plan(a) == pytest.approx(1200 * 64 * 256 / 160_000.0)  # the median of the two alone
    assert "130m_adamw_lr0.001: 19.7M tokens, about 123 s alone (its 2 runs alone at 130m)" in capsys.readouterr().out
    (results / "130m_adamw_speed.json").write_text(json.dumps(dict(tokens_per_s=100_000.0)))
    assert pretrain_llama.plan(a) == pytest.approx(1200 * 64 * 256 / 100_000.0)
    assert "(its speed pass)" in capsys.readouterr().out


def test_a_report_of_runs_from_two_kinds_of_gpu_is_named_after_both():
    h200 = dict(name="NVIDIA H200", mem_gib=139.8)
    h100 = dict(name="NVIDIA H100 80GB HBM3", mem_gib=79.2)
    assert runs_device([]) is None and runs_device([dict(status="ok")]) is None
    assert runs_device([dict(device=h100), dict(device=h100)]) == h100  # one kind: its own record
    mixed = runs_device([dict(device=h200), dict(device=h100), dict(device=h200), dict(status="no device")])
    assert mixed["name"] == "NVIDIA H200+H100" and mixed["runs_per_device"] == {"NVIDIA H200": 2, h100["name"]: 1}
    assert result_path("quality_x", "json", mixed).name.startswith("quality_x_h200+h100_")


def test_timings_from_more_than_one_machine_are_said_to_be(monkeypatch):
    # two lent H100s share a name; the boot id tells them apart
    a, b = dict(name="NVIDIA H100 80GB HBM3", machine="aaaaaaaa-1"), dict(name="NVIDIA H100 80GB HBM3", machine="bbbbbbbb-2")
    assert machines_note(dict(badam=a, adamw=a)) == ""
    assert machines_note(dict(badam=a, adamw=a, hift=b)) == "Timings from 2 machines (compare within one): aaaaaaaa: badam, adamw; bbbbbbbb: hift."
    c = dict(b, machine="cccccccc-3", host_cpu="AMD EPYC 9454", host_cores=16)  # newer records name the host
    assert machines_note(dict(badam=a, hift=c)) == \
        "Timings from 2 machines (compare within one): aaaaaaaa: badam; cccccccc (AMD EPYC 9454, 16 cores): hift."
    assert "not recorded: lora" in machines_note(dict(badam=a, lora=dict(name="NVIDIA H100 80GB HBM3")))
    assert "not recorded" in machines_note(dict(badam=None, adamw={}))  # records older than the machine id
    assert machines_note({}) == ""  # nothing timed: nothing to say
    boot_id = Path("/proc/sys/kernel/random/boot_id")
    record = device_record()
    assert record["machine"] == (boot_id.read_text().strip() if boot_id.is_file() else None)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():  # the host's processor, which two machines with one card name may differ in
        assert record["host_cpu"] and record["host_cpu"] in cpuinfo.read_text()
    assert record["host_cores"] == os.cpu_count()


def test_speed_again_times_what_another_machine_timed_and_keeps_this_ones(tmp_path):
    def record(name, machine):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(dict(tokens_per_s=1.0, device=dict(name="NVIDIA H100 80GB HBM3", machine=machine))))
        return path

    here, elsewhere, unnamed = record("here", machine_id()), record("elsewhere", "another-boot-id"), record("old", None)
    assert to_time(tmp_path / "none.json", again=False) and to_time(tmp_path / "none.json", again=True)
    assert not any(to_time(p, again=False) for p in (here, elsewhere, unnamed))  # a record is kept by default
    assert to_time(elsewhere, again=True) and to_time(unnamed, again=True)
    # this machine's record stays (a pass cut short goes on where it stopped); where no boot id exists, none is
    assert to_time(here, again=True) == (machine_id() is None)


def test_pretraining_grid_from_a_smaller_size_centres_on_its_best_lr(tmp_path, monkeypatch):
    import pretrain_llama

    monkeypatch.setattr(pretrain_llama, "WORK", tmp_path)
    (tmp_path / "results").mkdir()
    swept = {"adamw": {3.33e-4: 74.0, 1e-3: 48.0, 3e-3: 87.0, 6e-3: 204.0},  # best inside
             "galore": {3e-3: 49.3, 6e-3: 41.0, 1e-2: 40.5},                  # best at the top edge
             "fira": {3e-3: float("nan")}}                                      # no finished run
    for method, runs in swept.items():
        for lr, ppl in runs.items():
            status = "ok" if ppl == ppl else "error"
            run = dict(size="60m", method=method, lr=lr, status=status, **({"val_ppl": ppl} if status == "ok" else {}))
            (tmp_path / "results" / f"60m_{method}_lr{lr:g}.json").write_text(json.dumps(run))
    a = pretrain_llama.parser().parse_args(["--size", "130m", "--grid-from", "60m", "--lr", "apollo=1e-3"])
    grid = pretrain_llama.sweep_grid(a)
    assert grid["adamw"] == [3.33e-4, 1e-3, 3e-3]  # the best and its neighbours, not the whole sweep
    assert grid["galore"] == [6e-3, 1e-2]  # the top edge: the sweep steps past it (sweep_lrs)
    assert grid["fira"] == pretrain_llama.LR_GRID["fira"] and grid["apollo"] == [1e-3]  # default; --lr wins
    assert pretrain_llama.sweep_grid(pretrain_llama.parser().parse_args(["--size", "130m"])) == pretrain_llama.LR_GRID
    with pytest.raises(SystemExit):
        pretrain_llama.main(["run", "--size", "60m", "--grid-from", "60m"])


def test_a_run_starts_within_the_budget_and_before_the_pause():
    import time

    from common import start_budget

    assert start_budget(0, None) == 0 and start_budget(100, None) == 100  # 0: no limit
    assert start_budget(10, time.time() + 50) == 10
    assert 49 < start_budget(0, time.time() + 50) <= 50 and 49 < start_budget(100, time.time() + 50) <= 50
    assert 0 < start_budget(0, time.time() - 5) <= 1e-3  # past the pause: nothing starts (not "no limit")


def test_a_report_records_the_calls_of_the_report_it_replaces_then_the_new_ones(tmp_path):
    import argparse

    from common import add_ran_options, report_commands

    parser = argparse.ArgumentParser()
    add_ran_options(parser)
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"commands": ["call 1", "call 2", "study.py report --ran 'call 1' --ran 'call 2'"]}))
    commands = report_commands(parser.parse_args(["--ran-before", str(earlier), "--ran", "call 3"]))
    assert commands[:3] == ["call 1", "call 2", "call 3"] and len(commands) == 4  # then this command
    assert report_commands(parser.parse_args(["--ran", "call 3"]))[:1] == ["call 3"]
    earlier.write_text(json.dumps({"what": "no commands"}))
    with pytest.raises(SystemExit, match="no commands"):
        report_commands(parser.parse_args(["--ran-before", str(earlier)]))


def test_a_mean_of_one_seed_has_no_deviation_to_show():
    import finetune_rg

    assert finetune_rg.mean_std([0.285]) == (0.285, None)
    assert finetune_rg.pm(finetune_rg.mean_std([0.285])) == "0.285 (one seed)"
    mean, std = finetune_rg.mean_std([0.2, 0.3])
    assert finetune_rg.pm((mean, std)) == f"0.250 +- {std:.3f}" and abs(std - 0.0707107) < 1e-6
