"""The offload policy on CUDA: pinned host buffers, side-stream copies, prefetch (run with -m gpu)."""
import pytest
import torch

from badam_kernels import BlockOptimizer
from badam_kernels.state_policy import StatePark
from helpers import make, max_rel_diff, persistent_per_block_adamw, snapshot, train

pytestmark = pytest.mark.gpu


def test_park_and_take_round_trip_is_exact():
    park = StatePark()
    states = {"master": torch.randn(100_003, device="cuda"), "exp_avg": torch.randn(100_003, device="cuda"),
              "step": torch.tensor([7.0], device="cuda")}
    expected = {k: v.clone() for k, v in states.items()}
    park.park((0, 0), states)
    for v in states.values():
        v.fill_(float("nan"))  # the device copies may be overwritten at once: the host copy must not change
    del states
    back = park.take((0, 0), torch.device("cuda"))
    for key in expected:
        assert torch.equal(back[key], expected[key]), key
    assert park.host[(0, 0)]["master"].is_pinned()


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("switch_every", [1, 2, 4])
def test_offload_on_cuda_equals_states_kept_in_place(backend, switch_every):
    """switch_every=1 switches at every step: prefetch, park and take all overlap; no race may show."""
    # lr 1e-3: at 1e-2 this tiny model is chaotic, and the fused kernels' rounding (not a race)
    # moves it by 1e-3 within 24 steps
    model, opt = make(BlockOptimizer, switch_block_every=switch_every, switch_mode="descending",
                      state_policy="offload", backend=backend, base_kw={"lr": 1e-3}, model_kw={"device": "cuda"})
    steps = 24
    train(model, opt, steps)
    ref = persistent_per_block_adamw(steps, switch_every, order=[2, 1, 0], device="cuda", lr=1e-3)
    # the reference backend does torch's single-tensor AdamW's operations in the same order: exact
    assert max_rel_diff(ref, snapshot(model)) <= (0.0 if backend == "reference" else 1e-5)


def test_offload_host_buffers_are_pinned_up_front_and_reused():
    model, opt = make(BlockOptimizer, torch.bfloat16, switch_block_every=2, state_policy="offload",
                      model_kw={"device": "cuda"})
    buffers = {key: {k: v.data_ptr() for k, v in states.items()} for key, states in opt.park.host.items()}
    assert sorted(b for b, _ in buffers) == [0, 1, 2] and all(
        v.is_pinned() for states in opt.park.host.values() for v in states.values())
    train(model, opt, 12)
    assert {key: {k: v.data_ptr() for k, v in states.items()} for key, states in opt.park.host.items()} == buffers
