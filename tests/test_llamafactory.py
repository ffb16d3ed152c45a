"""LLaMA-Factory 0.9.5 with badam_kernels in place of the official badam (badam_kernels/integrations/llamafactory.py).

Runs in LLaMA-Factory's own environment, ``.venv-llamafactory`` (created and cached by
scripts/venv-llamafactory: about 80 s the first time, from PyPI), as subprocesses: a tiny random Llama saved
as a model folder with a byte tokenizer, 48 alpaca examples with their ``dataset_info.json``, one SFT YAML
(``use_badam: true``, descending, switch every 3 steps, fp32, weight decay 0, gradient checkpointing on as
LLaMA-Factory defaults) run three ways:

* ``python -m badam_kernels.integrations.llamafactory train ours.yaml`` (what ``badam-llamafactory`` runs),
  8 steps, checkpoints at 4 and 8;
* ``python -m llamafactory.cli train official.yaml`` (``llamafactory-cli``: the official badam 1.4), the same,
  recording the batches the Trainer feeds, which a plain loop then replays with our BlockOptimizer;
* ours resumed from its own checkpoint-4 (the middle of the second block) to step 8.

Checks: our optimizer is the one LLaMA-Factory trained with and ``optimizer.pt`` is our ``state_dict``; only
the blocks the schedule visited changed, whole (layers 3 and 2 by step 4, then layer 1; the embedding, layer 0,
the final norm and the head never); every loss and every final weight equal, to 1e-6, our BlockOptimizer driven
directly on the batches LLaMA-Factory fed (recorded in the official run); the official run trains the same
blocks and gives the same losses to 1e-5, its weights differing by its hidden weight decay (see below); the
run resumed at step 4 ends on the same weights, bit for bit, as the uninterrupted one.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
VENV_PY = ROOT / ".venv-llamafactory" / "bin" / "python"
pytestmark = pytest.mark.slow

PREPARE = """
import sys
sys.path.insert(0, {bench!r})
from pathlib import Path
import bench_llamafactory as b
work = Path({work!r})
b.save_model(work / "model", "tiny", seed=0)
(work / "data").mkdir()
b.write_dataset(work / "data", 48, answer_bytes=80, seed=0)
"""

# the official run, recording the batches the Trainer feeds (a passive wrapper of Trainer.training_step)
OFFICIAL_RECORDING = """
import sys, torch, transformers
batches, path = [], sys.argv[2]
original = transformers.Trainer.training_step
def training_step(self, model, inputs, *args, **kwargs):
    batches.append({k: v.detach().clone() for k, v in inputs.items() if torch.is_tensor(v)})
    torch.save(batches, path)
    return original(self, model, inputs, *args, **kwargs)
transformers.Trainer.training_step = training_step
sys.argv = ["llamafactory-cli", "train", sys.argv[1]]
from llamafactory.cli import main
main()
"""

# our BlockOptimizer driven directly on those batches, as badam_kernels.integrations.llamafactory builds it from
# the YAML (AdamW lr 1e-3, weight decay 0; descending, every 3 steps), with the Trainer's linear schedule and
# clipping to norm 1
DIRECT = """
import json, sys, torch
from transformers import LlamaForCausalLM, get_scheduler
from badam_kernels import BlockOptimizer
model_dir, batches_path, out = sys.argv[1:4]
model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
model.train()
base = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
optimizer = BlockOptimizer(base, list(model.named_parameters()), switch_block_every=3, switch_mode="descending",
                           verbose=0)
scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=8)
losses = []
for batch in torch.load(batches_path):
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    losses.append(loss.item())
model.save_pretrained(out)
json.dump(losses, open(out + "/losses.json", "w"))
"""


def _venv() -> None:
    """Create (or reuse) .venv-llamafactory; skip when it cannot be created (no network to PyPI)."""
    started = time.perf_counter()
    proc = subprocess.run([str(ROOT / "scripts" / "venv-llamafactory"), "true"], capture_output=True, text=True,
                          timeout=1200)
    if proc.returncode != 0 or not VENV_PY.exists():
        pytest.skip("scripts/venv-llamafactory could not create .venv-llamafactory (LLaMA-Factory 0.9.5 and its "
                    f"pins come from PyPI): {proc.stderr.strip()[-400:]}")
    print(f"venv ready in {time.perf_counter() - started:.0f} s")


def _run(args, log: Path, **env) -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("BADAM_KERNELS_", "TRITON_"))}
    environ.update(env, DISABLE_VERSION_CHECK="0", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="2",
                   CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    started = time.perf_counter()
    proc = subprocess.run([str(VENV_PY)] + args, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=600)
    log.write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{(proc.stdout + proc.stderr)[-4000:]}"
    print(f"{' '.join(args[:3])}: {time.perf_counter() - started:.0f} s")
    return proc.stdout + proc.stderr


def _yaml(path: Path, work: Path, out: Path, **overrides) -> Path:
    values = dict(model_name_or_path=str(work / "model"), stage="sft", do_train=True, finetuning_type="full",
                  use_badam=True, badam_mode="layer", badam_switch_mode="descending", badam_switch_interval=3,
                  badam_verbose=1, dataset="bench", dataset_dir=str(work / "data"), template="default",
                  cutoff_len=64, overwrite_cache=True, output_dir=str(out), logging_steps=1, save_steps=4,
                  report_to="none", per_device_train_batch_size=2, gradient_accumulation_steps=1,
                  learning_rate=1.0e-3, max_steps=8, lr_scheduler_type="linear", weight_decay=0.0,
                  max_grad_norm=1.0, seed=0, disable_tqdm=True, plot_loss=False, dataloader_num_workers=0,
                  save_only_model=False, overwrite_output_dir=True)
    values.update(overrides)
    path.write_text("".join(f"{k}: {json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}\n"
                            for k, v in values.items()))
    return path


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(folder / "model.safetensors"))


def _losses(folder: Path) -> list:
    state = json.loads((folder / "trainer_state.json").read_text())
    return [row["loss"] for row in state["log_history"] if "loss" in row]


def _changed(before: dict, after: dict) -> set:
    return {name for name in before if not torch.equal(before[name], after[name])}


def _layers(names) -> set:
    return {int(n.split("layers.")[1].split(".")[0]) if "layers." in n else n for n in names}


def test_llamafactory_trains_with_badam_kernels_matches_official_and_resumes(tmp_path):
    _venv()
    work = tmp_path
    subprocess.run([str(VENV_PY), "-c", PREPARE.format(bench=str(ROOT / "benchmarks"), work=str(work))], check=True,
                   capture_output=True, timeout=300, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    initial = _weights(work / "model")

    ours_out, official_out, resumed_out = work / "ours", work / "official", work / "resumed"
    log = _run(["-m", "badam_kernels.integrations.llamafactory", "train", str(_yaml(work / "ours.yaml", work, ours_out))],
               work / "ours.log")
    assert "badam_kernels BlockOptimizer: 4 blocks, switch mode descending, every 3 steps, start block 3" in log
    _run(["-c", OFFICIAL_RECORDING, str(_yaml(work / "official.yaml", work, official_out)), str(work / "batches.pt")],
         work / "official.log")
    _run(["-c", DIRECT, str(work / "model"), str(work / "batches.pt"), str(work / "direct")], work / "direct.log")
    _run(["-m", "badam_kernels.integrations.llamafactory", "train",
          str(_yaml(work / "resumed.yaml", work, resumed_out, resume_from_checkpoint=str(ours_out / "checkpoint-4")))],
         work / "resumed.log")

    # only the blocks the schedule visited changed: descending from layer 3, switching every 3 steps (the first
    # block trains 2 steps, as in badam 1.4): layer 3 in steps 1-2, layer 2 in 3-5, layer 1 in 6-8
    at_4, final = _weights(ours_out / "checkpoint-4"), _weights(ours_out)
    assert _layers(_changed(initial, at_4)) == {3, 2}
    assert _layers(_changed(initial, final)) == {3, 2, 1}
    assert _changed(initial, final) == {n for n in initial if _layers([n]) <= {1, 2, 3}}  # whole layers
    optimizer_state = torch.load(ours_out / "checkpoint-4" / "optimizer.pt", weights_only=True)
    assert optimizer_state.get("format", "").startswith("badam_kernels.BlockOptimizer"), list(optimizer_state)[:8]

    # our BlockOptimizer driven directly on the batches LLaMA-Factory fed: the same losses and weights
    direct, ours_losses = _weights(work / "direct"), _losses(ours_out / "checkpoint-8")
    assert len(ours_losses) == 8
    torch.testing.assert_close(torch.tensor(ours_losses),
                               torch.tensor(json.loads((work / "direct" / "losses.json").read_text())),
                               rtol=1e-6, atol=1e-6)
    for name in initial:
        torch.testing.assert_close(final[name], direct[name], rtol=1e-6, atol=1e-7, msg=name)

    # the official badam through llamafactory-cli on the same YAML: the same blocks trained, the same losses to
    # 1e-5; the weights differ by the official's hidden weight decay (badam 1.4 rebuilds its groups with the base
    # optimizer's defaults, and LLaMA-Factory passes weight_decay only in its groups, so every parameter, norms
    # included, decays at torch's AdamW default 0.01 whatever the YAML says): at step 1 exactly lr * 0.01 * p
    official = _weights(official_out)
    assert _changed(initial, official) == _changed(initial, final)
    torch.testing.assert_close(torch.tensor(ours_losses), torch.tensor(_losses(official_out / "checkpoint-8")),
                               rtol=1e-5, atol=1e-5)
    for name in initial:
        moved = (final[name] - initial[name]).abs().max()
        assert (final[name] - official[name]).abs().max() <= 0.2 * moved + 1e-7, name

    # resumed at step 4 (mid-block) to step 8: the same weights, bit for bit, and the same later losses
    resumed = _weights(resumed_out)
    assert all(torch.equal(final[name], resumed[name]) for name in final), \
        [n for n in final if not torch.equal(final[n], resumed[n])]
    assert _losses(resumed_out / "checkpoint-8")[-4:] == ours_losses[-4:]


def test_bench_llamafactory_tiny_runs_both_methods(tmp_path):
    """benchmarks/bench_llamafactory.py at the tiny shape on the CPU: both methods run, ours is ours, and the
    losses agree (the official's hidden weight decay moves them by less than 1e-3 here)."""
    _venv()
    env = dict(os.environ, BENCH_RESULTS_DIR=str(tmp_path / "results"), CUDA_VISIBLE_DEVICES="",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="2")
    proc = subprocess.run([str(VENV_PY), "benchmarks/bench_llamafactory.py", "--shape", "tiny", "--examples", "32",
                           "--switch-interval", "1", "--warmup", "1", "--work", str(tmp_path / "work")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    (result,) = (tmp_path / "results").glob("llamafactory_tiny_*.json")
    (png,) = (tmp_path / "results").glob("llamafactory_tiny_*.png")
    results = json.loads(result.read_text())["results"]
    assert results["official"]["optimizer"] == "badam.block_optim.BlockOptimizer"
    assert results["ours"]["optimizer"] == "badam_kernels.optimizer.BlockOptimizer"
    assert results["ours"]["steps_measured"] == 4 and results["ours"]["tokens_per_s"] > 0
    assert abs(results["ours"]["final_loss"] - results["official"]["final_loss"]) < 1e-3


def test_memory_budget_plans_the_kept_layers_for_the_yamls_batch(tmp_path):
    """BADAM_KERNELS_MEMORY_BUDGET: the main job's plan for the YAML's batch x cutoff_len, logged, and applied;
    BADAM_KERNELS_FUSED_CE=1 where liger cannot run: a warning, and the plain loss."""
    _venv()
    work = tmp_path
    subprocess.run([str(VENV_PY), "-c", PREPARE.format(bench=str(ROOT / "benchmarks"), work=str(work))], check=True,
                   capture_output=True, timeout=300, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    config = _yaml(work / "run.yaml", work, work / "out", max_steps=2, save_steps=100)
    log = _run(["-m", "badam_kernels.integrations.llamafactory", "train", str(config)], work / "run.log",
               BADAM_KERNELS_MEMORY_BUDGET="1000", BADAM_KERNELS_FUSED_CE="1")
    assert "gradient checkpointing, 4 of 4 layers keep their activations" in log
    assert "(2 x 64 tokens a micro-batch at most)" in log and "keep activations all" in log
    # the fused loss asked for where liger cannot run (not installed in this venv; the CPU): said, plain loss
    assert "BADAM_KERNELS_FUSED_CE=1: liger-kernel" in log and "the model keeps its plain loss" in log
    assert "fused loss off" in log
    # without gradient checkpointing there is nothing to plan: said, and LLaMA-Factory's path kept
    config = _yaml(work / "plain.yaml", work, work / "plain", max_steps=1, save_steps=100,
                   disable_gradient_checkpointing=True)
    log = _run(["-m", "badam_kernels.integrations.llamafactory", "train", str(config)], work / "plain.log",
               BADAM_KERNELS_MEMORY_BUDGET="1000")
    assert "MEMORY_BUDGET has nothing to plan: gradient checkpointing is off" in log
    assert "keep activations LLaMA-Factory default" in log and "micro-batch at most" not in log


def test_ratio_mode_trains_a_fraction_of_every_parameter(tmp_path):
    """``badam_mode: ratio`` through badam-llamafactory, with transformers' default ``optim`` (adamw_torch_fused,
    whose ``fused`` flag makes llamafactory-cli's official ratio mode fail): our BlockOptimizerRatio (its
    checkpoint format), each layer's 2-D weight changed in about ``badam_update_ratio`` of its entries (adjacent
    masks), the embedding and the head untouched, the loss going down."""
    _venv()
    work = tmp_path
    subprocess.run([str(VENV_PY), "-c", PREPARE.format(bench=str(ROOT / "benchmarks"), work=str(work))], check=True,
                   capture_output=True, timeout=300, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    initial = _weights(work / "model")
    config = _yaml(work / "ratio.yaml", work, work / "out", badam_mode="ratio", badam_update_ratio=0.25,
                   badam_mask_mode="adjacent", max_steps=4, save_steps=4)
    _run(["-m", "badam_kernels.integrations.llamafactory", "train", str(config)], work / "ratio.log")
    state = torch.load(work / "out" / "checkpoint-4" / "optimizer.pt", weights_only=True)
    assert state.get("format", "").startswith("badam_kernels.BlockOptimizerRatio"), list(state)[:8]
    final = _weights(work / "out")
    for name, before in initial.items():
        changed = (final[name] != before).float().mean().item()
        if "embed" in name or "lm_head" in name:  # left out of ratio mode (LLaMA-Factory's and badam's defaults)
            assert changed == 0.0, name
        elif before.dim() == 2:
            assert 0.15 < changed <= 0.25 + 1e-6, (name, changed)
    losses = _losses(work / "out" / "checkpoint-4")
    assert len(losses) == 4 and losses[-1] < losses[0]
