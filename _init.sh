#!/usr/bin/env bash
# LoftQ-quantize a model: SAVE_DIR/<name>-<bits>bit-<rank>rank/ = backbone with Q, llmm_init/, quantize_report.json.
# Presets (model, bits, rank, K, ...): configs/quantize.yaml. Any setting can be overridden by a flag.
# Hardware: streams the checkpoint tensor by tensor: host memory ~ one weight matrix plus LoftQ's buffers, whatever
# the model's size (README: LoftQ model directories). LoftQ's rank-r step is a
# truncated SVD (loftq_svd: truncated in the table; --loftq_svd exact for the reference's full SVD, ~30x slower on
# CPU): Llama-2-7B (rank 64, NF4, 5 iterations) takes ~22 min on ONE CPU thread (benchmarks/README.md); DEVICE=cuda
# runs it on the GPU.
# Threads: this script runs LoftQ on one CPU thread unless OMP_NUM_THREADS is set. On your own machine with idle
# cores, set OMP_NUM_THREADS to their number; on a shared or busy machine keep 1 (there, 2 threads were 6x to 80x
# slower than 1, LAPACK's SVD included).
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
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # one thread unless told otherwise (see Threads above)
exec python -m scripts.quantize_model "${args[@]}" "$@"
