"""Re-score a saved GLUE run (scripts.train_glue's output directory) on its dev splits or on labelled files.

    python -m scripts.eval_glue runs/glue/llmm-nf2-r32/cola/seed0                        # dev splits, mean network
    python -m scripts.eval_glue RUN --mode mc --mc_samples 10 --seed 1                    # Monte-Carlo average
    python -m scripts.eval_glue RUN --mode sample --file data/test.tsv --output test.json # one noise draw per batch

The run's adapter/ (M and Z) is loaded with llmm.load_llmm_model onto the backbone its adapter_config.json names
(the run's own backbone/ after in-process quantization, so the network is exactly the one trained), with the run's
tokenizer, max_length and eval batch size. ``--mode``: mean (eps = 0, deterministic: reproduces the run's
predictions.json), sample (a fresh draw per batch, the reference's evaluation) or mc (the average of --mc_samples
sampled networks; calibration metrics of the averaged distribution). Files (--file, one or more) are local
.tsv/.csv/.json/.jsonl with labels, read as scripts.train_glue reads them; without --file the run's dev splits.
Writes JSON (default RUN/eval/<mode>.json): per split the metrics (NLL/Brier/ECE for classification), outputs
(logits; mc: log of the averaged probabilities; STS-B: scores) and labels.
"""

from llmm.run.cli import run_main
from llmm.run.glue_eval import main

if __name__ == "__main__":
    run_main(main)
