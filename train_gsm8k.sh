#!/usr/bin/env bash
# Llmm (MeMoTune) on GSM8K: the paper's Llama-2-7B / Llama-2-13B 4-bit rank-64 runs (SPEC §3), 1880 steps;
# evaluate the adapters with test_gsm8k.sh.
#   Models:   LoftQ 4-bit directories from _init.sh (bash _init.sh llama-2-7b-gsm8k / llama-2-13b-gsm8k), the rows'
#             init_dir; METHODS=qlora loads the rows' base_model (meta-llama/Llama-2-*-hf) instead.
#   Hardware: one GPU per run; 1x A100 80GB as in the reference (7B NF4 + rank 64 at batch 2 x 512 tokens needs
#             roughly 20 GB, 13B roughly 30 GB). CPU works only for smoke runs.
#   Numbers:  every hyperparameter is in configs/gsm8k.yaml; this script only loops over its keys, methods, seeds.
#   Output:   $OUT/<model>-r<rank>-<method>-seed<seed>/ (adapter/, mean_adapter/, results.json, curves.png); the
#             seed table (median, mean ± sd, paired differences vs loftq): bash test_gsm8k.sh, or python -m scripts.lm_table.
#
# Override with environment variables; extra arguments go to every run:
#   MODELS=llama-2-7b METHODS="llmm loftq qlora" bash train_gsm8k.sh       # with the baselines
#   MODELS=quantized/my-llama-4bit-64rank bash train_gsm8k.sh     # a directory: your own _init.sh directory or checkpoint
#             (--model_name_or_path, the table's defaults; runs named after the directory), not a table row
#   SEEDS="0 1 2 3 4" bash train_gsm8k.sh       # default "0 1 2 3" (4 seeds, as LoftQ's medians); SEEDS=table: the row's seed
#   LAUNCH="accelerate launch" bash train_gsm8k.sh --max_steps 10            # smoke run
#   ACCELERATE_CONFIG=configs/accelerate/fsdp2.yaml MODELS=llama-2-7b SEEDS=0 bash train_gsm8k.sh   # FSDP2, 2 GPUs
# A complete run with the same settings is skipped (other settings: an error naming the first that differs); an
# interrupted one resumes from its newest checkpoint.
set -euo pipefail
# Paths you give (and the defaults below) are relative to where you stand; the code comes from this checkout.
export PYTHONPATH="$(cd "$(dirname "$0")" && pwd)${PYTHONPATH:+:$PYTHONPATH}"

MODELS=${MODELS:-"llama-2-7b llama-2-13b"}
RANK=${RANK:-64}
METHODS=${METHODS:-llmm}
OUT=${OUT:-runs/gsm8k}
source "$(dirname "$0")/scripts/launch.sh"  # ACCELERATE_CONFIG (configs/accelerate/fsdp2.yaml: README "Larger models") or LAUNCH
refuse_loop_flags train_gsm8k.sh "OUT=, MODELS= (a row or a directory), RANK=, METHODS= or SEEDS=" --output_dir --model \
  --model_name_or_path --rank --method --seed -- "$@"
SEEDS=${SEEDS:-"0 1 2 3"}
check_seeds "$SEEDS" table
check_models "$MODELS"

for model in $MODELS; do
  choose_model "$model"  # a row of configs/gsm8k.yaml, or a directory of your own
  for method in $METHODS; do
    for seed in $SEEDS; do
      seed_args=(); name="$model_label-r$RANK-$method"
      if [[ $seed != table ]]; then seed_args=(--seed "$seed"); name="$name-seed$seed"; fi
      start=(--overwrite)  # a run with checkpoints continues from its newest one
      if compgen -G "$OUT/$name/checkpoints/checkpoint-*" > /dev/null; then start=(--resume_from_checkpoint); fi
      $LAUNCH -m scripts.train_gsm8k "${model_args[@]}" --rank "$RANK" --method "$method" "${seed_args[@]}" \
        --output_dir "$OUT/$name" --skip_if_complete "${start[@]}" "$@"
    done
  done
done
