#!/usr/bin/env bash
# Llmm (MeMoTune) on GLUE: reproduces the paper's DeBERTaV3-base GLUE table, the seed's twelve rows of
# configs/glue.yaml (CoLA, MRPC, STS-B x normal-float/uniform x rank 16/32), 2-bit LoftQ, 60 epochs each.
#   Model:    microsoft/deberta-v3-base (or MODEL=<hub id | local dir>)
#   Hardware: one GPU per run (fake-quantized fp32 DeBERTaV3-base, batch 16 x 2, length 128); CPU for smoke runs.
#   Numbers:  every hyperparameter is in configs/glue.yaml; this script only loops over its keys and seeds.
#   Output:   $OUT/<method>-<quant>[<BITS>]-r<rank>/<task>/seed<seed>/ per run, then $OUT/table.md.
#
# Override with environment variables; extra arguments go to every run:
#   TASKS="cola mrpc stsb" QUANTS="nf uniform" RANKS="16 32" SEEDS="0 1 2 3" METHOD=llmm BITS=4 bash train_glue_llmm.sh
#   METHOD=loftq bash train_glue_llmm.sh                      # baselines: lora | qlora | loftq
#   DATA_DIR=glue_data bash train_glue_llmm.sh                 # local GLUE TSVs (glue_data/CoLA/train.tsv, ...)
#   LAUNCH="torchrun --nproc_per_node 2" bash train_glue_llmm.sh   # or LAUNCH="accelerate launch"
#   bash train_glue_llmm.sh --eval_noise mc --mc_samples 10    # Monte-Carlo dev evaluation, calibration metrics
# A run whose results.json is complete is skipped; an interrupted one resumes from its newest checkpoint.
set -euo pipefail
cd "$(dirname "$0")"

TASKS=${TASKS:-"cola mrpc stsb"}
QUANTS=${QUANTS:-"nf uniform"}
RANKS=${RANKS:-"16 32"}
SEEDS=${SEEDS:-"0 1 2 3"}
METHOD=${METHOD:-llmm}
OUT=${OUT:-runs/glue}
LAUNCH=${LAUNCH:-python}

for task in $TASKS; do
  for quant in $QUANTS; do
    for rank in $RANKS; do
      for seed in $SEEDS; do
        run="$OUT/$METHOD-$quant${BITS:-}-r$rank/$task/seed$seed"
        if grep -qs '"complete": true' "$run/results.json"; then
          echo "done already: $run"
          continue
        fi
        start=(--overwrite)  # a run with checkpoints continues from its newest one
        if compgen -G "$run/checkpoint-*" > /dev/null; then start=(--resume_from_checkpoint); fi
        $LAUNCH -m scripts.train_glue --task "$task" --quant "$quant" --rank "$rank" --seed "$seed" \
          --method "$METHOD" --output_dir "$run" "${start[@]}" \
          ${BITS:+--bits "$BITS"} ${MODEL:+--model "$MODEL"} ${DATA_DIR:+--data_dir "$DATA_DIR"} "$@"
      done
    done
  done
done
python -m scripts.glue_table "$OUT" --output "$OUT/table.md"
