"""Run a module as on a smaller GPU: ``python benchmarks/as_card.py GIB MODULE [ARGS...]``.

The card is emulated by capping PyTorch's caching allocator (``set_per_process_memory_fraction``) at
``GIB`` GiB less what this process holds on the device once it has its CUDA context (the context takes
its share of a real card too): NVML's figure for this process (PyPI ``nvidia-ml-py``), else, where
that is missing, everything the device holds (then other processes on the GPU shrink the card). What
the cap cannot see: memory the process takes outside the allocator later (kernel code loaded at first
use), a few hundred MiB at most, so the emulated card is slightly larger than a real one. An
allocation past the cap raises ``torch.cuda.OutOfMemoryError``, as the real card would.
"""
from __future__ import annotations

import os
import runpy
import sys
from typing import Tuple

import torch


def held_by_this_process() -> Tuple[int, str]:
    """Bytes this process holds on the current device (its context, what it allocated) and how that
    was measured."""
    free, total = torch.cuda.mem_get_info()
    try:
        import pynvml
    except ImportError:
        return total - free, "the whole device's use (nvidia-ml-py missing)"
    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())  # CUDA_VISIBLE_DEVICES unset
        mine = [p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle) if p.pid == os.getpid()]
    finally:
        pynvml.nvmlShutdown()
    if not mine or mine[0] is None:  # e.g. inside a container whose PIDs NVML cannot see
        return total - free, "the whole device's use (NVML does not list this process)"
    return mine[0], "this process' use (NVML)"


def cap_to_card(gib: float) -> Tuple[float, str]:
    """Cap this process' allocator at a card of ``gib`` GiB; returns the cap in GiB and how the
    context was measured."""
    torch.empty(1, device="cuda")  # the context exists once a tensor lives on the device
    held, how = held_by_this_process()
    cap = gib * 2**30 - held
    if cap <= 0:
        raise SystemExit(f"as_card: {held / 2**30:.1f} GiB already held ({how}), more than {gib:g} GiB")
    torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.mem_get_info()[1])
    return cap / 2**30, f"{held / 2**20:,.0f} MiB held before: {how}"


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__.splitlines()[0])
    gib, module = float(sys.argv[1]), sys.argv[2]
    cap, held = cap_to_card(gib)
    print(f"as_card: a {gib:g} GiB card: the allocator capped at {cap:.2f} GiB ({held})", file=sys.stderr)
    sys.argv = [module, *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
