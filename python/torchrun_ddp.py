"""Data-parallel BAdam: every rank trains the same active block on its own shard of each batch.

    torchrun --nproc-per-node 2 python/torchrun_ddp.py --steps 10        # CPU: gloo
    torchrun --nproc-per-node 8 python/torchrun_ddp.py --hidden 1024     # GPUs: NCCL

Only the active block's gradients are all-reduced (one call per dtype group per step), so each step
moves about 1/D of what DDP would. Rank 0 prints the loss (averaged over the ranks), the active
block, the bytes reduced and what a DDP all-reduce of every parameter would have moved.
The model is a random tiny Llama, the data random tokens: this shows the loop, not a result.
"""
import argparse

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from badam_kernels import truncate_backward
from badam_kernels.parallel.data_parallel import DataParallelBlockOptimizer, init_distributed, is_main_process


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8, help="global batch, split evenly over the ranks")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--switch-every", type=int, default=3)
    p.add_argument("--mode", default="random", choices=["random", "ascending", "descending"])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main():
    args = parse_args()
    rank, world, device = init_distributed()
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} does not split evenly over {world} ranks")
    shard = args.batch // world

    torch.manual_seed(args.seed + rank)  # ranks initialise differently: sync_module_states fixes that
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=args.seq)
    model = LlamaForCausalLM(config).to(device).train()
    truncate_backward(model)
    base = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    opt = DataParallelBlockOptimizer(base, list(model.named_parameters()), switch_block_every=args.switch_every,
                                     switch_mode=args.mode, verbose=0, sync_module_states=True)
    ddp_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if is_main_process():
        print(f"{world} ranks ({dist.get_backend()}), {opt.num_blocks} blocks, "
              f"{ddp_bytes / 1e6:.2f} MB of parameters", flush=True)

    for step in range(args.steps):
        data = torch.Generator().manual_seed(args.seed * 100003 + step)  # the same global batch on every rank
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
            sent = opt.bytes_reduced_last_step
            print(f"step {step:3d}  block {block}  loss {mean_loss.item() / world:.4f}  "
                  f"reduced {sent / 1e3:.1f} kB ({sent / ddp_bytes:.1%} of a full all-reduce)", flush=True)

    if is_main_process():
        print(f"total reduced {opt.bytes_reduced_total / 1e6:.2f} MB; DDP would have moved "
              f"{args.steps * ddp_bytes / 1e6:.2f} MB", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
