"""The quality studies run end to end in their --quick mode (tiny model, a few steps a method, CPU),
so that the GPU scripts cannot rot; and the shared registry of peer methods builds each peer."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script, *args, tmp_path):
    env = {**os.environ, "BENCH_RESULTS_DIR": str(tmp_path / "results"), "QUALITY_WORK": str(tmp_path / "work")}
    done = subprocess.run([sys.executable, f"benchmarks/quality/{script}", *args], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (result,) = (tmp_path / "results").glob("*.json")
    assert result.with_suffix(".png").is_file()
    return json.loads(result.read_text())


@pytest.mark.slow
def test_finetune_rg_quick_runs_every_method_and_reports(tmp_path):
    payload = run("finetune_rg.py", "--quick", "--workers", "2", tmp_path=tmp_path)  # two runs at a time, as on the GPU
    methods = payload["methods"]
    # AdaLomo allocates its states with .cuda(): on a CPU it is an error, recorded as such
    assert methods["adalomo"]["status"] in ("ok", "error")
    for name in ("badam", "badam_offload", "badam_official", "adamw", "lora", "galore", "apollo", "badam_time",
                 "badam_k15", "hift"):
        row = methods[name]
        assert row["status"] == "ok", (name, row)
        steps = round(payload["config"]["steps"] * payload["config"]["badam_variants"].get(name, {}).get("steps_factor", 1))
        assert row["seeds"] == [0, 1] and row["steps"] == len(row["curves"]["0"]["losses"]) == steps
        assert 0.0 <= row["test_exact_mean"][0] <= 1.0 and row["peak_mem_mib"] > 0 and row["concurrent_runs"] == 2
        # the runs shared the device: tokens/s comes from the speed pass after the seeds, each method alone
        assert row["alone"]["steps"] == 2 and row["alone"]["tokens_per_s"] > 0, (name, row["alone"])
        # what the runs' wall held besides their steps, by part: each part timed, none negative
        parts = row["outside_steps_s"]
        assert parts["eval_s"] > 0 and parts["generate_s"] > 0 and min(parts.values()) >= 0, (name, parts)
        if name in ("badam", "badam_offload", "badam_time", "badam_k15", "hift"):
            assert parts["job_start_and_save_s"] > 0 and parts["reload_s"] > 0, (name, parts)
    # the main job's BAdam and the official badam 1.4 train the same blocks on the same batches
    ours, theirs = methods["badam"]["curves"]["0"]["losses"], methods["badam_official"]["curves"]["0"]["losses"]
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-4
    # that trajectory evaluated two ways, by the job's --eval-data (ours) and the study's eval_loss (theirs):
    # the same steps, the same validation losses
    ours, theirs = methods["badam"]["curves"]["0"]["val_loss"], methods["badam_official"]["curves"]["0"]["val_loss"]
    assert [step for step, _ in ours] == [step for step, _ in theirs] == [2, 4]
    assert max(abs(a - b) for (_, a), (_, b) in zip(ours, theirs)) < 1e-4
    assert methods["badam"]["info"]["command"].startswith("badam-finetune ")
    # each BAdam variant's own options reach the job's command line
    for name, options in (("badam_offload", "--switch-every 1 --switch-mode descending --state-policy offload"),
                          ("badam_k15", "--switch-every 15 --switch-mode descending --state-policy reset"),
                          ("hift", "--switch-every 1 --switch-mode descending --state-policy offload")):
        assert options in methods[name]["info"]["command"], (name, methods[name]["info"]["command"])
    # badam_time: 7/3 the steps (AdamW's time), its validation loss as often as the others' (every 2 steps)
    assert [step for step, _ in methods["badam_time"]["curves"]["0"]["val_loss"]] == [2, 4, 6, 8, 9]
    assert methods["badam_time"]["tokens"] > 2 * methods["badam"]["tokens"]
    assert payload["command"].startswith("benchmarks/quality/finetune_rg.py") and payload["versions_where_reported"]["reasoning-gym"] and payload["run_device"]["torch"]
    # the README's tables come from the JSON: a row for every method, one for every lr of the sweep
    sys.path[:0] = [str(BENCHMARKS / "quality"), str(BENCHMARKS)]
    import finetune_rg

    tables = finetune_rg.markdown(payload)
    assert tables.count("| badam_k15 | ") == 2 and tables.count("| adalomo | ") >= 1
    assert f"| badam | {methods['badam']['lr']:g} | 2 | {methods['badam']['test_exact_mean'][0]:.3f} +- " in tables
    counts = payload["config"]["counts"]
    assert set(counts["test"]) == {"chain_sum", "basic_arithmetic", "letter_counting"}


@pytest.mark.slow
def test_pretrain_llama_quick_runs_every_method_and_reports(tmp_path):
    payload = run("pretrain_llama.py", "--quick", "--workers", "2", tmp_path=tmp_path)  # two runs at a time
    for name in ("adamw", "badam", "badam_offload", "galore", "fira", "apollo", "lowrank"):
        row = payload["methods"][name]
        assert row["status"] == "ok", (name, row)
        assert row["val_ppl"] > 1 and len(row["losses"]) == payload["config"]["steps"]
        # the runs shared the device: tokens/s comes from the solo pass after the sweep
        assert row["tokens_per_s_from"] == "a solo pass (speed)" and row["tokens_per_s"] > 0
    assert payload["corpus"]["sources"] and payload["config"]["size"] == "tiny"
    # the training tokens come in parts (as the real corpus' do, to travel to the GPU machine), each with its sha256
    parts = payload["corpus"]["token_files"]["train"]
    assert len(parts) > 1 and sum(p["tokens"] for p in parts) == payload["corpus"]["tokens"]["train"]
    assert all(len(p["sha256"]) == 64 for p in parts)
    # the README's table comes from the JSON, a row a method
    sys.path[:0] = [str(BENCHMARKS / "quality"), str(BENCHMARKS)]
    import pretrain_llama

    table = pretrain_llama.markdown(payload)
    adamw = payload["methods"]["adamw"]
    assert f"| adamw | {adamw['lr']:g} | {adamw['val_ppl']:.2f} | " in table and len(table.splitlines()) == 2 + 7


def test_the_registry_builds_every_peer_on_a_tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(BENCHMARKS))
    import peers

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, max_position_embeddings=64)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    options = {"galore": dict(rank=4), "fira": dict(rank=4), "apollo": dict(rank=4), "badam": dict(K=1),
               "badam_official": dict(K=1)}
    for name in sorted(peers.PEERS):
        if name in ("lomo", "adalomo"):  # lomo-optim's states are allocated on CUDA
            continue
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        method = peers.build(name, model, 1e-2, **options.get(name, {}))
        before = {n: p.detach().clone() for n, p in method.module.named_parameters()}
        loss = method.loss(ids)
        method.run_backward(loss)
        method.clip(1.0)
        method.run_step()
        method.close()
        changed = [n for n, p in method.module.named_parameters() if not torch.equal(before[n], p.detach())]
        assert changed, f"{name} changed no weight"
    with pytest.raises(ValueError, match="unknown method"):
        peers.build("sgd", model, 1e-3)
    assert peers.unavailable("adamw") is None


# Run in a fresh interpreter where no finder sees bitsandbytes (the GPU image lacks it; this venv has it).
WITHOUT_BITSANDBYTES = """
import sys
sys.path.insert(0, {benchmarks!r})


class Hidden:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        return None if name.partition(".")[0] == "bitsandbytes" else self.finder.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self.finder, attr)


sys.meta_path[:] = [Hidden(f) for f in sys.meta_path]
import torch
from transformers import LlamaConfig, LlamaForCausalLM
import peers

config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, max_position_embeddings=64)
for name in ("galore", "fira", "apollo", "lora"):  # one process, as a study's worker runs one method after another
    assert peers.unavailable(name) is None, name
    method = peers.build(name, LlamaForCausalLM(config), 1e-2, **({{}} if name == "lora" else dict(rank=4)))
    method.run_backward(method.loss(torch.randint(0, 64, (2, 16))))
    method.run_step()
    assert "bitsandbytes" not in sys.modules, name
print("ok")
"""


def test_peers_that_import_bitsandbytes_leave_no_stub_behind_for_lora():
    """galore, fira and apollo import bitsandbytes where it is missing through a stub; LoRA (peft) built after
    them in the same process must still see it missing (a stub left behind made peft raise ValueError)."""
    code = WITHOUT_BITSANDBYTES.format(benchmarks=str(BENCHMARKS))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def _steps_with_a_pause(name, device, steps=4, pause_after=None, **options):
    """The losses of ``steps`` steps of peer ``name`` on a tiny Llama; with ``pause_after=k``, the method's
    state (``Method.state_dict``) goes into a method built afresh after step k, as a paused study run's does."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(BENCHMARKS))
    import peers

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, max_position_embeddings=64)
    batches = torch.randint(0, 64, (steps, 2, 16), generator=torch.Generator().manual_seed(0)).to(device)

    def build():
        torch.manual_seed(0)
        return peers.build(name, LlamaForCausalLM(config).to(device), 1e-2, **options)

    method, losses = build(), []
    for step in range(steps):
        if step == pause_after:
            saved = method.state_dict()
            method.close()
            method = build()
            method.load_state_dict(saved)
        loss = method.loss(batches[step])
        method.run_backward(loss)
        method.clip(1.0)
        method.run_step()
        losses.append(float(loss))
    return losses


@pytest.mark.parametrize("name", ["adamw", "galore", "apollo", "lora", "badam"])
def test_a_peer_put_back_from_its_state_dict_takes_the_same_steps(name):
    # put back before step 3 of 6: steps 4 and 5 show what step 3's update took from the saved state (BAdam: 2
    # blocks of 2 steps, in the middle of the second block's visit: its moments and the schedule)
    options = {"galore": dict(rank=4), "apollo": dict(rank=4), "badam": dict(K=2)}.get(name, {})
    assert _steps_with_a_pause(name, "cpu", 6, 3, **options) == _steps_with_a_pause(name, "cpu", 6, **options)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["adalomo", "lomo"])  # lomo-optim allocates its states on CUDA
def test_lomo_optim_put_back_from_its_state_dict_takes_the_same_steps_on_a_gpu(name):
    assert _steps_with_a_pause(name, "cuda", 6, 3) == _steps_with_a_pause(name, "cuda", 6)


def test_badam_official_says_it_cannot_be_put_back():
    with pytest.raises(ValueError, match="cannot be put back"):
        _steps_with_a_pause("badam_official", "cpu", pause_after=1, K=1)
