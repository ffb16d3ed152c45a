"""Truncated backward: with block k active, layers below k build no graph, and gradients are unchanged."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from badam_kernels import BlockOptimizer, find_layer_stack, truncate_backward
from helpers import batches, enable_checkpointing, lm_loss, tiny_llama

LAYERS = 4


def activate(model, prefix):
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefix))


class LayerProbe:
    """Records, per layer: whether its output joined the graph, whether backward reached it, and how
    many times its MLP ran forward (twice means checkpointing recomputed it)."""

    def __init__(self, model):
        self.model = model
        self.graph, self.backward, self.forwards = set(), set(), {}
        self.handles = []
        for i, layer in enumerate(find_layer_stack(model)):
            self.handles.append(layer.register_forward_hook(self._on_output(i)))
            self.handles.append(layer.mlp.register_forward_pre_hook(self._on_mlp(i)))

    def _on_output(self, i):
        def hook(module, args, out):
            t = out[0] if isinstance(out, tuple) else out
            if t.requires_grad:
                self.graph.add(i)
                t.register_hook(lambda g: self.backward.add(i))
        return hook

    def _on_mlp(self, i):
        def hook(module, args):
            self.forwards[i] = self.forwards.get(i, 0) + 1
        return hook


class MatmulCounter(TorchDispatchMode):
    """Counts matrix products (aten.mm) while active."""

    def __init__(self):
        super().__init__()
        self.mm = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.mm += func is torch.ops.aten.mm.default
        return func(*args, **(kwargs or {}))


def grads_of(model, prefix, ckpt, truncate, keep=0, keep_mode="all"):
    activate(model, prefix)
    if ckpt != "none":
        enable_checkpointing(model, reentrant=ckpt == "reentrant")
    handle = truncate_backward(model, keep_activations=keep, keep_mode=keep_mode) if truncate else None
    probe = LayerProbe(model)
    loss = lm_loss(model, batches(1, seq=16)[0])
    with MatmulCounter() as counter:
        loss.backward()
    probe.backward_mm = counter.mm
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if handle:
        handle.remove()
    return grads, probe


@pytest.mark.parametrize("ckpt", ["none", "reentrant", "nonreentrant"])
@pytest.mark.parametrize("block", [0, 2, 3])
def test_layers_below_active_block_build_no_graph(ckpt, block):
    prefix = f"model.layers.{block}."
    reference, _ = grads_of(tiny_llama(layers=LAYERS), prefix, "none", truncate=False)
    grads, probe = grads_of(tiny_llama(layers=LAYERS), prefix, ckpt, truncate=True)
    above = set(range(block, LAYERS))
    assert probe.graph == above
    assert probe.backward == above
    recomputed = 2 if ckpt != "none" else 1
    assert probe.forwards == {i: (recomputed if i >= block else 1) for i in range(LAYERS)}
    assert grads.keys() == reference.keys() and len(grads) == 9
    for name in reference:
        torch.testing.assert_close(grads[name], reference[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("ckpt", ["reentrant", "nonreentrant"])
@pytest.mark.parametrize("block, keep", [(0, 2), (1, "all"), (2, 1), (3, 3)])
def test_kept_layers_skip_the_recompute_and_gradients_are_unchanged(ckpt, block, keep):
    prefix = f"model.layers.{block}."
    reference, _ = grads_of(tiny_llama(layers=LAYERS), prefix, "none", truncate=False)
    grads, probe = grads_of(tiny_llama(layers=LAYERS), prefix, ckpt, truncate=True, keep=keep)
    kept = range(block, LAYERS) if keep == "all" else range(max(block, LAYERS - keep), LAYERS)
    assert probe.graph == probe.backward == set(range(block, LAYERS))
    assert probe.forwards == {i: 2 if block <= i and i not in kept else 1 for i in range(LAYERS)}
    assert grads.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(grads[name], reference[name], rtol=1e-5, atol=1e-7)
    assert all(layer.gradient_checkpointing for layer in find_layer_stack(probe.model))  # restored


@pytest.mark.parametrize("ckpt", ["reentrant", "nonreentrant"])
@pytest.mark.parametrize("block, keep", [(0, "all"), (1, 2)])
def test_matmuls_mode_recomputes_no_matrix_product_and_gradients_are_unchanged(ckpt, block, keep):
    """keep_mode="matmuls": the kept layers' forward is replayed in backward for its elementwise
    operations only, so backward runs as many matrix products as with every activation kept."""
    prefix = f"model.layers.{block}."
    reference, _ = grads_of(tiny_llama(layers=LAYERS), prefix, "none", truncate=False)
    grads, probe = grads_of(tiny_llama(layers=LAYERS), prefix, ckpt, truncate=True, keep=keep,
                            keep_mode="matmuls")
    _, kept_all = grads_of(tiny_llama(layers=LAYERS), prefix, ckpt, truncate=True, keep=keep)
    _, recomputed = grads_of(tiny_llama(layers=LAYERS), prefix, ckpt, truncate=True)
    assert probe.graph == probe.backward == set(range(block, LAYERS))
    assert probe.backward_mm == kept_all.backward_mm < recomputed.backward_mm
    assert grads.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(grads[name], reference[name], rtol=1e-5, atol=1e-7)
    assert all(layer.gradient_checkpointing and "_gradient_checkpointing_func" in vars(layer)
               for layer in find_layer_stack(probe.model))  # HF's own checkpointing function is back


def test_keep_mode_is_checked():
    with pytest.raises(ValueError, match="keep_mode"):
        truncate_backward(tiny_llama(layers=LAYERS), keep_mode="some")


@pytest.mark.parametrize("keep", [-1, 1.5, True, "some"])
def test_keep_activations_must_be_a_count_or_all(keep):
    with pytest.raises(ValueError, match="keep_activations"):
        truncate_backward(tiny_llama(layers=LAYERS), keep_activations=keep)


@pytest.mark.parametrize("ckpt", ["reentrant", "nonreentrant"])
def test_without_truncation_checkpointing_drives_backward_through_every_layer(ckpt):
    """The problem being solved: HF checkpointing makes every layer join the graph."""
    _, probe = grads_of(tiny_llama(layers=LAYERS), "model.layers.3.", ckpt, truncate=False)
    assert probe.graph == set(range(LAYERS))


@pytest.mark.parametrize("tie", [False, True])
def test_trainable_embedding_disables_truncation(tie):
    prefix = "model.embed_tokens." if not tie else "lm_head."
    model = tiny_llama(layers=LAYERS, tie=tie)
    reference, _ = grads_of(tiny_llama(layers=LAYERS, tie=tie), "model.embed_tokens.", "none", False)
    grads, probe = grads_of(model, "model.embed_tokens.", "nonreentrant", truncate=True)
    assert probe.graph == set(range(LAYERS)), prefix
    torch.testing.assert_close(grads["model.embed_tokens.weight"], reference["model.embed_tokens.weight"])


def test_only_lm_head_trainable_truncates_every_layer():
    grads, probe = grads_of(tiny_llama(layers=LAYERS), "lm_head.", "reentrant", truncate=True)
    assert probe.graph == set() and list(grads) == ["lm_head.weight"]


def test_truncation_follows_block_switches_and_remove_restores_classes():
    model = tiny_llama(layers=LAYERS)
    classes = [type(layer) for layer in find_layer_stack(model)]
    enable_checkpointing(model, reentrant=True)
    opt = BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), list(model.named_parameters()),
                         switch_block_every=2, switch_mode="descending", verbose=0)
    handle = truncate_backward(model)
    probe = LayerProbe(model)
    seen = []
    for ids in batches(7, seq=16):
        probe.graph.clear()
        active = opt.active_block
        lm_loss(model, ids).backward()
        seen.append((active, min(probe.graph)))
        opt.step()
        opt.zero_grad()
    assert seen == [(3, 3), (2, 2), (2, 2), (1, 1), (1, 1), (0, 0), (0, 0)]
    handle.remove()
    assert [type(layer) for layer in find_layer_stack(model)] == classes
    truncate_backward(model)
    with pytest.raises(ValueError, match="already installed"):
        truncate_backward(model)


def test_eval_and_no_grad_forward_are_untouched():
    model = tiny_llama(layers=LAYERS)
    activate(model, "model.layers.2.")
    ids = batches(1, seq=16)[0]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    handle = truncate_backward(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=0)
    torch.testing.assert_close(model(input_ids=ids).logits.detach(), expected, rtol=0, atol=0)
    handle.remove()


def test_model_without_layer_stack_is_named():
    with pytest.raises(ValueError, match="no layer stack"):
        truncate_backward(torch.nn.Linear(3, 3))
