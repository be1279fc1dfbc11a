"""Gather multiple-choice calibration runs into BLoB-style tables with seed statistics and paired differences.

    python -m scripts.mcq_table runs/mcq                              # every results.json below runs/mcq
    python -m scripts.mcq_table runs/mcq --baseline map --output runs/mcq/table.md

A row is one way of predicting: "llmm int8 K2 mc N=10", "map loftq-nf4 K0 mean", "mcdropout int8 K0 dropout N=10",
"ensemble int8 K0 M=3" (scripts.test_mcq over M runs). A column is the training task (its test split) or an OOD
pair "obqa->arc_c". Prints, in this order:

1. One table per metric (accuracy and ECE in percent): median over seeds, then mean ± sd and n (llmm.stats),
   e.g. "72.4 (72.1 ± 0.9, n=3)", after the published BLoB / MAP rows (configs/mcq_published.yaml).
2. Paired differences against a --baseline run (default map, in mean mode) of the same task, backbone and settings
   on shared seeds: mean with its 95 % bootstrap interval (for ECE, NLL and Brier negative favours the row). The
   deep ensemble (seed "1+2+3") is paired with its members (same questions).
3. The learned distribution's width at the end of training (median over layers of ||Z|| / sqrt(s) / ||M||).

Evaluations are pooled as seeds only when their ``cell`` (the run's settings but the seed, plus eval set, mode and
N) is equal. Incomplete runs are left out (and listed on stderr).
"""

from __future__ import annotations

from llmm.run import tables
from llmm.run.cli import complete_runs, run_main, table_main
from llmm.run.mcq_report import PUBLISHED, check_published, gather, markdown


def render(args) -> str:
    published = tables.read_yaml(args.published)
    check_published(published, args.published)
    records, widths, skipped = gather(args.paths)
    return markdown(complete_runs(records, skipped, args.given_baseline), widths, published, args.baseline)


def main(argv: list[str] | None = None) -> str:
    flags = {"--published": dict(default=str(PUBLISHED), help="reference rows (YAML)")}
    return table_main(__doc__, argv, "map", render, flags)


if __name__ == "__main__":
    run_main(main)
