"""Gather the Llama runs into seed tables: GSM8K test accuracy, Alpaca / HH-RLHF held-out loss and perplexity.

    python -m scripts.lm_table runs/gsm8k                    # test_gsm8k results (accuracy) and training results
    python -m scripts.lm_table runs/nlg --baseline loftq --output runs/nlg/table.md

Reads every results.json below the paths: a scripts.test_gsm8k evaluation (GSM8K accuracy, x 100) or a training run
of scripts.train_gsm8k / scripts.train_nlg (held-out loss and perplexity after training). One table per task and
metric, one row per cell: n seeds, median, mean ± sd, and for every method with a --baseline run (default loftq) of
the same settings on shared seeds, the paired difference method - baseline with its 95 % bootstrap interval
(llmm.stats; for loss and perplexity lower is better, so a negative difference favours the method).

Runs are pooled as seeds only when the ``cell`` of their results.json (every setting but the seed; for a test,
the trained run's settings plus the test's: mode, decoding, mc_samples, ...) is equal; runs that differ in anything
else are separate rows, labelled by the settings that tell them apart. Two runs of one cell with one seed are an
error.
"""
from __future__ import annotations

from llmm.run.cli import run_main, table_main
from llmm.run.lm_report import markdown, read_records


def main(argv: list[str] | None = None) -> str:
    return table_main(__doc__, argv, "loftq", lambda args: markdown(read_records(args.paths), args.baseline))


if __name__ == "__main__":
    run_main(main)
