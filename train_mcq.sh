#!/usr/bin/env bash
# Uncertainty you can measure: BLoB's multiple-choice calibration protocol (configs/mcq.yaml) with Llmm and its
# baselines, then the comparison table.
#   Model:    meta-llama/Llama-2-7b-hf (the rows' model_name_or_path; MODEL=<hub id | local dir> overrides)
#   Hardware: one GPU per run (7B backbone in 8-bit, batch 4 x 300 tokens, rank 8); CPU only for smoke runs.
#   Numbers:  every hyperparameter is in configs/mcq.yaml; this script only loops over tasks, methods, backbones
#             and seeds.
#   Output:   $OUT/<task>/<method>-<backbone>/seed<seed>/ per run (train + in-distribution and OOD evaluation),
#             $OUT/<task>/ensemble-<backbone>/ (the deep ensemble of the map runs), then $OUT/table.md.
#
# Override with environment variables; extra arguments go to every training run (not --output_dir, --seed, --task
# or --method, which the loop sets: use OUT, SEEDS, TASKS, METHODS). A flag that applies to some methods only is
# refused by the others (map has no --mc_samples): give it to those methods alone, METHODS="llmm" ... --mc_samples 20.
#   TASKS="obqa boolq" METHODS="map llmm" SEEDS="1 2 3" BACKBONES="int8 nf4 nf2" bash train_mcq.sh
#   methods: the variants of configs/mcq.yaml: map mcdropout llmm | llmm_pex (per-example noise) | llmm_tfb / llmm_nll
#            (the validation-chosen width: add --validation_size N) | llmm_ent (the entropy term)
#   backbones: int8 (BLoB's bitsandbytes 8-bit) | bnb-nf4 (bitsandbytes 4-bit NF4, QLoRA's; runs on CPU too) |
#              nf4 / nf2 (LoftQ in-process, 16-bit storage) | bf16 | fp32
#   LAUNCH="accelerate launch" bash train_mcq.sh;  bash train_mcq.sh --max_steps 10   (a smoke run)
#   LAUNCH="torchrun --nproc_per_node 2" bash train_mcq.sh     # DDP (FSDP / DeepSpeed are refused: the
#                                                              # evaluations run on the main process alone)
# A complete run with the same settings is skipped (other settings: an error naming the first that differs); an
# interrupted one resumes from its newest checkpoint. The deep ensemble is evaluated again on every call (one
# evaluation of each member, no training): a member may have been trained further since.
set -euo pipefail
export PYTHONPATH="$(cd "$(dirname "$0")" && pwd)${PYTHONPATH:+:$PYTHONPATH}"  # relative paths stay the user's

TASKS=${TASKS:-"winogrande_s arc_c arc_e winogrande_m obqa boolq"}
# the calibration table of the method's options: METHODS="map mcdropout llmm llmm_pex llmm_tfb llmm_nll llmm_ent" (and --validation_size N)
METHODS=${METHODS:-"map mcdropout llmm"}
BACKBONES=${BACKBONES:-"int8"}
SEEDS=${SEEDS:-"1 2 3"}
OUT=${OUT:-runs/mcq}
source "$(dirname "$0")/scripts/launch.sh"  # LAUNCH, or ACCELERATE_CONFIG (DDP only: FSDP / DeepSpeed are refused)
check_seeds "$SEEDS"

refuse_loop_flags train_mcq.sh "OUT=, SEEDS=, TASKS=, METHODS= or BACKBONES=" --output_dir --seed --task --method \
  --variant --load_in_8bit --load_in_4bit --init --quant --bits --dtype ${MODEL:+--model_name_or_path} -- "$@"

backbone_flags() {  # the backbone's name -> the table's settings that select it
  case "$1" in
    int8) echo "--load_in_8bit true" ;;
    bnb-nf4) echo "--load_in_8bit false --load_in_4bit true --init lora" ;;
    nf4) echo "--load_in_8bit false --init loftq --quant nf --bits 4" ;;
    nf2) echo "--load_in_8bit false --init loftq --quant nf --bits 2" ;;
    bf16) echo "--load_in_8bit false --init lora --dtype bfloat16" ;;
    fp32) echo "--load_in_8bit false --init lora --dtype float32" ;;
    *) echo "error: unknown backbone '$1' (int8 | bnb-nf4 | nf4 | nf2 | bf16 | fp32)" >&2; exit 2 ;;
  esac
}

for task in $TASKS; do
  for backbone in $BACKBONES; do
    flags=$(backbone_flags "$backbone")
    for method in $METHODS; do
      for seed in $SEEDS; do
        run="$OUT/$task/$method-$backbone/seed$seed"
        start=(--overwrite)  # a run with checkpoints continues from its newest one
        if compgen -G "$run/checkpoints/checkpoint-*" > /dev/null; then start=(--resume_from_checkpoint); fi
        # shellcheck disable=SC2086
        $LAUNCH -m scripts.train_mcq --task "$task" --variant "$method" --seed "$seed" $flags \
          --output_dir "$run" --skip_if_complete "${start[@]}" ${MODEL:+--model_name_or_path "$MODEL"} "$@"
      done
    done
    members=()
    for seed in $SEEDS; do members+=("$OUT/$task/map-$backbone/seed$seed"); done
    if [[ " $METHODS " == *" map "* && ${#members[@]} -gt 1 ]]; then
      python -m scripts.test_mcq --runs "${members[@]}" --output_dir "$OUT/$task/ensemble-$backbone" --overwrite
    fi
  done
done
python -m scripts.mcq_table "$OUT" --output "$OUT/table.md"
