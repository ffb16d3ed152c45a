"""DataParallelBlockOptimizer on 2 CPU processes (gloo on 127.0.0.1) against the single-process BlockOptimizer.

One spawn runs every scenario (process start-up dominates); the tests then read what each rank saved.
Each rank takes half of every batch and its loss is the mean over its half, so the average of the
two ranks' gradients is the full-batch gradient: two ranks must follow the single-process trajectory.
"""
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from badam_kernels import BlockOptimizer
from badam_kernels.parallel.data_parallel import DataParallelBlockOptimizer
from helpers import free_port, batches, lm_loss, max_rel_diff, snapshot, tiny_llama

WORLD, STEPS, EVERY, BATCH = 2, 12, 3, 4
SCENARIOS = {
    "descending": dict(switch_mode="descending"),
    "random": dict(switch_mode="random", seed=1234),
    "random_unseeded": dict(switch_mode="random"),  # the ranks' global RNGs differ: rank 0's seed must win
    "overlap": dict(switch_mode="ascending", overlap=True),
}


def _optimizer(cls, model, **kw):
    # lr 1e-3, eps 1e-6: a well-conditioned run. With lr 1e-2 this tiny model moves 80% and the
    # run is chaotic: Adam's first step is lr * sign(g), so the rounding of a batch of 4 against two
    # of 2 flips the sign of near-zero gradients and one process on the two layouts differs by 3%.
    base = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6, weight_decay=0.1)
    return cls(base, list(model.named_parameters()), switch_block_every=EVERY, verbose=0, **kw)


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = {}
        for name, kw in SCENARIOS.items():
            model = tiny_llama()
            torch.manual_seed(100 + rank)  # different global RNG on each rank
            opt = _optimizer(DataParallelBlockOptimizer, model, **kw)
            rec = {"flat": [], "bytes": [], "grad_bytes": [], "blocks": [opt.active_block],
                   "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
            for ids in batches(STEPS, batch=BATCH):
                shard = ids[rank * BATCH // WORLD:(rank + 1) * BATCH // WORLD]
                lm_loss(model, shard).backward()
                rec["grad_bytes"].append(sum(g.grad.numel() * g.grad.element_size() for g in opt.groups))
                rec.setdefault("in_flight", []).append(len(opt.sync.pending))  # overlap: launched by the hooks
                opt.step()
                opt.zero_grad()
                rec["bytes"].append(opt.bytes_reduced_last_step)
                rec["blocks"].append(opt.active_block)
                rec["flat"].append(_flat(model))
            rec["final"] = snapshot(model)
            rec["bytes_total"] = opt.bytes_reduced_total
            results[name] = rec
        model = tiny_llama(seed=rank)  # different initial weights on each rank
        _optimizer(DataParallelBlockOptimizer, model, sync_module_states=True)
        results["synced"] = _flat(model)
        try:
            _optimizer(DataParallelBlockOptimizer, tiny_llama(layers=3 + rank))
            results["mismatch"] = None
        except ValueError as error:
            results["mismatch"] = str(error)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _single_process(accumulate=False, **kw):
    """The whole batch at once, or (``accumulate``) its two halves accumulated as the ranks see them."""
    kw.pop("overlap", None)
    model = tiny_llama()
    opt = _optimizer(BlockOptimizer, model, **kw)
    blocks = [opt.active_block]
    for ids in batches(STEPS, batch=BATCH):
        if accumulate:
            for shard in ids.chunk(WORLD):
                (lm_loss(model, shard) / WORLD).backward()
        else:
            lm_loss(model, ids).backward()
        opt.step()
        opt.zero_grad()
        blocks.append(opt.active_block)
    return snapshot(model), blocks


@pytest.mark.parametrize("name", ["descending", "random", "overlap"])
def test_two_ranks_on_half_batches_equal_one_process_on_the_whole_batch(ranks, name):
    expected, blocks = _single_process(**SCENARIOS[name])
    assert len(set(blocks)) == 3  # the run visited every block
    for rec in (r[name] for r in ranks):
        assert rec["blocks"] == blocks
        assert max_rel_diff(expected, rec["final"]) <= 1e-5
    assert max_rel_diff(expected, snapshot(tiny_llama())) > 1e-3  # the run did train


@pytest.mark.parametrize("name", ["descending", "random", "overlap"])
def test_two_ranks_equal_one_process_accumulating_both_halves_bit_for_bit(ranks, name):
    """(g0 + g1) / 2 and g0 / 2 + g1 / 2 are the same floats: halving is exact."""
    expected, blocks = _single_process(accumulate=True, **SCENARIOS[name])
    for rec in (r[name] for r in ranks):
        assert rec["blocks"] == blocks
        assert rec["in_flight"] == [1 if name == "overlap" else 0] * STEPS
        for n in expected:
            assert torch.equal(expected[n], rec["final"][n]), n


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_ranks_hold_identical_weights_after_every_step(ranks, name):
    a, b = ranks[0][name], ranks[1][name]
    assert len(a["flat"]) == STEPS
    for step, (wa, wb) in enumerate(zip(a["flat"], b["flat"])):
        assert torch.equal(wa, wb), f"ranks differ after step {step}"


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_bytes_reduced_are_the_active_block_gradients_only(ranks, name):
    for rec in (r[name] for r in ranks):
        assert rec["bytes"] == rec["grad_bytes"]
        assert rec["bytes_total"] == sum(rec["grad_bytes"])
        assert max(rec["bytes"]) < rec["param_bytes"] / 3  # one layer of 3 (padding included), not the embedding or lm_head


def test_random_order_agrees_although_global_rngs_differ(ranks):
    a, b = ranks[0]["random_unseeded"], ranks[1]["random_unseeded"]
    assert a["blocks"] == b["blocks"]
    assert len(set(a["blocks"])) == 3


def test_sync_module_states_starts_ranks_from_rank0_weights(ranks):
    assert torch.equal(ranks[0]["synced"], ranks[1]["synced"])
    assert torch.equal(ranks[0]["synced"], _flat(tiny_llama(seed=0)))


def test_ranks_with_different_models_are_refused(ranks):
    for r in ranks:
        assert r["mismatch"] is not None and "ranks [1]" in r["mismatch"]


def test_needs_an_initialised_process_group():
    assert not dist.is_initialized()
    model = tiny_llama()
    with pytest.raises(RuntimeError, match="init_distributed"):
        _optimizer(DataParallelBlockOptimizer, model)
