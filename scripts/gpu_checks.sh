#!/usr/bin/env bash
# Every GPU check and benchmark of the TTT layers in one run (under 10 minutes on one H100/H200: the
# per-step time limits add up to 590 s):
#   bash scripts/gpu_checks.sh [OUTDIR]        # logs in OUTDIR (default: $OUT, else runs/gpu_checks)
# 01 check_cuda.py: correctness on the device (fast forms, bf16 update math native vs emulated, streaming,
#    CUDA-graph generation, an autocast step); 02 bench_ttt.py: one gating at Moshi-7B's shape, plain
#    vs TTT with fp32 / tf32 / bf16 update math; 03 bench_model.py: the whole Moshi-7B LoRA + TTT
#    training step vs LoRA only; 04 check_precision.py: the error tables at Moshi-7B's real shape;
#    05 bench_streaming.py: per-frame latency with CUDA graphs. A failing step does not stop the
#    others; the exit status is the number of failed steps. PYTHON picks the interpreter (python3).
set -u
out=${1:-${OUT:-runs/gpu_checks}}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NO_TORCH_COMPILE=1
fails=0
step() {
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" != 0 ]; then
    echo "=== $name FAILED (exit $rc)"
    fails=$((fails + 1))
  fi
}
step 01_check_cuda 90 "$py" scripts/check_cuda.py
step 02_bench_ttt 90 "$py" scripts/bench_ttt.py --device cuda --amp bf16 --d 4096 --h 11264 --T 3000 6000 \
  --C 128 512 --update fp32 tf32 bf16 --no-forms --no-chunk-w
step 03_bench_model 210 "$py" scripts/bench_model.py --device cuda --T 3000 6000
step 04_check_precision 60 "$py" scripts/check_precision.py --device cuda --d 4096 --h 11264 --T 3000 --C 512
step 05_bench_streaming 140 "$py" scripts/bench_streaming.py --device cuda --dtype bf16 --only moshi7b --steps 150
echo "=== $fails step(s) failed; logs in $out"
exit "$fails"
