"""``--profile-steps A-B``: where a step's time goes, from torch.profiler, written to the run folder.

Steps A to B (optimizer steps, counted as the log counts them) run under ``torch.profiler`` with the
CPU and, on a GPU, the CUDA activity. After step B the job writes, in ``profile/`` of the run folder:

* ``ops.txt``: the operators' table (``key_averages``), sorted by device time on a GPU (CPU time on
  the CPU), with the profiled steps' wall seconds above it;
* ``trace.json.gz``: the Chrome trace (open it in ``chrome://tracing`` or https://ui.perfetto.dev),
  where the gaps between kernels show a step waiting for the host.

Pick steps after the first block epoch: the compiled layers' first passes and the first switches
are one-offs that a long run does not repeat.
"""
from __future__ import annotations

import os
import re
import time
from typing import List, Optional, Tuple

import torch

STEP_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


def parse_step_range(value: str) -> Optional[Tuple[int, int]]:
    """``"A-B"`` as (A, B) with 1 <= A <= B; None if it is not one."""
    match = STEP_RANGE.match(value) if isinstance(value, str) else None
    if match is None:
        return None
    first, last = int(match.group(1)), int(match.group(2))
    return (first, last) if 1 <= first <= last else None


def step_range(value) -> Optional[str]:
    """An option check: ``A-B``, two step numbers with 1 <= A <= B."""
    return None if parse_step_range(value) is not None else "two step numbers A-B with 1 <= A <= B, e.g. 40-45"


class StepProfiler:
    """Profiles the optimizer steps ``first..last``; :meth:`around` wraps each step of the loop."""

    def __init__(self, first: int, last: int, folder: str, device: torch.device, say=print):
        self.first, self.last, self.folder, self.say = first, last, folder, say
        self.cuda = device.type == "cuda"
        self.profiler: Optional[torch.profiler.profile] = None
        self.walls: List[float] = []

    @classmethod
    def from_config(cls, spec: Optional[str], run_dir: str, device: torch.device, start: int, target: int,
                    say=print) -> Optional["StepProfiler"]:
        """The profiler of ``--profile-steps`` for a run of steps ``start + 1 .. target``; None (and a line
        saying why) where the range misses the run."""
        steps = parse_step_range(spec) if spec else None
        if steps is None:
            return None
        if steps[0] > target or steps[1] <= start:
            say(f"note: --profile-steps {spec}: this run takes steps {start + 1} to {target}; nothing is profiled")
            return None
        return cls(*steps, os.path.join(run_dir, "profile"), device, say)

    def around(self, step: int, run_step):
        """``run_step()`` for step ``step`` (1-based), profiled when within the range."""
        if not self.first <= step <= self.last:
            return run_step()
        if self.profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities, record_shapes=True)
            self.profiler.__enter__()
        began = time.perf_counter()
        with torch.profiler.record_function(f"step {step}"):
            result = run_step()
        if self.cuda:
            torch.cuda.synchronize()
        self.walls.append(time.perf_counter() - began)
        if step == self.last:
            self.write()
        return result

    def write(self) -> None:
        """Stop profiling and write ``ops.txt`` and ``trace.json.gz`` (also when the run stopped early)."""
        if self.profiler is None:
            return
        profiler, self.profiler = self.profiler, None
        profiler.__exit__(None, None, None)
        os.makedirs(self.folder, exist_ok=True)
        sort = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        table = profiler.key_averages().table(sort_by=sort, row_limit=60, max_name_column_width=80)
        steps, mean = f"{self.first}-{self.first + len(self.walls) - 1}", sum(self.walls) / len(self.walls)
        head = (f"steps {steps}: {len(self.walls)} steps, wall seconds "
                f"{', '.join(f'{w:.4f}' for w in self.walls)} (mean {mean:.4f})\n"
                f"sorted by {sort}\n\n")
        with open(os.path.join(self.folder, "ops.txt"), "w", encoding="utf-8") as f:
            f.write(head + table + "\n")
        profiler.export_chrome_trace(os.path.join(self.folder, "trace.json.gz"))
        self.say(f"profile of steps {steps}: {os.path.join(self.folder, 'ops.txt')} and trace.json.gz "
                 f"(mean {mean:.4f} s a step)")
