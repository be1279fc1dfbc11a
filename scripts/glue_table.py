"""Gather GLUE runs into the paper's layout, with seed statistics and paired differences against LoftQ.

    python -m scripts.glue_table runs/glue                       # every results.json below runs/glue
    python -m scripts.glue_table runs/glue runs/baselines --which last --output runs/glue/table.md

Prints two markdown tables (dev scores x 100, best epoch, or the last with --which last):

1. The paper's layout, one row per method and setting, one column per task: the **median over seeds**, e.g. "60.5"
   (CoLA Matthews), "87.5/91.2" (MRPC accuracy/F1), "88.0/88.1" (MNLI m/mm), "89.5/89.2" (STS-B Pearson/Spearman),
   with the number of seeds; the published LoftQ numbers (configs/glue_reference.yaml) as reference rows.
2. Seed statistics per row, task and metric: n, median, mean ± sd, and for every method that has a --baseline run
   (default loftq) with the same settings on shared seeds, the paired difference method - baseline with its 95 %
   bootstrap interval (llmm.stats).

Runs are pooled as seeds only when the ``cell`` their results.json records (every setting but the seed: method,
backbone, rank, K, llmmscale, eval noise mode, Monte-Carlo samples, ...) is equal; runs that differ in anything else
are separate rows, labelled by the settings that tell them apart. Two runs of one cell with the same seed are an
error. Runs whose results.json is not marked complete are left out (and listed on stderr).
"""

from __future__ import annotations

from llmm.run.cli import complete_runs, run_main, table_main
from llmm.run.glue_report import build, gather, markdown


def main(argv: list[str] | None = None) -> str:
    flags = {"--which": dict(choices=("best", "last"), default="best", help="epoch to report"),
             "--no_reference": dict(action="store_true", help="leave out the published LoftQ rows")}
    return table_main(__doc__, argv, "loftq", lambda args: markdown(
        build(complete_runs(*gather(args.paths, args.which)), args.baseline), args.baseline,
        references=not args.no_reference), flags)


if __name__ == "__main__":
    run_main(main)
