"""ShardedBlockOptimizer on FSDP2: 2 CPU processes (gloo) against the single-process BlockOptimizer.

One spawn of 2 ranks runs every scenario and saves what each rank saw; a second spawn of 1 process
resumes the 2-rank DCP checkpoint (a different world size). Each rank takes half of every batch, so
the FSDP2-averaged gradient is the full-batch one and the sharded run must follow the unsharded
trajectory. Vocabulary 63 makes the embedding and lm_head split unevenly (32 + 31 rows), and those
blocks are trained in most scenarios.
"""
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from badam_kernels import BlockOptimizer
from badam_kernels.memory import memory_report
from badam_kernels.layers import find_layer_stack
from badam_kernels.parallel.fsdp import ShardedBlockOptimizer, load_checkpoint, save_checkpoint, shard_model
from badam_kernels.truncate import truncate_backward
from helpers import free_port, batches, enable_checkpointing, lm_loss, max_rel_diff, snapshot, tiny_llama

WORLD, STEPS, EVERY, BATCH, VOCAB, SAVE_AT = 2, 12, 2, 4, 63, 6
ALL_BLOCKS = dict(include_embedding=True, include_lm_head=True)  # 5 blocks: embedding, 3 layers, lm_head + norm
SCENARIOS = {
    "reset_descending": dict(opt=dict(switch_mode="descending", **ALL_BLOCKS)),
    "offload_random": dict(opt=dict(switch_mode="random", seed=1234, state_policy="offload", **ALL_BLOCKS)),
    "clip": dict(opt=dict(switch_mode="ascending", max_grad_norm=0.05, **ALL_BLOCKS)),
    # embedding, norm and lm_head stay plain tensors, replicated: averaged and norm-counted once by the optimizer
    "replicated_clip": dict(opt=dict(switch_mode="descending", max_grad_norm=0.05, **ALL_BLOCKS), replicated=True),
    "checkpointed": dict(opt=dict(switch_mode="descending"), checkpointing=True),
    "truncated": dict(opt=dict(switch_mode="descending"), checkpointing=True, truncate={}),
    "truncated_keep": dict(opt=dict(switch_mode="descending"), checkpointing=True, truncate=dict(keep_activations=1)),
    "bf16_master": dict(opt=dict(switch_mode="descending", **ALL_BLOCKS), dtype=torch.bfloat16),
    "bf16_rounding": dict(opt=dict(switch_mode="descending", master_weights=False, **ALL_BLOCKS), dtype=torch.bfloat16),
    "dcp": dict(opt=dict(switch_mode="random", state_policy="offload")),  # unseeded: rank 0's seed wins
}


def _init(rank: int, world: int, port: int) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # a hang fails the test instead


def _model(sc, seed=0, shard=True):
    model = tiny_llama(sc.get("dtype", torch.float32), seed=seed, vocab=VOCAB)
    if sc.get("checkpointing"):
        enable_checkpointing(model, reentrant=False)
    if shard:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        if sc.get("replicated"):  # FSDP2 leaves the parameters outside the layer stack alone
            stack = {id(p) for p in find_layer_stack(model).parameters()}
            for layer in find_layer_stack(model):
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh, ignored_params={p for p in model.parameters() if id(p) not in stack})
        else:
            shard_model(model, mesh=mesh)
    if "truncate" in sc:
        truncate_backward(model, **sc["truncate"])  # after fully_shard: wraps FSDP2's class swap
    return model


def _optimizer(cls, model, **kw):
    base = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6, weight_decay=0.1)
    return cls(base, list(model.named_parameters()), switch_block_every=EVERY, verbose=0, **kw)


def _full(model):
    """Every parameter's full tensor (all-gathered from the shards)."""
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


def _count_grad_forwards(model, counts):
    """Count, per layer, the forward calls that run with grad enabled (checkpoint recomputes included)."""
    for i, layer in enumerate(find_layer_stack(model)):
        layer.mlp.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + torch.is_grad_enabled()))


def _train(model, opt, rank, world, start, stop, rec):
    for ids in batches(STEPS, batch=BATCH, vocab=VOCAB)[start:stop]:
        lm_loss(model, ids[rank * BATCH // world:(rank + 1) * BATCH // world]).backward()
        opt.step()
        opt.zero_grad()
        rec["blocks"].append(opt.active_block)
        rec["norms"].append(None if opt.last_grad_norm is None else float(opt.last_grad_norm))


def _scenario(rank, sc):
    model = _model(sc)
    torch.manual_seed(100 + rank)  # different global RNGs on the ranks
    opt = _optimizer(ShardedBlockOptimizer, model, **sc["opt"])
    rec = {"blocks": [opt.active_block], "norms": [], "counts": [0, 0, 0],
           "dtensors": all(isinstance(p, DTensor) for p in model.parameters()),
           "local_rows": {n: p.to_local().shape[0] for n, p in model.named_parameters() if isinstance(p, DTensor)}}
    _count_grad_forwards(model, rec["counts"])
    _train(model, opt, rank, WORLD, 0, STEPS, rec)
    rec["final"] = _full(model)
    rec["weight_bytes"] = memory_report(opt, model)["weights"]
    return rec


def _dcp_scenario(rank, ckpt):
    sc = SCENARIOS["dcp"]
    model = _model(sc)
    torch.manual_seed(100 + rank)
    opt = _optimizer(ShardedBlockOptimizer, model, **sc["opt"])
    rec = {"blocks": [opt.active_block], "norms": []}
    _train(model, opt, rank, WORLD, 0, SAVE_AT, rec)
    save_checkpoint(ckpt, model, opt)
    rec["saved_states"] = sorted(opt.dcp_state_dict()["states"])
    _train(model, opt, rank, WORLD, SAVE_AT, STEPS, rec)
    rec["final"] = _full(model)
    rec["resumed"] = _resume(rank, WORLD, ckpt)
    return rec


def _resume(rank, world, ckpt):
    """A fresh run (other weights, other seed) that loads the checkpoint and trains to the end."""
    sc = SCENARIOS["dcp"]
    model = _model(sc, seed=5)
    opt = _optimizer(ShardedBlockOptimizer, model, **{**sc["opt"], "seed": 999})
    load_checkpoint(ckpt, model, opt)
    rec = {"blocks": [opt.active_block], "norms": [], "global_step": opt.global_step,
           "parked": opt.park.blocks()}
    _train(model, opt, rank, world, SAVE_AT, STEPS, rec)
    rec["final"] = _full(model)
    return rec


def _worker(rank: int, port: int, out_dir: str) -> None:
    _init(rank, WORLD, port)
    try:
        results = {name: _scenario(rank, sc) for name, sc in SCENARIOS.items() if name != "dcp"}
        results["dcp"] = _dcp_scenario(rank, os.path.join(out_dir, "ckpt"))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _single_worker(rank: int, port: int, out_dir: str) -> None:
    """World of 1: resume the 2-rank checkpoint; plain (unsharded) parameters; weights loaded into the
    sharded model after the optimizer was built."""
    _init(rank, 1, port)
    try:
        results = {"resumed": _resume(rank, 1, os.path.join(out_dir, "ckpt"))}
        sc = SCENARIOS["reset_descending"]
        model = _model(sc, shard=False)
        opt = _optimizer(ShardedBlockOptimizer, model, **sc["opt"])
        rec = {"blocks": [opt.active_block], "norms": []}
        _train(model, opt, 0, 1, 0, STEPS, rec)
        results["plain"] = snapshot(model)
        model = _model(sc, seed=5)  # sharded over a mesh of 1
        opt = _optimizer(ShardedBlockOptimizer, model, **sc["opt"])
        weights = tiny_llama(vocab=VOCAB).state_dict()  # loaded after the optimizer took its copies
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
        _train(model, opt, 0, 1, 0, STEPS, rec)
        results["loaded_after"] = _full(model)
        torch.save(results, os.path.join(out_dir, "single.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    mp.spawn(_single_worker, args=(free_port(), str(out)), nprocs=1, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)], torch.load(out / "single.pt")


@pytest.fixture(scope="module")
def ranks(runs):
    return runs[0]


def _unsharded(name, halves=False, **overrides):
    """One process, the plain BlockOptimizer: whole batches, or (``halves``) the ranks' halves accumulated."""
    sc = SCENARIOS[name]
    model = tiny_llama(sc.get("dtype", torch.float32), vocab=VOCAB)
    opt = _optimizer(BlockOptimizer, model, **{**sc["opt"], **overrides})
    blocks, norms = [opt.active_block], []
    for ids in batches(STEPS, batch=BATCH, vocab=VOCAB):
        for part in ids.chunk(WORLD) if halves else [ids]:
            (lm_loss(model, part) / (WORLD if halves else 1)).backward()
        opt.step()
        opt.zero_grad()
        blocks.append(opt.active_block)
        norms.append(None if opt.last_grad_norm is None else float(opt.last_grad_norm))
    return snapshot(model), blocks, norms


@pytest.mark.parametrize("name", ["reset_descending", "offload_random", "clip", "replicated_clip"])
def test_two_sharded_ranks_on_half_batches_equal_one_unsharded_process(ranks, name):
    expected, blocks, _ = _unsharded(name)
    accumulated, _, _ = _unsharded(name, halves=True)
    assert len(set(blocks)) == 5  # every block trained, the unevenly split embedding and lm_head included
    for rec in (r[name] for r in ranks):
        assert rec["dtensors"] == (name != "replicated_clip")
        assert rec["blocks"] == blocks
        assert max_rel_diff(expected, rec["final"]) <= 1e-5
        # the rounding of the batch split is the whole difference: exact but for the norm's summation order
        assert max_rel_diff(accumulated, rec["final"]) <= (1e-6 if "clip" in name else 0.0)
    assert max_rel_diff(expected, snapshot(tiny_llama(vocab=VOCAB))) > 1e-3  # the run did train


def test_shards_are_uneven(ranks):
    rows = [r["reset_descending"]["local_rows"] for r in ranks]
    assert rows[0]["model.embed_tokens.weight"] == 32 and rows[1]["model.embed_tokens.weight"] == 31
    assert rows[0]["lm_head.weight"] == 32 and rows[1]["lm_head.weight"] == 31


def test_memory_report_counts_the_local_shards(ranks):
    full = sum(t.numel() * t.element_size() for t in ranks[0]["reset_descending"]["final"].values())
    held = [r["reset_descending"]["weight_bytes"] for r in ranks]
    assert sum(held) == full and max(held) < full


@pytest.mark.parametrize("name", ["clip", "replicated_clip"])
def test_clipping_uses_the_global_norm(ranks, name):
    expected, _, norms = _unsharded(name)
    unclipped, _, _ = _unsharded(name, max_grad_norm=None)
    assert min(norms) > 0.05  # every step was clipped
    assert max_rel_diff(unclipped, expected) > 1e-3  # and clipping changed the run
    for rec in (r[name] for r in ranks):
        assert rec["norms"] == pytest.approx(norms, rel=1e-5)


def test_ranks_agree_on_the_seeded_random_order(ranks):
    assert ranks[0]["offload_random"]["blocks"] == ranks[1]["offload_random"]["blocks"]


@pytest.mark.parametrize("name", ["truncated", "truncated_keep"])
def test_truncated_backward_equals_the_untruncated_sharded_run(ranks, name):
    for rec_t, rec_c in ((r[name], r["checkpointed"]) for r in ranks):
        below = [sum(active > i for active in rec_t["blocks"][:-1]) for i in range(3)]  # block i = layer i
        assert below[0] > 0 and below[1] > 0
        assert rec_t["blocks"] == rec_c["blocks"]
        assert max_rel_diff(rec_c["final"], rec_t["final"]) <= 1e-6
        # checkpointing recomputes every layer in backward; truncated, a layer below the active block
        # runs once, without grad; with keep_activations=1 the top layer is never recomputed
        assert rec_c["counts"] == [2 * STEPS] * 3
        expected = [2 * (STEPS - b) for b in below]
        if name == "truncated_keep":
            expected[2] = STEPS
        assert rec_t["counts"] == expected
    expected, _, _ = _unsharded("checkpointed")
    assert max_rel_diff(expected, ranks[0][name]["final"]) <= 1e-5


def test_bf16_with_master_weights_within_bf16_tolerance(ranks):
    """bf16 gradients of half batches round otherwise than the full batch's (an unsharded run on the two
    halves differs as much); against that run, the sharded one is within a fraction of a bf16 ulp."""
    expected, blocks, _ = _unsharded("bf16_master")
    accumulated, _, _ = _unsharded("bf16_master", halves=True)
    start = snapshot(tiny_llama(torch.bfloat16, vocab=VOCAB))
    for rec in (r["bf16_master"] for r in ranks):
        assert rec["blocks"] == blocks
        assert all(t.dtype == torch.bfloat16 for t in rec["final"].values())
        assert max_rel_diff(expected, rec["final"]) <= 2e-2
        assert max_rel_diff(accumulated, rec["final"]) <= 1e-3
    assert max_rel_diff(expected, start) > 5e-2


def test_bf16_stochastic_rounding_trains_like_the_unsharded_run(ranks):
    """Other rounding noise than the unsharded run's (the flat layout differs), so only as close as two
    stochastic-rounding runs are."""
    expected, blocks, _ = _unsharded("bf16_rounding")
    start = snapshot(tiny_llama(torch.bfloat16, vocab=VOCAB))
    for rec in (r["bf16_rounding"] for r in ranks):
        assert rec["blocks"] == blocks
        assert max_rel_diff(expected, rec["final"]) <= 3e-2
        assert max_rel_diff(expected, rec["final"]) < max_rel_diff(expected, start) / 3


def test_dcp_resume_on_two_ranks_and_on_one_equals_the_uninterrupted_run(runs):
    ranks, single = runs
    assert ranks[0]["dcp"]["blocks"] == ranks[1]["dcp"]["blocks"]
    for rec in (r["dcp"] for r in ranks):
        assert len(rec["saved_states"]) == 3  # mid-block, with both other blocks parked (offload)
        resumed = rec["resumed"]
        assert resumed["global_step"] == SAVE_AT and len(resumed["parked"]) == 2
        assert resumed["blocks"] == rec["blocks"][SAVE_AT:]
        for n in rec["final"]:
            assert torch.equal(rec["final"][n], resumed["final"][n]), n
    uninterrupted = ranks[0]["dcp"]
    assert single["resumed"]["blocks"] == uninterrupted["blocks"][SAVE_AT:]
    assert max_rel_diff(uninterrupted["final"], single["resumed"]["final"]) <= 1e-5


@pytest.mark.parametrize("name", ["plain", "loaded_after"])
def test_a_world_of_one_equals_the_block_optimizer_bit_for_bit(runs, name):
    expected, _, _ = _unsharded("reset_descending")
    for n in expected:
        assert torch.equal(expected[n], runs[1][name][n]), n


def test_needs_an_initialised_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_distributed"):
        _optimizer(ShardedBlockOptimizer, tiny_llama())
