#!/usr/bin/env bash
# Offline quick start: all-MiniLM-L6-v2 on BBC News (both shipped in PyPI packages), 2-bit, four methods side by
# side (16-bit LoRA, QLoRA-style, LoftQ, Llmm); prints a markdown table and writes runs/quickstart/.
# Hardware: CPU, about 12 minutes on 2 idle cores (4 methods x 4 seeds). Settings: configs/quickstart.yaml and the
# bbcnews row of configs/glue.yaml. Extra flags go to python -m scripts.quickstart (--seeds 2 --methods loftq llmm
# --overwrite ...).
set -euo pipefail
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"  # output lands where you stand
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec python -m scripts.quickstart "$@"
