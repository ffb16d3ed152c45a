"""BAdam under the Hugging Face Trainer: train, checkpoint half way, resume, and check the resume is exact.

    python python/hf_trainer.py --steps 12 --out /tmp/badam-hf

Runs a tiny random Llama twice on the CPU: once for ``--steps`` steps in one go (saving a checkpoint
at half way), once resumed from that checkpoint by a fresh Trainer. On the CPU both end with the same
weights bit for bit. The Trainer's LR schedule, gradient clipping and accumulation apply unchanged.
"""
import argparse
import os
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from badam_kernels.integrations.hf import BAdamConfig, BAdamTrainer

VOCAB = 64


class CopyTask(torch.utils.data.Dataset):
    """Sequences ``x x``: the second half repeats the first."""

    def __init__(self, n: int, half: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randint(0, VOCAB, (n, half), generator=gen)
        self.ids = torch.cat([x, x], dim=1)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_llama(layers: int, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def run(out: str, args, resume: str = None):
    training_args = TrainingArguments(
        out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, lr_scheduler_type="cosine",
        warmup_steps=2, max_grad_norm=1.0, save_steps=args.steps // 2, logging_steps=max(args.steps // 4, 1),
        report_to=[], use_cpu=not torch.cuda.is_available(), seed=args.seed, disable_tqdm=True)
    trainer = BAdamTrainer(model=tiny_llama(args.layers, args.seed), args=training_args,
                           train_dataset=CopyTask(256, 16, args.seed),
                           badam=BAdamConfig(switch_block_every=args.switch_every, include_embedding=True,
                                             include_lm_head=True))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12, help="optimizer steps (a checkpoint at half way)")
    p.add_argument("--switch-every", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be at least 2 (a checkpoint at half way)")
    out = args.out or tempfile.mkdtemp(prefix="badam-hf-")

    full = run(os.path.join(out, "full"), args)
    block_optimizer = full.block_optimizer
    print(f"uninterrupted: {block_optimizer.global_step} steps, {block_optimizer.num_blocks} blocks, "
          f"last loss {full.state.log_history[-2].get('loss')}")
    checkpoint = os.path.join(out, "full", f"checkpoint-{args.steps // 2}")
    resumed = run(os.path.join(out, "resumed"), args, resume=checkpoint)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    same = all(torch.equal(a[k], b[k]) for k in a)
    print(f"resumed from {checkpoint}: final weights {'identical' if same else 'DIFFERENT'} to the uninterrupted run")
    if not same and not torch.cuda.is_available():
        raise SystemExit(1)


if __name__ == "__main__":
    main()
