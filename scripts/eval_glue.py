"""Re-score a saved GLUE run (scripts.train_glue's output directory) on its dev splits or on labelled files.

    python -m scripts.eval_glue runs/glue/llmm-nf2-r32/cola/seed0                        # dev splits, mean network
    python -m scripts.eval_glue RUN --mode mc --mc_samples 10 --seed 1                    # Monte-Carlo average
    python -m scripts.eval_glue RUN --mode sample --file data/test.tsv --output test.json # one noise draw per batch

The run's adapter/ is loaded onto the backbone its adapter_config.json names, with the run's tokenizer,
max_length and eval batch size. ``--mode``: mean (eps = 0: reproduces the run's predictions.json), sample (a fresh
draw per batch) or mc (the average of --mc_samples sampled networks). --file takes labelled .tsv/.csv/.json/.jsonl
files. Writes JSON (default RUN/eval/<mode>.json): per split the metrics, outputs and labels.
"""

from llmm.run.cli import run_main
from llmm.run.glue_eval import main

if __name__ == "__main__":
    run_main(main)
