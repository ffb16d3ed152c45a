"""Run a module as on a smaller GPU: ``python benchmarks/as_card.py GIB MODULE [ARGS...]``.

The card is emulated by capping PyTorch's caching allocator (``set_per_process_memory_fraction``) at
``GIB`` GiB less what the device already holds once this process has its CUDA context (the context
takes its share of a real card too). What the cap cannot see: memory the process takes outside the
allocator later (kernel code loaded at first use), a few hundred MiB at most, so the emulated card is
slightly larger than a real one. The GPU must be otherwise idle. An allocation past the cap raises
``torch.cuda.OutOfMemoryError``, as the real card would.
"""
from __future__ import annotations

import runpy
import sys

import torch


def cap_to_card(gib: float) -> float:
    """Cap this process' allocator at a card of ``gib`` GiB; returns the cap in GiB."""
    torch.cuda.init()
    torch.empty(1, device="cuda")  # the context exists once a tensor lives on the device
    free, total = torch.cuda.mem_get_info()
    cap = gib * 2**30 - (total - free)
    if cap <= 0:
        raise SystemExit(f"as_card: the device already holds {(total - free) / 2**30:.1f} GiB, more than {gib} GiB")
    torch.cuda.set_per_process_memory_fraction(cap / total)
    return cap / 2**30


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__.splitlines()[0])
    gib, module = float(sys.argv[1]), sys.argv[2]
    cap = cap_to_card(gib)
    print(f"as_card: a {gib:g} GiB card: the allocator capped at {cap:.2f} GiB", file=sys.stderr)
    sys.argv = [module, *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
