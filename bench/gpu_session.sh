#!/usr/bin/env bash
# One device call: the named stages in order, each under its own time limit. Everything goes to one log,
# $OUT/session.log (the device tool brings back at most 8 files), and each stage's JSON to $OUT/NAME.json.
# Usage: bench/gpu_session.sh STAGE:SECONDS [STAGE:SECONDS ...]; stages are defined below.
set -u
export PYTHONPATH=.:bench:/root/site PYTHONUNBUFFERED=1
log=$OUT/session.log

run_stage() {
  case $1 in
    env) nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,power.limit --format=csv
         python3 -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)' ;;
    check) python3 bench/gpu_check.py "$OUT/check.json" ;;
    micro) python3 bench/gpu_micro.py "$OUT/micro.json" ;;
    micro-quick) python3 bench/gpu_micro.py "$OUT/micro.json" quick ;;
    micro-capture) python3 bench/gpu_micro.py "$OUT/micro-capture.json" capture ;;
    profile) python3 bench/gpu_profile.py "$OUT/profile.json" ;;
    # A step's time and bytes by kernel, PDL off and op by op so that durations add up (8k, SFI and dense).
    kernel-table) python3 bench/kernel_table.py "$OUT/kernel-table.json" ;;
    prefill-profile) python3 bench/gpu_prefill_profile.py "$OUT/prefill-profile.json" ;;
    ab-stages) python3 bench/ab_stages.py "$OUT/ab-stages.json" ;;
    pdl-probe) python3 bench/pdl_probe.py "$OUT/pdl-probe.json" ;;
    gemm-sweep) python3 bench/gemm_sweep.py "$OUT/gemm-sweep.json" ;;
    tests-ranged) python3 -m pytest -q -x -p no:cacheprovider tests/test_ranged_kernel.py ;;
    # The kernels that take programmatic dependent launch, on the GPU (PDL on, the default there).
    tests-pdl) python3 -m pytest -q -x -p no:cacheprovider tests/test_pdl.py tests/test_skinny_gemm.py \
                 tests/test_fused_kernels.py tests/test_ranged_kernel.py ;;
    # `sfi bench` with module switches set ($AB_FLAGS, see bench/ab_flags.py) at $AB_CTX x $AB_BATCH, SFI and dense
    # only, JSON to $OUT/ab-$AB_NAME.json; e.g. AB_FLAGS=sfi.model.FOLD_SPLIT_SUMS=false AB_NAME=nofold.
    ab) python3 bench/ab_flags.py ${AB_FLAGS:-} -- bench --ctx "${AB_CTX:-8k,32k}" --batch "${AB_BATCH:-1,4}" \
          --new-tokens 256 --no-hf --no-torch --json "$OUT/ab-${AB_NAME:-default}.json" ;;
    # The same with the ranged attention kernel's defaults changed ($AB_KERNEL, see bench/ab_kernel.py).
    ab-kernel) python3 bench/ab_kernel.py ${AB_KERNEL:-} -- bench --ctx "${AB_CTX:-8k,32k}" --batch "${AB_BATCH:-1,4}" \
                 --new-tokens 256 --no-hf --no-torch --json "$OUT/ab-${AB_NAME:-kernel}.json" ;;
    # `sfi bench` with one kind of the decode step's kernels left out ($ABLATE, see bench/ablate.py), at $AB_CTX x
    # $AB_BATCH (8k x 1,4 by default), JSON to $OUT/ablate-$ABLATE.json: what fusing that kind away could save at most.
    ablate) python3 bench/ablate.py "$ABLATE" -- bench --ctx "${AB_CTX:-8k}" --batch "${AB_BATCH:-1,4}" \
              --new-tokens 256 --no-hf --no-torch --json "$OUT/ablate-$ABLATE.json" ;;
    # A step holding a slow row against a fast-only step, part by part (8k x 16 and 32k x 4).
    slow-parts) python3 bench/slow_parts.py "$OUT/slow-parts.json" ;;
    sweep-long) python3 bench/gpu_kernel_sweep.py "$OUT/sweep-long.json" long ;;
    bench-8k) python3 -m sfi_cli.main bench --ctx 8k --batch 1,16 --new-tokens 256 --json "$OUT/bench-8k.json" ;;
    prefill-check) python3 bench/gpu_prefill_check.py "$OUT/prefill-check.json" ;;
    profile-slow) python3 bench/gpu_profile.py "$OUT/profile-slow.json" slow ;;
    refresh-profile) python3 bench/gpu_refresh_profile.py "$OUT/refresh-profile.json" ;;
    tests) python3 -m pytest -q -x -p no:cacheprovider tests/test_ranged_kernel.py tests/test_fused_kernels.py \
             tests/test_compact_kernel.py tests/test_selector_kernel.py tests/test_skinny_gemm.py tests/test_topk_positions.py \
             tests/test_static.py tests/test_loader.py::test_staged_copies_to_a_gpu_load_the_same_weights ;;
    load-profile) python3 bench/gpu_load_profile.py "$OUT/load-profile.json" /root/q4b ;;
    # The GPU-only tests alone (native bf16 tiles, pinned weight copies): seconds instead of the whole kernel stage.
    tests-gpu-only) python3 -m pytest -q -x -p no:cacheprovider tests/test_ranged_kernel.py -k "awkward and True" &&
                    python3 -m pytest -q -x -p no:cacheprovider tests/test_model.py -k "split or prefill_attention" \
                      tests/test_fused_kernels.py &&
                    python3 -m pytest -q -x -p no:cacheprovider \
                      tests/test_loader.py::test_staged_copies_to_a_gpu_load_the_same_weights ;;
    capture-smoke) PYTHONPATH=.:tests python3 bench/gpu_capture_smoke.py /root/smoke ;;
    capture-q4b) PYTHONPATH=.:tests python3 bench/gpu_capture_smoke.py /root/smoke-q4b /root/q4b ;;
    bench-short) python3 -m sfi_cli.main bench --ctx 8k,32k --batch 1,4 --new-tokens 256 --json "$OUT/bench-short.json" ;;
    bench-mid) python3 -m sfi_cli.main bench --ctx 8k,32k --batch 1,4 --new-tokens 256 --no-hf --json "$OUT/bench-mid.json" ;;
    # The same without programmatic dependent launch (sfi_kernels/pdl.py), for the A/B in one call.
    bench-mid-nopdl) SFI_PDL=0 python3 -m sfi_cli.main bench --ctx 8k,32k --batch 1,4 --new-tokens 256 --no-hf --no-torch \
                       --json "$OUT/bench-mid-nopdl.json" ;;
    # The same points with the ranged kernel's float32-upcast tiles, for an A/B against native tiles.
    bench-upcast) python3 bench/ab_kernel.py native_tiles=false -- bench --ctx 8k,32k --batch 1,4 --new-tokens 256 --no-hf --no-torch \
                    --json "$OUT/bench-upcast.json" ;;
    # Where slow rows cost the most: 32k and 128k at batch 4, SFI and dense only.
    bench-slow) python3 -m sfi_cli.main bench --ctx 32k,128k --batch 4 --new-tokens 256 --no-hf --no-torch \
                  --json "$OUT/bench-slow.json" ;;
    bench-b16) python3 -m sfi_cli.main bench --ctx 8k --batch 16 --new-tokens 256 --json "$OUT/bench-b16.json" ;;
    bench-long) python3 -m sfi_cli.main bench --ctx 128k --batch 1,4 --new-tokens 256 --no-hf --json "$OUT/bench-long.json" ;;
    # The SmolLM2 GGUF (98 MB) reaches the machine in two calls: `smol-part1` with .carry/a (the first half and
    # the gguf wheel with what it imports), then `smol-join` with .carry/b (the second half) while it is warm.
    smol-part1) cp -r .carry/a/smol.part1 .carry/a/smol.sha256 .carry/a/meta /root/ &&
                python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /root/site \
                  .carry/a/*.whl && ls -la /root ;;
    # The config and tokenizer come converted (.carry/a/meta); only the weights are converted there.
    smol-join) cat /root/smol.part1 .carry/b/smol.part2 > /root/SmolLM2-135M-Instruct.gguf &&
               (cd /root && sed 's#  .*#  SmolLM2-135M-Instruct.gguf#' smol.sha256 | sha256sum -c -) &&
               mkdir -p /root/SmolLM2-135M-Instruct && cp /root/meta/* /root/SmolLM2-135M-Instruct/ &&
               python3 -c 'from sfi.gguf import convert_weights
convert_weights("/root/SmolLM2-135M-Instruct.gguf", "/root/SmolLM2-135M-Instruct/model.safetensors")' &&
               ls -la /root/SmolLM2-135M-Instruct ;;
    # sfi eval on the GPU (bf16): recipes from $EVAL_RECIPES (a file, bench/eval-recipes.txt by default), tasks
    # and lengths from $EVAL_TASKS and $EVAL_LENGTHS, 50 trials decoded as one batch.
    eval) mapfile -t recipes < <(grep -v '^#' "${EVAL_RECIPES:-bench/eval-recipes.txt}" | grep .)
          python3 -m sfi_cli.main eval -m "${EVAL_MODEL:-/root/SmolLM2-135M-Instruct}" \
            $(printf -- '-r %s ' "${recipes[@]}") \
            --tasks "${EVAL_TASKS:-passkey,multikey,vartrack,preamble,nll,fidelity}" \
            --lengths "${EVAL_LENGTHS:-2k,4k,7k}" --trials "${EVAL_TRIALS:-50}" --batch "${EVAL_BATCH:-50}" \
            --json "$OUT/eval-${EVAL_NAME:-gpu}.json" ;;
    # The Qwen3-4B architecture with random bf16 weights as a checkpoint folder, with the real Qwen3 tokenizer
    # carried in .carry/q (a copy of ~/.cache/sfi/tokenizers/qwen3-3.7.2: the machine has no network).
    qwen3-ckpt) mkdir -p /root/.cache/sfi/tokenizers && cp -r .carry/q/qwen3-3.7.2 /root/.cache/sfi/tokenizers/ &&
                python3 -m sfi_cli.main bench --write-checkpoint /root/q4b 2>&1 | grep -v Writing ;;
    # `sfi run` end to end on that checkpoint: shared prefixes, the built-in mix (SFI and dense, continuous and
    # static batches), determinism; $WORKLOAD_SKIP names sections to leave out
    # (bootstrap,prefix,profile,mix,order,workers,determinism,oom).
    workload) python3 bench/gpu_workload.py "$OUT/workload.json" /root/q4b ${WORKLOAD_SKIP:+--skip "$WORKLOAD_SKIP"} ;;
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
