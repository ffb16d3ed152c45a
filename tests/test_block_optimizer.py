"""BlockOptimizer against the official badam 1.4 and against plain torch optimizers."""
import gc

import badam
import pytest
import torch

from badam_kernels import BlockOptimizer
from helpers import batches, lm_loss, make, max_rel_diff, persistent_per_block_adamw, snapshot, tiny_llama, train


def run_both(steps=32, dtype=torch.float32, **kw):
    model_a, opt_a = make(badam.BlockOptimizer, dtype, **kw)
    losses_a = train(model_a, opt_a, steps)
    model_b, opt_b = make(BlockOptimizer, dtype, **kw)
    losses_b = train(model_b, opt_b, steps)
    return losses_a, losses_b, snapshot(model_a), snapshot(model_b)


@pytest.mark.parametrize("kw", [
    dict(switch_mode="descending", switch_block_every=5),
    dict(switch_mode="ascending", switch_block_every=4),
    dict(switch_mode="fixed", start_block=1, switch_block_every=6),
    dict(switch_mode="ascending", start_block=2, switch_block_every=3),
    dict(switch_mode="descending", switch_block_every=5, include_embedding=True, include_lm_head=True),
    dict(switch_mode="ascending", switch_block_every=5, active_modules=["model.norm."]),
], ids=["descending", "ascending", "fixed", "start_block", "embedding+lm_head", "active_modules"])
def test_fp32_trajectory_equals_badam(kw):
    losses_a, losses_b, params_a, params_b = run_both(**kw)
    assert len(losses_a) == 32
    for la, lb in zip(losses_a, losses_b):
        assert abs(la - lb) <= 1e-6 * abs(la)
    assert max_rel_diff(params_a, params_b) <= 1e-6
    assert max_rel_diff(params_a, snapshot(tiny_llama())) > 1e-3  # the run did train


@pytest.mark.parametrize("base,base_kw", [
    (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    (torch.optim.Adagrad, {"lr": 0.02}),
    (torch.optim.Adam, {"lr": 1e-2}),
])
def test_any_base_optimizer_equals_badam(base, base_kw):
    losses_a, losses_b, params_a, params_b = run_both(steps=24, base=base, base_kw=base_kw, switch_block_every=5)
    assert max(abs(a - b) / abs(a) for a, b in zip(losses_a, losses_b)) <= 1e-6
    assert max_rel_diff(params_a, params_b) <= 1e-6


def test_bf16_close_to_badam():
    losses_a, losses_b, params_a, params_b = run_both(dtype=torch.bfloat16, switch_block_every=5)
    assert max(abs(a - b) / abs(a) for a, b in zip(losses_a, losses_b)) <= 1e-2
    assert max_rel_diff(params_a, params_b) <= 1e-2


def test_bf16_master_lives_only_for_active_block():
    model, opt = make(BlockOptimizer, torch.bfloat16, switch_block_every=3, switch_mode="ascending")
    active = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.layers.0."))
    (group,) = opt.groups
    assert group.master.dtype == torch.float32 and group.master.numel() >= active
    assert group.master.numel() < 2 * active
    train(model, opt, 1)
    for name, p in model.named_parameters():
        assert p.requires_grad == name.startswith("model.layers.0.")


def test_outgoing_block_states_are_freed_before_the_next_block_allocates(monkeypatch):
    """At a switch the old block's master and moments must be gone when the new ones are allocated,
    or they are held twice at that moment (2.4 GiB more at the peak for a Llama-3-8B layer)."""
    import weakref

    from badam_kernels import block_state

    model, opt = make(BlockOptimizer, torch.bfloat16, switch_block_every=2)
    outgoing = []
    original_init = block_state.FlatGroup.__init__

    def init(self, *args, **kwargs):
        outgoing.append([ref() is None for ref in refs])
        original_init(self, *args, **kwargs)

    refs = [weakref.ref(g) for g in opt.groups]
    monkeypatch.setattr(block_state.FlatGroup, "__init__", init)
    train(model, opt, 1)  # the first block trains one step, then the switch
    assert outgoing == [[True]]


def test_clipping_over_dtype_groups_unscales_the_gradscaler_norm():
    """A block of bf16 matrices and fp32 norms is two flat groups: the norm is taken outside the
    kernel, on gradients GradScaler has not unscaled yet. Scaled by 1024 (exact in bf16) with
    grad_scale=1024 the step must equal the unscaled one."""
    def step(scale):
        model = tiny_llama()
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.data = p.data.bfloat16()
        opt = BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), list(model.named_parameters()),
                             switch_block_every=5, max_grad_norm=0.01, verbose=0)
        assert len(opt.groups) == 2
        gen = torch.Generator().manual_seed(0)
        for p in model.parameters():
            if p.requires_grad:
                p.grad = (torch.randn(p.shape, generator=gen) * scale).to(p.dtype)
        if scale != 1:
            opt.grad_scale, opt.found_inf = torch.tensor([float(scale)]), torch.tensor([0.0])
        opt.step()
        return snapshot(model), float(opt.last_grad_norm)

    (plain, plain_norm), (scaled, scaled_norm) = step(1), step(1024)
    assert scaled_norm == pytest.approx(plain_norm, rel=1e-6)
    assert max_rel_diff(plain, scaled) <= 1e-6


def test_frozen_parameters_unchanged_bit_for_bit():
    model, opt = make(BlockOptimizer, torch.bfloat16, switch_block_every=100, switch_mode="fixed", start_block=1)
    before = snapshot(model)
    train(model, opt, 6)
    after = snapshot(model)
    for name in before:
        same = torch.equal(before[name], after[name])
        assert same == (not name.startswith("model.layers.1.")), name


def test_no_weight_decay_on_norms_and_biases():
    """A fixed block with weight decay equals torch AdamW with decay on matrices only."""
    kw = dict(base_kw={"weight_decay": 0.3}, switch_mode="fixed", start_block=0, switch_block_every=100)
    model, opt = make(BlockOptimizer, **kw)
    train(model, opt, 8)
    ref = tiny_llama()
    block = [(n, p) for n, p in ref.named_parameters() if n.startswith("model.layers.0.")]
    for n, p in ref.named_parameters():
        p.requires_grad_(n.startswith("model.layers.0."))
    groups = [{"params": [p for n, p in block if p.dim() >= 2], "weight_decay": 0.3},
              {"params": [p for n, p in block if p.dim() < 2], "weight_decay": 0.0}]
    train(ref, torch.optim.AdamW(groups, lr=1e-2), 8)
    assert max_rel_diff(snapshot(ref), snapshot(model)) <= 1e-6


def test_reset_policy_starts_fresh_states_at_each_switch():
    model, opt = make(BlockOptimizer, switch_block_every=3, switch_mode="ascending")
    train(model, opt, 2)  # first block: 2 steps, then the switch
    (group,) = opt.groups
    assert opt.active_block == 1 and group.step.item() == 0
    assert torch.count_nonzero(group.exp_avg) == 0 and torch.count_nonzero(group.exp_avg_sq) == 0
    train(model, opt, 1, start=2)
    assert group.step.item() == 1


def test_offload_policy_equals_states_kept_in_place():
    model, opt = make(BlockOptimizer, switch_block_every=4, switch_mode="descending", state_policy="offload")
    train(model, opt, 30)
    assert opt.active_block == 1 and opt.park.blocks() == [0, 2]  # 7 switches: 2 1 0 2 1 0 2 1
    ref = persistent_per_block_adamw(30, 4, order=[2, 1, 0])
    assert max_rel_diff(ref, snapshot(model)) <= 1e-6
    # and it differs from the reset policy, which restarts Adam at each switch
    model_r, opt_r = make(BlockOptimizer, switch_block_every=4, switch_mode="descending")
    train(model_r, opt_r, 30)
    assert max_rel_diff(ref, snapshot(model_r)) > 1e-4


def test_random_mode_visits_every_block_once_per_epoch_and_is_seeded():
    def order(seed):
        model, opt = make(BlockOptimizer, switch_block_every=2, switch_mode="random", seed=seed,
                          model_kw={"layers": 4})
        seen = [opt.active_block]
        for ids in batches(2 * 12 - 2):  # the first block trains one step, the others two
            lm_loss(model, ids).backward()
            opt.step()
            opt.zero_grad()
            if opt.switched:
                seen.append(opt.active_block)
        return seen

    seen = order(7)
    assert len(seen) == 12
    for epoch in range(3):
        assert sorted(seen[4 * epoch: 4 * epoch + 4]) == [0, 1, 2, 3]
    assert order(7) == seen
    assert any(order(s) != seen for s in (8, 9, 10))


@pytest.mark.parametrize("dtype,policy,mode", [
    (torch.float32, "reset", "descending"),
    (torch.bfloat16, "reset", "random"),
    (torch.bfloat16, "offload", "ascending"),
    (torch.float32, "offload", "random"),
])
def test_resume_mid_block_is_exact(dtype, policy, mode):
    kw = dict(switch_block_every=4, switch_mode=mode, state_policy=policy, seed=3)
    model, opt = make(BlockOptimizer, dtype, **kw)
    train(model, opt, 21)
    straight = snapshot(model)

    model, opt = make(BlockOptimizer, dtype, **kw)
    train(model, opt, 10)
    weights, state = snapshot(model), opt.state_dict()
    model, opt = make(BlockOptimizer, dtype, model_kw={"seed": 5}, **{**kw, "seed": 99})
    model.load_state_dict(weights)
    opt.load_state_dict(state)
    train(model, opt, 11, start=10)
    resumed = snapshot(model)
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_nonfinite_gradient_never_touches_weights():
    model, opt = make(BlockOptimizer, torch.bfloat16, switch_block_every=100, switch_mode="fixed", start_block=0)
    train(model, opt, 2)
    before = snapshot(model)
    (group,) = opt.groups
    step_before = group.step.item()
    lm_loss(model, batches(1)[0]).backward()
    next(p for n, p in model.named_parameters() if n.startswith("model.layers.0.")).grad.view(-1)[3] = float("nan")
    opt.step()
    assert group.step.item() == step_before
    for name in before:
        assert torch.equal(before[name], model.state_dict()[name]), name
    assert not torch.isfinite(opt.last_grad_norm)
    opt.zero_grad()
    train(model, opt, 1, start=3)
    assert group.step.item() == step_before + 1


def test_clipping_equals_torch_clip_grad_norm():
    kw = dict(switch_mode="fixed", start_block=2, switch_block_every=100, max_grad_norm=0.05)
    model, opt = make(BlockOptimizer, **kw)
    train(model, opt, 6)
    ref = tiny_llama()
    block = [p for n, p in ref.named_parameters() if n.startswith("model.layers.2.")]
    for p in ref.parameters():
        p.requires_grad_(any(p is q for q in block))
    adamw = torch.optim.AdamW(block, lr=1e-2, weight_decay=0.0)
    for ids in batches(6):
        lm_loss(ref, ids).backward()
        torch.nn.utils.clip_grad_norm_(block, 0.05)
        adamw.step()
        adamw.zero_grad()
    assert max_rel_diff(snapshot(ref), snapshot(model)) <= 1e-5


def test_hot_path_calls_neither_empty_cache_nor_gc(monkeypatch):
    model, opt = make(BlockOptimizer, switch_block_every=3)

    def forbidden(*args, **kwargs):
        raise AssertionError("called on the hot path")

    monkeypatch.setattr(torch.cuda, "empty_cache", forbidden)
    monkeypatch.setattr(gc, "collect", forbidden)
    train(model, opt, 7)  # crosses two switches


def test_lr_scheduler_drives_the_learning_rate():
    model, opt = make(BlockOptimizer, switch_block_every=50, switch_mode="fixed", start_block=0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0)
    before = snapshot(model)
    sched.step()
    train(model, opt, 3)
    assert opt.param_groups[0]["lr"] == 0.0
    assert max_rel_diff(before, snapshot(model)) == 0.0


@pytest.mark.parametrize("kw,message", [
    (dict(block_prefix_list=[["model.layers.0."], ["model.nope."]]), "matches no parameter"),
    (dict(block_prefix_list=[["model.layers.0."], ["model.layers.0.mlp"]]), "in two blocks"),
    (dict(switch_mode="sideways"), "unknown switch_mode"),
    (dict(state_policy="keep"), "unknown state_policy"),
    (dict(switch_block_every=0), "switch_block_every"),
    (dict(switch_mode="fixed"), "needs start_block"),
    (dict(start_block=7), "outside"),
    (dict(backend="nonesuch"), "unknown backend"),
])
def test_bad_input_is_named(kw, message):
    with pytest.raises(ValueError, match=message):
        make(BlockOptimizer, **kw)


def test_checkpoint_from_another_model_is_refused():
    _, opt = make(BlockOptimizer)
    state = opt.state_dict()
    _, other = make(BlockOptimizer, model_kw={"layers": 4})
    with pytest.raises(ValueError, match="another model"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="not a badam_kernels"):
        other.load_state_dict({"state": {}, "param_groups": []})


def test_step_without_backward_is_an_error():
    model, opt = make(BlockOptimizer)
    for p in model.parameters():
        p.grad = None
    with pytest.raises(RuntimeError, match="no gradient"):
        opt.step()


def test_memory_report_counts_each_category():
    from badam_kernels.memory import memory_report

    model, opt = make(BlockOptimizer, torch.bfloat16, switch_block_every=2, switch_mode="ascending",
                      state_policy="offload")
    train(model, opt, 5)  # blocks 0, 1 parked; block 2 active
    assert memory_report(opt, model)["grads"] == 0  # zero_grad freed them
    lm_loss(model, batches(1)[0]).backward()
    opt.step()  # the gradients now sit in the block's flat buffer
    report = memory_report(opt, model)
    (group,) = opt.groups
    numel = group.numel
    assert report["weights"] == sum(p.numel() * 2 for p in model.parameters())
    assert report["master"] == 4 * numel and report["moments"] == 8 * numel and report["grads"] == 2 * numel
    parked = sum(opt.park.host[key]["master"].numel() for key in opt.park.host)
    assert report["host_parked"] == 12 * parked + 4 * len(opt.park.host)


def test_gradients_move_into_the_flat_buffer_during_backward_and_leave_at_zero_grad():
    model, opt = make(BlockOptimizer, torch.bfloat16, switch_mode="fixed", start_block=1, switch_block_every=50)
    (group,) = opt.groups
    assert group.grad is None  # no gradient memory during the forward
    lm_loss(model, batches(1)[0]).backward()
    base = group.grad.data_ptr()
    for entry, offset in zip(group.entries, group.offsets):
        assert entry.param.grad.data_ptr() == base + offset * group.grad.element_size()
    first = {e.name: e.param.grad.clone() for e in group.entries}
    lm_loss(model, batches(1)[0]).backward()  # accumulation goes into the same views
    for e in group.entries:
        torch.testing.assert_close(e.param.grad, 2 * first[e.name], rtol=1e-2, atol=1e-3)
    opt.step()
    opt.zero_grad()
    assert group.grad is None and all(e.param.grad is None for e in group.entries)


def test_dropping_model_and_optimizer_frees_them():
    import weakref

    model, opt = make(BlockOptimizer, torch.bfloat16, switch_block_every=2, state_policy="offload")
    train(model, opt, 3)
    lm_loss(model, batches(1)[0]).backward()
    opt.step()  # leave gradients and states in place
    refs = [weakref.ref(model), weakref.ref(opt), weakref.ref(opt.groups[0].master)]
    del model, opt
    gc.collect()
    assert all(r() is None for r in refs)
