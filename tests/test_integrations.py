"""BlockOptimizer under the Hugging Face Trainer and Accelerate, and the examples in python/ (CPU)."""
import os
import subprocess
import sys

import pytest
import torch

from badam_kernels import BlockOptimizer
from helpers import max_rel_diff, snapshot, tiny_llama

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from badam_kernels.integrations.hf import (BAdamConfig, BAdamTrainer, FreeBlockGradsCallback,  # noqa: E402
                                           make_badam_optimizer)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=32, seq=12, vocab=64, seed=3):
        self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def trainer_args(out, **kw):
    defaults = dict(per_device_train_batch_size=4, max_steps=6, learning_rate=1e-2, lr_scheduler_type="linear",
                    logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                    data_seed=0)
    defaults.update(kw)
    return TrainingArguments(str(out), **defaults)


def badam_trainer(out, badam=None, model=None, dataset=None, **kw):
    return BAdamTrainer(model=model or tiny_llama(), args=trainer_args(out, **kw), train_dataset=dataset or Tokens(),
                        badam=badam or BAdamConfig(switch_block_every=100))


def test_trainer_trains_only_the_active_block_with_the_lr_schedule(tmp_path):
    trainer = badam_trainer(tmp_path, max_steps=5)
    before = snapshot(trainer.model)
    trainer.train()
    opt = trainer.block_optimizer
    assert isinstance(opt, BlockOptimizer) and opt.global_step == 5
    after = snapshot(trainer.model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == set(opt.active_param_names)  # the top layer (descending), all of it, nothing else
    assert all(n.startswith("model.layers.2.") for n in changed)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 5 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert [h["learning_rate"] for h in logs] == pytest.approx([1e-2 * (1 - s / 5) for s in range(5)])
    assert all(g.grad is None for g in opt.groups)  # the flat gradient buffer is freed after each step


@pytest.mark.parametrize("policy", ["reset", "offload"])
def test_trainer_resume_mid_block_is_bit_exact(tmp_path, policy):
    badam = BAdamConfig(switch_block_every=2, state_policy=policy, include_embedding=True, include_lm_head=True)
    full = badam_trainer(tmp_path / "full", badam, max_steps=7, save_strategy="steps", save_steps=3,
                         max_grad_norm=0.5)
    full.train()
    resumed = badam_trainer(tmp_path / "resumed", badam, model=tiny_llama(seed=1), max_steps=7, max_grad_norm=0.5)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert resumed.block_optimizer.global_step == full.block_optimizer.global_step == 7
    assert resumed.block_optimizer.active_block == full.block_optimizer.active_block
    a, b = snapshot(full.model), snapshot(resumed.model)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    badam = BAdamConfig(switch_block_every=3)
    big = badam_trainer(tmp_path / "big", badam, per_device_train_batch_size=4, max_steps=4)
    big.train()
    acc = badam_trainer(tmp_path / "acc", badam, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                        max_steps=4)
    acc.train()
    assert acc.block_optimizer.global_step == 4
    assert max_rel_diff(snapshot(big.model), snapshot(acc.model)) < 1e-5


class _GradNormBeforeStep(TrainerCallback):
    def __init__(self):
        self.norms = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, model=None, **kw):
        flat = torch.cat([g.grad.float() for g in optimizer.optimizer.groups])  # what the fused step reads
        self.norms.append(flat.norm().item())


def test_max_grad_norm_clips_the_flat_gradients(tmp_path):
    probe = _GradNormBeforeStep()
    trainer = badam_trainer(tmp_path, max_steps=3, max_grad_norm=1e-3)
    trainer.add_callback(probe)
    trainer.train()
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert all(n > 1e-2 for n in logged)  # the norm before clipping
    assert probe.norms == pytest.approx([1e-3] * 3, rel=1e-3)


def test_config_passes_keep_activations_to_the_truncation():
    from badam_kernels import find_layer_stack

    model = tiny_llama()
    make_badam_optimizer(model, BAdamConfig(keep_activations=2, keep_mode="matmuls"), lr=1e-3)
    handle, _ = find_layer_stack(model)[0]._badam_truncation
    assert handle.keep_activations == 2 and handle.keep_mode == "matmuls"


def test_config_compiles_the_layers_once():
    from badam_kernels import find_layer_stack

    model = tiny_llama()
    assert find_layer_stack(model)[0]._compiled_call_impl is None
    make_badam_optimizer(model, BAdamConfig(compile_layers=True), lr=1e-3)
    compiled = [layer._compiled_call_impl for layer in find_layer_stack(model)]
    assert all(c is not None for c in compiled)
    make_badam_optimizer(model, BAdamConfig(compile_layers=True), lr=1e-3)  # a second optimizer, same model
    assert [layer._compiled_call_impl for layer in find_layer_stack(model)] == compiled


def test_activation_checkpointing_keeps_the_truncation(tmp_path):
    model = tiny_llama()
    grad_mode = []
    model.model.layers[0].register_forward_hook(lambda m, i, o: grad_mode.append(torch.is_grad_enabled()))
    trainer = badam_trainer(tmp_path, model=model, max_steps=2, activation_checkpointing=True,
                            activation_checkpointing_kwargs={"use_reentrant": True})
    before = snapshot(model)
    trainer.train()
    assert model.model.layers[0].gradient_checkpointing  # the Trainer did enable it (and input grads)
    assert grad_mode and not any(grad_mode)  # layer 0 (below the active top layer) ran without autograd
    after = snapshot(model)
    assert all(not torch.equal(before[n], after[n]) for n in trainer.block_optimizer.active_param_names)


def test_plain_trainer_with_make_badam_optimizer(tmp_path):
    model = tiny_llama()
    opt = make_badam_optimizer(model, BAdamConfig(switch_block_every=2, seed=0), lr=1e-2)
    trainer = Trainer(model=model, args=trainer_args(tmp_path, max_steps=4), train_dataset=Tokens(),
                      optimizers=(opt, None), callbacks=[FreeBlockGradsCallback()])
    trainer.train()
    assert opt.global_step == 4 and opt.active_block == 0  # blocks 2, 1 (1 step, 2 steps), then 0
    assert trainer.optimizer.optimizer is opt and all(g.grad is None for g in opt.groups)
    with pytest.raises(ValueError, match="already installed"):  # the factory installed the truncation once
        from badam_kernels import truncate_backward
        truncate_backward(model)


def _plain_steps(model, opt, data, sched=None):
    for ids in data:
        ids = ids.to(model.device)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()


def test_accelerate_prepare_round_trip():
    accelerate = pytest.importorskip("accelerate", reason="accelerate is not installed")
    data = [torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(s)) for s in range(6)]
    config = BAdamConfig(switch_block_every=2, seed=0)
    ref = tiny_llama()
    ref_opt = make_badam_optimizer(ref, config, lr=1e-2)
    _plain_steps(ref, ref_opt, data)

    model = tiny_llama()
    opt = make_badam_optimizer(model, config, lr=1e-2)
    accelerator = accelerate.Accelerator(cpu=True)
    model, prepared = accelerator.prepare(model, opt)  # calls opt.load_state_dict(opt.state_dict())
    assert isinstance(prepared, accelerate.optimizer.AcceleratedOptimizer) and prepared.optimizer is opt
    _plain_steps(model, prepared, data[:3])  # a switch happens in here
    prepared.load_state_dict(prepared.state_dict())  # mid-block round trip through the wrapper
    _plain_steps(model, prepared, data[3:])
    assert opt.global_step == ref_opt.global_step and opt.active_block == ref_opt.active_block
    a, b = snapshot(ref), snapshot(model)
    assert all(torch.equal(a[n], b[n]) for n in a)


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["reset", "offload"])
def test_state_dict_moved_to_the_gpu_loads(policy):
    """What ``accelerator.prepare`` does on a GPU: ``load_state_dict(move_to_device(state_dict()))``."""
    model = tiny_llama().cuda()
    opt = make_badam_optimizer(model, BAdamConfig(switch_block_every=2, seed=0, state_policy=policy), lr=1e-2)
    _plain_steps(model, opt, [torch.randint(0, 64, (2, 12)) for _ in range(5)])
    state = opt.state_dict()
    opt.load_state_dict(_to(state, "cuda"))
    assert all(v.device.type == "cpu" for states in opt.park.host.values() for v in states.values())
    after = opt.state_dict()
    assert torch.equal(after["schedule"]["generator"], state["schedule"]["generator"])


EXAMPLES = {
    "plain_loop": [sys.executable, "python/plain_loop.py", "--steps", "3", "--switch-every", "2"],
    "hf_trainer": [sys.executable, "python/hf_trainer.py", "--steps", "4", "--switch-every", "2", "--grad-accum", "1"],
    "accelerate_loop": [sys.executable, "python/accelerate_loop.py", "--steps", "3", "--switch-every", "2"],
    "torchrun_plain_loop": ["bash", "python/torchrun_plain_loop.sh", "--steps", "2"],
    "torchrun_fsdp": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                      "python/torchrun_fsdp.py", "--steps", "3"],
}


def test_every_example_runs(tmp_path):
    """All at once (each spends most of its time importing torch and transformers)."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],  # this venv's torchrun
           "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    procs = {}
    for name, command in EXAMPLES.items():
        if name in ("hf_trainer", "accelerate_loop", "torchrun_fsdp"):
            command = command + ["--out", str(tmp_path / name)]
        procs[name] = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
    failures = []
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        if proc.returncode != 0 or "done" not in out and "identical" not in out:
            failures.append(f"{name} (exit {proc.returncode}):\n{out[-1500:]}\n{err[-2500:]}")
    assert not failures, "\n\n".join(failures)
