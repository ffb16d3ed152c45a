"""benchmarks/bench_ratio.py runs end to end at a tiny shape on CPU and writes its JSON and PNG."""
import json
import os
import subprocess
import sys


def test_bench_ratio_at_a_tiny_shape(tmp_path):
    env = {**os.environ, "BENCH_RESULTS_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "benchmarks/bench_ratio.py", "--shape", "tiny", "--steps", "2",
                           "--warmup", "1", "--switch-every", "2"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = tmp_path.glob("ratio_tiny_*.json")
    payload = json.loads(result.read_text())
    rows = {r["method"]: r for r in payload["rows"]}
    assert set(rows) == {"ours_ratio", "badam_ratio", "ours_layer"}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    # the same data, weights and masks: the two ratio modes see the same first loss and agree after 3 steps
    assert abs(rows["ours_ratio"]["loss_last"] - rows["badam_ratio"]["loss_last"]) < 1e-4
    assert rows["ours_ratio"]["state_gib"] > 0 and result.with_suffix(".png").is_file()
    # the masked step alone (the reference on the CPU): both mask modes timed, against the copy bandwidth
    kernel = {r["mask_mode"]: r for r in payload["masked_step"]}
    assert set(kernel) == {"adjacent", "scatter"} and all(r["status"] == "ok" and r["gbps"] > 0 for r in kernel.values())
