#!/usr/bin/env bash
# Compile badam_kernels._C for sm_90 against a CUDA build of torch, without needing a GPU, in a copy of
# the work tree (nothing is written into it). Fails on any compiler warning. Then loads the library,
# prints the op schemas and traces them with fake tensors, and (unless --no-jit) compiles the same
# sources through the JIT path of badam_kernels/_build.py.
#
#   csrc/compile_check.sh [--no-jit] [PYTHON]
#
# PYTHON (the argument, else $PYTHON, else python3 on PATH) must have a CUDA build of torch, e.g. a venv
# made with (5.5 GB):
#   python3 -m venv VENV && VENV/bin/pip install torch==2.14.1 numpy setuptools wheel ninja
set -euo pipefail

jit=1
if [[ "${1:-}" == "--no-jit" ]]; then jit=0; shift; fi
python="${1:-${PYTHON:-python3}}"
if ! "$python" -c 'import sys, torch; sys.exit(torch.version.cuda is None)' 2>/dev/null; then
  echo "$python has no CUDA build of torch: pass the python of one (see the top of $0)" >&2
  exit 2
fi
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"

work="$(mktemp -d -t badam-compile-XXXXXX)"
trap 'rm -rf "$work"' EXIT
# tracked and untracked-but-not-ignored files, as they are now
(cd "$repo" && git ls-files -co --exclude-standard -z | xargs -0 -I{} sh -c 'test -e "{}" && printf "%s\0" "{}"' \
  | tar --null -T - -cf -) | tar -xf - -C "$work"
cd "$work"

echo "== setup.py build_ext ($("$python" -c 'import torch; print(torch.__version__)'), $("$CUDA_HOME/bin/nvcc" --version | tail -1), arch $TORCH_CUDA_ARCH_LIST)"
start=$SECONDS
BADAM_KERNELS_BUILD_CUDA=1 BADAM_KERNELS_BUILD_VERBOSE=1 "$python" setup.py build_ext --inplace >build.log 2>&1 \
  || { tail -50 build.log; echo "FAILED: setup.py build_ext"; exit 1; }
echo "compiled in $((SECONDS - start)) s: $(ls badam_kernels/_C*.so)"
if grep -inE "warning[: #]" build.log; then echo "FAILED: the build printed warnings (above)"; exit 1; fi
echo "no warnings"

echo "== ptxas: registers and spills per kernel (sm_90)"
"$python" - build.log <<'EOF'
import re, subprocess, sys
name, rows = None, []
for line in open(sys.argv[1]):
    m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
    if m:
        name = m.group(1)
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and name:
        spill = int(m.group(1)) + int(m.group(2))
    m = re.search(r"Used (\d+) registers", line)
    if m and name:
        pretty = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip()
        pretty = re.sub(r"badam::\(anonymous namespace\)::|\(.*\)$", "", pretty)
        for a, b in (("__nv_bfloat16", "bf16"), ("__half", "fp16"), ("float", "fp32")):
            pretty = pretty.replace(a, b)
        rows.append((int(m.group(1)), spill, pretty.replace("void ", "")))
        name = None
shown = ("prologue", "sumsq", "update_kernel<bf16, bf16, fp32, fp32, true>", "update_kernel<bf16, bf16, fp32, fp32, false>",
         "update_kernel<fp32, fp32, fp32, fp32, false>", "init_state_kernel<bf16, fp32, fp32, true>")
for regs, spill, pretty in sorted(rows, key=lambda r: r[2]):
    if any(s in pretty for s in shown):
        print(f"  {regs:3d} regs  {spill:4d} B spilled  {pretty}")
for kind in ("adamw_update_kernel", "init_state_kernel", "masked_adamw_kernel"):
    regs = [r[0] for r in rows if kind in r[2]]
    print(f"  {kind}: {len(regs)} instantiations, {min(regs)}-{max(regs)} regs")
print(f"  {len(rows)} kernels; spilled bytes in all of them: {sum(r[1] for r in rows)}")
EOF

echo "== load, schemas, Meta/fake tracing"
"$python" - <<'EOF'
import torch
import badam_kernels._C  # noqa: F401  (registers torch.ops.badam_kernels)
from torch.fx.experimental.proxy_tensor import make_fx

ops = torch.ops.badam_kernels
print(" ", ops.adamw_step.default._schema)
print(" ", ops.init_state.default._schema)
print(" ", ops.masked_adamw_step.default._schema)
meta = lambda n, dtype=torch.float32: torch.empty(n, dtype=dtype, device="meta")  # noqa: E731

def step(p, g, w, m, v, s, lr):
    norm = ops.adamw_step(p, g, w, m, v, s, lr, 0.9, 0.999, 1e-8, 0.1, 500, None, None, 1.0, True, 0)
    ops.init_state(p, w, m, v)
    return norm

args = (meta(1000, torch.bfloat16), meta(1000, torch.bfloat16), meta(1000), meta(1000), meta(1000), meta(1), meta(1))
graph = make_fx(step, tracing_mode="fake", pre_dispatch=False)(*args)
assert "badam_kernels.adamw_step" in graph.code and "badam_kernels.init_state" in graph.code
assert step(*args).shape == () and ops.adamw_step(*args, 0.9, 0.999, 1e-8, 0.0, 0, None, None, 0.0, False, 0).shape == (0,)
def masked(p, g, index, w, m, v, base, steps):
    ops.masked_adamw_step(p, g, index, w, m, v, base, steps, 1e-3, 0.9, 0.999, 1e-8, 0.0, 0, 2)

tiles = 2
margs = (meta(5000, torch.bfloat16), meta(5000, torch.bfloat16), meta(tiles * 1024, torch.int32), meta(tiles * 1024),
         meta(tiles * 1024), meta(tiles * 1024), meta(tiles, torch.int64), meta(tiles))
graph = make_fx(masked, tracing_mode="fake", pre_dispatch=False)(*margs)
assert "badam_kernels.masked_adamw_step" in graph.code
print("  Meta kernels and fake tracing: ok")
EOF

if [[ $jit == 1 ]]; then
  echo "== JIT build (badam_kernels/_build.py: jit_compile)"
  start=$SECONDS
  "$python" - "$work/jit" <<'EOF' >jit.log 2>&1 || { tail -50 jit.log; echo "FAILED: JIT build"; exit 1; }
import os, sys
import torch
from badam_kernels import _build
assert _build.use_cuda_home() is None
os.makedirs(sys.argv[1])
_build.jit_compile(verbose=True, build_directory=sys.argv[1])
torch.ops.badam_kernels.adamw_step
EOF
  if grep -inE "warning[: #]" jit.log; then echo "FAILED: the JIT build printed warnings (above)"; exit 1; fi
  echo "JIT build compiled and loaded in $((SECONDS - start)) s, no warnings"
fi
echo "OK"
