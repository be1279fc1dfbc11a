"""BBC News preparation: dedupe, split sizes, stratification, stable label ids (on a tiny folder tree)."""

import csv
import json
from collections import Counter

import pytest

from llmm.tasks.bbcnews import split_corpus, write_split


def prepare(out_dir, corpus_dir, **split):
    return write_split(out_dir, split_corpus(corpus_dir, **split))


def make_corpus(root, per_class=20):
    # Created in non-alphabetical order: label ids must follow sorted names, not creation/filesystem order.
    for name in ["tech", "business", "sports"]:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{i:03d}.txt").write_text(f"{name} story {i}\n\nbody  of {name} {i}")
    (root / "tech" / "900.txt").write_text("tech story 3\n\nbody of tech 3")  # same text after whitespace folding
    (root / "business" / "901.txt").write_text("shared text")
    (root / "sports" / "902.txt").write_text("shared text")  # one text under two classes: dropped


def read(path):
    with open(path, newline="") as handle:
        return [(row["sentence"], int(row["label"])) for row in csv.DictReader(handle)]


def test_prepare_dedupes_and_splits_stratified(tmp_path):
    make_corpus(tmp_path / "corpus")
    report = prepare(tmp_path / "out", tmp_path / "corpus", seed=3, dev_fraction=0.2, test_fraction=0.2)
    assert report["classes"] == ["business", "sports", "tech"]
    assert json.loads((tmp_path / "out" / "labels.json").read_text()) == {"0": "business", "1": "sports", "2": "tech"}
    assert report["documents"] == 63 and report["duplicates_dropped"] == 3
    splits = {name: read(tmp_path / "out" / f"{name}.csv") for name in ("train", "dev", "test")}
    assert {name: len(rows) for name, rows in splits.items()} == {"train": 36, "dev": 12, "test": 12}
    texts = [text for rows in splits.values() for text, _ in rows]
    assert len(texts) == len(set(texts)) == 60 and "shared text" not in texts
    for rows in splits.values():
        assert set(Counter(label for _, label in rows).values()) == {len(rows) // 3}  # stratified
    assert all(text.startswith(report["classes"][label]) for rows in splits.values() for text, label in rows)
    again = prepare(tmp_path / "again", tmp_path / "corpus", seed=3, dev_fraction=0.2, test_fraction=0.2)
    assert again == report and read(tmp_path / "again" / "dev.csv") == splits["dev"]  # seeded


def test_missing_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare(tmp_path / "out", tmp_path / "nowhere")


def test_the_quick_start_checks_the_split_before_it_writes(tmp_path, capsys):
    """A corpus too small to split is one error line, and the output directory is never created."""
    from llmm.run.cli import run_main
    from scripts import quickstart

    for name in ("business", "entertainment", "politics", "sports", "tech"):
        (tmp_path / "corpus" / name).mkdir(parents=True)
        (tmp_path / "corpus" / name / "1.txt").write_text(f"one {name} story")
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: quickstart.main(["--corpus_dir", str(tmp_path / "corpus"), "--output_dir",
                                          str(tmp_path / "out")]))
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and line.startswith("error: too few documents for a stratified split")
    assert "dev_fraction / test_fraction" in line and not (tmp_path / "out").exists()
