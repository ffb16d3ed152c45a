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
        tmp_path=tmp_path)
    (result,) = tmp_path.glob("e2e_epoch_tiny_*.json")
    payload = json.loads(result.read_text())
    rows = {r["method"]: r for r in payload["rows"]}
    assert rows["ours"]["status"] == rows["badam_official"]["status"] == "ok"
    # the same data and seed: speed must not change the math
    assert abs(rows["ours"]["loss_last"] - rows["badam_official"]["loss_last"]) < 1e-4
    assert payload["command"].startswith("benchmarks/bench_e2e.py") and payload["device"]["torch"]
    assert result.with_suffix(".png").is_file()
    run("bench_e2e.py", "--quick", "--shape", "tiny", "--steps", "1", "--warmup", "1", tmp_path=tmp_path)
    (quick,) = tmp_path.glob("e2e_quick_tiny_*.json")
    assert len(json.loads(quick.read_text())["rows"]) == 6


def test_gpu_benchmarks_refuse_cleanly_without_cuda(tmp_path):
    env = {**os.environ, "BENCH_RESULTS_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "benchmarks/bench_switch.py"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 2 and "needs a CUDA device" in done.stderr
