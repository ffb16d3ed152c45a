"""Small models and data shared by the tests."""
import socket

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(dtype=torch.float32, seed=0, layers=3, tie=False, vocab=64, hidden=32, device="cpu"):
    """A random Llama small enough for CPU tests: 3 layers of width 32."""
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype=dtype, device=device)
    model.train()
    return model


def batches(n, batch=2, seq=12, vocab=64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=gen) for _ in range(n)]


def lm_loss(model, ids):
    ids = ids.to(model.device)
    return model(input_ids=ids, labels=ids).loss


def enable_checkpointing(model, reentrant: bool):
    """Hugging Face gradient checkpointing, with the embedding output requiring grad as HF's Trainer has it."""
    from badam_kernels.layers import enable_gradient_checkpointing

    enable_gradient_checkpointing(model, use_reentrant=reentrant)
    model.enable_input_require_grads()  # what HF does for text models: the embedding output requires grad


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train(model, opt, steps, seed=1, start=0):
    """Plain loop; returns the losses. Batches depend on (seed, step) so a resumed run sees the same data."""
    losses = []
    data = batches(start + steps, seed=seed)[start:]
    for ids in data:
        loss = lm_loss(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def max_rel_diff(a: dict, b: dict) -> float:
    return max(((a[n].float() - b[n].float()).norm() / a[n].float().norm().clamp_min(1e-30)).item() for n in a)


def make(cls, dtype=torch.float32, base=torch.optim.AdamW, base_kw=None, model_kw=None, **kw):
    """A tiny Llama and an optimizer of class ``cls`` (ours or badam's) over it."""
    model = tiny_llama(dtype, **(model_kw or {}))
    base_kw = {"lr": 1e-2, "weight_decay": 0.0, **(base_kw or {})}
    opt = cls(base(model.parameters(), **base_kw), list(model.named_parameters()), verbose=0, **kw)
    return model, opt


def persistent_per_block_adamw(steps, switch_every, order, device="cpu", lr=1e-2):
    """The reference for `offload`: one AdamW per block whose state is never reset.

    The single-tensor AdamW (``foreach=False``) does the reference backend's operations in the same
    order, on CUDA as on CPU.
    """
    model = tiny_llama(device=device)
    blocks = [[p for n, p in model.named_parameters() if n.startswith(f"model.layers.{b}.")] for b in range(3)]
    opts = [torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=False) for params in blocks]
    # badam's first block trains one step less (the switch test runs after the step counter moved)
    step_blocks = [order[0]] * max(switch_every - 1, 1)
    k = 1
    while len(step_blocks) < steps:
        step_blocks += [order[k % len(order)]] * switch_every
        k += 1
    for ids, b in zip(batches(steps), step_blocks):
        for n, p in model.named_parameters():
            p.requires_grad_(any(p is q for q in blocks[b]))
        lm_loss(model, ids).backward()
        opts[b].step()
        model.zero_grad()
    return snapshot(model)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
