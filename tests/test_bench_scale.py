"""``benchmarks/bench_scale.py`` under torchrun on the CPU (gloo): 2 processes, 1 process, an agreed OOM.

Each run is a subprocess (``python -m torch.distributed.run``, as in test_cli's torchrun test) at the
tiny shape, writing to ``BENCH_RESULTS_DIR`` = the test's tmp folder. The JSON must hold every step,
positive tokens/s, finite losses, and a communication model that agrees with the shapes (computed
here from the config, independently of the benchmark) and with the collectives counted as issued.
"""
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ["--shape", "tiny", "--seq", "32", "--blocks", "3", "--switch-every", "2"]
# the tiny shape: hidden 64, intermediate 128, 4 layers, 4 heads (head dim 16), 2 KV heads, vocab 256, tied
H, I, LAYERS, KV, VOCAB = 64, 128, 4, 2 * 16, 256
FP32 = 4
LAYER_PARAMS = 2 * H * H + 2 * KV * H + 3 * H * I + 2 * H  # q, o, k, v, gate/up/down, 2 norms
ROOT_PARAMS = VOCAB * H + H  # the embedding (lm_head tied to it) and the final norm
TOTAL = LAYERS * LAYER_PARAMS + ROOT_PARAMS

pytestmark = pytest.mark.slow


def bench_scale(nproc, *args, tmp_path, timeout=120, stem="tiny"):
    """Run the benchmark under torchrun; return its JSON (the one result file) and the process."""
    env = {**os.environ, "BENCH_RESULTS_DIR": str(tmp_path), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": "",  # gloo on the CPU, also on a machine with GPUs
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), "benchmarks/bench_scale.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    reasons = [line for line in done.stderr.splitlines() if "rror" in line or "terminate" in line]
    assert done.returncode == 0, "\n".join(reasons[:20]) + "\n" + done.stderr[-2000:]
    (result,) = tmp_path.glob(f"bench_scale_{stem}_{nproc}proc_*.json")
    assert result.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp"))
    return json.loads(result.read_text()), done


def check_steps(payload, world, warmup=1, blocks=3, every=2):
    steps = payload["steps"]
    assert payload["status"] == "ok" and payload["world_size"] == world
    assert [r["step"] for r in steps] == list(range(warmup + blocks * every))
    assert [r["warmup"] for r in steps] == [True] * warmup + [False] * (blocks * every)
    # descending from the top layer; the first (warm-up) block trains switch_every - 1 steps
    assert [r["block"] for r in steps] == [3, 2, 2, 1, 1, 0, 0]
    assert [r["switched"] for r in steps] == [True, False, True, False, True, False, True]
    for r in steps:
        assert math.isfinite(r["loss"]) and 0 < r["loss"] < 10
        assert r["step_s"] > 0 and r["tokens_per_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(world * 1 * 32 / r["step_s"])
        assert r["max_rss_bytes"] > 0 and r["peak_mem_bytes"] is None  # the CPU: no CUDA peak
    summary = payload["summary"]
    assert summary["measured_steps"] == blocks * every and summary["tokens_per_s"] > 0
    assert set(summary["tokens_per_s_by_block"]) == {"2", "1", "0"}
    assert payload["command"].startswith("benchmarks/bench_scale.py") and payload["device"]["torch"]


def check_comm_model(payload, world):
    layer, root, total = LAYER_PARAMS * FP32, ROOT_PARAMS * FP32, TOTAL * FP32  # no padding: dims even
    assert payload["model"]["num_params"] == TOTAL and payload["model"]["param_bytes"] == total
    assert payload["model"]["layer_unit_bytes"] == layer and payload["model"]["root_unit_bytes"] == root
    for r in payload["steps"]:
        low = r["block"]
        assert r["lowest_layer"] == low
        assert r["allgather_forward_bytes_model"] == total  # every unit, once, in forward
        # backward: the root and the layers from the active one up (no prefetch of the layer below)
        assert r["allgather_backward_bytes_model"] == root + (LAYERS - low) * layer
        assert r["reducescatter_bytes_model"] == r["active_param_bytes"] == layer  # fp32 grads of one layer
        assert r["allreduce_bytes_model"] == 4
        ag = r["allgather_forward_bytes_model"] + r["allgather_backward_bytes_model"]
        assert r["allgather_bytes_model"] == ag
        assert r["wire_bytes_model"] == pytest.approx((world - 1) / world * (ag + layer) + 2 * (world - 1) / world * 4)
        assert r["allreduce_bytes_counted"] == 4  # the gradient norm, once per step
    base = payload["comm_baselines_per_step"]
    assert base["fsdp_full_allgather_bytes_model"] == 2 * total
    assert base["fsdp_full_reducescatter_bytes_model"] == total
    assert base["ddp_allreduce_bytes_model"] == total
    assert base["ddp_wire_bytes_model"] == pytest.approx(2 * (world - 1) / world * total)


def test_two_processes_fsdp2_on_gloo(tmp_path):
    payload, done = bench_scale(2, *SMOKE, tmp_path=tmp_path)
    assert payload["backend"] == "gloo" and payload["dtype"] == "float32"
    check_steps(payload, world=2)
    check_comm_model(payload, world=2)
    for r in payload["steps"]:  # what FSDP2 issued is what the model says
        assert r["allgather_bytes_counted"] == r["allgather_bytes_model"]
        assert r["reducescatter_bytes_counted"] == r["reducescatter_bytes_model"]
    assert payload["summary"]["wire_vs_ddp"] > 0 and payload["summary"]["wire_vs_fsdp_full"] < 1
    assert done.stdout.count("bench_scale: tiny on 2 rank(s)") == 1  # rank 0 alone reports


def test_two_replicated_processes_all_reduce_the_active_block_only(tmp_path):
    """--parallel replicated: DataParallelBlockOptimizer, one all-reduce of the active layer per step
    (its dims are multiples of the flat buffer's 64-element alignment: no padding)."""
    payload, _ = bench_scale(2, *SMOKE, "--parallel", "replicated", tmp_path=tmp_path, stem="tiny_replicated")
    check_steps(payload, world=2)
    assert payload["parallel"] == "replicated"
    for r in payload["steps"]:
        assert r["allgather_bytes_model"] == r["reducescatter_bytes_model"] == 0
        assert r["allreduce_bytes_model"] == r["allreduce_bytes_counted"] == LAYER_PARAMS * FP32
        assert r["allgather_bytes_counted"] == r["reducescatter_bytes_counted"] == 0
    assert payload["summary"]["wire_vs_ddp"] == pytest.approx(LAYER_PARAMS / TOTAL)


def test_single_process(tmp_path):
    payload, _ = bench_scale(1, *SMOKE, tmp_path=tmp_path)
    check_steps(payload, world=1)
    check_comm_model(payload, world=1)
    assert all(r["wire_bytes_model"] == 0 for r in payload["steps"])


def test_out_of_memory_is_a_result_all_ranks_agree_on(tmp_path):
    payload, _ = bench_scale(2, "--shape", "tiny", "--seq", "16", "--blocks", "2", "--switch-every", "2",
                             "--fail-oom-at", "2", tmp_path=tmp_path)
    assert payload["status"] == "OOM" and payload["oom_at"] == "step 2" and payload["oom_ranks"] == [0, 1]
    assert [r["step"] for r in payload["steps"]] == [0, 1]  # the steps before it are kept
