"""compile_layers: regional torch.compile under BlockOptimizer and truncate_backward changes no math.

On CPU with the ``aot_eager`` backend (the graphs dynamo captures and AOT autograd differentiates,
run without code generation: what can go wrong in the wrapping, at no compile time), on CUDA with
inductor (fused kernels: equal to rounding).
"""
import pytest
import torch
from helpers import batches, enable_checkpointing, lm_loss, max_rel_diff, snapshot, tiny_llama

from badam_kernels import BlockOptimizer, compile_layers, find_layer_stack, truncate_backward


def run_epoch(compile_kwargs, *, checkpointing, keep, layers=3, device="cpu", steps=12, lr=1e-2):
    """A tiny Llama trained over every block twice (switch every 2 steps), compiled or not: the
    losses, the final weights, and each step's gradients."""
    torch._dynamo.reset()
    model = tiny_llama(layers=layers, device=device)
    if checkpointing:
        enable_checkpointing(model, reentrant=False)
    opt = BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0),
                         list(model.named_parameters()), switch_block_every=2, switch_mode="descending", verbose=0)
    truncate_backward(model, keep_activations=keep)
    if compile_kwargs is not None:
        compile_layers(model, **compile_kwargs)
    losses, grads = [], []
    for ids in batches(steps):
        loss = lm_loss(model, ids)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, snapshot(model), grads


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing, keep", [(True, 0), (True, "all"), (False, 0)])
def test_compiled_layers_train_exactly_like_eager_ones(checkpointing, keep):
    eager_losses, eager, _ = run_epoch(None, checkpointing=checkpointing, keep=keep)
    losses, compiled, _ = run_epoch({"backend": "aot_eager"}, checkpointing=checkpointing, keep=keep)
    assert losses == pytest.approx(eager_losses, rel=1e-6)
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-6, atol=1e-7,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
def test_the_layers_share_their_graphs_whatever_the_depth():
    from torch._dynamo.utils import counters

    graphs = {}
    for layers in (3, 6):  # deep enough for every role (below, active, above) to occur
        counters.clear()
        run_epoch({"backend": "aot_eager"}, checkpointing=True, keep="all", layers=layers, steps=4 * layers)
        graphs[layers] = counters["stats"]["unique_graphs"]
    assert 0 < graphs[3] == graphs[6], graphs  # one graph per role, not one per layer


@pytest.mark.slow
def test_the_bottom_block_compiles_nothing_new():
    """Hugging Face's checkpointing makes the embedding output require grad, so the bottom layer's input
    differs from every other layer's; truncate_backward cuts it (nothing below trains), so when block 0
    becomes active, after the blocks above, its layer plays a role already compiled."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = tiny_llama(layers=3)
    enable_checkpointing(model, reentrant=False)
    opt = BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), list(model.named_parameters()),
                         switch_block_every=1, switch_mode="descending", verbose=0)
    truncate_backward(model, keep_activations="all")
    compile_layers(model, backend="aot_eager")
    counters.clear()
    graphs = []
    for ids in batches(3):  # blocks 2, 1, 0
        graphs.append(counters["stats"]["unique_graphs"])
        lm_loss(model, ids).backward()
        opt.step()
        opt.zero_grad()
    graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] > 0 and graphs[3] == graphs[2], graphs  # block 0's step (the last) compiled nothing


def test_compile_layers_compiles_each_layer_of_the_stack():
    model = tiny_llama()
    stack = compile_layers(model, backend="eager")
    assert stack is find_layer_stack(model)
    assert all(layer._compiled_call_impl is not None for layer in stack)
    assert model.lm_head._compiled_call_impl is None  # regional: the rest of the model stays eager
    first = [layer._compiled_call_impl for layer in stack]
    compile_layers(model, backend="eager")
    assert [layer._compiled_call_impl for layer in stack] == first  # compiled layers are left alone


@pytest.mark.gpu
@pytest.mark.parametrize("keep", [0, "all"])
def test_inductor_compiled_layers_match_eager_on_cuda(keep):
    """Inductor reassociates fp32 reductions, and Adam at lr 1e-2 turns those last-bit differences
    into weight differences of 1e-3 on near-zero gradients within a few steps (measured on the
    H200); so at lr 0 (every block still takes its turn, every role compiled) each step's loss and
    the active block's gradients are held to fp32 rounding instead."""
    eager_losses, _, eager_grads = run_epoch(None, checkpointing=True, keep=keep, device="cuda", lr=0.0)
    losses, _, grads = run_epoch({}, checkpointing=True, keep=keep, device="cuda", lr=0.0)
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    for step, (mine, reference) in enumerate(zip(grads, eager_grads)):
        assert mine.keys() == reference.keys() and mine, step
        assert max_rel_diff(reference, mine) < 1e-4, step
