#!/usr/bin/env bash
# Llmm (MeMoTune) on GLUE: reproduces the paper's DeBERTaV3-base GLUE table, the seed's twelve rows of
# configs/glue.yaml (CoLA, MRPC, STS-B x normal-float/uniform x rank 16/32), 2-bit LoftQ, 60 epochs each, 4 seeds
# (LoftQ reports the median of 4). Protocol: the paper's and LoftQ's (--quant_embedding): the encoder's linear
# layers AND its embedding tables (word and relative-position embeddings) are LoftQ-quantized, each with its own
# trainable low-rank pair; EMBEDDINGS=fp keeps the embeddings in full precision instead (a different protocol:
# its runs go to their own directories).
#   Model:    microsoft/deberta-v3-base (or MODEL=<hub id | local dir>)
#   Hardware: one GPU per run (fake-quantized fp32 DeBERTaV3-base, batch 16 x 2, length 128); CPU for smoke runs.
#   Numbers:  every hyperparameter is in configs/glue.yaml; this script only loops over its keys and seeds.
#   Output:   $OUT/<method>-<quant>[<BITS>]-r<rank>[-fpemb]/<task>/seed<seed>/ per run, then $OUT/table.md.
#   Disk:     after in-process LoftQ each run keeps its quantized backbone/ (~0.7 GB fp32 for DeBERTaV3-base) so
#             that its adapters reload exactly; MODEL=<an _init.sh directory> shares one (llmm / loftq only).
#
# Override with environment variables; extra arguments go to every run:
#   TASKS="cola mrpc stsb" QUANTS="nf uniform" RANKS="16 32" SEEDS="0 1 2 3" METHOD=llmm BITS=4 bash train_glue_llmm.sh
#   EMBEDDINGS=fp bash train_glue_llmm.sh                      # embeddings left in full precision (not the paper's)
#   METHOD=loftq bash train_glue_llmm.sh                      # baselines: lora | qlora | loftq
#   DATA_DIR=glue_data bash train_glue_llmm.sh                 # local GLUE TSVs (glue_data/CoLA/train.tsv, ...)
#   LAUNCH="torchrun --nproc_per_node 2" bash train_glue_llmm.sh   # or LAUNCH="accelerate launch"
#   ACCELERATE_CONFIG=my_ddp.yaml bash train_glue_llmm.sh   # an accelerate config (DDP: FSDP / DeepSpeed are refused)
#   bash train_glue_llmm.sh --eval_noise mc --mc_samples 10    # Monte-Carlo dev evaluation, calibration metrics
# A complete run with the same settings is skipped (other settings: an error naming the first that differs); an
# interrupted one resumes from its newest checkpoint.
set -euo pipefail
# Paths you give (and the defaults below) are relative to where you stand; the code comes from this checkout.
export PYTHONPATH="$(cd "$(dirname "$0")" && pwd)${PYTHONPATH:+:$PYTHONPATH}"

TASKS=${TASKS:-"cola mrpc stsb"}
QUANTS=${QUANTS:-"nf uniform"}
RANKS=${RANKS:-"16 32"}
SEEDS=${SEEDS:-"0 1 2 3"}
METHOD=${METHOD:-llmm}
OUT=${OUT:-runs/glue}
source "$(dirname "$0")/scripts/launch.sh"  # ACCELERATE_CONFIG (DDP only: the encoder fits one device) or LAUNCH
check_seeds "$SEEDS"
refuse_loop_flags train_glue_llmm.sh "OUT=, TASKS=, QUANTS=, RANKS=, SEEDS=, METHOD=, BITS= or EMBEDDINGS=" \
  --output_dir --task --quant --rank --seed --method --bits --quantize_embeddings --no-quantize_embeddings -- "$@"
bits=(); bits_name=""  # lora: a 16-bit backbone, BITS neither passed nor in its directory's name
if [[ -n ${BITS:-} && $METHOD != lora ]]; then bits=(--bits "$BITS"); bits_name=$BITS; fi
EMBEDDINGS=${EMBEDDINGS:-quantized}  # quantized (the paper's protocol) | fp
case $EMBEDDINGS in
  quantized) embeddings=(); suffix="" ;;
  fp) embeddings=(--no-quantize_embeddings); suffix="-fpemb" ;;
  *) echo "error: EMBEDDINGS must be quantized or fp, got '$EMBEDDINGS'" >&2; exit 2 ;;
esac

for task in $TASKS; do
  for quant in $QUANTS; do
    for rank in $RANKS; do
      for seed in $SEEDS; do
        run="$OUT/$METHOD-$quant$bits_name-r$rank$suffix/$task/seed$seed"
        start=(--overwrite)  # a run with checkpoints continues from its newest one
        if compgen -G "$run/checkpoint-*" > /dev/null; then start=(--resume_from_checkpoint); fi
        $LAUNCH -m scripts.train_glue --task "$task" --quant "$quant" --rank "$rank" --seed "$seed" \
          --method "$METHOD" --output_dir "$run" --skip_if_complete "${start[@]}" ${embeddings[@]+"${embeddings[@]}"} \
          ${bits[@]+"${bits[@]}"} ${MODEL:+--model "$MODEL"} ${DATA_DIR:+--data_dir "$DATA_DIR"} "$@"
      done
    done
  done
done
python -m scripts.glue_table "$OUT" --output "$OUT/table.md"
