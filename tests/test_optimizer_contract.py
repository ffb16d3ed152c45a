"""The torch-optimizer contract and badam 1.4's behaviour where users rely on them: frozen parameters,
the global RNG, hyperparameters read from ``param_groups``, all-or-nothing loads, weight decay of
norms and biases, blocks of any architecture."""
import badam
import peft
import pytest
import torch
import transformers

from badam_kernels import BlockOptimizer, find_layer_stack
from badam_kernels.partition import decays
from helpers import batches, lm_loss, make, max_rel_diff, snapshot, tiny_llama, train


def build(model, cls=BlockOptimizer, lr=1e-2, weight_decay=0.0, **kw):
    base = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    return cls(base, list(model.named_parameters()), verbose=0, **kw)


def lora_llama(seed=0):
    model = tiny_llama(seed=seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    torch.manual_seed(seed + 1)
    model = peft.get_peft_model(model, config)
    for name, p in model.named_parameters():  # lora_B starts at zero; make the adapters matter from step 1
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


# ---------------------------------------------------------------- parameters the user froze
def test_lora_model_trains_only_the_adapters():
    model = lora_llama()
    before = snapshot(model)
    opt = build(model, switch_block_every=3, switch_mode="ascending")
    train(model, opt, 9)  # every block has its turn
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    adapters = {n for n in before if "lora_" in n}
    assert changed and changed <= adapters, sorted(changed - adapters)[:3]
    assert {n.split(".layers.")[1].split(".")[0] for n in changed} == {"0", "1", "2"}
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_lora_trajectory_equals_badam():
    runs = []
    for cls in (badam.BlockOptimizer, BlockOptimizer):
        model = lora_llama()
        opt = build(model, cls, switch_block_every=4)
        runs.append((train(model, opt, 12), snapshot(model)))
    (losses_a, params_a), (losses_b, params_b) = runs
    assert max(abs(a - b) / abs(a) for a, b in zip(losses_a, losses_b)) <= 1e-6
    assert max_rel_diff(params_a, params_b) <= 1e-6
    assert max_rel_diff(params_a, snapshot(lora_llama())) > 1e-4  # the adapters did train


def test_hand_frozen_parameter_is_never_trained():
    model = tiny_llama()
    frozen = model.model.layers[1].mlp.up_proj.weight
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    opt = build(model, switch_block_every=2, switch_mode="ascending")
    seen_active = set()
    for ids in batches(8):
        seen_active.add(opt.active_block)
        assert not frozen.requires_grad
        lm_loss(model, ids).backward()
        opt.step()
        opt.zero_grad()
    assert seen_active == {0, 1, 2} and torch.equal(frozen, before)
    assert "model.layers.1.mlp.up_proj.weight" not in opt.active_param_names or opt.active_block != 1


def test_second_optimizer_over_a_partly_frozen_model_trains_every_block():
    model = tiny_llama()
    build(model, switch_mode="descending")  # freezes every layer but the last
    before = snapshot(model)
    opt = build(model, switch_block_every=2, switch_mode="ascending")
    train(model, opt, 6)
    for layer in range(3):
        names = [n for n in before if n.startswith(f"model.layers.{layer}.")]
        assert all(not torch.equal(model.get_parameter(n), before[n]) for n in names), layer


def test_block_whose_parameters_are_all_frozen_is_skipped():
    model = tiny_llama()
    for p in model.model.layers[1].parameters():
        p.requires_grad_(False)
    opt = build(model, switch_block_every=2, switch_mode="ascending")
    visited = []
    for ids in batches(9):
        visited.append(opt.active_block)
        lm_loss(model, ids).backward()
        opt.step()
        opt.zero_grad()
    assert 1 not in visited and {0, 2} <= set(visited)
    untrainable = tiny_llama().requires_grad_(False)
    with pytest.raises(ValueError, match="no block has a parameter to train"):
        build(untrainable)


# ---------------------------------------------------------------- the global RNG
@pytest.mark.parametrize("kw", [dict(switch_mode="descending"), dict(switch_mode="ascending"),
                                dict(switch_mode="fixed", start_block=1)], ids=["descending", "ascending", "fixed"])
def test_building_leaves_the_global_rng_alone(kw):
    model = tiny_llama()
    state = torch.get_rng_state()
    build(model, **kw)
    assert torch.equal(torch.get_rng_state(), state)


def tiny_opt_with_dropout(seed=0):
    config = transformers.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=3,
                                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                                    dropout=0.1, attention_dropout=0.1)
    torch.manual_seed(seed)
    model = transformers.OPTForCausalLM(config)
    model.train()
    return model


def test_dropout_model_trajectory_equals_badam():
    runs = []
    for cls in (badam.BlockOptimizer, BlockOptimizer):
        model = tiny_opt_with_dropout()
        opt = build(model, cls, switch_block_every=4)
        runs.append((train(model, opt, 12), snapshot(model)))  # the same dropout masks only if neither draws
    (losses_a, params_a), (losses_b, params_b) = runs
    assert max(abs(a - b) / abs(a) for a, b in zip(losses_a, losses_b)) <= 1e-6
    assert max_rel_diff(params_a, params_b) <= 1e-6


# ---------------------------------------------------------------- hyperparameters from param_groups
def one_block(model, base, **kw):
    """One block holding every parameter, never switched: the optimizer is then plain AdamW."""
    return BlockOptimizer(base, list(model.named_parameters()), block_prefix_list=[[""]], switch_mode="fixed",
                          start_block=0, switch_block_every=10**6, verbose=0, **kw)


def torch_adamw_reference(model, **kw):
    """torch's AdamW with the decay split BlockOptimizer makes: no weight decay on biases and norms."""
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if decays(n, p)]},
              {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, foreach=False, **kw)


@pytest.mark.parametrize("path,tolerance", [("reference", 1e-6), ("triton", 1e-5), ("base optimizer", 1e-6)])
def test_one_cycle_momentum_and_weight_decay_edits_follow_torch_adamw(path, tolerance):
    """OneCycleLR cycles lr and beta1 (cycle_momentum=True); weight decay is changed by hand mid-run."""
    if path == "triton":
        pytest.importorskip("triton")
    amsgrad = path == "base optimizer"  # amsgrad is not fused: the base optimizer does the update
    backend = {} if amsgrad else {"backend": path}
    results = []
    for ours in (True, False):
        model = tiny_llama()
        kw = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.05, amsgrad=amsgrad)
        opt = one_block(model, torch.optim.AdamW(model.parameters(), **kw), **backend) if ours else torch_adamw_reference(model, **kw)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10, cycle_momentum=True,
                                                    base_momentum=0.8, max_momentum=0.95)
        for step, ids in enumerate(batches(10)):
            if step == 5:
                opt.param_groups[0]["weight_decay"] = 0.5
            lm_loss(model, ids).backward()
            opt.step()
            sched.step()
            opt.zero_grad()
        results.append(snapshot(model))
    assert max_rel_diff(results[1], results[0]) <= tolerance
    # the edits matter: ignoring them moves the weights far beyond the tolerance
    model = tiny_llama()
    plain = torch_adamw_reference(model, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.05, amsgrad=amsgrad)
    train(model, plain, 10)
    assert max_rel_diff(results[1], snapshot(model)) > 100 * tolerance


# ---------------------------------------------------------------- all-or-nothing loads
def tensors_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("policy", ["reset", "offload"])
def test_refused_load_leaves_the_optimizer_unchanged(policy):
    kw = dict(switch_block_every=3, state_policy=policy)
    model, opt = make(BlockOptimizer, **kw)
    twin_model, twin = make(BlockOptimizer, **kw)
    train(model, opt, 4)
    train(twin_model, twin, 4)
    foreign_model, foreign = make(BlockOptimizer, model_kw={"hidden": 48}, switch_mode="ascending", **kw)
    train(foreign_model, foreign, 7)  # another step count, active block and parked blocks
    before = opt.state_dict()
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(foreign.state_dict())
    assert tensors_equal(opt.state_dict(), before)
    # and it goes on as if nothing had happened
    assert train(model, opt, 5, start=4) == train(twin_model, twin, 5, start=4)
    assert max_rel_diff(snapshot(model), snapshot(twin_model)) == 0.0


# ---------------------------------------------------------------- weight decay, the documented difference
def test_default_weight_decay_spares_norms_and_biases_where_badam_decays_them():
    """At weight decay > 0 one step of each differs exactly by the decay of the norms (badam 1.4
    decays them); every other parameter is equal."""
    lr, wd = 1e-2, 0.1
    start = snapshot(tiny_llama())
    after = []
    for cls in (badam.BlockOptimizer, BlockOptimizer):
        model = tiny_llama()
        opt = build(model, cls, lr=lr, weight_decay=wd, switch_block_every=10)
        train(model, opt, 1)
        after.append(snapshot(model))
    theirs, ours = after
    trained = [n for n in start if n.startswith("model.layers.2.")]
    norms = [n for n in trained if not decays(n, start[n])]
    assert norms and len(norms) < len(trained)
    for name in trained:
        expected = theirs[name] + lr * wd * start[name] if name in norms else theirs[name]
        torch.testing.assert_close(ours[name], expected, rtol=1e-6, atol=1e-7)
    assert all(not torch.equal(ours[n], theirs[n]) for n in norms)


# ---------------------------------------------------------------- blocks of any architecture
ARCHITECTURES = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=64),
    "opt": lambda: transformers.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=3,
                                          num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3,
                                                   num_attention_heads=4, intermediate_size=64,
                                                   max_position_embeddings=64),
    "phi3": lambda: transformers.Phi3Config(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                                            pad_token_id=0),
    "gemma2": lambda: transformers.Gemma2Config(vocab_size=64, hidden_size=32, num_hidden_layers=3,
                                                num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                                intermediate_size=64, max_position_embeddings=64),
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_blocks_are_the_layers_of_any_architecture(arch):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(ARCHITECTURES[arch]())
    model.train()
    stack = find_layer_stack(model)
    opt = build(model, switch_block_every=10**6, switch_mode="ascending")
    assert opt.num_blocks == len(stack)
    names = {id(p): n for n, p in model.named_parameters()}
    before = snapshot(model)
    for block, (layer, ids) in enumerate(zip(stack, batches(len(stack)))):
        assert opt.active_block == block
        assert sorted(opt.active_param_names) == sorted(names[id(p)] for p in layer.parameters())
        loss = lm_loss(model, ids)
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
        opt.switch_block()
    changed = {n for n in before if not torch.equal(model.get_parameter(n), before[n])}
    assert changed and changed <= {names[id(p)] for p in stack.parameters()}
