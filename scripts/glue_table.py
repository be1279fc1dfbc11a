"""Gather GLUE runs into the paper's layout, with seed statistics and paired differences against LoftQ.

    python -m scripts.glue_table runs/glue                       # every results.json below runs/glue
    python -m scripts.glue_table runs/glue runs/baselines --which last --output runs/glue/table.md

Prints two markdown tables of dev scores x 100 (best epoch, or the last with --which last): the paper's layout
(per method and task the median over seeds, e.g. "87.5/91.2" for MRPC accuracy/F1, beside the published LoftQ rows
of configs/glue_reference.yaml), then per row, task and metric: n, median, mean ± sd and the paired difference
against a --baseline run (default loftq) of the same settings on shared seeds, with its 95 % bootstrap interval.
Runs are pooled as seeds only when their ``cell`` (every setting but the seed) is equal (llmm.stats); rows are
labelled by the settings that tell them apart. Incomplete runs are left out (and listed on stderr).
"""

from __future__ import annotations

from llmm.run.cli import complete_runs, run_main, table_main
from llmm.run.glue_report import build, gather, markdown


def main(argv: list[str] | None = None) -> str:
    flags = {"--which": dict(choices=("best", "last"), default="best", help="epoch to report"),
             "--no_reference": dict(action="store_true", help="leave out the published LoftQ rows")}
    return table_main(__doc__, argv, "loftq", lambda args: markdown(
        build(complete_runs(*gather(args.paths, args.which), args.given_baseline), args.baseline), args.baseline,
        references=not args.no_reference), flags)


if __name__ == "__main__":
    run_main(main)
