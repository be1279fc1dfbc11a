#!/usr/bin/env bash
# LoftQ-quantize a model: SAVE_DIR/<name>-<bits>bit-<rank>rank/ = backbone with Q, llmm_init/, quantize_report.json.
# Presets (model, bits, rank, K, ...): configs/quantize.yaml. Any setting can be overridden by a flag.
# Hardware: runs layer by layer; a 7B model in bfloat16 needs ~16 GiB of host memory. DEVICE=cuda takes minutes
# on one GPU; CPU works too (hours for 7B: a full SVD per layer and iteration).
#   bash _init.sh llama-2-7b-gsm8k
#   SAVE_DIR=/data/quantized DEVICE=cuda bash _init.sh deberta-v3-base-2bit-32 --bits 4
#   bash _init.sh --model ./my-llama --rank 16 --bits 2       # no preset: the table's defaults plus flags
set -euo pipefail
# Paths you give (and the defaults below) are relative to where you stand; the code comes from this checkout.
export PYTHONPATH="$(cd "$(dirname "$0")" && pwd)${PYTHONPATH:+:$PYTHONPATH}"
args=()
if [[ $# -gt 0 && $1 != --* ]]; then args+=(--preset "$1"); shift; fi
if [[ -n ${SAVE_DIR:-} ]]; then args+=(--save_dir "$SAVE_DIR"); fi
if [[ -n ${DEVICE:-} ]]; then args+=(--device "$DEVICE"); fi
exec python -m scripts.quantize_model "${args[@]}" "$@"
