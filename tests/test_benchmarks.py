"""The benchmark scripts run end to end (on CPU, at a tiny shape) and write their JSON and PNG."""
import json
import os
import subprocess
import sys

import pytest


def run(script, *args, tmp_path):
    env = {**os.environ, "BENCH_RESULTS_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, f"benchmarks/{script}", *args], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_bench_e2e_epoch_and_quick_at_a_tiny_shape(tmp_path):
    run("bench_e2e.py", "--shape", "tiny", "--methods", "ours", "badam_official", "--switch-every", "2",
        "--checkpointing", "both", tmp_path=tmp_path)
    (result,) = tmp_path.glob("e2e_epoch_tiny_*.json")
    payload = json.loads(result.read_text())
    rows = {(r["method"], r["checkpointing"]): r for r in payload["rows"]}
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows.values())
    for checkpointing in (True, False):
        # the same data and seed: speed must not change the math
        ours, theirs = rows["ours", checkpointing], rows["badam_official", checkpointing]
        assert abs(ours["loss_last"] - theirs["loss_last"]) < 1e-4
    assert payload["command"].startswith("benchmarks/bench_e2e.py") and payload["device"]["torch"]
    assert result.with_suffix(".png").is_file()
    run("bench_e2e.py", "--quick", "--shape", "tiny", "--steps", "1", "--warmup", "1", tmp_path=tmp_path)
    (quick,) = tmp_path.glob("e2e_quick_tiny_*.json")
    assert len(json.loads(quick.read_text())["rows"]) == 6


@pytest.mark.slow
def test_profile_step_lists_the_operators_of_each_method(tmp_path):
    run("profile_step.py", "--shape", "tiny", "--steps", "1", "--warmup", "1", "--top", "5", tmp_path=tmp_path)
    (result,) = tmp_path.glob("profile_tiny_block0_*.json")
    payload = json.loads(result.read_text())
    assert [m["method"] for m in payload["methods"]] == ["ours", "badam_official"]
    for method in payload["methods"]:  # on CPU: host self times, no GPU spans
        assert method["operators_ms"]["aten::mm"] > 0 and method["gpu_span_ms"] == {}
    assert len(payload["largest_gaps"]) == 5


def test_gpu_benchmarks_refuse_cleanly_without_cuda(tmp_path):
    env = {**os.environ, "BENCH_RESULTS_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "benchmarks/bench_switch.py"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 2 and "needs a CUDA device" in done.stderr
