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
    assert lf.fused_ce_from_env({"BADAM_KERNELS_FUSED_CE": "1"}) and not lf.fused_ce_from_env({})


def test_fast_turns_on_the_whole_fast_path_and_each_variable_still_wins():
    fast = {"BADAM_KERNELS_FAST": "1"}
    assert lf.fast_from_env(fast) and not lf.fast_from_env({})
    assert lf.options_from_env(fast) == dict(compile_layers=True) and lf.fused_ce_from_env(fast)
    off = dict(fast, BADAM_KERNELS_COMPILE="0", BADAM_KERNELS_FUSED_CE="0")
    assert lf.options_from_env(off) == dict(compile_layers=False) and not lf.fused_ce_from_env(off)
    assert lf.options_from_env({"BADAM_KERNELS_FAST": "0"}) == {}
    # its budget: the main job's default on a GPU; off a GPU none (every frozen layer keeps its activations)
    assert lf.fast_budget_gib(tiny_llama(layers=2)) is None


@pytest.mark.gpu
def test_fast_budget_is_the_main_jobs_default_counting_the_loaded_model_as_free():
    import torch

    from badam_kernels.finetune.plan import GiB, MARGIN_GIB, MARGIN_SHARE

    model = tiny_llama(layers=2).cuda()
    free, total = torch.cuda.mem_get_info()
    expected = (free + torch.cuda.memory_allocated() - MARGIN_GIB * GiB - MARGIN_SHARE * total) / GiB
    assert lf.fast_budget_gib(model) == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize("name,value,message", [
    ("COMPILE", "maybe", "BADAM_KERNELS_COMPILE must be 1 or 0, got 'maybe'"),
    ("KEEP_ACTIVATIONS", "-2", "BADAM_KERNELS_KEEP_ACTIVATIONS must be a non-negative integer or 'all', got '-2'"),
    ("FUSED_CE", "maybe", "BADAM_KERNELS_FUSED_CE must be 1 or 0, got 'maybe'"),
    ("FAST", "sure", "BADAM_KERNELS_FAST must be 1 or 0, got 'sure'"),
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


def liger_patched_llama(monkeypatch):
    """A tiny Llama with liger's RMSNorm and SwiGLU in its layers, as ``enable_liger_kernel`` leaves it."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    from transformers.models.llama import modeling_llama

    # liger also swaps modeling_llama's classes for later models: put them back after the test
    for name in ("LlamaRMSNorm", "LlamaMLP", "apply_rotary_pos_emb"):
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    model = tiny_llama(layers=2)
    apply_liger_kernel_to_llama(rope=False, cross_entropy=False, fused_linear_cross_entropy=False, model=model)
    return model


def test_liger_modules_are_found_where_liger_patched_the_layers(monkeypatch):
    """enable_liger_kernel's patching is what turns BADAM_KERNELS_COMPILE off: found in a patched model's
    layers, absent from a plain one's."""
    from badam_kernels import find_layer_stack

    assert lf.liger_modules(find_layer_stack(tiny_llama(layers=2))) == []
    assert lf.liger_modules(find_layer_stack(liger_patched_llama(monkeypatch))) == ["LigerRMSNorm", "LigerSwiGLUMLP"]


def test_compile_is_dropped_with_a_warning_where_liger_is_in_the_layers(monkeypatch):
    """BADAM_KERNELS_COMPILE=1 with liger's modules in the layers: compiled they crashed on the GPU, so the
    fast path drops the compile and says so; without them the compile stays."""
    from badam_kernels import find_layer_stack
    from badam_kernels.options import BAdamOptions

    monkeypatch.setenv("BADAM_KERNELS_COMPILE", "1")
    args = SimpleNamespace(per_device_train_batch_size=2)
    for model, dropped in ((tiny_llama(layers=2), False), (liger_patched_llama(monkeypatch), True)):
        layers, log = find_layer_stack(model), _Lines()
        options, ours_keep, fused = lf._fast_path(model, layers, lf.liger_modules(layers),
                                                  BAdamOptions(compile_layers=True), args, log)
        assert options.compile_layers is not dropped and not ours_keep and not fused
        warnings = [line for level, line in log.lines if level == "warning"]
        if dropped:
            [line] = warnings
            assert "BADAM_KERNELS_COMPILE=1 is ignored" in line and "LigerRMSNorm, LigerSwiGLUMLP" in line
        else:
            assert warnings == [], warnings


class _Lines:
    """LLaMA-Factory's logger, as far as the integration uses it: the lines it was given."""

    def __init__(self):
        self.lines = []

    def info_rank0(self, line):
        self.lines.append(("info", line))

    def warning_rank0(self, line):
        self.lines.append(("warning", line))


def test_fused_loss_is_added_only_where_it_can_run(monkeypatch):
    """BADAM_KERNELS_FUSED_CE=1: nothing to add where enable_liger_kernel is already in the model; on the CPU
    without the Triton interpreter liger's kernels cannot run, and the warning says why (the model keeps its
    plain loss, its forward untouched)."""
    model, log = tiny_llama(layers=2), _Lines()
    assert lf.fuse_the_loss(model, ["LigerRMSNorm"], log) is False
    assert log.lines == [("info", "badam-llamafactory: BADAM_KERNELS_FUSED_CE=1 has nothing to add: "
                                  "enable_liger_kernel already fuses the loss")]
    log.lines.clear()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert lf.fuse_the_loss(model, [], log) is False
    [(level, line)] = log.lines
    assert level == "warning" and "liger's Triton kernels need a GPU" in line and "plain loss" in line
    assert "forward" not in vars(model)


def test_fused_loss_is_patched_into_the_model_and_equals_the_plain_one(monkeypatch):
    """Where liger runs (a GPU, or here Triton's interpreter) the model instance gets liger's fused-loss
    forward, and its loss equals the plain one."""
    import torch

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, log = tiny_llama(layers=2).to(device).train(), _Lines()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), device=device)
    plain = model(input_ids=ids, labels=ids)
    assert lf.fuse_the_loss(model, [], log) is True and log.lines == []
    fused = model(input_ids=ids, labels=ids)
    assert plain.logits is not None and fused.logits is None  # the fused path: no logits in training
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-4, atol=1e-5)
