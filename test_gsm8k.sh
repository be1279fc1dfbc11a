#!/usr/bin/env bash
# GSM8K test accuracy of the adapters train_gsm8k.sh wrote (SPEC §3): generate up to 256 new tokens, take the number
# after "The final answer is" (else the last number), exact match with the gold number after "####".
#   Models:   each run's adapter/ names its backbone (the _init.sh directory, or the base model for qlora).
#   Hardware: one GPU per run; 1x A100 80GB as in the reference (7B NF4 generation at batch 16 fits 24 GB).
#             LAUNCH="accelerate launch --num_processes N" splits the questions over N GPUs.
#   Numbers:  decoding settings are in configs/gsm8k_test.yaml (greedy; reference = T 0.1, top-k 40, top-p 0.95,
#             seed 42); this script only loops over runs, decodings and modes.
#   Output:   <run>/test-<decoding>-<mode>/ (predictions.jsonl, results.json with the accuracy).
#
# Override with environment variables; extra arguments go to every evaluation:
#   DECODINGS="greedy reference" MODES="mean sample mc" bash test_gsm8k.sh
#   RUNS="runs/gsm8k/llama-2-7b-r64-llmm" bash test_gsm8k.sh --max_samples 50      # smoke test
#   MODES="mean mc" MC_SAMPLES=16 SEED=1 bash test_gsm8k.sh   # --mc_samples for mc, --seed where something is drawn
# An evaluation done already with the same settings is skipped (other settings: an error naming the first that differs);
# the noisy modes (sample, mc) skip the K = 0 baselines, which a table pairs by their mean mode.
set -euo pipefail
# Paths you give (and the defaults below) are relative to where you stand; the code comes from this checkout.
export PYTHONPATH="$(cd "$(dirname "$0")" && pwd)${PYTHONPATH:+:$PYTHONPATH}"

RUNS=${RUNS:-$(ls -d runs/gsm8k/*/ 2>/dev/null || true)}
DECODINGS=${DECODINGS:-greedy}
MODES=${MODES:-mean}
source "$(dirname "$0")/scripts/launch.sh"  # LAUNCH (or ACCELERATE_CONFIG)
refuse_loop_flags test_gsm8k.sh "RUNS=, DECODINGS=, MODES=, MC_SAMPLES= or SEED=" \
  --adapter --decoding --mode --output_dir --mc_samples --seed -- "$@"

if [[ -z $RUNS ]]; then echo "error: no runs under runs/gsm8k/: run train_gsm8k.sh first, or set RUNS" >&2; exit 2; fi
adapter_k() {  # the K an adapter was trained with (its adapter_config.json's k); unreadable: test_gsm8k says why
  python -c 'import json, sys
try: print(json.load(open(sys.argv[1])).get("k", 0))
except (OSError, ValueError, AttributeError): print("unknown")' "$1/adapter_config.json"
}

for run in $RUNS; do
  k=$(adapter_k "${run%/}/adapter")
  for decoding in $DECODINGS; do
    for mode in $MODES; do
      if [[ $mode != mean && $k == 0 ]]; then  # a K = 0 baseline (loftq, qlora) has no noise to draw
        echo "skip: ${run%/} has K = 0 (no Llmm noise): --mode $mode does not apply (its row: --mode mean)"
        continue
      fi
      out="${run%/}/test-$decoding-$mode"
      own=()  # flags that act in some evaluations only (elsewhere they are refused)
      if [[ $mode == mc && -n ${MC_SAMPLES:-} ]]; then own+=(--mc_samples "$MC_SAMPLES"); fi
      if [[ -n ${SEED:-} && ( $mode != mean || $decoding != greedy ) ]]; then own+=(--seed "$SEED"); fi
      $LAUNCH -m scripts.test_gsm8k --adapter "${run%/}/adapter" --decoding "$decoding" --mode "$mode" \
        --output_dir "$out" --skip_if_complete --overwrite ${own[@]+"${own[@]}"} "$@"
    done
  done
done
python -m scripts.lm_table $RUNS   # seed table: accuracy per cell, paired differences vs loftq
