#!/usr/bin/env bash
# One call on the GPU machine: install the carried wheels, build the CUDA extension, run the GPU
# tests and the benchmarks named in $BENCH, and pack the results into $OUT.
#   run(command="bash benchmarks/device_run.sh", carry=[".whl"])
# .whl: ../shared/tools/device-wheels badam==1.4 galore-torch==1.0 lomo-optim==0.1.1 apollo-torch==1.0.3 fira==1.0.2 \
#         gguf==0.19.0 tensorly liger-kernel==0.8.5 nvidia-ml-py==13.615.71   (the image has none of them)
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
echo "compilers: $(which -a g++ | tr '\n' ' ') CXX=${CXX:-unset}"
t0=$(date +%s)
# the image sets CXX to a g++ whose libstdc++ differs from the one torch loads: error messages built
# with iostreams then crash inside the extension; the system g++ matches torch
BUILD_CXX=${BUILD_CXX:-/usr/bin/g++}
[ -x "$BUILD_CXX" ] && export CXX=$BUILD_CXX
MAX_JOBS=16 python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; }
echo "build: $(( $(date +%s) - t0 )) s with $(${CXX:-g++} --version | head -1)"
ldd badam_kernels/_C*.so 2>/dev/null | grep -i "stdc++\|gcc_s" 
python3 -c "import badam_kernels.ops as o; print(o.backend_report())"
BENCH=${BENCH-"tests step e2e_quick"}  # unset: the default list; set and empty: only the build
for b in $BENCH; do
  t0=$(date +%s)
  case $b in
    # -rs: the skip reasons in the log, grouped (the triton-cpu cases need TRITON_INTERPRET=1: CI runs them)
    tests) python3 -m pytest -m gpu -q -rs -p no:cacheprovider ${TESTS:-tests/} ${PYTEST_ARGS:-} > "$OUT/gpu_tests.log" 2>&1; tail -15 "$OUT/gpu_tests.log" ;;
    cputests) python3 -m pytest -q -p no:cacheprovider -m "not gpu" ${CPU_TESTS:-tests/test_truncate.py} 2>&1 | tail -3 ;;
    gdb) cuda-gdb -batch -ex run -ex bt --args python3 -m pytest -q -m gpu -p no:cacheprovider $GDB_TEST > "$OUT/gdb.log" 2>&1; grep -v "^\[New Thread\|^\[Thread\|^\[Detaching" "$OUT/gdb.log" | grep -m 30 -A 30 "signal\|^#0" ;;
    capacity) python3 benchmarks/bench_e2e.py --shape 8b --capacity ${CAP_ARGS:-} 2>&1 | grep -v "^Parameters with" | tail -30 ;;
    step) python3 benchmarks/bench_step.py ${STEP_ARGS:-} 2>&1 | tail -40 ;;
    e2e_quick) python3 benchmarks/bench_e2e.py --quick 2>&1 | grep -v "^Parameters with" | tail -30 ;;
    e2e_1b) python3 benchmarks/bench_e2e.py --shape 1b ${E2E_ARGS:-} 2>&1 | grep -v "^Parameters with" | tail -40 ;;
    e2e_8b) python3 benchmarks/bench_e2e.py --shape 8b ${E2E_ARGS:-} 2>&1 | grep -v "^Parameters with" | tail -40 ;;
    scale) python3 -m torch.distributed.run --standalone --nproc-per-node ${SCALE_GPUS:-$(nvidia-smi -L | wc -l)} \
             benchmarks/bench_scale.py ${SCALE_ARGS:-} 2>&1 | grep -v "^Parameters with" | tail -30 ;;
    switch) python3 benchmarks/bench_switch.py 2>&1 | tail -30 ;;
    profile) python3 benchmarks/profile_step.py ${PROFILE_ARGS:-} 2>&1 | grep -v "^Parameters with\|USDT" | tail -40 ;;
    finetune_1b) python3 benchmarks/bench_finetune.py --shape 1b ${FINETUNE_ARGS:-} 2>&1 | tail -30 ;;
    finetune_8b) python3 benchmarks/bench_finetune.py --shape 8b ${FINETUNE_ARGS:-} 2>&1 | tail -30 ;;
    ratio) python3 benchmarks/bench_ratio.py ${RATIO_ARGS:-} 2>&1 | tail -30 ;;
    # LLaMA-Factory 0.9.5 with its pins (transformers 5.6, peft 0.18.1, trl 0.24, ...), carried as wheels in
    # .whl-lf (the command in bench_llamafactory.py's docstring), first on the path for this benchmark only
    llamafactory)
      [ -d .whl-lf ] || { echo "llamafactory: carry .whl-lf (bench_llamafactory.py's docstring)"; continue; }
      # without /tmp/site: LLaMA-Factory imports galore_torch when it is installed, and galore_torch needs
      # bitsandbytes, which the image lacks; liger-kernel comes from .whl for `enable_liger_kernel`
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-lf \
        .whl-lf/*.whl .whl/liger_kernel-*.whl
      PYTHONPATH=/tmp/site-lf:$PWD python3 benchmarks/bench_llamafactory.py --shape ${LF_SHAPE:-1b} ${LF_ARGS:-} 2>&1 \
        | grep -v "^Parameters with" | tail -30 ;;
    *) echo "unknown benchmark $b" ;;
  esac
  echo "== $b: $(( $(date +%s) - t0 )) s"
  tar cf "$OUT/results.tar" benchmarks/results  # after each one: a run cut short keeps what it finished
done
