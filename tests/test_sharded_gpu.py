"""ShardedBlockOptimizer on CUDA with NCCL (run with -m gpu): a world of one process on one GPU.

Two ranks need two GPUs (NCCL refuses two ranks on one device); with one, the FSDP2 code path on
CUDA still runs whole: DTensor parameters, NCCL all-gathers and reduce-scatters of a mesh of one,
the fused kernels on local shards, pinned-host offload of sharded states, and a DCP round trip.
It must equal the unsharded BlockOptimizer on the same GPU.
"""
import os

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from badam_kernels import BlockOptimizer
from badam_kernels.parallel.fsdp import ShardedBlockOptimizer, load_checkpoint, save_checkpoint, shard_model
from helpers import free_port, max_rel_diff, snapshot, tiny_llama, train

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def nccl_world_of_one():  # without CUDA, conftest skips every gpu-marked test before this runs
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    yield init_device_mesh("cuda", (1,))
    dist.destroy_process_group()


def _run(cls, mesh=None, steps=12, dtype=torch.float32, **kw):
    model = tiny_llama(dtype, device="cuda")
    if mesh is not None:
        shard_model(model, mesh=mesh)
    base = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    opt = cls(base, list(model.named_parameters()), switch_block_every=2, verbose=0, **kw)
    train(model, opt, steps)
    return model, opt


def _full(model):
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("policy", ["reset", "offload"])
def test_sharded_on_cuda_equals_unsharded(nccl_world_of_one, backend, policy):
    kw = dict(backend=backend, state_policy=policy, include_embedding=True, max_grad_norm=1.0)
    sharded, _ = _run(ShardedBlockOptimizer, nccl_world_of_one, **kw)
    assert all(isinstance(p, DTensor) for p in sharded.parameters())
    plain, _ = _run(BlockOptimizer, **kw)
    # the clipping norm is a sum of squares all-reduced, not the kernel's own: rounding apart
    assert max_rel_diff(snapshot(plain), _full(sharded)) <= 1e-5


def test_sharded_bf16_stochastic_rounding_on_cuda(nccl_world_of_one):
    kw = dict(master_weights=False, state_dtype=torch.bfloat16, seed=3, switch_mode="random")
    sharded, _ = _run(ShardedBlockOptimizer, nccl_world_of_one, dtype=torch.bfloat16, **kw)
    plain, _ = _run(BlockOptimizer, dtype=torch.bfloat16, **kw)
    assert max_rel_diff(snapshot(plain), _full(sharded)) <= 1e-6  # same seed, same shard: the same rounding


def test_dcp_round_trip_on_cuda_resumes_exactly(nccl_world_of_one, tmp_path):
    kw = dict(state_policy="offload", switch_mode="random", seed=5)
    reference, _ = _run(ShardedBlockOptimizer, nccl_world_of_one, steps=10, **kw)
    model, opt = _run(ShardedBlockOptimizer, nccl_world_of_one, steps=5, **kw)
    save_checkpoint(tmp_path / "ckpt", model, opt)
    fresh = tiny_llama(device="cuda", seed=9)
    shard_model(fresh, mesh=nccl_world_of_one)
    base = torch.optim.AdamW(fresh.parameters(), lr=1e-3, weight_decay=0.1)
    resumed = ShardedBlockOptimizer(base, list(fresh.named_parameters()), switch_block_every=2, verbose=0,
                                    **{**kw, "seed": 99})
    load_checkpoint(tmp_path / "ckpt", fresh, resumed)
    train(fresh, resumed, 5, start=5)
    assert max_rel_diff(_full(reference), _full(fresh)) == 0.0
