"""Evaluate trained multiple-choice runs again, or as a deep ensemble: accuracy, ECE, NLL, Brier per mode.

    python -m scripts.test_mcq --runs runs/mcq/obqa-llmm-int8-s1 --eval_modes mean mc --mc_samples 20 --output_dir OUT
    python -m scripts.test_mcq --runs runs/mcq/obqa-map-int8-s{1,2,3} --output_dir runs/mcq/obqa-ensemble-int8

One run: its adapter in every --eval_modes mode (default: the run's); with --noise_width_search tfb | nll | tfb nll
first the width search on the run's validation split, then the evaluations with each rule's m (with two rules each
one's reliability plots go to OUTPUT_DIR/<variant>/, or OUTPUT_DIR/<rule>/ for a run whose variant has no row
with that rule). Several runs: the deep ensemble, the average of the members'
mean-mode distributions (they must share every setting but the seed and data_seed). The eval sets are the run's test
split and OOD sets (--ood, --test_data and --max_eval_samples override the run's). Writes OUTPUT_DIR/results.json
(per evaluation its seed, an ensemble's "1+2+3", its cell for scripts.mcq_table, and every question's
probabilities) and reliability-<set>.png.
"""

from llmm.run.cli import run_main
from llmm.run.mcq_test import main

if __name__ == "__main__":
    run_main(main)
