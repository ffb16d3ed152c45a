"""BAdam in a plain PyTorch loop: a tiny random Llama learns a synthetic copy task on the CPU.

    python python/plain_loop.py --steps 60
    torchrun --nproc-per-node 1 python/plain_loop.py   # same run, launched by torchrun

Only the public API: ``BlockOptimizer`` over ``torch.optim.AdamW`` (one block per layer, switched
every ``--switch-every`` steps) and ``truncate_backward`` (the layers below the active block build no
graph). The loop is the usual one: forward, backward, clip, step, scheduler step, zero_grad.
"""
import argparse
import os
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from badam_kernels import BlockOptimizer, truncate_backward

VOCAB = 64


def tiny_llama(layers: int, hidden: int, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def copy_batch(step: int, batch: int, half: int, seed: int) -> torch.Tensor:
    """Sequences ``x x`` (a random half, then the same again): the second half is learnable."""
    gen = torch.Generator().manual_seed(seed * 100003 + step)
    x = torch.randint(0, VOCAB, (batch, half), generator=gen)
    return torch.cat([x, x], dim=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--switch-every", type=int, default=10, help="steps per block")
    p.add_argument("--switch-mode", default="descending", choices=["descending", "ascending", "random", "fixed"])
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=5, help="linear warm-up steps")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        raise SystemExit("plain_loop.py is a single-process example (torchrun --nproc-per-node 1)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = tiny_llama(args.layers, args.hidden, args.seed).to(device)
    model.train()
    model.config.use_cache = False
    if args.grad_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})

    base = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    optimizer = BlockOptimizer(base, list(model.named_parameters()), switch_block_every=args.switch_every,
                               switch_mode=args.switch_mode, start_block=0 if args.switch_mode == "fixed" else None,
                               include_embedding=True, include_lm_head=True, verbose=0, seed=args.seed)
    truncation = truncate_backward(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(args.warmup, 1)))
    print(f"rank {rank}/{world} on {device}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{optimizer.num_blocks} blocks, switch every {args.switch_every} steps ({args.switch_mode})")

    t0 = time.perf_counter()
    first = last = None
    for step in range(args.steps):
        ids = copy_batch(step, args.batch_size, args.seq_len // 2, args.seed).to(device)
        block = optimizer.active_block
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        last = loss.item()
        first = last if first is None else first
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step + 1}/{args.steps}  loss {last:.4f}  block {block}  lr {scheduler.get_last_lr()[0]:.2e}")
    truncation.remove()
    print(f"done: loss {first:.4f} -> {last:.4f} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
