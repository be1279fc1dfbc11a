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

import argparse
import sys
from llmm.run.cli import run_main
from llmm.run.fileio import write_text
from llmm.run.glue_report import gather, build, markdown


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), allow_abbrev=False)
    parser.add_argument("paths", nargs="+", help="run directories (searched recursively) or results.json files")
    parser.add_argument("--which", choices=("best", "last"), default="best", help="epoch to report")
    parser.add_argument("--baseline", default="loftq", help="method the others are paired with (same settings, "
                        "same seeds)")
    parser.add_argument("--no_reference", action="store_true", help="leave out the published LoftQ rows")
    parser.add_argument("--output", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    records, skipped = gather(args.paths, args.which)
    for file in skipped:
        print(f"skipped (incomplete): {file}", file=sys.stderr)
    if not records:
        raise ValueError(f"none of the {len(skipped)} results.json files is complete: let the runs finish (or "
                         "continue them with --resume_from_checkpoint)")
    text = markdown(build(records, args.baseline), args.baseline, references=not args.no_reference)
    if args.output:
        write_text(args.output, text)
    print(text, end="")
    return text


if __name__ == "__main__":
    run_main(main)
