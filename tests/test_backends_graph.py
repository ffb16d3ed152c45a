"""A fused step captured in a CUDA graph, for every backend: replays equal eager steps bit for bit and
follow the reference.

Both fused backends run on the current stream without a host synchronisation, so a training step
can be captured with lr, the loss scale and found_inf as device tensors that change between replays.
"""
import pytest
import torch
from test_backends import BF16, FP32, TENSORS, assert_guards_untouched, clone_block, copy_block, make_block, run

from badam_kernels import ops

pytestmark = pytest.mark.gpu
FOLLOWS_THE_REFERENCE = ("triton",)  # graphed replays checked against the reference (cuda: not yet run on a GPU)


@pytest.mark.parametrize("master", [True, False], ids=["master", "stochastic"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_step_replayed_from_a_cuda_graph_equals_eager_and_follows_the_reference(backend, master):
    if ops.load_backend(backend) is None:
        reason = ops.backend_report()[backend]
        if backend == "triton":
            pytest.skip(reason)
        pytest.fail(f"the {backend} backend did not load: {reason}")
    n, device = 300_007, torch.device("cuda")
    graphed = make_block(n, BF16, master, FP32, device, step=0.0)
    eager, ref = copy_block(graphed), clone_block(graphed)
    lr, scale = torch.tensor([1e-3], device=device), torch.tensor([8.0], device=device)
    found_inf = torch.zeros(1, device=device)
    kwargs = dict(lr=lr, grad_scale=scale, found_inf=found_inf, max_grad_norm=1.0, seed=5)

    def step(block, backend=backend, **override):
        return run(backend, block, **{**kwargs, **override})

    side = torch.cuda.Stream()  # warm-up outside the graph (compiles the kernels, caches the launch configuration)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(graphed)
    torch.cuda.current_stream().wait_stream(side)
    step(eager)
    step(ref, "reference", lr=1e-3, found_inf=found_inf.clone())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_norm = step(graphed)

    gen = torch.Generator(device=device).manual_seed(9)
    for i in range(6):
        grad = (torch.randn(n, device=device, generator=gen) * 8.0 * 0.1).to(BF16)
        lr.fill_(1e-3 * (i + 1))
        found_inf.fill_(1.0 if i == 3 else 0.0)  # the fourth replay is skipped on the device
        for block in (graphed, eager, ref):
            block["grad"].copy_(grad)
        graph.replay()
        eager_norm = step(eager)
        step(ref, "reference", lr=1e-3 * (i + 1), found_inf=found_inf.clone())
        torch.cuda.synchronize()
        assert torch.equal(graph_norm, eager_norm), i
        for name in TENSORS:
            if graphed[name] is not None:
                assert torch.equal(graphed[name], eager[name]), (i, name)
        # the reference's stochastic rounding draws other noise: its weights differ; m and v do not
        for name in ("master", "exp_avg", "exp_avg_sq", "step") if backend in FOLLOWS_THE_REFERENCE else ():
            if graphed[name] is not None:
                torch.testing.assert_close(graphed[name], ref[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{i} {name}: {m}")
    assert graphed["step"].item() == 1 + 5  # one warm-up step, six replays of which one was skipped
    assert_guards_untouched(graphed)
