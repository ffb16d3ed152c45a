"""The LLaMA-Factory integration's environment options and its activation plan, without LLaMA-Factory
(badam_kernels/integrations/llamafactory.py imports it only where it runs inside it; the runs themselves
are in tests/test_llamafactory.py, in LLaMA-Factory's own environment)."""
from types import SimpleNamespace

import pytest

from badam_kernels.finetune.plan import DeviceFacts, ModelShape, make_plan
from badam_kernels.integrations import llamafactory as lf
from helpers import tiny_llama


def test_environment_options_map_to_badam_options():
    env = {"BADAM_KERNELS_COMPILE": "1", "BADAM_KERNELS_KEEP_ACTIVATIONS": "3", "BADAM_KERNELS_STATE_POLICY": "offload",
           "BADAM_KERNELS_BACKEND": "auto", "BADAM_KERNELS_TRUNCATE": "0", "BADAM_KERNELS_MEMORY_BUDGET": "24"}
    assert lf.options_from_env(env) == dict(compile_layers=True, keep_activations=3, state_policy="offload",
                                            truncate=False)
    assert lf.memory_budget_from_env(env) == 24.0 and lf.memory_budget_from_env({}) is None


@pytest.mark.parametrize("name,value,message", [
    ("COMPILE", "maybe", "BADAM_KERNELS_COMPILE must be 1 or 0, got 'maybe'"),
    ("KEEP_ACTIVATIONS", "-2", "BADAM_KERNELS_KEEP_ACTIVATIONS must be a non-negative integer or 'all', got '-2'"),
    ("MEMORY_BUDGET", "lots", "BADAM_KERNELS_MEMORY_BUDGET must be a positive number of GiB, got 'lots'"),
    ("MEMORY_BUDGET", "0", "BADAM_KERNELS_MEMORY_BUDGET must be a positive number of GiB, got '0'"),
])
def test_bad_environment_is_refused_before_llamafactory_loads(monkeypatch, capsys, name, value, message):
    monkeypatch.setenv("BADAM_KERNELS_" + name, value)
    assert lf.main(["train", "run.yaml"]) == 2
    assert capsys.readouterr().err.strip() == f"badam-llamafactory: error: {message}"


def test_planned_activations_are_the_main_jobs_plan_within_the_budget():
    model = tiny_llama(layers=4)
    args = SimpleNamespace(per_device_train_batch_size=2)
    shape = ModelShape.from_model(model)

    def plan(budget_gib):
        return lf.planned_activations(model, args, budget_gib, compiled=False, seq_len=64, fused_ce=False)

    assert plan(1000.0).keep_activations == "all" and plan(1000.0).fits
    starved = plan(1e-6)
    assert starved.keep_activations == 0 and not starved.fits and "exceeds the memory budget" in starved.notes[0]
    # a budget between the peaks with none and with every layer kept: some but not all, as make_plan chooses
    peaks = [make_plan(shape, 2, 64, DeviceFacts("cpu"), fast="on", budget_bytes=None, fused_ce=False,
                       compile_layers=False, grad_checkpointing=True, keep_activations=k).peak_gib for k in (0, 4)]
    middle = plan(sum(peaks) / 2)
    assert 0 < middle.keep_activations < 4 and middle.fits and middle.peak_gib <= sum(peaks) / 2
    assert middle.budget_gib == round(sum(peaks) / 2, 3)


def test_liger_modules_are_found_where_liger_patched_the_layers(monkeypatch):
    """enable_liger_kernel's patching is what turns BADAM_KERNELS_COMPILE off: found in a patched model's
    layers, absent from a plain one's."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    from transformers.models.llama import modeling_llama

    from badam_kernels import find_layer_stack

    # liger also swaps modeling_llama's classes for later models: put them back after this test
    for name in ("LlamaRMSNorm", "LlamaMLP", "apply_rotary_pos_emb"):
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    model = tiny_llama(layers=2)
    assert lf.liger_modules(find_layer_stack(model)) == []
    apply_liger_kernel_to_llama(rope=False, cross_entropy=False, fused_linear_cross_entropy=False, model=model)
    assert lf.liger_modules(find_layer_stack(model)) == ["LigerRMSNorm", "LigerSwiGLUMLP"]
