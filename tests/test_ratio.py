"""BAdam's ratio mode (``badam_kernels.ratio.BlockOptimizerRatio``) against badam 1.4's ``BlockOptimizerRatio``.

Where the original works (fp32, a tiny Llama, a tiny MoE) the trajectories are equal; the cases where
it fails, raising or silently, are named ``test_official_fails_*`` and show ours working there.
"""
import copy
import os
import warnings

import pytest
import torch

from badam_kernels import ops
from badam_kernels.ops import MASKED_TILE
from badam_kernels.ratio import BlockOptimizerRatio
from conftest import triton_interpreting
from helpers import batches, free_port, lm_loss, max_rel_diff, snapshot, tiny_llama, train

badam = pytest.importorskip("badam")
warnings.filterwarnings("ignore", message="Sparse invariant checks")


def tiny_moe(dtype=torch.float32):
    """A Mixtral with 4 experts in 3-D tensors (transformers 5) and a router: MoE shapes, CPU size."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    return MixtralForCausalLM(config).to(dtype)


def build(cls, model_fn=tiny_llama, dtype=torch.float32, groups=None, **kw):
    """A model and a ratio optimizer over it, the seeds drawn from the same global RNG state."""
    model = model_fn(dtype)
    torch.manual_seed(123)
    params = groups(model) if groups else [{"params": list(model.parameters())}]
    kw = {"lr": 1e-2, **kw}
    return model, cls(params, list(model.named_parameters()), verbose=0, **kw)


def run(cls, steps, **kw):
    model, opt = build(cls, **kw)
    losses = train(model, opt, steps)
    return snapshot(model), losses


# ------------------------------------------------------------------------------------------ the same trajectory

SAME = {
    "adjacent_defaults": dict(),
    "adjacent_across_switches": dict(switch_every=3),
    "adjacent_own_masks": dict(switch_every=2, keep_mask=False, update_ratio=0.3),
    "scatter_own_masks": dict(switch_every=3, mask_mode="scatter", keep_mask=False),
    "scatter_shared_masks_first_period": dict(switch_every=8, mask_mode="scatter"),
    "embedding_and_lm_head_ratio_half": dict(switch_every=3, update_ratio=0.5, include_embedding=True,
                                             include_lm_head=True),
    "param_update_ratios": dict(switch_every=3, param_update_ratios={"mlp": 0.3, "norm": 0.5}),
    "moe_3d_experts": dict(switch_every=3, model_fn=tiny_moe, param_update_ratios={"experts": 0.2}),
}


@pytest.mark.parametrize("case", list(SAME), ids=list(SAME))
def test_matches_official_in_fp32(case):
    kw = SAME[case]
    theirs, their_losses = run(badam.BlockOptimizerRatio, 7, **kw)
    ours, our_losses = run(BlockOptimizerRatio, 7, **kw)
    assert max_rel_diff(theirs, ours) <= 1e-6
    assert our_losses == pytest.approx(their_losses, rel=1e-6)
    start = snapshot(kw.get("model_fn", tiny_llama)(torch.float32))
    assert max_rel_diff(start, ours) > 1e-4  # it trained


def test_same_seeds_and_global_rng_as_official():
    """One ``randint`` per named parameter, so the global RNG after construction is the same."""
    _, theirs = build(badam.BlockOptimizerRatio)
    after_theirs = torch.get_rng_state()
    _, ours = build(BlockOptimizerRatio)
    assert torch.equal(torch.get_rng_state(), after_theirs)
    assert ours.seeds == [theirs.sparse_dict[p]["seed"] for _, p in theirs.named_parameters_list]


# ------------------------------------------------------------------------------------------ where the original fails

def test_official_fails_tied_embeddings():
    """No parameter is named lm_head (tied to the embedding): the original's lm_head_layer is None."""
    with pytest.raises(AttributeError, match="requires_grad_"):
        build(badam.BlockOptimizerRatio, model_fn=lambda d: tiny_llama(d, tie=True))
    model, opt = build(BlockOptimizerRatio, model_fn=lambda d: tiny_llama(d, tie=True))
    start = snapshot(model)
    train(model, opt, 4)
    trained = snapshot(model)
    assert not model.model.embed_tokens.weight.requires_grad
    assert torch.equal(trained["model.embed_tokens.weight"], start["model.embed_tokens.weight"])
    assert max_rel_diff(start, trained) > 1e-4


def _clipped_steps(cls, steps=3):
    model, opt = build(cls)
    for ids in batches(steps):
        lm_loss(model, ids).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)  # the HF Trainer clips at 1.0 by default
        opt.step()
        opt.zero_grad()
    return model


def test_official_fails_gradient_clipping():
    """``clip_grad_norm_`` (HF Trainer's default max_grad_norm=1.0) cannot take the sparse gradients."""
    with pytest.raises(NotImplementedError, match="Sparse"):
        _clipped_steps(badam.BlockOptimizerRatio)
    clipped = snapshot(_clipped_steps(BlockOptimizerRatio))
    unclipped, _ = run(BlockOptimizerRatio, 3)
    assert max_rel_diff(unclipped, clipped) > 1e-4  # the clipping took effect


def test_official_fails_ratio_one_with_small_parameters():
    """update_ratio 1 on a parameter below preserve_threshold (the norms here): add_ on a sparse grad."""
    with pytest.raises(RuntimeError, match="sparse"):
        run(badam.BlockOptimizerRatio, 1, update_ratio=1.0)
    model, opt = build(BlockOptimizerRatio, update_ratio=1.0)
    before = snapshot(model)
    train(model, opt, 2)
    after = snapshot(model)
    for name, value in before.items():
        if name != "model.embed_tokens.weight" and name != "lm_head.weight":
            assert (after[name] != value).float().mean() > 0.99, name  # every entry trains


def test_official_fails_param_update_ratios_shared_shape():
    """A parameter whose shape another parameter has gets that one's mask: its own ratio is ignored."""
    kw = dict(param_update_ratios={"q_proj": 0.5})  # o_proj has q_proj's shape and the default 0.1
    model, theirs = build(badam.BlockOptimizerRatio, **kw)
    train(model, theirs, 1)
    names = dict(model.named_parameters())
    q, o = names["model.layers.0.self_attn.q_proj.weight"], names["model.layers.0.self_attn.o_proj.weight"]
    assert theirs.state[q]["exp_avg"].numel() == theirs.state[o]["exp_avg"].numel()  # one of them is wrong
    model, ours = build(BlockOptimizerRatio, **kw)
    index = {n: i for i, (n, _) in enumerate(ours.named_parameters_list)}
    assert ours.masked_count(index["model.layers.0.self_attn.q_proj.weight"]) == 512
    assert ours.masked_count(index["model.layers.0.self_attn.o_proj.weight"]) == 102


def _accumulated(cls, steps, switch_every):
    """Each step: two backwards of half the loss on the same batch (the gradient of one full backward)."""
    model, opt = build(cls, switch_every=switch_every)
    for ids in batches(steps):
        for _ in range(2):
            (lm_loss(model, ids) / 2).backward()
        opt.step()
        opt.zero_grad()
    return snapshot(model)


def test_official_fails_gradient_accumulation_across_a_switch():
    """The original moves the masks in the hook of every backward of a switch step: with two backwards
    the second gradient is masked with the next period's mask and the offsets move twice. Silent."""
    within, _ = run(badam.BlockOptimizerRatio, 2, switch_every=3)
    assert max_rel_diff(within, _accumulated(badam.BlockOptimizerRatio, 2, 3)) < 1e-5  # fine within a period
    plain_theirs, _ = run(badam.BlockOptimizerRatio, 5, switch_every=3)
    assert max_rel_diff(plain_theirs, _accumulated(badam.BlockOptimizerRatio, 5, 3)) > 1e-3  # not across a switch
    assert max_rel_diff(plain_theirs, _accumulated(BlockOptimizerRatio, 5, 3)) < 1e-5


def test_official_fails_scatter_shared_mask_at_the_switch_step():
    """scatter + keep_mask: at a switch step the original draws a fresh mask from each parameter's own
    seed after the first of its shape, so those parameters update other entries than their moments
    were built on. Ours keeps each period's mask for all its steps."""
    model, theirs = build(badam.BlockOptimizerRatio, mask_mode="scatter", switch_every=3)
    name = "model.layers.0.self_attn.q_proj.weight"  # not the first of its shape to get its gradient
    param = dict(model.named_parameters())[name]
    masks = []
    for ids in batches(3):
        lm_loss(model, ids).backward()
        masks.append(param.grad.coalesce().indices().clone())
        theirs.step()
        theirs.zero_grad()
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])

    model, ours = build(BlockOptimizerRatio, mask_mode="scatter", switch_every=3)
    seen = []
    for ids in batches(3):
        lm_loss(model, ids).backward()
        ours.step()
        seen.append(ours.groups[0][2].index.clone())
        ours.zero_grad()
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[1], seen[2])


def test_official_fails_scatter_reseeds_the_global_rng():
    """The original calls torch.random.manual_seed(seed) for each mask it draws (dropout, data order...)."""
    for cls, changes_it in ((badam.BlockOptimizerRatio, True), (BlockOptimizerRatio, False)):
        model, opt = build(cls, mask_mode="scatter")
        torch.manual_seed(777)
        expected = torch.get_rng_state()
        lm_loss(model, batches(1)[0]).backward()  # the original draws its masks here
        opt.step()  # ours here
        assert torch.equal(torch.get_rng_state(), expected) != changes_it


def test_official_fails_bf16_updates_below_half_an_ulp():
    """bf16 parameters: the original keeps bf16 moments and adds each update to the bf16 weight, where
    updates below half an ulp round away (lr 1e-5, its default). Ours keeps an fp32 master of the
    masked entries: after 12 steps the original's bf16 weights made 1.4% of the fp32 run's movement,
    ours 9.6% (the rest is in the master until it crosses a bf16 rounding step)."""
    kw = dict(lr=1e-5, switch_every=100)
    reference, _ = run(BlockOptimizerRatio, 12, **kw)
    start = snapshot(tiny_llama(torch.bfloat16))
    theirs, _ = run(badam.BlockOptimizerRatio, 12, dtype=torch.bfloat16, **kw)
    ours, _ = run(BlockOptimizerRatio, 12, dtype=torch.bfloat16, **kw)

    def progress(run_):  # how much of the fp32 run's movement a bf16 run made
        moved = sum(((run_[n].float() - start[n].float()) * (reference[n] - start[n].float())).sum() for n in start)
        return float(moved / sum(((reference[n] - start[n].float()) ** 2).sum() for n in start))

    assert progress(theirs) < 0.03 and progress(ours) > 4 * progress(theirs)


def test_official_fails_resume_mid_period():
    """The original's state_dict is torch's: no global step, offsets or masks, so a resumed run switches
    at other steps. Ours resumes exactly (see test_resume_mid_run_is_bit_exact)."""
    straight, _ = run(badam.BlockOptimizerRatio, 6, switch_every=4)
    model, opt = build(badam.BlockOptimizerRatio, switch_every=4)
    train(model, opt, 2)
    saved, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    model2, opt2 = build(badam.BlockOptimizerRatio, switch_every=4)
    model2.load_state_dict(weights)
    opt2.load_state_dict(saved)
    train(model2, opt2, 4, start=2)
    assert max_rel_diff(straight, snapshot(model2)) > 1e-4


def test_official_fails_under_ddp():
    """DistributedDataParallel reads the gradients the hook made sparse ("Cannot access storage of
    SparseTensorImpl"); ours runs under DDP (gloo, one process) and equals the plain run."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        results = {}
        for cls in (badam.BlockOptimizerRatio, BlockOptimizerRatio):
            model, opt = build(cls, switch_every=2)
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            try:
                for ids in batches(3):
                    ddp(input_ids=ids, labels=ids).loss.backward()
                    opt.step()
                    opt.zero_grad()
                results[cls] = snapshot(model)
            except (NotImplementedError, RuntimeError) as exc:
                results[cls] = exc
    finally:
        dist.destroy_process_group()
    assert isinstance(results[badam.BlockOptimizerRatio], Exception)
    plain, _ = run(BlockOptimizerRatio, 3, switch_every=2)
    assert max_rel_diff(plain, results[BlockOptimizerRatio]) < 1e-6


# ------------------------------------------------------------------------------------------ resume and memory

@pytest.mark.parametrize("mask_mode", ["adjacent", "scatter"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cut", [3, 4], ids=["after_switch", "mid_period"])
def test_resume_mid_run_is_bit_exact(mask_mode, dtype, cut):
    kw = dict(dtype=dtype, switch_every=3, mask_mode=mask_mode, update_ratio=0.3)
    straight, straight_losses = run(BlockOptimizerRatio, 8, **kw)
    model, opt = build(BlockOptimizerRatio, **kw)
    first = train(model, opt, cut)
    saved, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    model2, opt2 = build(BlockOptimizerRatio, **kw)
    model2.load_state_dict(weights)
    opt2.load_state_dict(saved)
    second = train(model2, opt2, 8 - cut, start=cut)
    resumed = snapshot(model2)
    assert all(torch.equal(straight[n], resumed[n]) for n in straight)
    assert first + second == straight_losses


def test_load_state_dict_refuses_another_ratio_and_changes_nothing():
    model, opt = build(BlockOptimizerRatio)
    train(model, opt, 2)
    before = copy.deepcopy(opt.state_dict())
    _, other = build(BlockOptimizerRatio, update_ratio=0.5)
    with pytest.raises(ValueError, match="other update ratios"):
        opt.load_state_dict(other.state_dict())
    after = opt.state_dict()
    assert after["global_step"] == before["global_step"]
    assert all(torch.equal(a, b) for s, t in zip(after["states"], before["states"]) for a, b in zip(s.values(), t.values()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_states_hold_only_the_masked_entries(dtype):
    """16 bytes per masked entry for bf16 (index, master, m, v), 12 for fp32, in whole tiles; no dense state."""
    model, opt = build(BlockOptimizerRatio, dtype=dtype,
                       model_fn=lambda d: tiny_llama(d, hidden=128, layers=2), update_ratio=0.25)
    train(model, opt, 1)
    trained = [i for i, (_, p) in enumerate(opt.named_parameters_list) if p.requires_grad]
    masked = sum(opt.masked_count(i) for i in trained)
    tiles = sum(-(-opt.masked_count(i) // MASKED_TILE) for i in trained)
    per_entry = 16 if dtype == torch.bfloat16 else 12
    assert opt.state_bytes() == tiles * MASKED_TILE * per_entry + tiles * (8 + 4)
    numel = sum(opt.named_parameters_list[i][1].numel() for i in trained)
    assert masked == pytest.approx(0.25 * numel, rel=1e-3)
    assert opt.state_bytes() < 0.3 * per_entry * numel  # against dense states of every trained parameter
    assert not opt.state  # nothing in torch's per-parameter state


def test_parameter_without_gradient_is_skipped_like_the_original():
    """An expert that no token reached has no gradient: no update, no step counted (as the original)."""
    kw = dict(switch_every=4)
    results = {}
    for cls in (badam.BlockOptimizerRatio, BlockOptimizerRatio):
        model, opt = build(cls, **kw)
        skipped = model.model.layers[1].mlp.up_proj.weight
        for k, ids in enumerate(batches(5)):
            lm_loss(model, ids).backward()
            if k in (1, 2):
                skipped.grad = None
            opt.step()
            opt.zero_grad()
        results[cls] = snapshot(model)
    assert max_rel_diff(results[badam.BlockOptimizerRatio], results[BlockOptimizerRatio]) <= 1e-6


def test_schedulers_and_weight_decay_are_read_each_step():
    groups = lambda m: [{"params": [p for n, p in m.named_parameters() if "norm" not in n], "weight_decay": 0.1},
                        {"params": [p for n, p in m.named_parameters() if "norm" in n], "weight_decay": 0.0}]
    model, opt = build(BlockOptimizerRatio, groups=groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0 if step >= 1 else 1.0)
    train(model, opt, 1)
    scheduler.step()
    frozen = snapshot(model)
    train(model, opt, 2, start=1)
    assert max_rel_diff(frozen, snapshot(model)) == 0.0  # lr 0: nothing moves, weight decay included
    plain, _ = run(BlockOptimizerRatio, 2)
    decayed, _ = run(BlockOptimizerRatio, 2, groups=groups)
    assert max_rel_diff(plain, decayed) > 0


# ------------------------------------------------------------------------------------------ backends

def masked_inputs(dtype, device, seed=0, tiles_per_param=(1, 3, 2), numel=(900, 5000, 3000)):
    """Random dense buffers and compact states of three parameters; some tiles fresh, some not."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(numel)
    param = torch.randn(n, generator=gen).to(dtype)
    grad = torch.randn(n, generator=gen).to(dtype)
    k = sum(tiles_per_param) * MASKED_TILE
    index = torch.full((k,), -1, dtype=torch.int32)
    bases, tile, base = [], 0, 0
    for tiles, size in zip(tiles_per_param, numel):
        count = min(size, tiles * MASKED_TILE - 37)
        index[tile * MASKED_TILE:tile * MASKED_TILE + count] = torch.randperm(size, generator=gen)[:count].sort().values.int()
        bases += [base] * tiles
        tile, base = tile + tiles, base + size
    steps = torch.tensor([0.0, 3.0, 3.0, 3.0, 0.0, 0.0])[: len(bases)]
    states = dict(master=torch.randn(k, generator=gen) if dtype != torch.float32 else None,
                  exp_avg=torch.randn(k, generator=gen) * 1e-2, exp_avg_sq=torch.rand(k, generator=gen) * 1e-3)
    tensors = dict(param=param, grad=grad, index=index, **states, tile_base=torch.tensor(bases), tile_step=steps)
    return {k: (v.to(device) if v is not None else None) for k, v in tensors.items()}


def step_args(t, master=True):
    """The masked op's positional arguments from masked_inputs' tensors (without the master if told)."""
    states = ops.MaskedStates(t["index"], t["master"] if master else None, t["exp_avg"], t["exp_avg_sq"],
                              t["tile_base"], t["tile_step"])
    return t["param"], t["grad"], states
BACKENDS = [pytest.param("triton", "cpu", marks=pytest.mark.skipif(not triton_interpreting(), reason="no interpreter"),
                         id="triton-interpreted"),
            pytest.param("triton", "cuda", marks=pytest.mark.gpu, id="triton-cuda"),
            pytest.param("cuda", "cuda", marks=pytest.mark.gpu, id="cuda")]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("tiles", [(0, 6), (1, 2), (0, 1)], ids=["all", "a_run", "one_tile"])
def test_backend_matches_reference(backend, device, dtype, tiles):
    inputs = masked_inputs(dtype, device)
    kw = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05, tile_start=tiles[0], num_tiles=tiles[1])
    results = {}
    for name in ("reference", backend):
        t = {k: (v.clone() if v is not None else None) for k, v in inputs.items()}
        for _ in range(2):
            ops.masked_adamw_step(*step_args(t), backend=name, **kw)
        results[name] = t
    ref, got = results["reference"], results[backend]
    assert torch.equal(ref["tile_step"], got["tile_step"])
    valid = ref["index"] >= 0
    for key in ("master", "exp_avg", "exp_avg_sq"):
        if ref[key] is not None:
            torch.testing.assert_close(got[key][valid], ref[key][valid], rtol=2e-6, atol=1e-9)
    if dtype == torch.float32:
        torch.testing.assert_close(got["param"], ref["param"], rtol=2e-6, atol=1e-9)
    else:  # the same fp32 master rounded to nearest: equal but where the masters differ in the last bits
        assert (got["param"] != ref["param"]).float().mean() < 1e-3
    untouched = torch.ones_like(inputs["param"], dtype=torch.bool)
    untouched[(ref["param"] != inputs["param"])] = False
    assert torch.equal(got["param"][untouched], inputs["param"][untouched])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_optimizer_on_each_backend_matches_reference(backend, device):
    kw = dict(switch_every=2, update_ratio=0.3, mask_mode="scatter", model_fn=lambda d: tiny_llama(d, device=device))
    ref, _ = run(BlockOptimizerRatio, 3, backend="reference", **kw)
    got, _ = run(BlockOptimizerRatio, 3, backend=backend, **kw)
    assert max_rel_diff(ref, got) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_kernel_equals_the_reference_to_the_bit(dtype):
    """The CUDA kernel rounds each operation on its own in the reference's order (csrc/masked_adamw.cu)."""
    inputs = masked_inputs(dtype, "cuda")
    results = {}
    for name in ("reference", "cuda"):
        t = {k: (v.clone() if v is not None else None) for k, v in inputs.items()}
        for _ in range(3):
            ops.masked_adamw_step(*step_args(t), backend=name, lr=3e-3, betas=(0.9, 0.99), weight_decay=0.05)
        results[name] = t
    for key, ref in results["reference"].items():
        if ref is not None:
            assert torch.equal(results["cuda"][key], ref), key


@pytest.mark.gpu
def test_cuda_op_names_bad_inputs():
    t = masked_inputs(torch.bfloat16, "cuda")
    assert ops.load_backend("cuda") is not None, ops.backend_report()["cuda"]  # builds or loads the extension
    op = torch.ops.badam_kernels.masked_adamw_step
    args = lambda **kw: [kw.get(k, t[k]) for k in ("param", "grad", "index", "master", "exp_avg", "exp_avg_sq",  # noqa: E731
                                                   "tile_base", "tile_step")]
    with pytest.raises(RuntimeError, match="index must be Int"):
        op(*args(index=t["index"].long()), 1e-3, 0.9, 0.999, 1e-8, 0.0, 0, 6)
    with pytest.raises(RuntimeError, match="BFloat16 params need a float32 master"):
        op(*args(master=None), 1e-3, 0.9, 0.999, 1e-8, 0.0, 0, 6)
    with pytest.raises(RuntimeError, match=r"tiles \[4, 7\) are outside the 6 tiles"):
        op(*args(), 1e-3, 0.9, 0.999, 1e-8, 0.0, 4, 3)


@pytest.mark.gpu
def test_dispatch_on_cuda_picks_a_backend_with_the_op():
    module = ops.resolve_op_backend("masked_adamw_step", None, torch.device("cuda"))
    assert module.NAME == "triton"
    model, opt = build(BlockOptimizerRatio, model_fn=lambda d: tiny_llama(d, device="cuda"), dtype=torch.bfloat16)
    train(model, opt, 2)


def test_forcing_a_backend_without_the_op_names_it(monkeypatch):
    reference = ops.load_backend("reference")
    monkeypatch.delattr(reference, "masked_adamw_step")
    with pytest.raises(RuntimeError, match="does not implement masked_adamw_step"):
        ops.resolve_op_backend("masked_adamw_step", "reference", torch.device("cpu"))


# ------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("kw,message", [
    (dict(update_ratio=0.0), r"update_ratio must lie in \(0, 1\], got 0.0"),
    (dict(update_ratio=1.5), r"update_ratio must lie in \(0, 1\], got 1.5"),
    (dict(mask_mode="random"), r"unknown mask_mode 'random'; choose one of adjacent, scatter"),
    (dict(param_update_ratios={"mlp": 2}), r"param_update_ratios\['mlp'\] must lie in \(0, 1\]"),
    (dict(switch_every=0), r"switch_every must be a positive integer, got 0"),
], ids=["ratio_zero", "ratio_above_one", "unknown_mask_mode", "bad_param_ratio", "switch_every_zero"])
def test_bad_arguments_are_named(kw, message):
    with pytest.raises(ValueError, match=message):
        build(BlockOptimizerRatio, **kw)


def test_bad_op_inputs_are_named():
    inputs = masked_inputs(torch.bfloat16, "cpu")
    inputs["index"] = inputs["index"].long()
    with pytest.raises(ValueError, match="index has dtype torch.int64"):
        ops.masked_adamw_step(*step_args(inputs), lr=1e-3)
    inputs = masked_inputs(torch.bfloat16, "cpu")
    with pytest.raises(ValueError, match="need an fp32 master"):
        ops.masked_adamw_step(*step_args(inputs, master=False), lr=1e-3)
    with pytest.raises(ValueError, match="outside the 6 tiles"):
        ops.masked_adamw_step(*step_args(inputs), lr=1e-3, tile_start=4, num_tiles=3)
