"""BAdam in a Hugging Face Accelerate loop: ``accelerator.prepare`` wraps the BlockOptimizer, accumulation and
clipping go through the Accelerator, and ``save_state`` / ``load_state`` checkpoint it
(with ``safe_serialization=False``: the active block's parameters share one flat buffer, which safetensors refuses).

    python python/accelerate_loop.py --steps 20
    accelerate launch --num_processes 1 python/accelerate_loop.py

The optimizer is built before ``prepare`` (``prepare`` calls ``load_state_dict(state_dict())`` on it
to place its states, which a BlockOptimizer survives).
"""
import argparse
import os
import tempfile

import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

from badam_kernels.integrations.hf import BAdamConfig, make_badam_optimizer

VOCAB = 64


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="optimizer steps")
    p.add_argument("--switch-every", type=int, default=5)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="where save_state writes (default: a temporary folder)")
    args = p.parse_args(argv)

    accelerator = Accelerator(gradient_accumulation_steps=args.grad_accum, cpu=not torch.cuda.is_available())
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).to(accelerator.device)
    model.train()
    optimizer = make_badam_optimizer(model, BAdamConfig(switch_block_every=args.switch_every, seed=args.seed),
                                     lr=args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 4))
    gen = torch.Generator().manual_seed(args.seed)
    half = torch.randint(0, VOCAB, (args.steps * args.grad_accum * args.batch_size, 16), generator=gen)
    data = torch.utils.data.DataLoader(torch.cat([half, half], dim=1), batch_size=args.batch_size)
    model, optimizer, data, scheduler = accelerator.prepare(model, optimizer, data, scheduler)
    block_optimizer = optimizer.optimizer  # the BlockOptimizer inside AcceleratedOptimizer

    for i, ids in enumerate(data):
        with accelerator.accumulate(model):
            loss = model(input_ids=ids, labels=ids).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()  # a no-op on the micro-batches that only accumulate
            scheduler.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients and block_optimizer.global_step % 5 == 0:
            accelerator.print(f"step {block_optimizer.global_step}/{args.steps}  loss {loss.item():.4f}  "
                              f"block {block_optimizer.active_block}")

    out = args.out or tempfile.mkdtemp(prefix="badam-accelerate-")
    # safe_serialization=False: safetensors refuses tensors that share a storage, and the active block's
    # parameters are views of one flat buffer (torch.save writes that buffer once)
    accelerator.save_state(out, safe_serialization=False)
    block, step = block_optimizer.active_block, block_optimizer.global_step
    accelerator.load_state(out)  # what a resumed run does: the optimizer comes back on the same block and step
    assert (block_optimizer.active_block, block_optimizer.global_step) == (block, step)
    accelerator.print(f"done: {step} steps, state saved to {out} and loaded back (block {block})")


if __name__ == "__main__":
    main()
