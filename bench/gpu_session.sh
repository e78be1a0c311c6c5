#!/usr/bin/env bash
# One device call: the named stages in order, each under its own time limit. Everything goes to one log,
# $OUT/session.log (the device tool brings back at most 8 files), and each stage's JSON to $OUT/NAME.json.
# Usage: bench/gpu_session.sh STAGE:SECONDS [STAGE:SECONDS ...]; stages are defined below.
set -u
export PYTHONPATH=.:bench PYTHONUNBUFFERED=1
log=$OUT/session.log

run_stage() {
  case $1 in
    env) nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,power.limit --format=csv
         python3 -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)' ;;
    check) python3 bench/gpu_check.py "$OUT/check.json" ;;
    micro) python3 bench/gpu_micro.py "$OUT/micro.json" ;;
    micro-quick) python3 bench/gpu_micro.py "$OUT/micro.json" quick ;;
    profile) python3 bench/gpu_profile.py "$OUT/profile.json" ;;
    refresh-profile) python3 bench/gpu_refresh_profile.py "$OUT/refresh-profile.json" ;;
    tests) python3 -m pytest -q -x -p no:cacheprovider tests/test_ranged_kernel.py tests/test_fused_kernels.py \
             tests/test_compact_kernel.py tests/test_selector_kernel.py tests/test_skinny_gemm.py tests/test_topk_positions.py \
             tests/test_static.py ;;
    bench-short) python3 -m sfi_cli.main bench --ctx 8k,32k --batch 1,4 --new-tokens 256 --json "$OUT/bench-short.json" ;;
    bench-b16) python3 -m sfi_cli.main bench --ctx 8k --batch 16 --new-tokens 256 --json "$OUT/bench-b16.json" ;;
    bench-long) python3 -m sfi_cli.main bench --ctx 128k --batch 1,4 --new-tokens 256 --no-hf --json "$OUT/bench-long.json" ;;
    *) echo "unknown stage $1"; return 2 ;;
  esac
}

export -f run_stage
for spec in "$@"; do
  name=${spec%%:*}
  limit=${spec##*:}
  start=$(date +%s)
  echo "== $name (limit ${limit}s)" | tee -a "$log"
  timeout -k 5 "$limit" bash -c "run_stage $name" 2>&1 | tee -a "$log"
  echo "== $name rc=${PIPESTATUS[0]} in $(( $(date +%s) - start ))s" | tee -a "$log"
done
