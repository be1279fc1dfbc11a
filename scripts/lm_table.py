"""Gather the Llama runs into seed tables: GSM8K test accuracy, Alpaca / HH-RLHF held-out loss and perplexity.

    python -m scripts.lm_table runs/gsm8k                    # test_gsm8k results (accuracy) and training results
    python -m scripts.lm_table runs/nlg --baseline loftq --output runs/nlg/table.md

Reads every results.json below the paths: scripts.test_gsm8k's (GSM8K accuracy x 100) or a training run's of
scripts.train_gsm8k / train_nlg (held-out loss and perplexity). One table per task and metric, one row per cell
(every setting but the seed; for a test, the trained run's plus the test's): n seeds, median, mean ± sd, and the
paired difference against a --baseline run (default loftq) of the same settings on shared seeds with its 95 %
bootstrap interval (llmm.stats; for loss and perplexity a negative difference favours the method).
"""
from __future__ import annotations

from llmm.run.cli import complete_runs, run_main, table_main
from llmm.run.lm_report import markdown, read_records


def main(argv: list[str] | None = None) -> str:
    return table_main(__doc__, argv, "loftq", lambda args: markdown(
        complete_runs(read_records(args.paths), [], args.given_baseline), args.baseline))


if __name__ == "__main__":
    run_main(main)
