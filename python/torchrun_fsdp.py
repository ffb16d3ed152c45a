"""Sharded BAdam on FSDP2: every rank holds 1/N of each layer, and of the active block's Adam states.

    torchrun --nproc-per-node 2 python/torchrun_fsdp.py --steps 10                 # CPU: gloo
    torchrun --nproc-per-node 8 python/torchrun_fsdp.py --hidden 1024 --out ckpt   # GPUs: NCCL

FSDP2 all-gathers each layer for its forward (and for the backward of the layers above the active
block) and reduce-scatters gradients, which only the active block has. With ``--out`` the model and
optimizer are saved with torch.distributed.checkpoint at the end; ``--resume`` continues from such
a folder, on any number of ranks. The model is a random tiny Llama, the data random tokens: this
shows the loop, not a result.
"""
import argparse

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from badam_kernels import truncate_backward
from badam_kernels.parallel.data_parallel import init_distributed, is_main_process
from badam_kernels.memory import format_bytes, memory_report
from badam_kernels.parallel.fsdp import ShardedBlockOptimizer, load_checkpoint, save_checkpoint, shard_model


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8, help="global batch, split evenly over the ranks")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--switch-every", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", help="save a DCP checkpoint of model and optimizer here at the end")
    p.add_argument("--resume", help="start from a DCP checkpoint saved by --out (any number of ranks)")
    return p.parse_args()


def main():
    args = parse_args()
    rank, world, device = init_distributed()
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} does not split evenly over {world} ranks")
    shard = args.batch // world

    torch.manual_seed(0)  # every rank builds the same model, then keeps its shards of it
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=args.seq)
    model = shard_model(LlamaForCausalLM(config).to(device).train())
    truncate_backward(model)
    base = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    opt = ShardedBlockOptimizer(base, list(model.named_parameters()), switch_block_every=args.switch_every,
                                switch_mode="random", verbose=0)
    start = 0
    if args.resume:
        load_checkpoint(args.resume, model, opt)
        start = opt.global_step
    if is_main_process():
        held = memory_report(opt, model)
        print(f"{world} ranks ({dist.get_backend()}), {opt.num_blocks} blocks; rank 0 holds weights "
              f"{format_bytes(held['weights'])}, master {format_bytes(held['master'])}, "
              f"moments {format_bytes(held['moments'])}", flush=True)

    for step in range(start, start + args.steps):
        data = torch.Generator().manual_seed(step)  # the same global batch on every rank
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=data)[rank * shard:(rank + 1) * shard]
        ids = ids.to(device)
        block = opt.active_block
        loss = model(input_ids=ids, labels=ids).loss  # the mean over this rank's shard
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)  # for the log only
        if is_main_process():
            print(f"step {step:3d}  block {block}  loss {mean_loss.item() / world:.4f}", flush=True)

    if args.out:
        save_checkpoint(args.out, model, opt)
    if is_main_process():
        print(f"done: {args.steps} steps" + (f", checkpoint in {args.out}" if args.out else ""), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
