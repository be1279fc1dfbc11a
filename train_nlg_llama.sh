#!/usr/bin/env bash
# Llmm (MeMoTune) on Alpaca and HH-RLHF: the paper's Llama-7B / Llama-2-7B / Llama-2-13B 4-bit runs (SPEC §3),
# held-out loss and perplexity (HH-RLHF: the official test split; Alpaca: 1024 records held out of train).
#   Models:   LoftQ 4-bit directories from _init.sh (bash _init.sh llama-7b-alpaca / llama-2-7b-alpaca /
#             llama-2-13b-alpaca), the rows' init_dir; METHODS=qlora loads the rows' base_model instead.
#   Hardware: one GPU per run; 1x A100 80GB as in the reference (a 13B NF4 backbone + rank-16 adapters at
#             batch 2 x 512 tokens also fits a 40 GB card; 7B fits 24 GB). CPU works only for smoke runs.
#   Numbers:  every hyperparameter is in configs/nlg.yaml (lr 1e-4 = the reference's effective rate, 30000 steps);
#             this script only loops over its keys, methods and seeds.
#   Output:   $OUT/<task>-<model>-r<rank>-<method>-seed<seed>/ (adapter/, mean_adapter/, results.json, curves.png),
#             then $OUT/table.md (python -m scripts.lm_table: median, mean ± sd, paired differences vs loftq).
#
# Override with environment variables; extra arguments go to every run:
#   TASKS=alpaca MODELS=llama-2-7b bash train_nlg_llama.sh
#   TASKS=alpaca MODELS=quantized/my-llama-4bit-16rank bash train_nlg_llama.sh --data my_alpaca.jsonl --eval_size 100
#             # a directory: your own _init.sh directory or checkpoint (--model_name_or_path, the table's defaults;
#             # runs named after the directory; the data is yours, as a row's dataset goes with its model)
#   METHODS="llmm loftq qlora" SEEDS="0 1" bash train_nlg_llama.sh   # baselines; SEEDS default "0 1 2 3", table: the row's
#   LAUNCH="accelerate launch" bash train_nlg_llama.sh --llmmscale 700    # the reference's later scale
#   ACCELERATE_CONFIG=configs/accelerate/fsdp2.yaml bash train_nlg_llama.sh   # sharded over the GPUs
# A complete run with the same settings is skipped (other settings: an error naming the first that differs); an
# interrupted one resumes from its newest checkpoint.
set -euo pipefail
# Paths you give (and the defaults below) are relative to where you stand; the code comes from this checkout.
export PYTHONPATH="$(cd "$(dirname "$0")" && pwd)${PYTHONPATH:+:$PYTHONPATH}"

TASKS=${TASKS:-"alpaca hh-rlhf"}
MODELS=${MODELS:-"llama-7b llama-2-7b llama-2-13b"}
RANK=${RANK:-16}
METHODS=${METHODS:-llmm}
OUT=${OUT:-runs/nlg}
source "$(dirname "$0")/scripts/launch.sh"  # ACCELERATE_CONFIG (configs/accelerate/fsdp2.yaml: README "Larger models") or LAUNCH
refuse_loop_flags train_nlg_llama.sh "OUT=, TASKS=, MODELS= (a row or a directory), RANK=, METHODS= or SEEDS=" \
  --output_dir --task --model --model_name_or_path --rank --method --seed -- "$@"
SEEDS=${SEEDS:-"0 1 2 3"}
check_seeds "$SEEDS" table
check_models "$MODELS"

for task in $TASKS; do
  for model in $MODELS; do
    choose_model "$model"  # a row of configs/nlg.yaml, or a directory of your own
    for method in $METHODS; do
      for seed in $SEEDS; do
        seed_args=(); name="$task-$model_label-r$RANK-$method"
        if [[ $seed != table ]]; then seed_args=(--seed "$seed"); name="$name-seed$seed"; fi
        start=(--overwrite)  # a run with checkpoints continues from its newest one
        if compgen -G "$OUT/$name/checkpoints/checkpoint-*" > /dev/null; then start=(--resume_from_checkpoint); fi
        $LAUNCH -m scripts.train_nlg --task "$task" "${model_args[@]}" --rank "$RANK" --method "$method" \
          "${seed_args[@]}" --output_dir "$OUT/$name" --skip_if_complete "${start[@]}" "$@"
      done
    done
  done
done
python -m scripts.lm_table "$OUT" --output "$OUT/table.md"
