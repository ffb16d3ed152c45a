"""benchmarks/as_card.py: a module run as on a smaller GPU (run with -m gpu)."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.gpu
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALLOCATE = """import sys, torch
x = torch.empty(int(float(sys.argv[1]) * 2**30), dtype=torch.uint8, device="cuda")
print("allocated", sys.argv[1])
"""


def run_as_card(tmp_path, card_gib, allocate_gib):
    (tmp_path / "allocate.py").write_text(ALLOCATE)
    env = {**os.environ, "PYTHONPATH": str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "as_card.py"), str(card_gib), "allocate",
                           str(allocate_gib)], capture_output=True, text=True, env=env, timeout=300)


def test_within_the_card_runs_the_module_with_its_arguments(tmp_path):
    proc = run_as_card(tmp_path, 4, 2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "allocated 2" in proc.stdout and "a 4 GiB card: the allocator capped at" in proc.stderr


def test_past_the_card_is_out_of_memory(tmp_path):
    # the H200 has 140 GiB: without the cap 5 GiB would fit many times over
    proc = run_as_card(tmp_path, 4, 5)
    assert proc.returncode != 0 and "OutOfMemoryError" in proc.stderr
